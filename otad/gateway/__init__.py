"""`otad-gateway`: the site's trust boundary and distribution hub (and, later, telemetry relay)."""
