"""Push delivery: the runtime sends tasks to agents (Membridge nodes) and follows them."""
