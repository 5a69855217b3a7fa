"""The agent install script: no secret in it, no query value that runs as shell code,
clean under bash -n and shellcheck, and what it writes on a node, run with stand-in git,
python3 and systemctl in a scratch HOME (no network)."""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path
from urllib.parse import quote

import pytest

from bloom import create_app
from bloom.services import services

from .conftest import make_settings

AGENT_KEY = "agent-key-not-in-any-script"
RUNTIME_KEY = "runtime-key-not-in-any-script"
HOSTILE = "$(touch /tmp/bloom-pwned); `touch /tmp/bloom-pwned`; ' \" \\ ; rm -rf ~ #"


@pytest.fixture
def app(database_url):
    app = create_app(make_settings(database_url, MEMBRIDGE_AGENT_KEY=AGENT_KEY, RUNTIME_API_KEY=RUNTIME_KEY,
                                   BLOOM_PUBLIC_URL="https://bloom.example.test"))
    yield app
    services(app).database.dispose()


def _script(client, **params) -> str:
    query = "&".join(f"{key}={quote(str(value), safe='')}" for key, value in params.items())
    response = client.get(f"/api/runtime/agent-install-script?{query}", headers={"Host": "evil.example"})
    assert response.status_code == 200, response.get_json()
    assert response.mimetype == "text/plain"
    return response.get_data(as_text=True)


def _stand_ins(bin_dir: Path, log: Path) -> None:
    """git, python3, systemctl, hostname and id that do what the script needs, and log it."""
    tools = {
        "git": 'echo "git $*" >> "$LOG"; if [ "$1" = clone ]; then mkdir -p "$3/.git"; '
               'touch "$3/requirements.txt"; fi',
        "python3": 'echo "python3 $*" >> "$LOG"; if [ "$2" = venv ]; then mkdir -p "$3/bin"; '
                   'printf \'#!/bin/sh\\necho "pip $*" >> "$LOG"\\n\' > "$3/bin/pip"; chmod +x "$3/bin/pip"; fi',
        "systemctl": 'echo "systemctl $*" >> "$LOG"',
        "hostname": 'echo node-from-hostname',
        "id": 'echo 0',
    }
    for name, body in tools.items():
        path = bin_dir / name
        path.write_text(f"#!/bin/sh\n{body}\n")
        path.chmod(path.stat().st_mode | stat.S_IEXEC)


def _run(script: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    bin_dir, home = tmp_path / "bin", tmp_path / "home"
    bin_dir.mkdir(exist_ok=True)
    home.mkdir(exist_ok=True)
    log = tmp_path / "calls.log"
    _stand_ins(bin_dir, log)
    base = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(home), "LOG": str(log),
            "SYSTEMD_UNIT_DIR": str(tmp_path / "units")}
    return subprocess.run(["bash", "-s"], input=script, capture_output=True, text=True, timeout=30,
                          env={**base, **env})


def test_the_script_holds_no_secret_and_no_address_from_the_request(client):
    script = _script(client, node_id="rpi4b")
    assert AGENT_KEY not in script and RUNTIME_KEY not in script
    assert "RUNTIME_URL=https://bloom.example.test" in script and "evil.example" not in script
    assert _script(client, server_url="http://10.0.0.5:3002").count("RUNTIME_URL=http://10.0.0.5:3002") == 1


@pytest.mark.slow  # starts processes of its own
def test_hostile_values_stay_values(client, tmp_path):
    Path("/tmp/bloom-pwned").unlink(missing_ok=True)
    script = _script(client, node_id=HOSTILE, repo_url="https://example.org/x.git")
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    if shutil.which("shellcheck"):
        checked = subprocess.run(["shellcheck", "-s", "bash", "-"], input=script, capture_output=True, text=True)
        assert checked.returncode == 0, checked.stdout
    else:
        pytest.fail("shellcheck is not installed (Debian package shellcheck; .ci/run installs it)")
    done = _run(script, tmp_path, MEMBRIDGE_AGENT_KEY=AGENT_KEY, RUNTIME_API_KEY=RUNTIME_KEY)
    assert done.returncode == 0, done.stderr
    assert not Path("/tmp/bloom-pwned").exists()
    env_file = (tmp_path / "home" / "membridge" / "agent.env").read_text()
    assert f"MEMBRIDGE_NODE_ID={HOSTILE}\n" in env_file


def test_on_a_node_it_clones_installs_writes_its_env_and_unit_and_starts(client, tmp_path):
    script = _script(client, port=8111)
    refused = _run(script, tmp_path)  # no keys in the shell: a clear stop, nothing done
    assert refused.returncode == 1 and "Set MEMBRIDGE_AGENT_KEY and RUNTIME_API_KEY" in refused.stderr
    assert not (tmp_path / "home" / "membridge").exists()

    done = _run(script, tmp_path, MEMBRIDGE_AGENT_KEY=AGENT_KEY, RUNTIME_API_KEY=RUNTIME_KEY)
    assert done.returncode == 0, done.stderr
    home = tmp_path / "home"
    env_file = home / "membridge" / "agent.env"
    assert env_file.read_text().splitlines() == [
        "MEMBRIDGE_SERVER_URL=http://127.0.0.1:8000", "BLOOM_RUNTIME_URL=https://bloom.example.test",
        "MEMBRIDGE_NODE_ID=node-from-hostname", "MEMBRIDGE_AGENT_PORT=8111",
        f"MEMBRIDGE_AGENT_KEY={AGENT_KEY}", f"RUNTIME_API_KEY={RUNTIME_KEY}",
    ]
    assert oct(env_file.stat().st_mode & 0o777) == "0o600"
    unit = (tmp_path / "units" / "membridge-agent.service").read_text()
    assert f"EnvironmentFile={env_file}" in unit and "--port 8111" in unit and "node-from-hostname" in unit
    calls = (tmp_path / "calls.log").read_text().splitlines()
    assert calls[0] == f"git clone https://github.com/maxfraieho/membridge.git {home}/membridge"
    assert "systemctl daemon-reload" in calls and "systemctl enable --now membridge-agent.service" in calls
    assert any(line.startswith("pip install --quiet -r") for line in calls)
    assert os.environ.get("MEMBRIDGE_AGENT_KEY") != AGENT_KEY  # nothing leaked into this process either


def test_bad_query_values_are_refused(client):
    for query in ("port=0", "port=abc", "server_url=ftp://x", "repo_url=file:///etc", "node_id="):
        assert client.get(f"/api/runtime/agent-install-script?{query}").status_code == 400, query
