"""Records: artifacts, audit, stats (service.py) and retention (retention.py)."""
