"""otad: over-the-air updates and telemetry for robot fleets behind unreliable links."""

__version__ = "0.1.0"
