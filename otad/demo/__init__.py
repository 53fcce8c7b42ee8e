"""`make demo` (`python -m otad.demo`) and the loopback tools it runs a fleet with."""
