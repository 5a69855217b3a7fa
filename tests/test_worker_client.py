"""`python -m bloom.worker` end to end: real processes against gunicorn and PostgreSQL."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psutil
import pytest
import requests

from .support import REPO_ROOT, GunicornServer, wait_until

UPPERCASE = [sys.executable, "-c", "import os, sys, json; t = json.loads(os.environ['BLOOM_TASK']); "
             "print(sys.stdin.read().upper() + ' by ' + t['agent_slug'], end='')"]


@pytest.fixture(scope="module")
def server(module_database_url):
    served = GunicornServer({"DATABASE_URL": module_database_url, "LEASE_SWEEP_INTERVAL_S": "1"})
    yield served
    served.stop()


class WorkerProcess:
    def __init__(self, server, name, command, *, slug, ttl=30, grace=10, wait=2, concurrency=1):
        self.name = name
        self.log = tempfile.TemporaryFile()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bloom.worker", "--server", server.base_url, "--name", name,
             "--ttl", str(ttl), "--wait", str(wait), "--grace", str(grace), "--agent-slug", slug,
             "--concurrency", str(concurrency), "--", *command],
            cwd=REPO_ROOT, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def terminate(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=30)

    def kill(self) -> None:
        os.killpg(self.process.pid, signal.SIGKILL)  # the worker and the command it runs
        self.process.wait(timeout=10)


def new_tasks(server, slug, count, prompt="hello", **fields):
    return [
        requests.post(server.url("/api/runtime/llm-tasks"),
                      json={"context_id": "c", "agent_slug": slug, "prompt": f"{prompt} {i}", **fields},
                      timeout=10).json()["id"]
        for i in range(count)
    ]


def task(server, task_id):
    return requests.get(server.url(f"/api/runtime/llm-tasks/{task_id}"), timeout=10).json()


def result_of(server, task_id):
    artifacts = requests.get(server.url(f"/api/runtime/artifacts?task_id={task_id}"), timeout=10).json()
    return [a["content"] for a in artifacts]


def all_finished(server, task_ids):
    return all(task(server, t)["status"] in ("completed", "failed") for t in task_ids)


def test_two_workers_drain_the_queue_each_task_once(server):
    slug = f"upper-{uuid.uuid4().hex[:6]}"
    task_ids = new_tasks(server, slug, 40)
    workers = [WorkerProcess(server, f"{slug}-{i}", UPPERCASE, slug=slug) for i in range(2)]
    try:
        wait_until(lambda: all_finished(server, task_ids), timeout=90, interval=0.5, what="the queue to drain")
    finally:
        codes = [w.terminate() for w in workers]
    assert codes == [0, 0]
    for index, task_id in enumerate(task_ids):
        assert task(server, task_id)["status"] == "completed"
        assert result_of(server, task_id) == [f"HELLO {index} by {slug}"]  # exactly one result each
    assert all("completed" in w.output() for w in workers)


def test_a_failing_command_fails_the_task_with_its_stderr_and_exit_code(server):
    slug = f"fail-{uuid.uuid4().hex[:6]}"
    (task_id,) = new_tasks(server, slug, 1, max_attempts=1)
    failing = [sys.executable, "-c", "import sys; sys.stderr.write('model exploded'); sys.exit(3)"]
    worker = WorkerProcess(server, f"{slug}-w", failing, slug=slug)
    try:
        wait_until(lambda: all_finished(server, [task_id]), timeout=30, interval=0.3, what="the task to fail")
    finally:
        worker.terminate()
    assert task(server, task_id)["status"] == "failed"
    results = requests.get(server.url("/api/runtime/audit?limit=1000"), timeout=10).json()
    assert any(e["action"] == "task_completed" and e["entity_id"] == task_id for e in results)
    with_error = [line for line in worker.output().splitlines() if task_id in line]
    assert any("completed (error)" in line for line in with_error)


def test_sigterm_lets_the_running_task_finish_then_exits(server):
    slug = f"slow-{uuid.uuid4().hex[:6]}"
    (task_id,) = new_tasks(server, slug, 1)
    slow = [sys.executable, "-c", "import sys, time; time.sleep(2); print('finished late', end='')"]
    worker = WorkerProcess(server, f"{slug}-w", slow, slug=slug)
    wait_until(lambda: task(server, task_id)["status"] in ("leased", "running"), timeout=20, what="the claim")
    assert worker.terminate() == 0
    assert task(server, task_id)["status"] == "completed"
    assert result_of(server, task_id) == ["finished late"]


def test_a_killed_workers_task_is_swept_and_run_by_another(server):
    slug = f"kill-{uuid.uuid4().hex[:6]}"
    (task_id,) = new_tasks(server, slug, 1)
    stuck = [sys.executable, "-c", "import time; time.sleep(60)"]
    doomed = WorkerProcess(server, f"{slug}-doomed", stuck, slug=slug, ttl=2)
    wait_until(lambda: task(server, task_id)["status"] == "running", timeout=20, what="the first heartbeat")
    doomed.kill()
    rescuer = WorkerProcess(server, f"{slug}-rescuer", UPPERCASE, slug=slug)
    try:
        wait_until(lambda: all_finished(server, [task_id]), timeout=30, interval=0.3, what="the rescue")
    finally:
        rescuer.terminate()
    final = task(server, task_id)
    assert (final["status"], final["worker_id"], final["attempts"]) == ("completed", f"{slug}-rescuer", 2)
    assert result_of(server, task_id) == [f"HELLO 0 by {slug}"]


def test_a_command_that_cannot_start_fails_the_task_instead_of_stranding_it(server):
    slug = f"missing-{uuid.uuid4().hex[:6]}"
    [task_id] = new_tasks(server, slug, 1, max_attempts=1)
    worker = WorkerProcess(server, f"w-{slug}", ["/nonexistent/cmd"], slug=slug)
    try:
        failed = wait_until(lambda: (t := task(server, task_id))["status"] == "failed" and t, timeout=20,
                            what="the task to fail")
        assert "command could not start" in failed["result"]["error_message"]
        assert worker.process.poll() is None  # the worker lives on, ready for the next task
        assert "Traceback" not in worker.output()
        assert f"worker w-{slug} serving {server.base_url}" in worker.output()
    finally:
        assert worker.terminate() == 0


def test_cancelling_a_running_task_stops_the_workers_command(server):
    slug = f"cancel-{uuid.uuid4().hex[:6]}"
    [task_id] = new_tasks(server, slug, 1)
    marker = tempfile.mktemp(prefix="bloom-cancel-")
    sleeper = [sys.executable, "-c", f"import time, pathlib; pathlib.Path({marker!r}).touch(); time.sleep(60)"]
    worker = WorkerProcess(server, f"w-{slug}", sleeper, slug=slug, ttl=3)  # heartbeat every second
    try:
        wait_until(lambda: task(server, task_id)["status"] == "running" and os.path.exists(marker), timeout=20,
                   what="the command to run")
        assert requests.post(server.url(f"/api/runtime/llm-tasks/{task_id}/cancel"), timeout=10).status_code == 200
        wait_until(lambda: "lease lost (lease released, task cancelled); stopping the command" in worker.output(),
                   timeout=10, what="the worker to stop its command")
        assert worker.process.poll() is None  # it lives on for the next task
        assert task(server, task_id)["status"] == "cancelled"
        assert requests.get(server.url(f"/api/runtime/artifacts?task_id={task_id}"), timeout=10).json() == []
    finally:
        assert worker.terminate() == 0


def test_a_cancel_reaches_a_running_command_within_seconds_at_the_default_ttl(server):
    """The worker learns of a cancel at its heartbeat, every TTL/3: at the default 300 s a
    cancelled command ran 100 s more. Now every 5 s at most."""
    slug = f"cancel-{uuid.uuid4().hex[:6]}"
    [task_id] = new_tasks(server, slug, 1)
    marker = tempfile.mktemp(prefix="bloom-cancel-")
    sleeper = [sys.executable, "-c", f"import time, pathlib; pathlib.Path({marker!r}).touch(); time.sleep(120)"]
    worker = WorkerProcess(server, f"w-{slug}", sleeper, slug=slug, ttl=300)
    try:
        wait_until(lambda: task(server, task_id)["status"] == "running" and os.path.exists(marker), timeout=20,
                   what="the command to run")
        assert requests.post(server.url(f"/api/runtime/llm-tasks/{task_id}/cancel"), timeout=10).status_code == 200
        wait_until(lambda: "stopping the command" in worker.output(), timeout=8,
                   what="the worker to stop its command (5 s heartbeats, and a little)")
    finally:
        assert worker.terminate() == 0


def test_a_failed_run_is_retried_after_its_backoff_and_every_result_stays_readable(server):
    slug = f"retry-{uuid.uuid4().hex[:6]}"
    [task_id] = new_tasks(server, slug, 1, max_attempts=2)
    failing = [sys.executable, "-c", "import sys; sys.stderr.write('flaky model'); sys.exit(7)"]
    worker = WorkerProcess(server, f"w-{slug}", failing, slug=slug)
    try:
        first = wait_until(lambda: (t := task(server, task_id))["attempts"] == 1 and t["status"] == "queued" and t,
                           timeout=20, what="the first failure")
        assert first["retry_at"] - first["updated_at"] >= 7_500  # ~10 s of backoff before the next claim
        assert "exit code 7" in first["result"]["error_message"]
        last = wait_until(lambda: (t := task(server, task_id))["status"] == "failed" and t, timeout=30,
                          interval=0.5, what="the retry, and its failure")
        assert last["attempts"] == 2 and last["retry_at"] is None
        assert last["updated_at"] >= first["retry_at"]  # not claimed again before retry_at
        artifacts = requests.get(server.url(f"/api/runtime/artifacts?task_id={task_id}"), timeout=10).json()
        assert len(artifacts) == 2
    finally:
        assert worker.terminate() == 0


def _sleeps_running(seconds: str) -> list[psutil.Process]:
    """Live `sleep <seconds>` processes (a zombie is not running)."""
    return [process for process in psutil.process_iter(["cmdline", "status"])
            if process.info["cmdline"] == ["sleep", seconds] and process.info["status"] != psutil.STATUS_ZOMBIE]


def test_cancel_ends_every_process_the_command_started_not_only_the_command(server):
    slug = f"group-{uuid.uuid4().hex[:6]}"
    [task_id] = new_tasks(server, slug, 1)
    marker = f"117.{uuid.uuid4().int % 10**6}"  # a sleep no one else runs
    worker = WorkerProcess(server, f"w-{slug}", ["sh", "-c", f"sleep {marker}; echo done"], slug=slug, ttl=3,
                           grace=1)
    try:
        wait_until(lambda: task(server, task_id)["status"] == "running" and _sleeps_running(marker), timeout=20,
                   what="the command and its child to run")
        assert requests.post(server.url(f"/api/runtime/llm-tasks/{task_id}/cancel"), timeout=10).status_code == 200
        wait_until(lambda: not _sleeps_running(marker), timeout=10, what="the grandchild `sleep` to end too")
        [next_task] = new_tasks(server, slug, 1)  # the worker is free again at once, not in 105 s
        wait_until(lambda: task(server, next_task)["status"] in ("leased", "running"), timeout=10,
                   what="the next claim")
    finally:
        assert worker.terminate() == 0  # the grace (1 s) ends the next task's whole group too
    assert not _sleeps_running(marker)


def test_the_first_heartbeat_comes_as_the_command_starts(server):
    slug = f"beat-{uuid.uuid4().hex[:6]}"
    [task_id] = new_tasks(server, slug, 1)
    slow = [sys.executable, "-c", "import time; time.sleep(4); print('ok', end='')"]
    worker = WorkerProcess(server, f"w-{slug}", slow, slug=slug, ttl=60)  # the next beat only in 20 s
    try:
        leased = wait_until(lambda: (t := task(server, task_id))["status"] in ("leased", "running") and t,
                            timeout=20, interval=0.05, what="the claim")
        running = wait_until(lambda: (t := task(server, task_id))["status"] == "running" and t, timeout=2,
                             interval=0.05, what="the task to show running")
        assert running["updated_at"] - leased["updated_at"] < 2000
        wait_until(lambda: task(server, task_id)["status"] == "completed", timeout=20, what="the run")
    finally:
        assert worker.terminate() == 0


def test_concurrency_runs_several_tasks_at_once_under_one_heartbeat(server):
    slug = f"many-{uuid.uuid4().hex[:6]}"
    journal = tempfile.mktemp(prefix="bloom-journal-")
    record = [sys.executable, "-c",
              "import time, sys; f = open(sys.argv[1], 'a'); f.write(f'start {time.time()}\\n'); f.flush(); "
              "time.sleep(1.5); f.write(f'end {time.time()}\\n'); print('ok', end='')", journal]
    task_ids = new_tasks(server, slug, 6)
    worker = WorkerProcess(server, f"w-{slug}", record, slug=slug, ttl=6, concurrency=3)
    try:
        wait_until(lambda: all_finished(server, task_ids), timeout=60, interval=0.3, what="the six tasks")
    finally:
        assert worker.terminate() == 0
    assert {task(server, t)["status"] for t in task_ids} == {"completed"}
    events = sorted((float(line.split()[1]), line.split()[0]) for line in open(journal))
    running = most = 0
    for _, kind in events:
        running += 1 if kind == "start" else -1
        most = max(most, running)
    assert most == 3  # several at once, never more than asked
    worker_row = requests.get(server.url(f"/api/runtime/workers/w-{slug}"), timeout=10).json()
    assert worker_row["capabilities"]["max_concurrency"] == 3
    assert "/claim" in server.log() and f"/workers/w-{slug}/heartbeat" in server.log()


@pytest.mark.slow  # starts processes of its own
def test_a_429_slows_the_worker_down_and_never_ends_it(module_database_url):
    limited = GunicornServer({"DATABASE_URL": module_database_url, "BLOOM_RATE_LIMIT": "4 per second"}, workers=1)
    slug = f"limited-{uuid.uuid4().hex[:6]}"
    worker = WorkerProcess(limited, f"w-{slug}", UPPERCASE, slug=slug, wait=0)  # polls as fast as allowed
    try:
        wait_until(lambda: "HTTP 429" in worker.output(), timeout=20, what="the limit to bite")
        time.sleep(3)
        assert worker.process.poll() is None, worker.output()
        other_client = {"X-Forwarded-For": "192.0.2.7"}  # counted apart from the worker (a trusted local proxy)
        task_id = requests.post(limited.url("/api/runtime/llm-tasks"), headers=other_client, timeout=10,
                                json={"context_id": "c", "agent_slug": slug, "prompt": "go"}).json()["id"]
        wait_until(lambda: requests.get(limited.url(f"/api/runtime/llm-tasks/{task_id}"), headers=other_client,
                                        timeout=10).json().get("status") == "completed",
                   timeout=30, interval=0.5, what="the task to run despite the limit")
    finally:
        worker.kill()
        limited.stop()


@pytest.mark.slow  # starts processes of its own
def test_the_worker_client_imports_no_part_of_the_service():
    """A worker node needs `requests`, not Flask, SQLAlchemy, psycopg2 or minio."""
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, bloom.worker; print(' '.join(sorted(m for m in "
         "('flask', 'sqlalchemy', 'psycopg2', 'minio', 'marshmallow', 'apscheduler') if m in sys.modules)))"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=30, check=True,
    ).stdout.strip()
    assert loaded == ""


@pytest.mark.slow  # starts processes of its own
def test_the_console_script_is_the_worker_client():
    """`make` installs `bloom-worker` beside the interpreter (pyproject.toml)."""
    script = Path(sys.executable).parent / "bloom-worker"
    shown = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=30, check=True).stdout
    assert "--concurrency" in shown and "--server" in shown


def _attempts_and_status(server, task_id):
    found = task(server, task_id)
    return found["status"], found["attempts"]


def test_a_task_killed_at_the_end_of_the_grace_is_queued_again_at_once_without_spending_an_attempt(server):
    slug = f"grace-{uuid.uuid4().hex[:6]}"
    [task_id] = new_tasks(server, slug, 1)
    worker = WorkerProcess(server, f"w-{slug}", [sys.executable, "-c", "import time; time.sleep(60)"], slug=slug,
                           ttl=300, grace=1)
    wait_until(lambda: task(server, task_id)["status"] == "running", timeout=20, what="the run to start")
    assert worker.terminate() == 0
    # At once, not when its 300 s lease runs out; and the attempt the worker cut short is not spent.
    assert _attempts_and_status(server, task_id) == ("queued", 0)
    assert "gave back 1 task(s) (killed at the end of the grace period)" in worker.output()


def test_a_stopping_worker_gives_back_what_its_pending_long_poll_is_granted(server, tmp_path):
    slug = f"late-{uuid.uuid4().hex[:6]}"
    ran = tmp_path / "ran"
    marks = [sys.executable, "-c", f"open({str(ran)!r}, 'a').write('ran\\n')"]
    worker = WorkerProcess(server, f"w-{slug}", marks, slug=slug, wait=10)
    wait_until(lambda: requests.get(server.url(f"/api/runtime/workers/w-{slug}"), timeout=5).status_code == 200,
               timeout=20, what="the worker to register")
    time.sleep(1.5)  # its long poll is waiting in the server
    worker.process.send_signal(signal.SIGTERM)
    time.sleep(0.05)
    [task_id] = new_tasks(server, slug, 1)  # granted to the waiting poll, after "no new claims"
    assert worker.process.wait(timeout=30) == 0
    assert not ran.exists(), "the stopping worker ran a task"
    assert _attempts_and_status(server, task_id) == ("queued", 0)


def test_a_heartbeat_crossing_a_completion_reports_no_lost_lease(server):
    """Short runs under a fast heartbeat: beats often cross a completion on the way."""
    slug = f"cross-{uuid.uuid4().hex[:6]}"
    task_ids = new_tasks(server, slug, 40)
    quick = [sys.executable, "-c", "import time; time.sleep(0.25); print('ok', end='')"]
    worker = WorkerProcess(server, f"w-{slug}", quick, slug=slug, ttl=1, concurrency=4)
    try:
        wait_until(lambda: all_finished(server, task_ids), timeout=90, interval=0.5, what="the runs")
    finally:
        assert worker.terminate() == 0
    assert {task(server, t)["status"] for t in task_ids} == {"completed"}
    assert "lease lost" not in worker.output()
