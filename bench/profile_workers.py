"""Where gunicorn's CPU goes during the lifecycle benchmark: py-spy over every worker.

    python bench/profile_workers.py                     # 8 clients, 3,000 tasks
    python bench/profile_workers.py --clients 32 --top 60

Starts gunicorn (4 workers x 8 threads) on a scratch PostgreSQL as bench/run.py does,
runs the lifecycle (lease -> heartbeat -> complete) and samples all processes with
`py-spy record --subprocesses --gil` meanwhile: only the thread holding the GIL is
sampled, so the samples follow the CPU spent in Python, not threads waiting on sockets.
Prints the frames that hold the most samples (inclusive, each frame counted once per
stack) and where the time under the request handler goes. py-spy comes from
requirements-dev.txt.
"""
from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import (  # noqa: E402
    DONE,
    TASK,
    Client,
    Service,
    defaultdict,
    register_workers,
    run_clients,
    scratch_postgres,
    split,
    warm_up,
)


def frame_name(frame: str) -> str:
    """'Flask.wsgi_app (flask/app.py:1479)' -> 'Flask.wsgi_app flask/app.py'."""
    name, _, where = frame.partition(" (")
    path = where.rsplit(":", 1)[0]
    short = path.split("site-packages/")[-1].split("/work/main/")[-1]
    return f"{name} {short}" if where else name


# The parts of a request, each a test on the function names of one sampled stack.
PARTS = {
    "gunicorn, outside the app": lambda names: "ThreadWorker.handle" in names and "Flask.__call__" not in names,
    "Flask-Limiter, the check before the view": lambda names: "Limiter._check_request_limit" in names,
    "Flask-Limiter, its headers after the view": lambda names: "Limiter.__inject_headers" in names,
    "our before/after-request hooks": lambda names: (
        ("Flask.preprocess_request" in names or "Flask.process_response" in names)
        and not any(name.startswith("Limiter.") for name in names)
    ),
    "the views (marshmallow, service, SQL, JSON)": lambda names: "Flask.dispatch_request" in names,
    "  of which executing SQL (Queries._run)": lambda names: "Queries._run" in names,
    "Flask and werkzeug around them (context, routing, response)": lambda names: (
        "Flask.wsgi_app" in names and not {"Flask.dispatch_request", "Flask.preprocess_request",
                                           "Flask.process_response"} & names
    ),
}


def summarize(raw: Path, top: int) -> None:
    inclusive: collections.Counter = collections.Counter()
    parts: collections.Counter = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        samples = int(count)
        total += samples
        frames = {frame_name(f) for f in stack.split(";") if not f.startswith(("process ", "thread "))}
        for name in frames:
            inclusive[name] += samples
        names = {frame.split(" ")[0] for frame in frames}
        for part, test in PARTS.items():
            if test(names):
                parts[part] += samples
    print(f"{total} samples holding the GIL. Parts of a request:")
    for part in PARTS:
        print(f"  {parts[part] / total:6.1%}  {part}")
    print("Frames by inclusive share:")
    for name, samples in inclusive.most_common(top):
        print(f"  {samples / total:6.1%}  {name}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--tasks", type=int, default=3000)
    parser.add_argument("--top", type=int, default=45)
    args = parser.parse_args()
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    scratch = Path(tempfile.mkdtemp(prefix="bloom-profile-"))
    raw = scratch / "py-spy.txt"
    with scratch_postgres("bloom-profile-pg-") as (url, postgres_pid):
        service = Service(url, 4, 8, postgres_pid)
        try:
            warm_up(service, 400)
            register_workers(service.port, count=4, capacity=32)
            creator = Client(service.port, defaultdict(list), threading.Lock())
            task_ids = [creator.call("create", "POST", "/api/runtime/llm-tasks", TASK)["id"] for _ in range(args.tasks)]
            spy = subprocess.Popen(
                [py_spy, "record", "--pid", str(service.process.pid), "--subprocesses", "--gil", "--nonblocking",
                 "--rate", "97", "--format", "raw", "-o", str(raw)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )

            def work(client: Client, index: int) -> None:
                for position in split(args.tasks, args.clients, index):
                    task_id = task_ids[position]
                    granted = client.call("lease", "POST", f"/api/runtime/llm-tasks/{task_id}/lease", {"ttl_seconds": 300})
                    fence = {"lease_id": granted["lease"]["id"], "worker_id": granted["worker"]["id"]}
                    client.call("heartbeat", "POST", f"/api/runtime/llm-tasks/{task_id}/heartbeat", fence)
                    client.call("complete", "POST", f"/api/runtime/llm-tasks/{task_id}/complete", {**DONE, **fence})

            elapsed, requests, _, cpu_ms = run_clients(service, args.clients, work)
            spy.send_signal(2)  # SIGINT: py-spy writes what it has and exits
            spy.wait(timeout=30)
        finally:
            service.stop()
    print(f"lifecycle, {args.clients} clients: {requests / elapsed:.0f} requests/s; CPU per request: "
          + ", ".join(f"{part} {ms:.2f} ms" for part, ms in cpu_ms.items()))
    summarize(raw, args.top)
    shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
