"""The README's quick start works when pasted: its block runs as written against a
served instance (only the port and the interpreter's path are this test's)."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest
import requests

from .support import REPO_ROOT, GunicornServer


@pytest.mark.slow  # starts processes of its own
def test_the_quick_start_runs_as_written(database_url):
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"<!-- quickstart -->\n```sh\n(.*?)```\n<!-- /quickstart -->", readme, re.S).group(1)
    served = GunicornServer({"DATABASE_URL": database_url}, workers=2)
    try:
        # This test's port, and the interpreter running the tests (the checkout's .venv in `make test`).
        script = block.replace("127.0.0.1:3002", f"127.0.0.1:{served.port}").replace(".venv/bin/python", sys.executable)
        result = subprocess.run(["bash", "-e", "-c", script + "\nwait\n"], cwd=REPO_ROOT, capture_output=True,
                                text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        out = result.stdout
        assert '"status":"completed"' in out and '"output":"THE CAT SAT ON THE MAT"' in out, out
        assert '"id":"laptop"' in out and '"status":"online"' in out
        assert '"status":"cancelled"' in out
        tasks = requests.get(served.url("/api/runtime/llm-tasks"), timeout=10).json()
        assert sorted(t["status"] for t in tasks) == ["cancelled", "completed"]
    finally:
        served.stop()
