"""Workers: the registry (service.py), the Membridge sync (sync.py), liveness (liveness.py)."""
