"""The move off the embedded PostgreSQL, run as docs/OPERATIONS.md writes it: every table
arrives (the documented list once left two out, and the projects were lost)."""
from __future__ import annotations

import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from bloom import create_app
from bloom.services import services

from .conftest import make_settings
from .support import REPO_ROOT

pytestmark = pytest.mark.slow  # an embedded server and bash of its own

_POPULATE = """
from bloom import create_app
from bloom.services import services
app = create_app()
client = app.test_client()
assert client.post("/api/runtime/projects", json={"name": "garden", "repo_url": "https://x.org/g.git"}).status_code == 201
assert client.post("/api/runtime/llm-tasks", json={"context_id": "c", "agent_slug": "a", "prompt": "moved"}).status_code == 201
services(app).database.dispose()
"""


def _libpq_url(admin_url, database: str) -> str:
    url = make_url(str(admin_url)) if not hasattr(admin_url, "query") else admin_url
    socket_dir = url.query.get("host")
    where = f"/{database}?host={socket_dir}" if socket_dir else f"{url.host}:{url.port or 5432}/{database}"
    return f"postgresql://{url.username or 'postgres'}@{where}"


def test_the_documented_move_carries_every_table(postgres, tmp_path):
    # psql: the one that ships with the embedded server, where no system one is installed.
    from bloom.embedded_postgres import import_pgserver

    server_bin = Path(import_pgserver().__file__).parent / "pginstall18" / "bin"
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin:{server_bin}", "HOME": str(tmp_path),
           "BLOOM_DATA_DIR": ".bloom", "BLOOM_LOG_LEVEL": "WARNING"}
    made = subprocess.run([sys.executable, "-c", _POPULATE], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert made.returncode == 0, made.stderr
    guide = (REPO_ROOT / "docs" / "OPERATIONS.md").read_text(encoding="utf-8")
    block = re.search(r"<!-- database-move -->\n```sh\n(.*?)```\n<!-- /database-move -->", guide, re.S).group(1)
    target = f"bloom_moved_{uuid.uuid4().hex[:8]}"
    script = (block.replace(".venv/bin/python", sys.executable)
              .replace("ADMIN_URL=postgresql://admin:secret@db.example.com:5432/postgres",
                       f"ADMIN_URL='{_libpq_url(postgres.admin_url, 'postgres')}'")
              .replace("export DATABASE_URL=postgresql://bloom:secret@db.example.com:5432/bloom",
                       f"export DATABASE_URL='{_libpq_url(postgres.admin_url, target)}'")
              .replace("CREATE DATABASE bloom'", f"CREATE DATABASE {target}'")
              .replace("make run\n", ""))
    assert "db.example.com" not in script and "make run" not in script
    moved = subprocess.run(["bash", "-e", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=120)
    assert moved.returncode == 0, moved.stderr
    app = create_app(make_settings(postgres.url_for(target)))
    try:
        client = app.test_client()
        assert [p["name"] for p in client.get("/api/runtime/projects").get_json()] == ["garden"]
        assert [t["prompt"] for t in client.get("/api/runtime/llm-tasks").get_json()] == ["moved"]
    finally:
        services(app).database.dispose()
        postgres.drop_database(target)
