"""The CI side of the OTA pipeline: build, sign and publish releases (`otad-release`)."""
