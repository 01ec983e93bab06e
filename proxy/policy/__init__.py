"""The policy engine: what may run, and how it is rewritten.  Knows SQL, not sockets."""
