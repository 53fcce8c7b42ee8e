"""Telemetry shared by agent, gateway and dashboard: the record format and token files."""
