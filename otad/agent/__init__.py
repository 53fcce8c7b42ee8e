"""`telemetry-agent`: the robot's metrics and update events, spooled durably and posted to the gateway."""
