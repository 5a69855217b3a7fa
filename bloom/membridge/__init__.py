"""Membridge, the control plane: its HTTP client and the settings that point at it."""
