"""A pull-based worker: `python -m bloom.worker --server URL --name NAME -- COMMAND ARGS…`

It registers itself, claims tasks with a long poll, runs COMMAND once per task with the
prompt on stdin and the task as JSON in $BLOOM_TASK, heartbeats (one worker heartbeat
for all its leases) from a background thread at a third of the lease TTL, and completes
the task with COMMAND's stdout (or an error with its stderr and exit code). A lease the
heartbeat reports lost stops the command, and every completion carries the lease id, so
a worker that lost its lease can never complete the task another worker now holds. On SIGTERM it stops claiming, lets the running task finish within the grace
period and exits. It rides out a server restart by retrying with backoff.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any

from urllib.parse import quote

import requests

log = logging.getLogger("bloom.worker")

RETRYABLE_STATUSES = {502, 503, 504}
REREGISTER_EVERY_S = 30.0
MAX_BACKOFF_S = 10.0


class Stopped(Exception):
    """The worker was asked to stop while waiting for the server."""


class RuntimeApi:
    """HTTP calls to the runtime that ride out restarts: retry with backoff until answered."""

    def __init__(self, server: str, api_key: str | None, stopping: threading.Event) -> None:
        self.server = server.rstrip("/")
        self._session = requests.Session()
        if api_key:
            self._session.headers["X-Runtime-API-Key"] = api_key
        self._stopping = stopping

    def call(self, method: str, path: str, body: Any = None, *, timeout: float = 30.0,
             give_up_when_stopping: bool = True, deadline: float | None = None) -> requests.Response:
        backoff = 0.5
        while True:
            try:
                response = self._session.request(method, f"{self.server}{path}", json=body, timeout=timeout)
                if response.status_code not in RETRYABLE_STATUSES:
                    return response
                problem = f"HTTP {response.status_code}"
            except requests.RequestException as error:
                problem = type(error).__name__
            if give_up_when_stopping and self._stopping.is_set():
                raise Stopped()
            if deadline is not None and time.monotonic() + backoff > deadline:
                raise Stopped()
            log.warning("%s %s failed (%s); retrying in %.1fs", method, path, problem, backoff)
            if self._stopping.wait(backoff) and give_up_when_stopping:
                raise Stopped()  # SIGTERM during a backoff stops at once
            backoff = min(backoff * 2, MAX_BACKOFF_S)


class Worker:
    def __init__(self, args: argparse.Namespace) -> None:
        self.name = args.name
        self.command = args.command
        self.ttl_seconds = args.ttl
        self.wait_seconds = args.wait
        self.grace_seconds = args.grace
        self.agent_slugs = args.agent_slug or None
        self.stopping = threading.Event()
        self.abort_at: float | None = None
        self.api = RuntimeApi(args.server, args.api_key, self.stopping)
        self._child: subprocess.Popen | None = None
        self._child_lock = threading.Lock()
        self.completed = 0

    # lifecycle -------------------------------------------------------------------

    def request_stop(self, *_: Any) -> None:
        if not self.stopping.is_set():
            log.info("stop requested: no new claims; finishing the running task (grace %ss)", self.grace_seconds)
            self.abort_at = time.monotonic() + self.grace_seconds
            self.stopping.set()
            timer = threading.Timer(self.grace_seconds, self._abort_running_task)
            timer.daemon = True  # must not keep a finished worker alive
            timer.start()

    def _abort_running_task(self) -> None:
        with self._child_lock:
            if self._child is not None and self._child.poll() is None:
                log.warning("grace period over: killing the running command")
                self._child.kill()

    def run(self) -> int:
        log.info("worker %s serving %s (capacity 1, lease ttl %ss, long poll %ss): %s",
                 self.name, self.api.server, self.ttl_seconds, self.wait_seconds, " ".join(self.command))
        try:
            self.register()
            last_registered = time.monotonic()
            while not self.stopping.is_set():
                if time.monotonic() - last_registered > REREGISTER_EVERY_S:
                    self.register()  # keeps last_heartbeat fresh while idle
                    last_registered = time.monotonic()
                claimed = self.claim()
                if claimed is not None:
                    self.execute(claimed["task"], claimed["lease"])
                    last_registered = time.monotonic()
        except Stopped:
            pass
        log.info("worker %s stopped after %d task(s)", self.name, self.completed)
        return 0

    def register(self) -> None:
        body = {"name": self.name, "status": "online", "capabilities": {"claude_cli": True, "max_concurrency": 1}}
        response = self.api.call("POST", "/api/runtime/workers", body)
        if response.status_code not in (200, 201):
            raise SystemExit(f"registration refused: {response.status_code} {response.text}")

    def claim(self) -> dict[str, Any] | None:
        body = {"ttl_seconds": self.ttl_seconds, "wait_seconds": self.wait_seconds}
        if self.agent_slugs:
            body["agent_slugs"] = self.agent_slugs
        path = f"/api/runtime/workers/{quote(self.name, safe='')}/claim"
        response = self.api.call("POST", path, body, timeout=self.wait_seconds + 30)
        if response.status_code == 201:
            return response.json()
        if response.status_code == 204:
            # The server had no room for another waiting poll: come back when it says.
            retry_after = response.headers.get("Retry-After", "")
            if retry_after.isdigit():
                self.stopping.wait(min(int(retry_after), MAX_BACKOFF_S))
            return None
        if response.status_code in (404, 409):  # forgotten by the server, or marked offline: register again
            log.warning("claim refused (%s: %s); registering again", response.status_code, response.text.strip())
            self.register()
            time.sleep(1.0)
            return None
        raise SystemExit(f"claim failed: {response.status_code} {response.text}")

    # one task --------------------------------------------------------------------

    def execute(self, task: dict[str, Any], lease: dict[str, Any]) -> None:
        task_id, lease_id = task["id"], lease["id"]
        log.info("running task %s (lease %s)", task_id, lease_id)
        lease_lost = threading.Event()
        finished = threading.Event()
        heartbeats = threading.Thread(
            target=self._heartbeat_until, args=(task_id, lease_id, finished, lease_lost), daemon=True
        )
        started = time.monotonic()
        env = {**os.environ, "BLOOM_TASK": json.dumps(task), "BLOOM_LEASE_ID": lease_id}
        try:
            with self._child_lock:
                self._child = subprocess.Popen(
                    self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
                )
        except OSError as error:  # not found, not executable: the task fails, it is not stranded
            log.error("task %s: the command could not start: %s", task_id, error)
            reason = f"command could not start: {error.strerror or error} ({self.command[0]})".encode()
            self._complete(task_id, lease_id, b"", reason, None, False, started)
            return
        heartbeats.start()
        timeout = task.get("policy", {}).get("timeout_sec") or None
        try:
            stdout, stderr = self._child.communicate(task["prompt"].encode("utf-8"), timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            self._child.kill()
            stdout, stderr = self._child.communicate()
            timed_out = True
        finally:
            finished.set()
            heartbeats.join()
        returncode = self._child.returncode
        with self._child_lock:
            self._child = None
        if lease_lost.is_set():
            log.warning("task %s: lease lost while running; result discarded", task_id)
            return
        if self.abort_at is not None and time.monotonic() >= self.abort_at and returncode != 0:
            log.warning("task %s: killed at the end of the grace period; its lease will expire", task_id)
            return
        self._complete(task_id, lease_id, stdout, stderr, returncode, timed_out, started)

    def _complete(self, task_id, lease_id, stdout, stderr, returncode, timed_out, started) -> None:
        output = stdout.decode("utf-8", errors="replace")
        body: dict[str, Any] = {
            "lease_id": lease_id,
            "worker_id": self.name,
            "metrics": {"duration_ms": int((time.monotonic() - started) * 1000)},
        }
        if returncode == 0 and not timed_out:
            body.update(status="success", output=output, error_message=None)
        else:
            reason = "timed out" if timed_out else "not started" if returncode is None else f"exit code {returncode}"
            detail = stderr.decode("utf-8", errors="replace")[-8000:]
            body.update(status="error", output=output or None, error_message=f"{reason}: {detail}".strip())
        deadline = self.abort_at + 5 if self.abort_at is not None else None
        try:
            response = self.api.call(
                "POST", f"/api/runtime/llm-tasks/{task_id}/complete", body,
                give_up_when_stopping=False, deadline=deadline,
            )
        except Stopped:
            log.warning("task %s: could not report the result before stopping", task_id)
            return
        if response.status_code == 200:
            self.completed += 1
            log.info("task %s completed (%s)", task_id, body["status"])
        else:
            log.warning("task %s: completion refused (%s %s)", task_id, response.status_code, response.text.strip())

    def _heartbeat_until(self, task_id: str, lease_id: str, finished: threading.Event, lost: threading.Event) -> None:
        """One worker heartbeat per beat renews every lease this worker holds; the lease
        of the running task coming back as lost (expired, cancelled, taken over) stops it."""
        interval = max(self.ttl_seconds / 3, 0.2)
        path = f"/api/runtime/workers/{quote(self.name, safe='')}/heartbeat"
        while not finished.wait(interval):
            try:
                response = self.api.call(
                    "POST", path, {"lease_ids": [lease_id]},
                    timeout=interval, give_up_when_stopping=False, deadline=time.monotonic() + interval,
                )
            except Stopped:
                continue  # the server is away; try again at the next beat
            reason = _lost_reason(response, lease_id)
            if reason is not None:
                log.warning("task %s: lease lost (%s); stopping the command", task_id, reason)
                lost.set()
                with self._child_lock:
                    if self._child is not None:
                        self._child.kill()
                return


def _lost_reason(response: requests.Response, lease_id: str) -> str | None:
    """Why the worker heartbeat says this lease is lost, or None while it holds."""
    if response.status_code == 404:
        return "this worker is not registered any more"
    if response.status_code != 200:
        return None  # not an answer about the lease: try again at the next beat
    for entry in response.json().get("lost", []):
        if entry.get("lease_id") == lease_id:
            return f"lease {entry.get('lease_status')}, task {entry.get('task_status')}"
    return None


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bloom.worker", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--server", required=True, help="runtime base URL, e.g. http://127.0.0.1:3002")
    parser.add_argument("--name", required=True, help="worker name (its id)")
    parser.add_argument("--api-key", default=argparse.SUPPRESS,
                        help="X-Runtime-API-Key (default: $RUNTIME_API_KEY; never shown)")
    parser.add_argument("--ttl", type=int, default=300, help="lease TTL in seconds (heartbeat every TTL/3)")
    parser.add_argument("--wait", type=float, default=10.0, help="long-poll seconds per claim (0..30)")
    parser.add_argument("--grace", type=float, default=30.0, help="seconds a running task may take after SIGTERM")
    parser.add_argument("--agent-slug", action="append", help="claim only tasks of this agent (repeatable)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND ARGS…")
    args = parser.parse_args(argv)
    args.api_key = getattr(args, "api_key", None) or os.environ.get("RUNTIME_API_KEY")
    if args.command and args.command[0] == "--":
        args.command = args.command[1:]
    if not args.command:
        parser.error("a COMMAND to run is required after --")
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s worker: %(message)s")
    worker = Worker(parse_args(sys.argv[1:] if argv is None else argv))
    signal.signal(signal.SIGTERM, worker.request_stop)
    signal.signal(signal.SIGINT, worker.request_stop)
    return worker.run()


if __name__ == "__main__":
    sys.exit(main())
