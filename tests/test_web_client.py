"""The frontend's web client, replayed: its three pages' loads, polls and buttons, in its
order and with its bodies (POSTs "without body" send none and no Content-Type), through
a real nginx with its own login that adds the operator key for the browser, while the
agents call the runtime directly with the runtime key. Every answer the client reads must
be 2xx, as it shows anything else as a failure."""
from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import requests

from .fake_agent import AGENT_KEY
from .fake_membridge import ADMIN_KEY, PROJECTS
from .support import free_port, wait_until

WORKER_KEY = "runtime-key-for-agents"
OPERATOR_KEY = "operator-key-behind-the-login"
LOGIN = ("alice", "wonderland")

NGINX_CONF = """
{user}
worker_processes 1;
daemon off;
pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {root}/body;
    proxy_temp_path {root}/proxy;
    fastcgi_temp_path {root}/fastcgi;
    uwsgi_temp_path {root}/uwsgi;
    scgi_temp_path {root}/scgi;
    upstream bloom_runtime {{
        server 127.0.0.1:{upstream};
        keepalive 8;
        keepalive_timeout 4s;   # below gunicorn's keepalive (5 s), so nginx never reuses a closed one
    }}
    server {{
        listen 127.0.0.1:{port};
        client_max_body_size 16m;
        # Outside the login, with no key added: a node's `curl ... | bash` and the health check.
        location = /api/runtime/agent-install-script {{ proxy_pass http://bloom_runtime; }}
        location = /api/runtime/health {{ proxy_pass http://bloom_runtime; }}
        location / {{
            auth_basic "BLOOM Runtime";
            auth_basic_user_file {root}/htpasswd;
            proxy_pass http://bloom_runtime;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_set_header X-Runtime-API-Key "{operator_key}";
            proxy_read_timeout 75s;
        }}
    }}
}}
"""


@pytest.fixture
def nginx_front(tmp_path):
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if nginx is None:
        pytest.fail("nginx is not installed (Debian package nginx-light; .ci/run installs it)")
    started = []

    def start(upstream_port: int) -> str:
        root, port = tmp_path / "nginx", free_port()
        for folder in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (root / folder).mkdir(parents=True, exist_ok=True)
        (root / "htpasswd").write_text(f"{LOGIN[0]}:{{PLAIN}}{LOGIN[1]}\n")
        conf = root / "nginx.conf"
        # As root, nginx's workers would run as nobody, who cannot read this test's private files.
        user = "user root;" if os.geteuid() == 0 else ""
        conf.write_text(NGINX_CONF.format(user=user, root=root, upstream=upstream_port, port=port,
                                          operator_key=OPERATOR_KEY))
        process = subprocess.Popen([nginx, "-c", str(conf), "-p", str(root)], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE)
        started.append(process)
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: _answers(url), timeout=10, what="nginx to listen")
        return url

    yield start
    for process in started:
        process.terminate()
        process.wait(timeout=10)


def _answers(url: str) -> bool:
    try:
        return requests.get(f"{url}/api/runtime/health", timeout=1).status_code in (200, 401)
    except requests.RequestException:
        return False


class Browser:
    """The web client's calls: relative URLs through the frontend's proxy, cookies (here:
    the proxy's login) and no key of its own."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.session = requests.Session()
        self.session.auth = LOGIN

    def get(self, path: str):
        return self._checked(self.session.get(self.base + path, timeout=30))

    def post(self, path: str, body=None):
        if body is None:  # "no body": no body and no Content-Type
            return self._checked(self.session.post(self.base + path, timeout=30))
        return self._checked(self.session.post(self.base + path, json=body, timeout=30))

    def delete(self, path: str):
        return self._checked(self.session.delete(self.base + path, timeout=30))

    @staticmethod
    def _checked(response):
        assert 200 <= response.status_code < 300, f"{response.request.method} {response.url}: " \
                                                  f"{response.status_code} {response.text[:300]}"
        return response.json() if response.content else None


def test_the_web_clients_pages_work_through_a_proxy_with_its_own_login(fleet_server, agents, membridge,
                                                                        nginx_front):
    served = fleet_server(RUNTIME_API_KEY=WORKER_KEY, BLOOM_OPERATOR_KEY=OPERATOR_KEY, BLOOM_DISPATCH="off")
    front = nginx_front(served.port)
    assert requests.get(f"{front}/api/runtime/llm-tasks", timeout=10).status_code == 401  # nginx's login
    # A node installs its agent through the same front, without the login (it used to get
    # nginx's 401 page, which `curl ... | bash` then ran).
    script = requests.get(f"{front}/api/runtime/agent-install-script?node_id=rpi4b&server_url={front}", timeout=10)
    assert script.status_code == 200 and script.text.startswith("#!/usr/bin/env bash")
    assert requests.get(f"{front}/api/runtime/health", timeout=10).status_code == 200
    assert requests.get(served.url("/api/runtime/llm-tasks"), timeout=10).status_code == 401  # no key: no entry
    browser = Browser(front)
    agent = agents("rpi4b", runtime_api_key=WORKER_KEY)  # agents call the runtime directly
    assert agent.register(served.base_url).status_code == 201
    membridge.add_agent("rpi4b", agent.url)

    # Runtime page: load, polls, settings, test, create and dispatch, per-row buttons.
    browser.get("/api/runtime/config")
    for path in ("/api/runtime/workers", "/api/runtime/leases", "/api/runtime/llm-tasks", "/api/runtime/stats"):
        browser.get(path)
    browser.post("/api/runtime/config", {"membridge_server_url": membridge.url, "admin_key": ADMIN_KEY})
    tested = browser.post("/api/runtime/test-connection")
    assert tested["connected"] is True
    assert browser.get("/api/runtime/config")["connected"] is True
    # The agent registered itself with the workers' key: it is sent tasks once Membridge,
    # now configured, lists it (README, "Security"); the Runtime page shows it approved.
    wait_until(lambda: any(w["id"] == "rpi4b" and w["approved"] for w in browser.get("/api/runtime/workers")),
               timeout=10, what="the Membridge sync to vouch for the agent")
    task = browser.post("/api/runtime/llm-tasks", {
        "prompt": "Summarize the notebook", "context_id": f"ctx-{int(time.time() * 1000)}", "agent_slug": "default",
        "desired_format": "text", "policy": {"timeout_sec": 120, "budget": 0}})
    dispatched = browser.post(f"/api/runtime/llm-tasks/{task['id']}/dispatch")  # at once, as the client does
    assert dispatched["dispatched"] is True and dispatched["worker_id"] == "rpi4b"
    wait_until(lambda: browser.get(f"/api/runtime/llm-tasks/{task['id']}")["status"] == "completed", timeout=15,
               what="the dispatched task to run")
    failing = browser.post("/api/runtime/llm-tasks", {
        "prompt": "will fail", "context_id": "ctx-1", "agent_slug": "default", "desired_format": "text",
        "policy": {"timeout_sec": 120, "budget": 0}, "max_attempts": 1})
    as_worker = {"X-Runtime-API-Key": WORKER_KEY}  # a pull worker, straight to the runtime
    requests.post(served.url("/api/runtime/workers"), json={"name": "puller"}, headers=as_worker, timeout=10)
    claimed = requests.post(served.url("/api/runtime/workers/puller/claim"), json={}, headers=as_worker,
                            timeout=10).json()
    assert claimed["task"]["id"] == failing["id"]
    requests.post(served.url(f"/api/runtime/llm-tasks/{failing['id']}/complete"), headers=as_worker, timeout=10,
                  json={"status": "error", "output": None, "error_message": "model exploded",
                        "metrics": {"duration_ms": 5}, "lease_id": claimed["lease"]["id"]})
    assert browser.get(f"/api/runtime/llm-tasks/{failing['id']}")["status"] == "failed"
    assert any(t["id"] == failing["id"] for t in browser.get("/api/runtime/llm-tasks"))  # its Requeue button
    browser.post(f"/api/runtime/llm-tasks/{failing['id']}/requeue")

    # Idle past gunicorn's keepalive (5 s), then a POST. (nginx drops a pooled connection that
    # gunicorn closed while idle; the 502 the issue saw is the race where gunicorn closes one
    # just as nginx sends on it, which `keepalive_timeout 4s` upstream rules out by closing first.)
    time.sleep(6)
    browser.post("/api/runtime/config", {"membridge_server_url": membridge.url, "admin_key": ADMIN_KEY})

    # Membridge page.
    cid = PROJECTS[0]["canonical_id"]
    browser.get("/api/membridge/projects")
    assert browser.get("/api/runtime/projects") == []
    browser.get(f"/api/membridge/projects/{cid}/leadership")
    browser.get(f"/api/membridge/projects/{cid}/nodes")
    browser.post(f"/api/membridge/projects/{cid}/leadership/select", {"primary_node_id": "rpi4b", "lease_seconds": 60})
    project = browser.post("/api/runtime/projects", {"name": "garden-seedling", "repo_url": "https://x.org/g.git",
                                                     "target_path": "~/garden", "primary_node_id": "rpi4b"})
    assert browser.post(f"/api/runtime/projects/{project['id']}/clone", {})["status"] == "cloned"
    assert browser.post(f"/api/runtime/projects/{project['id']}/propagate", {})["status"] == "nothing_to_propagate"
    assert browser.get(f"/api/runtime/projects/{project['id']}/node-status")[0]["clone_status"] == "cloned"
    assert browser.post(f"/api/runtime/projects/{project['id']}/sync-memory", {"direction": "push"})["status"] == "ok"
    browser.delete(f"/api/runtime/projects/{project['id']}")

    # Nodes page.
    browser.get("/api/runtime/workers")
    spare = agents("spare-node", runtime_api_key=WORKER_KEY)
    browser.post("/api/runtime/workers", {"name": "spare-node", "url": spare.url, "status": "unknown"})
    health = browser.get("/api/runtime/workers/spare-node/agent-health")
    assert health["reachable"] is True
    node = next(w for w in browser.get("/api/runtime/workers") if w["id"] == "spare-node")
    assert (node["agent_version"], node["os_info"], node["status"]) == ("0.4.2", "spare-node-host", "online")
    assert browser.post("/api/runtime/workers/spare-node/agent-update", {})["status"] == "updated"
    assert browser.post("/api/runtime/workers/spare-node/agent-restart", {})["status"] == "restarted"
    assert browser.post("/api/runtime/workers/spare-node/agent-uninstall", {})["status"] == "uninstalled"
    browser.delete("/api/runtime/workers/spare-node")
    script = browser.session.get(f"{front}/api/runtime/agent-install-script?node_id=rpi4b", timeout=10)
    assert script.status_code == 200 and script.text.startswith("#!/usr/bin/env bash")
    assert OPERATOR_KEY not in script.text and WORKER_KEY not in script.text and AGENT_KEY not in script.text
