"""A small real HTTP server that behaves as a Membridge agent was measured to, quirks included
(README, "Tests").

- It registers once, at its start (`register`), and never again.
- `POST /execute-task` (header X-MEMBRIDGE-AGENT) answers only when the run has ended:
  one task heartbeat with no body before the run, the run (`run_seconds`), then a
  completion callback with `"tokens_used": null` and no lease or worker id, then the
  answer `{"ok": true, "task_id", "output", "duration_ms"}`. A failed callback is only
  recorded, never retried.
- Modes: `no_cli` answers 503 "Claude CLI is not installed on this node" at once;
  `drop_callback` runs but never calls back; `die_mid_run` dies after its heartbeat
  (the process is gone: its port refuses connections, its open requests are cut);
  `fail_next` answers the next delivery 500, then runs normally again; `black_hole`
  takes the task (heartbeat) and never answers nor completes, while its /health says ok;
  `trickle` answers a delivery one byte a second; `fail_runs` fails every run at once
  (heartbeat, an error completion, `{"ok": false}`); `silent_trickle` takes a delivery,
  never heartbeats, and answers a byte a second.
- `GET /health` answers 200 while it lives, with its version, hostname, capabilities and
  addresses; `GET /system-info` too. Its operations (`POST /self-update`, `/restart`,
  `/uninstall`, `/clone`) need the agent key, answer `{"ok": true, ...}` (a self-update
  moves its version to 0.5.0; a clone refuses names outside `[A-Za-z0-9_.-]` with a 422
  list), or 500 when `operations_fail` is set.
- `freeze()` is a SIGSTOP (a partition, an overloaded host): the agent still accepts
  connections but answers nothing and calls nobody; its runs stand still. `thaw()`
  resumes it where it stopped: late answers, late callbacks, as the real one would.
"""
from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import quote

import requests

from .fake_membridge import _Server
from .support import free_port

AGENT_KEY = "membridge-agent-secret-key"


@dataclass
class AgentState:
    agent_key: str
    runtime_api_key: str | None
    mode: str = "normal"
    fail_detail: str = "agent error"  # what `fail_next` says
    version: str = "0.4.2"
    operations: list[tuple[str, Any]] = field(default_factory=list)  # (path, body) of operations asked
    operations_fail: bool = False
    run_seconds: float = 0.05
    output_bytes: int = 0  # an output this large (its callback and its answer carry it), else a short line
    executed: list[str] = field(default_factory=list)
    deliveries: list[dict[str, Any]] = field(default_factory=list)
    delivery_peers: list[tuple[str, int]] = field(default_factory=list)  # the runtime's end of each delivery
    callbacks: list[tuple[str, str, int]] = field(default_factory=list)  # (kind, task_id, status)
    runs: list[tuple[str, float, float]] = field(default_factory=list)  # (task_id, started, ended): time.time()
    seen: list[tuple[str, str, bool]] = field(default_factory=list)  # (method, path, carried the agent key)
    running: int = 0
    most_running: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


class FakeAgent:
    def __init__(self, name: str, *, runtime_api_key: str | None = None, agent_key: str = AGENT_KEY,
                 mode: str = "normal", run_seconds: float = 0.05, max_concurrency: int = 2,
                 address: str = "127.0.0.1") -> None:
        self.name = name
        self.max_concurrency = max_concurrency
        self.state = AgentState(agent_key, runtime_api_key, mode=mode, run_seconds=run_seconds)
        self.port = free_port()
        self.url = f"http://{address}:{self.port}"
        self._http = requests.Session()
        self._server = _Server((address, self.port), _handler(self))
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        self.alive = True
        self.awake = threading.Event()
        self.awake.set()

    def freeze(self) -> None:
        self.awake.clear()

    def thaw(self) -> None:
        self.awake.set()

    # What the real agent does once, at its start.
    def register(self, runtime_url: str) -> requests.Response:
        body = {
            "name": self.name, "url": self.url, "status": "online",
            "capabilities": {"claude_cli": True, "max_concurrency": self.max_concurrency, "labels": []},
            "ip_addrs": ["127.0.0.1"], "agent_version": "0.4.2",
            "os_info": "Linux 6.1 x86_64", "install_method": "pipx",
        }
        return self._http.post(f"{runtime_url}/api/runtime/workers", json=body, headers=self._headers(), timeout=10)

    def kill(self) -> None:
        """Gone: its port refuses connections and its open requests are cut."""
        self.awake.set()  # frozen handlers run out, into a closed server
        if self.alive:
            self.alive = False
            self._server.shutdown()
            self._server.server_close()
            self._server.close_connections()

    def outputs(self) -> list[str]:
        with self.state.lock:
            return list(self.state.executed)

    def _headers(self) -> dict[str, str]:
        key = self.state.runtime_api_key
        return {"X-Runtime-API-Key": key} if key else {}

    def callback(self, runtime_url: str, task_id: str, kind: str, body: Any = None) -> None:
        self.awake.wait()
        url = f"{runtime_url}/api/runtime/llm-tasks/{quote(task_id, safe='')}/{kind}"
        try:
            status = self._http.post(url, json=body, headers=self._headers(), timeout=10).status_code
        except requests.RequestException:
            status = 0  # only logged by the real agent, never retried
        with self.state.lock:
            self.state.callbacks.append((kind, task_id, status))


def _handler(agent: FakeAgent):
    state = agent.state

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            return

        def _send(self, status: int, body: Any) -> None:
            agent.awake.wait()
            payload = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def _note(self) -> None:
            with state.lock:
                state.seen.append((self.command, self.path, self.headers.get("X-MEMBRIDGE-AGENT") == state.agent_key))

        def do_GET(self):
            self._note()
            agent.awake.wait()
            if self.path == "/health":
                return self._send(200, {
                    "status": "ok", "node": agent.name, "version": state.version, "hostname": f"{agent.name}-host",
                    "capabilities": {"claude_cli": True, "max_concurrency": agent.max_concurrency},
                    "ip_addrs": ["127.0.0.1"]})
            if self.path == "/system-info":
                return self._send(200, {"hostname": f"{agent.name}-host", "os": "Linux"})
            self._send(404, {"detail": "Not Found"})

        def _operation(self, body: dict[str, Any]) -> None:
            """The agent's own API beside /execute-task (README, "Agent operations")."""
            if self.headers.get("X-MEMBRIDGE-AGENT") != state.agent_key:
                return self._send(401, {"detail": "invalid agent key"})
            with state.lock:
                state.operations.append((self.path, body))
            if state.operations_fail:
                return self._send(500, {"detail": "operation failed: " + "x" * 2000})
            if self.path == "/self-update":
                state.version = "0.5.0"
                return self._send(200, {"ok": True, "version": state.version, "detail": "updated"})
            if self.path in ("/restart", "/uninstall"):
                return self._send(200, {"ok": True, "detail": self.path[1:] + " scheduled"})
            if self.path == "/clone":
                name = body.get("project_name", "")
                if not name or not all(c.isalnum() or c in "_.-" for c in name):
                    return self._send(422, {"detail": [{"type": "value_error", "loc": ["body", "project_name"],
                                                        "msg": "invalid project name", "input": name}]})
                return self._send(200, {"ok": True, "path": f"/home/agent/projects/{name}"})
            self._send(404, {"detail": "Not Found"})

        def do_POST(self):
            self._note()
            length = int(self.headers.get("Content-Length") or 0)
            task = json.loads(self.rfile.read(length) or b"{}")
            if self.path != "/execute-task":
                return self._operation(task)
            if self.headers.get("X-MEMBRIDGE-AGENT") != state.agent_key:
                return self._send(401, {"detail": "invalid agent key"})
            with state.lock:
                state.deliveries.append(task)
                state.delivery_peers.append(self.client_address)
                mode = state.mode
            if mode == "no_cli":
                return self._send(503, {"detail": "Claude CLI is not installed on this node"})
            if mode == "fail_next":
                with state.lock:
                    state.mode = "normal"
                return self._send(500, {"detail": state.fail_detail})
            if mode == "silent_trickle":  # takes it, never says a run started, answers a byte a second
                time.sleep(1.0)  # taken (no refusal within the runtime's accept window)
                for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b" " * 100000:
                    if not agent.alive:
                        return
                    try:
                        self.wfile.write(bytes([byte]))
                        self.wfile.flush()
                    except OSError:
                        return
                    time.sleep(1.0)
                return
            if mode == "trickle":
                for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}":
                    if not agent.alive:
                        return
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                    time.sleep(1.0)
                return
            self._run(task, mode)

        def _run(self, task: dict[str, Any], mode: str) -> None:
            runtime_url, task_id = task["runtime_url"], task["task_id"]
            started, started_at = time.monotonic(), time.time()
            agent.callback(runtime_url, task_id, "heartbeat")
            if mode == "black_hole":
                while agent.alive:  # holds the request open for ever, says nothing
                    time.sleep(0.2)
                return
            if mode == "fail_runs":  # every run fails at once (a broken CLI), said as the real agent says it
                agent.callback(runtime_url, task_id, "complete", {
                    "status": "error", "output": None, "error_message": "claude exited with code 1",
                    "metrics": {"duration_ms": 5, "tokens_used": None},
                })
                return self._send(200, {"ok": False, "task_id": task_id, "error": "claude exited with code 1",
                                        "duration_ms": 5})
            if mode == "die_mid_run":
                threading.Thread(target=agent.kill, daemon=True).start()
                time.sleep(1.0)
                return
            with state.lock:  # runs in progress (the CLI processes), what max_concurrency bounds
                state.running += 1
                state.most_running = max(state.most_running, state.running)
            time.sleep(state.run_seconds)
            agent.awake.wait()  # a frozen run stands still
            output = f"{agent.name} ran {task_id}"
            if state.output_bytes:
                output = (output + " ").ljust(state.output_bytes, "x")
            if task.get("desired_format") == "json":  # as the CLI would, asked for JSON
                output = json.dumps({"result": output})
            duration_ms = int((time.monotonic() - started) * 1000)
            with state.lock:
                state.running -= 1
                state.executed.append(task_id)
                state.runs.append((task_id, started_at, time.time()))
            if mode != "drop_callback":
                agent.callback(runtime_url, task_id, "complete", {
                    "status": "success", "output": output, "error_message": None,
                    "metrics": {"duration_ms": duration_ms, "tokens_used": None},
                })
            self._send(200, {"ok": True, "task_id": task_id, "output": output, "duration_ms": duration_ms})

    return Handler
