"""Training recipes built on verl (installed as a pinned dependency)."""
