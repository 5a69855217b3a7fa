"""A pull-based worker: `python -m bloom.worker --server URL --name NAME -- COMMAND ARGS…`

It registers itself, claims tasks with a long poll (up to `--concurrency` at once, in one
claim), runs COMMAND once per task with the prompt on stdin and the task as JSON in
$BLOOM_TASK, and completes the task with COMMAND's stdout (or an error with its stderr
and exit code). One background thread heartbeats for all its leases (one worker
heartbeat), right after a command starts and then every third of the lease TTL. A lease
the heartbeat reports lost stops its command, and every completion carries the lease
id, so a worker that lost its lease can never complete the task another worker now
holds. Each command runs in a process group of its own, and stopping it (lost lease,
`policy.timeout_sec`, the end of the SIGTERM grace) ends the whole group: TERM, then
KILL. On SIGTERM it stops claiming, lets the running tasks finish within the grace
period and exits. It rides out a server restart, and a 429, by retrying (honouring
Retry-After).
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

HEARTBEAT_MAX_S = 5.0

# 429 too: a worker told to slow down waits (Retry-After) and goes on; it never gives up.
RETRYABLE_STATUSES = {429, 502, 503, 504}
# After TERM, how long the command's processes have before KILL.
KILL_GRACE_S = 2.0
MAX_RETRY_AFTER_S = 60.0
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
            wait = backoff
            try:
                response = self._session.request(method, f"{self.server}{path}", json=body, timeout=timeout)
                if response.status_code not in RETRYABLE_STATUSES:
                    return response
                problem = f"HTTP {response.status_code}"
                retry_after = response.headers.get("Retry-After", "")
                if retry_after.isdigit():  # the server says when: no sooner, and no much later
                    wait = min(float(retry_after), MAX_RETRY_AFTER_S)
            except requests.RequestException as error:
                problem = type(error).__name__
            if give_up_when_stopping and self._stopping.is_set():
                raise Stopped()
            if deadline is not None and time.monotonic() + wait > deadline:
                raise Stopped()
            log.warning("%s %s failed (%s); retrying in %.1fs", method, path, problem, wait)
            if self._stopping.wait(wait) and give_up_when_stopping:
                raise Stopped()  # SIGTERM during a backoff stops at once
            backoff = min(backoff * 2, MAX_BACKOFF_S)


class _Run:
    """One claimed task and the command running it (in a process group of its own)."""

    def __init__(self, task: dict[str, Any], lease: dict[str, Any]) -> None:
        self.task = task
        self.lease = lease
        self.process: subprocess.Popen | None = None
        self.lost = threading.Event()
        self.ended = threading.Event()  # the command has exited: its outcome is being reported


class Worker:
    def __init__(self, args: argparse.Namespace) -> None:
        self.name = args.name
        self.command = args.command
        self.ttl_seconds = args.ttl
        self.wait_seconds = args.wait
        self.grace_seconds = args.grace
        self.concurrency = args.concurrency
        self.agent_slugs = args.agent_slug or None
        self.stopping = threading.Event()
        self.abort_at: float | None = None
        self.api = RuntimeApi(args.server, args.api_key, self.stopping)
        self._runs: dict[str, _Run] = {}  # by lease id
        self._runs_lock = threading.Lock()
        self._slot_freed = threading.Event()
        self._beat_now = threading.Event()
        self.completed = 0

    # lifecycle -------------------------------------------------------------------

    def request_stop(self, *_: Any) -> None:
        if not self.stopping.is_set():
            log.info("stop requested: no new claims; finishing the running tasks (grace %ss)", self.grace_seconds)
            self.abort_at = time.monotonic() + self.grace_seconds
            self.stopping.set()
            self._slot_freed.set()
            timer = threading.Timer(self.grace_seconds, self._abort_running_tasks)
            timer.daemon = True  # must not keep a finished worker alive
            timer.start()

    def _abort_running_tasks(self) -> None:
        for run in self._running():
            if run.process is not None and run.process.poll() is None:
                log.warning("grace period over: stopping the command of task %s", run.task["id"])
                end_process_group(run.process)

    def _running(self) -> list[_Run]:
        with self._runs_lock:
            return list(self._runs.values())

    def run(self) -> int:
        log.info("worker %s serving %s (capacity %d, lease ttl %ss, long poll %ss): %s",
                 self.name, self.api.server, self.concurrency, self.ttl_seconds, self.wait_seconds,
                 " ".join(self.command))
        heartbeats = threading.Thread(target=self._heartbeat_forever, name="bloom-worker-heartbeat", daemon=True)
        heartbeats.start()
        try:
            self.register()
            last_registered = time.monotonic()
            while not self.stopping.is_set():
                free = self.concurrency - len(self._running())
                if free <= 0:
                    self._slot_freed.wait(1.0)
                    self._slot_freed.clear()
                    continue
                if not self._running() and time.monotonic() - last_registered > REREGISTER_EVERY_S:
                    self.register()  # keeps last_heartbeat fresh while idle
                    last_registered = time.monotonic()
                for task, lease in self.claim(free):
                    self._start(task, lease)
                    last_registered = time.monotonic()
        except Stopped:
            pass
        for thread in [t for t in threading.enumerate() if t.name.startswith("bloom-worker-task")]:
            thread.join()
        log.info("worker %s stopped after %d task(s)", self.name, self.completed)
        return 0

    def register(self) -> None:
        body = {"name": self.name, "status": "online",
                "capabilities": {"claude_cli": True, "max_concurrency": self.concurrency}}
        response = self.api.call("POST", "/api/runtime/workers", body)
        if response.status_code not in (200, 201):
            raise SystemExit(f"registration refused: {response.status_code} {response.text}")

    def claim(self, free: int) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        """Claim up to `free` tasks (one claim, long-polling); [(task, lease)], maybe empty."""
        body: dict[str, Any] = {"ttl_seconds": self.ttl_seconds, "wait_seconds": self.wait_seconds,
                                "max_tasks": free}
        if self.agent_slugs:
            body["agent_slugs"] = self.agent_slugs
        path = f"/api/runtime/workers/{quote(self.name, safe='')}/claim"
        response = self.api.call("POST", path, body, timeout=self.wait_seconds + 30)
        if response.status_code == 201:
            claimed = response.json()
            if self.stopping.is_set():  # granted while the poll waited: not ours to run now
                self.give_back([lease["id"] for lease in claimed["leases"]], "the worker is stopping")
                return []
            return list(zip(claimed["tasks"], claimed["leases"], strict=True))
        if response.status_code == 204:
            # The server had no room for another waiting poll: come back when it says.
            retry_after = response.headers.get("Retry-After", "")
            if retry_after.isdigit():
                self.stopping.wait(min(int(retry_after), MAX_BACKOFF_S))
            return []
        if response.status_code in (404, 409) and not self._running():
            # Forgotten by the server, or marked offline after a silence: register again.
            log.warning("claim refused (%s: %s); registering again", response.status_code, response.text.strip())
            self.register()
            self.stopping.wait(1.0)
            return []
        if response.status_code == 409:  # full: the server counts a lease we are finishing
            self._slot_freed.wait(1.0)
            return []
        raise SystemExit(f"claim failed: {response.status_code} {response.text}")

    def give_back(self, lease_ids: list[str], why: str) -> None:
        """Hand leases back to the server: their tasks are queued again at once, without
        spending an attempt (instead of waiting for the leases to run out)."""
        path = f"/api/runtime/workers/{quote(self.name, safe='')}/release"
        try:
            response = self.api.call("POST", path, {"lease_ids": lease_ids}, timeout=10,
                                     give_up_when_stopping=False, deadline=time.monotonic() + 10)
        except Stopped:
            log.warning("could not give back %d lease(s) (%s); they run out at their TTL", len(lease_ids), why)
            return
        if response.status_code == 200:
            log.info("gave back %d task(s) (%s)", len(response.json()["released"]), why)
        else:
            log.warning("giving back %d lease(s) refused (%s %s)", len(lease_ids), response.status_code,
                        response.text.strip())

    # one task --------------------------------------------------------------------

    def _start(self, task: dict[str, Any], lease: dict[str, Any]) -> None:
        run = _Run(task, lease)
        with self._runs_lock:
            self._runs[lease["id"]] = run
        threading.Thread(target=self._execute, args=(run,), name=f"bloom-worker-task-{task['id'][:8]}").start()

    def _execute(self, run: _Run) -> None:
        try:
            self.execute(run)
        finally:
            with self._runs_lock:
                self._runs.pop(run.lease["id"], None)
            self._slot_freed.set()

    def execute(self, run: _Run) -> None:
        task, task_id, lease_id = run.task, run.task["id"], run.lease["id"]
        log.info("running task %s (lease %s)", task_id, lease_id)
        started = time.monotonic()
        env = {**os.environ, "BLOOM_TASK": json.dumps(task), "BLOOM_LEASE_ID": lease_id}
        try:
            # A session (and process group) of its own: ending the task ends every process
            # the command started, not only the command itself.
            run.process = subprocess.Popen(
                self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                start_new_session=True,
            )
        except OSError as error:  # not found, not executable: the task fails, it is not stranded
            log.error("task %s: the command could not start: %s", task_id, error)
            reason = f"command could not start: {error.strerror or error} ({self.command[0]})".encode()
            self._complete(task_id, lease_id, b"", reason, None, False, started)
            return
        self._beat_now.set()  # the task shows 'running' now, not a third of the TTL later
        timeout = task.get("policy", {}).get("timeout_sec") or None
        try:
            stdout, stderr = run.process.communicate(task["prompt"].encode("utf-8"), timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            end_process_group(run.process)
            stdout, stderr = run.process.communicate()
            timed_out = True
        returncode = run.process.returncode
        run.ended.set()
        if run.lost.is_set():
            log.warning("task %s: lease lost while running; result discarded", task_id)
            return
        if self.abort_at is not None and time.monotonic() >= self.abort_at and returncode != 0:
            log.warning("task %s: killed at the end of the grace period", task_id)
            self.give_back([lease_id], "killed at the end of the grace period")
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
                "POST", f"/api/runtime/llm-tasks/{quote(task_id, safe='')}/complete", body,
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

    def _heartbeat_forever(self) -> None:
        """One worker heartbeat per beat renews every lease this worker holds; a lease of
        a running task coming back as lost (expired, cancelled, taken over) stops it."""
        # Every TTL/3, and at least every HEARTBEAT_MAX_S: the heartbeat is also how the
        # worker learns of a cancel, which must reach a running command within seconds
        # whatever the TTL (at the default 300 s, a cancelled command ran 100 s more).
        interval = min(max(self.ttl_seconds / 3, 0.2), HEARTBEAT_MAX_S)
        path = f"/api/runtime/workers/{quote(self.name, safe='')}/heartbeat"
        while True:
            self._beat_now.wait(interval)
            self._beat_now.clear()
            runs = self._running()
            if not runs:
                continue
            try:
                response = self.api.call(
                    "POST", path, {"lease_ids": [run.lease["id"] for run in runs]},
                    timeout=interval, give_up_when_stopping=False, deadline=time.monotonic() + interval,
                )
            except Stopped:
                continue  # the server is away; try again at the next beat
            for run in runs:
                if run.ended.is_set():
                    continue  # its completion may have ended the lease while this beat was on its way
                reason = _lost_reason(response, run.lease["id"])
                if reason is not None and not run.lost.is_set():
                    log.warning("task %s: lease lost (%s); stopping the command", run.task["id"], reason)
                    run.lost.set()
                    if run.process is not None:
                        end_process_group(run.process)


def end_process_group(process: subprocess.Popen) -> None:
    """End the command and everything it started: TERM to its process group, then KILL
    after a short grace. (A process of the group that outlives the command would keep its
    pipes open, and the worker waiting on them.)"""
    def signal_group(sig: int) -> bool:
        try:
            os.killpg(process.pid, sig)
            return True
        except (ProcessLookupError, PermissionError):
            return False

    if not signal_group(signal.SIGTERM):
        return
    threading.Timer(KILL_GRACE_S, signal_group, args=(signal.SIGKILL,)).start()


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
    parser.add_argument("--concurrency", type=int, default=1, choices=range(1, 33), metavar="N",
                        help="tasks run at once (1..32): claimed together, one heartbeat for all")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND ARGS…")
    args = parser.parse_args(argv)
    if not 1 <= args.ttl <= 86400:
        parser.error("--ttl must be from 1 to 86400 seconds")
    if not 0 <= args.wait <= 30:
        parser.error("--wait must be from 0 to 30 seconds")
    if args.grace < 0:
        parser.error("--grace must be 0 or more seconds")
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
