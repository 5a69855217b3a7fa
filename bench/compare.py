"""Compare two revisions with bench/run.py, in alternating runs on one machine.

    python bench/compare.py aa7afb0             # that commit against the working tree
    python bench/compare.py aa7afb0 HEAD --pairs 3 -- --clients 8 --tasks 2000

The machines this project is measured on drift by up to ~1.7x within minutes (the same
load generator took 0.17 to 0.26 ms of CPU per request in one afternoon), so a figure
from an earlier run is no baseline. This runs the two revisions in A B B A order, pair
after pair, so that a slow spell falls on both, and prints each figure's runs side by
side with the ratio of the medians. Both revisions run with this interpreter and its
packages: compare revisions whose requirements match.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
WORKING_TREE = "worktree"


def checkout(revision: str, scratch: Path) -> Path:
    if revision == WORKING_TREE:
        return REPO_ROOT
    path = scratch / revision.replace("/", "_")
    subprocess.run(["git", "-C", str(REPO_ROOT), "worktree", "add", "--detach", "-q", str(path), revision], check=True)
    return path


def run_once(root: Path, run_args: list[str], scratch: Path) -> dict:
    out = scratch / "result.json"
    subprocess.run([sys.executable, str(root / "bench" / "run.py"), "--json", str(out), *run_args],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return json.loads(out.read_text())


def figures(result: dict) -> dict[str, float]:
    """The figures worth comparing, flattened: throughput and p99 of every call."""
    flat: dict[str, float] = {}
    for kind in ("creation", "batch_creation", "lifecycle", "worker_lifecycle"):
        for run in result.get(kind, []):
            prefix = f"{kind} {run['clients']} clients"
            flat[f"{prefix}: tasks/s"] = run["tasks_per_s"]
            for call, latency in run["latency"].items():
                flat[f"{prefix}: p99 {call} ms"] = latency["p99_ms"]
                flat[f"{prefix}: p99/p50 {call}"] = latency["p99_ms"] / latency["p50_ms"]
            for part, ms in run.get("cpu_ms_per_request", {}).items():
                flat[f"{prefix}: CPU {part} ms/request"] = ms
            for part, ms in run.get("cpu_ms_per_task", {}).items():
                flat[f"{prefix}: CPU {part} ms/task"] = ms
            if "waits" in run:  # bench_creation's WaitSampler
                flat[f"{prefix}: busy backends on the notify lock"] = run["waits"].get("Lock: object", 0.0)
    fleet = result.get("fleet")
    if fleet:  # bench/run.py --fleet: CPU as a share of one core while the fleet heartbeats
        for part, share in fleet["cpu_share_of_one_core"].items():
            flat[f"fleet: CPU {part}, share of one core"] = share
        if "floor_cpu_share_of_one_core" in fleet:
            flat["fleet: the floor at the same rate, gunicorn share"] = fleet["floor_cpu_share_of_one_core"]
        flat["fleet: p99 worker heartbeat ms"] = fleet["heartbeat_latency"]["worker heartbeat"]["p99_ms"]
    for run in result.get("floor", []):  # a bare Flask app under the same gunicorn
        prefix = f"floor {run['clients']} clients"
        flat[f"{prefix}: CPU gunicorn ms/request"] = run["cpu_ms_per_request"]["gunicorn"]
        flat[f"{prefix}: lifecycle gunicorn CPU / floor's"] = run["lifecycle_gunicorn_cpu_ratio"]
    for what, count in result.get("limiter_trouble", {}).items():
        flat[f"rate limiter {what} (whole run)"] = count
    return flat


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("base", help="a git revision")
    parser.add_argument("new", nargs="?", default=WORKING_TREE, help="a git revision (default: the working tree)")
    parser.add_argument("--pairs", type=int, default=2, help="A B B A rounds; each runs both revisions twice")
    argv = sys.argv[1:]
    split_at = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split_at])
    run_args = argv[split_at + 1:]  # after --: arguments for bench/run.py

    scratch = Path(tempfile.mkdtemp(prefix="bloom-compare-"))
    roots = {}
    try:
        roots = {name: checkout(revision, scratch) for name, revision in (("base", args.base), ("new", args.new))}
        runs: dict[str, list[dict[str, float]]] = {"base": [], "new": []}
        for pair in range(args.pairs):
            for name in ("base", "new", "new", "base"):
                print(f"pair {pair + 1}: {name} ({args.base if name == 'base' else args.new})", flush=True)
                runs[name].append(figures(run_once(roots[name], run_args, scratch)))
        print(f"\n{'figure':<52} {'base: ' + args.base:<36} {'new: ' + args.new:<36} new/base")
        # Every figure either side has (a figure only one revision measures shows alone).
        keys = list(dict.fromkeys(key for run in runs["base"] + runs["new"] for key in run))
        for key in keys:
            base = [run[key] for run in runs["base"] if key in run]
            new = [run[key] for run in runs["new"] if key in run]
            ratio = (statistics.median(new) / statistics.median(base)
                     if base and new and statistics.median(base) else float("nan"))
            print(f"{key:<52} {' '.join(f'{v:8.2f}' for v in base):<36} {' '.join(f'{v:8.2f}' for v in new):<36} {ratio:5.2f}")
    finally:
        for root in roots.values():
            if root != REPO_ROOT:
                subprocess.run(["git", "-C", str(REPO_ROOT), "worktree", "remove", "--force", str(root)], check=False)
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
