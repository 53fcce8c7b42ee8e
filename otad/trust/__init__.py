"""Trust decisions: keys, signature bundles, manifests and artifact verification.

Everything here works on bytes and returns facts or raises a `TrustError`;
network and disk stay outside, so the gateway and the robot make exactly the
same decision from the same bytes. `verify.verify_artifact` is the one entry
point the daemons use to accept an artifact.
"""
