"""CPU instructions per lifecycle request of the app itself, counted by valgrind.

    python bench/instructions.py                 # this checkout
    python bench/instructions.py --variant no-limiter

Timings on this project's machines drift by up to 1.7x within minutes, so a change of a
few percent cannot be seen in CPU seconds. Instructions can: this runs the WSGI app in one
thread, called directly (no gunicorn, no sockets), under `valgrind --tool=callgrind`, for
100 and then 300 lifecycles (lease -> heartbeat -> complete) after the same start-up, and
prints (instructions of the second - of the first) / 600 requests. Two runs of one
checkout agree within 0.2 %. PostgreSQL runs in its own process and is not counted; the
driver's work in this one is. Needs valgrind (on this machine kind: /usr/bin/valgrind).

Variants, to price a part of the request: `no-limiter` (no rate limit at all),
`no-limit-headers` (the shared limit's X-RateLimit headers off). Until 2026-12-03 a
`direct-limit` variant priced the shared limit done as one `limits` hit in a hook instead
of by Flask-Limiter: that is now how the app does it (bloom/web/rate_limits.py).
"""
from __future__ import annotations

import argparse
import io
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from bloom.services import services

REPO_ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ("as-is", "no-limiter", "no-limit-headers")


def call(app, method: str, path: str, body=None):
    raw = json.dumps(body).encode() if body is not None else b""
    environ = {
        "REQUEST_METHOD": method, "PATH_INFO": path, "QUERY_STRING": "", "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "3002", "SERVER_PROTOCOL": "HTTP/1.1", "REMOTE_ADDR": "127.0.0.1", "HTTP_HOST": "127.0.0.1",
        "CONTENT_LENGTH": str(len(raw)), "CONTENT_TYPE": "application/json", "wsgi.version": (1, 0),
        "wsgi.url_scheme": "http", "wsgi.input": io.BytesIO(raw), "wsgi.errors": sys.stderr,
        "wsgi.multithread": True, "wsgi.multiprocess": True, "wsgi.run_once": False,
    }
    answer = b"".join(app(environ, lambda status, headers, exc_info=None: None))
    return json.loads(answer) if answer.strip() else None


def apply_variant(app, variant: str) -> None:
    """Take the shared limit's hooks (bloom/web/rate_limits.py) out, and with no-limiter
    Flask-Limiter's too (it only looks at the connection test)."""
    doomed = {"no-limiter": {"_count_request", "_add_headers"}, "no-limit-headers": {"_add_headers"}}.get(variant, set())
    for hooks in (app.before_request_funcs, app.after_request_funcs):
        hooks[None] = [hook for hook in hooks.get(None, []) if getattr(hook, "__name__", "") not in doomed]
    if variant == "no-limiter":
        app.extensions["bloom.limiter"].enabled = False


def inner(lifecycles: int, variant: str) -> None:
    """Start-up, then `lifecycles` lease -> heartbeat -> complete cycles (run under valgrind)."""
    sys.path.insert(0, str(REPO_ROOT))
    sys.path.insert(0, str(REPO_ROOT / "bench"))
    import logging

    from run import DONE, TASK, scratch_postgres

    from bloom import create_app
    from bloom.settings import Settings

    with scratch_postgres("bloom-instructions-") as (url, _):
        app = create_app(Settings.from_env({"DATABASE_URL": url, "BLOOM_RATE_LIMIT": "100000000 per minute"}))
        logging.getLogger().setLevel(logging.WARNING)
        apply_variant(app, variant)
        call(app, "POST", "/api/runtime/workers", {"name": "w", "capabilities": {"max_concurrency": 32}})
        task_ids = [call(app, "POST", "/api/runtime/llm-tasks", TASK)["id"] for _ in range(lifecycles)]
        for task_id in task_ids:
            granted = call(app, "POST", f"/api/runtime/llm-tasks/{task_id}/lease", {"ttl_seconds": 300})
            fence = {"lease_id": granted["lease"]["id"], "worker_id": granted["worker"]["id"]}
            call(app, "POST", f"/api/runtime/llm-tasks/{task_id}/heartbeat", fence)
            call(app, "POST", f"/api/runtime/llm-tasks/{task_id}/complete", {**DONE, **fence})
        services(app).database.dispose()


def count(lifecycles: int, variant: str, scratch: Path) -> int:
    out = scratch / f"callgrind-{lifecycles}.out"
    run = subprocess.run(
        ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable, __file__,
         "--inner", str(lifecycles), "--variant", variant],
        capture_output=True, text=True, cwd=REPO_ROOT,
    )
    collected = re.search(r"Collected : (\d+)", run.stderr)
    if run.returncode != 0 or not collected:
        raise SystemExit(f"valgrind run failed:\n{run.stderr[-3000:]}")
    return int(collected.group(1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", choices=VARIANTS, default="as-is")
    parser.add_argument("--inner", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inner is not None:
        inner(args.inner, args.variant)
        return 0
    with tempfile.TemporaryDirectory(prefix="bloom-callgrind-") as scratch:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=2) as pool:  # the two runs side by side
            few, many = pool.map(lambda n: count(n, args.variant, Path(scratch)), (100, 300))
    per_request = (many - few) / (200 * 3)
    print(f"{args.variant}: {per_request:,.0f} instructions per lifecycle request (in-process, one thread)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
