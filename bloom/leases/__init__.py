"""Leases and claims: bloom/leases/service.py and the statements beside it."""
