"""The agent install script: no secret in it, no value that runs as shell code — in the
script, in agent.env, or in the OpenRC service and start script it writes, which a shell
sources on the node — clean under bash -n and shellcheck, and what it writes on a node,
run with stand-in git, python3, systemctl or rc-update/rc-service in a scratch HOME (no
network)."""
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
# URL characters a shell makes something of when a value is not quoted: each `pwned` runs
# the stand-in command of that name, which leaves a mark.
SHELLY_URL = "http://h:3002/a;pwned;b&pwned&c#d"


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


def _stand_ins(bin_dir: Path, log: Path, *, init: str, hostname: str) -> None:
    """git, python3 (its venv's pip and python too), the init system's tools, hostname, id
    and `pwned` that do what the script needs, and log it."""
    venv_python = 'printf \'#!/bin/sh\\necho "agent started: node=$MEMBRIDGE_NODE_ID runtime=$BLOOM_RUNTIME_URL ' \
                  'control=$MEMBRIDGE_ALLOW_PROCESS_CONTROL args=$*" >> "$LOG"\\n\' > "$3/bin/python"; '
    tools = {
        "git": 'echo "git $*" >> "$LOG"; if [ "$1" = clone ]; then mkdir -p "$3/.git"; '
               'touch "$3/requirements.txt"; fi',
        "python3": 'echo "python3 $*" >> "$LOG"; if [ "$2" = venv ]; then mkdir -p "$3/bin"; '
                   'printf \'#!/bin/sh\\necho "pip $*" >> "$LOG"\\n\' > "$3/bin/pip"; ' + venv_python +
                   'chmod +x "$3/bin/pip" "$3/bin/python"; fi',
        "hostname": f"echo '{hostname}'",
        "id": "echo 0",
        "pwned": 'echo pwned >> "$LOG"; touch "$PWNED_MARK"',
        **({"systemctl": 'echo "systemctl $*" >> "$LOG"'} if init == "systemd" else {
            "rc-update": 'echo "rc-update $*" >> "$LOG"', "rc-service": 'echo "rc-service $*" >> "$LOG"'}),
    }
    for name, body in tools.items():
        path = bin_dir / name
        path.write_text(f"#!/bin/sh\n{body}\n")
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    # Only what a node needs besides them: no systemctl of this machine's on the OpenRC node.
    for tool in ("sh", "mkdir", "chmod", "touch", "cat", "env"):
        (bin_dir / tool).symlink_to(shutil.which(tool))


def _run(script: str, tmp_path: Path, *, init: str = "systemd", hostname: str = "node-from-hostname",
         **env: str) -> subprocess.CompletedProcess:
    bin_dir, home = tmp_path / "bin", tmp_path / "home"
    shutil.rmtree(bin_dir, ignore_errors=True)
    bin_dir.mkdir()
    home.mkdir(exist_ok=True)
    log = tmp_path / "calls.log"
    _stand_ins(bin_dir, log, init=init, hostname=hostname)
    (tmp_path / "init.d").mkdir(exist_ok=True)  # /etc/init.d on an OpenRC node
    base = {"PATH": str(bin_dir), "HOME": str(home), "LOG": str(log), "PWNED_MARK": str(tmp_path / "pwned"),
            "SYSTEMD_UNIT_DIR": str(tmp_path / "units"), "OPENRC_DIR": str(tmp_path / "init.d")}
    return subprocess.run([shutil.which("bash"), "-s"], input=script, capture_output=True, text=True, timeout=30,
                          env={**base, **env})


def _lint(script: str) -> None:
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    if not shutil.which("shellcheck"):
        pytest.fail("shellcheck is not installed (Debian package shellcheck; .ci/run installs it)")
    checked = subprocess.run(["shellcheck", "-s", "bash", "-"], input=script, capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout


def test_the_script_holds_no_secret_and_no_address_from_the_request(client):
    script = _script(client, node_id="rpi4b")
    assert AGENT_KEY not in script and RUNTIME_KEY not in script
    assert "RUNTIME_URL=https://bloom.example.test" in script and "evil.example" not in script
    assert _script(client, server_url="http://10.0.0.5:3002").count("RUNTIME_URL=http://10.0.0.5:3002") == 1


def test_values_that_would_be_shell_code_are_refused(client):
    for name, value in [("node_id", HOSTILE), ("node_id", 'n1$(touch /tmp/x)"; touch /tmp/x; "'),
                        ("node_id", "n1 n2"), ("server_url", "http://h/$(touch${IFS}/tmp/x)"),
                        ("server_url", "http://h/`id`"), ("server_url", "http://h/a'b"),
                        ("repo_url", "https://h/x.git;$(id)"), ("repo_url", 'https://h/"x')]:
        response = client.get(f"/api/runtime/agent-install-script?{name}={quote(value, safe='')}")
        assert response.status_code == 400, (name, value)
        assert name in response.get_json()["error"]["fieldErrors"]


@pytest.mark.slow  # starts processes of its own
@pytest.mark.parametrize("init", ["openrc", "systemd"])
def test_url_characters_a_shell_reads_stay_values_in_every_file_on_the_node(client, tmp_path, init):
    script = _script(client, node_id="rpi4b", server_url=SHELLY_URL, repo_url="https://example.org/x.git#a;pwned")
    _lint(script)
    done = _run(script, tmp_path, init=init, MEMBRIDGE_AGENT_KEY=AGENT_KEY, RUNTIME_API_KEY=RUNTIME_KEY)
    assert done.returncode == 0, done.stderr
    env_file = tmp_path / "home" / "membridge" / "agent.env"
    assert f"BLOOM_RUNTIME_URL='{SHELLY_URL}'" in env_file.read_text().splitlines()
    # What the service does on the node: openrc-run sources the service file, the start
    # script sources agent.env (systemd reads it as an EnvironmentFile: quotes are its too).
    if init == "openrc":
        service = tmp_path / "init.d" / "membridge-agent"
        read = subprocess.run(["sh", "-c", '. "$1"; printf "%s|%s|%s" "$description" "$command" "$directory"',
                               "sh", str(service)], capture_output=True, text=True, env={"PATH": str(tmp_path / "bin")})
        assert read.returncode == 0, read.stderr
        start_script = tmp_path / "home" / "membridge" / "start-agent.sh"
        assert read.stdout == (f"Membridge agent (BLOOM Runtime node rpi4b)|{start_script}|"
                               f"{tmp_path / 'home' / 'membridge'}")
        started = subprocess.run([str(start_script)], capture_output=True, text=True,
                                 env={"PATH": str(tmp_path / "bin"), "LOG": str(tmp_path / "calls.log"),
                                      "PWNED_MARK": str(tmp_path / "pwned")})
        assert started.returncode == 0, started.stderr
        assert (f"agent started: node=rpi4b runtime={SHELLY_URL} control=1 "
                "args=-m uvicorn agent.main:app --host 0.0.0.0 --port 8001") in (tmp_path / "calls.log").read_text()
    else:
        sourced = subprocess.run(["sh", "-c", 'set -a; . "$1"; printf "%s" "$BLOOM_RUNTIME_URL"', "sh", str(env_file)],
                                 capture_output=True, text=True, env={"PATH": str(tmp_path / "bin")})
        assert sourced.stdout == SHELLY_URL
    assert not (tmp_path / "pwned").exists() and "pwned" not in (tmp_path / "calls.log").read_text().splitlines()


@pytest.mark.slow  # starts processes of its own
def test_a_hostname_or_key_that_cannot_be_quoted_stops_the_install(client, tmp_path):
    script = _script(client)
    refused = _run(script, tmp_path, hostname="node;pwned", MEMBRIDGE_AGENT_KEY=AGENT_KEY, RUNTIME_API_KEY=RUNTIME_KEY)
    assert refused.returncode == 1 and "node id may hold only" in refused.stderr
    refused = _run(_script(client, node_id="n1"), tmp_path, MEMBRIDGE_AGENT_KEY="it's", RUNTIME_API_KEY=RUNTIME_KEY)
    assert refused.returncode == 1 and "MEMBRIDGE_AGENT_KEY may not hold a quote" in refused.stderr
    assert not (tmp_path / "home" / "membridge").exists() and not (tmp_path / "pwned").exists()


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
        "MEMBRIDGE_SERVER_URL='http://127.0.0.1:8000'", "BLOOM_RUNTIME_URL='https://bloom.example.test'",
        "MEMBRIDGE_NODE_ID='node-from-hostname'", "MEMBRIDGE_AGENT_PORT='8111'",
        f"MEMBRIDGE_AGENT_KEY='{AGENT_KEY}'", f"RUNTIME_API_KEY='{RUNTIME_KEY}'",
        "MEMBRIDGE_ALLOW_PROCESS_CONTROL=1",  # the agent refuses update, restart and uninstall without it
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
