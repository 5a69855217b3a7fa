"""A small real HTTP server that speaks the Membridge control plane contract, with the
quirks measured on the real one (README, "Tests"): a new agent is `unknown`, statuses
change only when the control plane itself calls an agent (`poll_agents`) and then stay,
state lives in memory (`restart` empties it), an unknown project answers 200 with empty
data, validation errors are 422 with a list of details, and without its own admin key
configured every admin route answers 500.

Switches make it slow, fail with 5xx, drop connections or answer garbage; every
request it receives is recorded so tests can count retries and check headers.
"""
from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from .support import free_port

ADMIN_KEY = "membridge-admin-secret-key"


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: Any
    at: float = field(default_factory=time.monotonic)  # when it arrived


@dataclass
class FakeMembridgeState:
    admin_key: str | None  # None: started without MEMBRIDGE_ADMIN_KEY configured
    agents: list[Any] = field(default_factory=list)
    mode: str = "normal"  # normal | fail5xx | drop | garbage | slow
    slow_seconds: float = 0.0
    received: list[Received] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self, method: str, path: str) -> int:
        with self.lock:
            return sum(1 for r in self.received if r.method == method and r.path == path)

    def requests_to(self, path: str) -> list[Received]:
        with self.lock:
            return [r for r in self.received if r.path == path]


PROJECTS = [{"name": "notebook", "canonical_id": "cid-1", "created_at": 1.7e9, "last_seen": 1.7e9, "nodes_count": 2, "source": "sync"}]
NODES = [{"node_id": "node-a", "canonical_id": "cid-1", "role": "primary", "obs_count": 12, "db_sha": "abc", "last_seen": 1.7e9, "ip_addrs": ["10.0.0.1"], "registered_at": 1.6e9}]


def _handler(state: FakeMembridgeState):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # keep test output quiet
            return

        def _send(self, status: int, body: Any, raw: bytes | None = None) -> None:
            payload = raw if raw is not None else json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json" if raw is None else "text/plain")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def _handle(self, method: str) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw_body = self.rfile.read(length) if length else b""
            try:
                body = json.loads(raw_body) if raw_body else None
            except ValueError:
                body = raw_body.decode(errors="replace")
            with state.lock:
                state.received.append(Received(method, self.path, dict(self.headers), body))
                mode, slow = state.mode, state.slow_seconds
            if mode == "slow":
                time.sleep(slow)
            if mode == "drop":
                self.close_connection = True
                self.connection.shutdown(2)
                return
            if mode == "fail5xx":
                return self._send(503, {"detail": "control plane overloaded"})
            if mode == "garbage":
                return self._send(200, None, raw=b"<html>definitely not json")
            if self.path == "/health":
                return self._send(200, {"status": "ok", "service": "membridge-control-plane", "version": "0.9.1"})
            if state.admin_key is None:
                return self._send(500, {"detail": "MEMBRIDGE_ADMIN_KEY not configured on server"})
            if self.headers.get("X-MEMBRIDGE-ADMIN") != state.admin_key:
                return self._send(401, {"detail": "invalid admin key"})
            self._route(method, body)

        def _route(self, method: str, body: Any) -> None:
            parts = self.path.split("?")[0].strip("/").split("/")
            if method == "GET" and parts == ["agents"]:
                with state.lock:
                    return self._send(200, state.agents)
            if method == "GET" and parts == ["projects"]:
                return self._send(200, PROJECTS)
            if len(parts) >= 3 and parts[0] == "projects":
                cid = parts[1]
                known = cid in {project["canonical_id"] for project in PROJECTS}
                if method == "GET" and parts[2:] == ["nodes"]:
                    return self._send(200, [dict(node, canonical_id=cid) for node in NODES] if known else [])
                if method == "GET" and parts[2:] == ["leadership"]:
                    if not known:
                        return self._send(200, {"canonical_id": cid, "preferred_primary": None, "node_count": 0, "nodes": []})
                    return self._send(200, {"canonical_id": cid, "preferred_primary": "node-a", "node_count": 1, "nodes": NODES})
                if method == "POST" and parts[2:] == ["leadership", "select"]:
                    if not isinstance(body, dict) or "primary_node_id" not in body:
                        return self._send(422, {"detail": [{
                            "type": "missing", "loc": ["body", "primary_node_id"], "msg": "Field required",
                            "input": body,
                        }]})
                    return self._send(200, {
                        "ok": True, "canonical_id": cid, "primary_node_id": body["primary_node_id"],
                        "lease_seconds": body.get("lease_seconds", 30), "detail": "promoted",
                    })
            if method == "POST" and len(parts) == 2 and parts[0] == "sync":
                return self._sync(parts[1], body)
            self._send(404, {"detail": "Not Found"})

        def _sync(self, direction: str, body: Any) -> None:
            """POST /sync/<push|pull> {project, agent}, as the real control plane takes it:
            other field names are a 422 list; an agent it does not know is a 404."""
            if direction not in ("push", "pull"):
                return self._send(404, {"detail": "Not Found"})
            missing = [name for name in ("project", "agent") if not isinstance(body, dict) or name not in body]
            if missing:
                return self._send(422, {"detail": [
                    {"type": "missing", "loc": ["body", name], "msg": "Field required", "input": body}
                    for name in missing]})
            with state.lock:
                known = {agent["name"] for agent in state.agents}
            if body["agent"] not in known:
                return self._send(404, {"detail": f"Agent '{body['agent']}' not found"})
            import hashlib

            self._send(200, {"ok": True, "project": body["project"], "agent": body["agent"],
                             "canonical_id": hashlib.sha256(body["project"].encode()).hexdigest()[:16],
                             "detail": f"{direction} queued", "job_id": "job-1"})

        def do_GET(self):
            self._handle("GET")

        def do_POST(self):
            self._handle("POST")

    return Handler


class _Server(ThreadingHTTPServer):
    """Remembers its connections so that stopping it also cuts the keep-alive ones."""

    daemon_threads = True
    # The real servers listen with a backlog of 2048 (uvicorn); socketserver's default of 5
    # drops the connections of a burst (a dispatcher's health checks before 256 deliveries).
    request_queue_size = 128

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.connections: set = set()

    def get_request(self):
        connection, address = super().get_request()
        self.connections.add(connection)
        return connection, address

    def close_connections(self) -> None:
        import socket

        for connection in list(self.connections):
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            connection.close()
        self.connections.clear()


class FakeMembridge:
    def __init__(self, admin_key: str | None = ADMIN_KEY) -> None:
        self.state = FakeMembridgeState(admin_key=admin_key)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._server: ThreadingHTTPServer | None = None
        self.start()

    def start(self) -> None:
        self._server = _Server(("127.0.0.1", self.port), _handler(self.state))
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def add_agent(self, name: str, url: str | None) -> None:
        """What the real control plane lists for a newly added agent: `unknown`, never seen."""
        with self.state.lock:
            self.state.agents.append(
                {"name": name, "url": url, "status": "unknown", "registered_at": time.time(), "last_seen": None}
            )

    def poll_agents(self, alive: set[str]) -> None:
        """The control plane's own sync: the only moment an agent's status changes."""
        with self.state.lock:
            for agent in self.state.agents:
                agent["status"] = "online" if agent["name"] in alive else "offline"
                if agent["name"] in alive:
                    agent["last_seen"] = time.time()

    def restart(self) -> None:
        """State is in memory: after a restart /agents is empty."""
        self.stop()
        with self.state.lock:
            self.state.agents = []
        self.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server.close_connections()
            self._server = None
