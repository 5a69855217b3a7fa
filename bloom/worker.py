"""`python -m bloom.worker`, as before the pull client's module was named for what it is
(bloom/pull_client.py)."""
from __future__ import annotations

from .pull_client import main

if __name__ == "__main__":
    main()
