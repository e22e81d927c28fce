"""`make e2e` (`python -m bench.e2e`): restoring a prefix's KV cache against recomputing it.

Starts a kvtier dev cluster and a redis-server, runs the producer process (prefill each context,
store its KV blocks in kvtier, in files and in Redis) and then a fresh restorer process (TTFT of
a full recompute and of a restore from each store, checked against the recompute), stops the
servers, checks the targets as ratios within the run, and writes bench/results/e2e.json, and
unless --no-doc docs/img/e2e_ttft.png, docs/img/e2e_tps.png and the `e2e` section of
docs/benchmarks.md. `make bench` runs it as its `e2e` section (bench/run.py, `--skip-e2e`).

Usage: python -m bench.e2e [--quick] [--no-doc] [--model bench|small] [--lengths 1024,4096]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from bench import common as bench_common
from bench import kv_bench
from bench.e2e import jobs, layout, servers

ROOT = Path(__file__).resolve().parents[2]
HEADING = "End-to-end: restoring context vs recomputing it"
LENGTHS = (1024, 4096, 16384)
QUICK_LENGTHS = (1024, 4096)
BENCH_METHODS = ("kvtier-shm", "kvtier-tcp", "disk", "disk-cold", "redis")
#: The acceptance: at TARGET_LENGTH tokens a kvtier restore reaches the first token at least
#: SPEEDUP_TARGET times sooner than a recompute, and no sooner through files or Redis.
TARGET_LENGTH = 16384
SPEEDUP_TARGET = 5.0
LOGIT_TOLERANCE = 1e-3
KV_TOLERANCE = 1e-4
WORKER_TIMEOUT_S = 1500.0


class WorkerFailed(RuntimeError):
    """A worker process failed; the message carries its output's tail."""


def missing_dependencies() -> str | None:
    """Why the model cannot be built here (torch / transformers not installed), or None."""
    missing = [m for m in ("torch", "transformers") if importlib.util.find_spec(m) is None]
    if missing:
        return f"{' and '.join(missing)} not installed (pip install -e '.[e2e]')"
    return None


def _worker(
    role: str, job_path: Path, out_path: Path, log_path: Path, env: Mapping[str, str]
) -> dict[str, Any]:
    # Every worker runs with glibc keeping freed memory, as the kv bench's clients do (a client
    # that gets a new bytes object per block, redis-py, otherwise pays page faults on each).
    env = {**env, **kv_bench.CLIENT_ENV, "PYTHONPATH": str(ROOT)}
    argv = [sys.executable, "-m", "bench.e2e.worker", role, str(job_path), str(out_path)]
    with log_path.open("wb") as log:
        proc = subprocess.run(
            argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, timeout=WORKER_TIMEOUT_S, check=False,
        )  # fmt: skip
    if proc.returncode != 0:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-25:])
        raise WorkerFailed(f"{role} worker exited with {proc.returncode}:\n{tail}")
    value: dict[str, Any] = json.loads(out_path.read_text())
    return value


def run_workers(
    job: jobs.Job, workdir: Path, env: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """The producer, then a fresh restorer, against the servers job names; both outputs. env:
    the workers' environment (default: this process's), with the kvtier credentials a user
    would configure (`servers.DevCluster.client_env`)."""
    workdir.mkdir(parents=True, exist_ok=True)
    job_path = workdir / "job.json"
    job.save(job_path)
    env = dict(os.environ if env is None else env)
    produced = _worker("produce", job_path, workdir / "produced.json", workdir / "produce.log", env)
    restored = _worker("restore", job_path, workdir / "restored.json", workdir / "restore.log", env)
    if produced["weights_digest"] != restored["weights_digest"]:
        raise WorkerFailed("the two processes built different weights from the same seed")
    return {"job": dataclasses.asdict(job), "produced": produced, "restored": restored}


def checks(run: dict[str, Any]) -> list[dict[str, Any]]:
    """Correctness of every restore: one row per length and method (`ok` says all held)."""
    job, rows = run["job"], []
    for length, entry in run["restored"]["lengths"].items():
        stored = run["produced"]["lengths"][length]["chunks"]
        expected = min(stored, entry["restorable_chunks"])
        for method, m in entry["methods"].items():
            row: dict[str, Any] = {"length": int(length), "method": method}
            if "error" in m:
                rows.append({**row, "ok": False, "detail": m["error"]})
                continue
            problems = []
            if m["restored_chunks"] != expected or not m["same_chunks_every_run"]:
                problems.append(f"restored {m['restored_chunks']} chunks, expected {expected}")
            if m["logit_diff"] > LOGIT_TOLERANCE:
                problems.append(f"logits differ by {m['logit_diff']:.2e}")
            if m["kv_diff"] > KV_TOLERANCE:
                problems.append(f"KV differs by {m['kv_diff']:.2e}")
            if not (m["first_token_ok"] and m["tokens_ok"]):
                problems.append(f"tokens {m['tokens']} != {entry['recompute']['tokens']}")
            detail = "; ".join(problems) or (
                f"{m['restored_tokens']} tokens restored, {job['generate_tokens']} greedy tokens "
                f"equal, logits within {m['logit_diff']:.1e}, KV within {m['kv_diff']:.1e}"
            )
            rows.append({**row, "ok": not problems, "detail": detail})
    return rows


def _ttft(entry: dict[str, Any], method: str) -> float | None:
    m = entry["methods"].get(method, {})
    return None if "error" in m or "ttft_s" not in m else float(m["ttft_s"])


def targets(run: dict[str, Any]) -> list[dict[str, Any]]:
    """The acceptance as ratios within this run (at TARGET_LENGTH), plus correctness."""
    rows = checks(run)
    bad = [r for r in rows if not r["ok"]]
    worst = max(m.get("logit_diff", 0.0) for e in _entries(run) for m in e["methods"].values())
    out = [
        {
            "target": "e2e: every restore reproduces the recompute (logits, KV, greedy tokens)",
            "ratio": worst / LOGIT_TOLERANCE,
            "detail": "; ".join(f"{r['method']} @ {r['length']}: {r['detail']}" for r in bad)
            or f"{len(rows)} (context, method) pairs, "
            f"{len(rows) * (run['job']['restore_repeats'] + 1)} restores; worst logit diff "
            f"{worst:.1e} (the ratio is to {LOGIT_TOLERANCE:g})",
            "ok": not bad,
        }
    ]
    entry = run["restored"]["lengths"].get(str(TARGET_LENGTH))
    if entry is None:
        return out
    kvtier = {m: t for m in entry["methods"] if m.startswith("kvtier") and (t := _ttft(entry, m))}
    if not kvtier:
        return out
    best, ttft = min(kvtier.items(), key=lambda item: item[1])
    speedup = entry["recompute"]["ttft_s"] / ttft
    out.append(
        {
            "target": f"e2e: {best} TTFT at {TARGET_LENGTH // 1024}k tokens ≥ "
            f"{SPEEDUP_TARGET:.0f}× sooner than recompute",
            "ratio": speedup,
            "detail": f"{entry['recompute']['ttft_s'] * 1e3:.0f} ms vs {ttft * 1e3:.0f} ms",
            "ok": speedup >= SPEEDUP_TARGET,
        }
    )
    fetch = entry["methods"][best]["fetch_s"]
    for peer in ("disk", "disk-cold", "redis"):
        other = _ttft(entry, peer)
        if other is None:
            continue
        out.append(
            {
                "target": f"e2e: {best} TTFT at {TARGET_LENGTH // 1024}k tokens ≤ {peer}'s",
                "ratio": other / ttft,
                "detail": f"{peer} {other * 1e3:.0f} ms vs {ttft * 1e3:.0f} ms; of which "
                f"fetch {entry['methods'][peer]['fetch_s'] * 1e3:.1f} ms vs {fetch * 1e3:.1f} ms",
                "ok": other >= ttft,
            }
        )
    return out


def _entries(run: dict[str, Any]) -> list[dict[str, Any]]:
    return list(run["restored"]["lengths"].values())


def run_e2e(job: jobs.Job, workdir: Path) -> dict[str, Any]:
    """Start the servers the job's methods need, run the workers, stop the servers (always)."""
    cluster = servers.DevCluster(workdir / "cluster")
    redis = servers.Redis()
    notes: dict[str, str] = {}
    methods = list(job.methods)
    reason = servers.redis_unavailable()
    if "redis" in methods and reason is not None:
        methods.remove("redis")
        notes["redis"] = f"skipped: {reason}"
    try:
        cluster.start()
        port = redis.start() if "redis" in methods else 0
        job = dataclasses.replace(
            job, methods=tuple(methods), metadata=cluster.metadata, redis_port=port,
            disk_dir=str(workdir / "files"),
        )  # fmt: skip
        try:
            run = run_workers(job, workdir / "workers", cluster.client_env())
        except WorkerFailed as exc:
            raise WorkerFailed(f"{exc}\n{cluster.log_tails()}") from None
        if port:
            notes["redis"] = redis.describe()
        run["notes"] = notes
        return run
    finally:
        redis.stop()
        cluster.stop()


def bench_job(quick: bool, model: str = "bench", lengths: Sequence[int] = ()) -> jobs.Job:
    """The sweep's job (servers are filled in by run_e2e)."""
    return jobs.Job(
        model=model,
        lengths=tuple(lengths) or (QUICK_LENGTHS if quick else LENGTHS),
        recompute_repeats=1 if quick else 2,
        restore_repeats=5 if quick else 15,
        methods=BENCH_METHODS,
    )


def run_section(
    quick: bool,
    write_doc: Callable[[str, str, str], None] | None,
    model: str = "bench",
    lengths: Sequence[int] = (),
) -> dict[str, Any]:
    """What `make bench` and `make e2e` run: measure, check, write results (and the doc)."""
    reason = missing_dependencies()
    if reason is not None:
        print(f"e2e: cannot run: {reason}", file=sys.stderr)
        target = {"target": "e2e: the end-to-end section ran", "ratio": 0.0, "ok": False}
        return {"targets": [{**target, "detail": reason}]}
    started = time.perf_counter()
    load_before = os.getloadavg()[1]
    workdir = Path(tempfile.mkdtemp(prefix="kvtier-e2e-"))
    try:
        run = run_e2e(bench_job(quick, model, lengths), workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    # Other jobs share these 2 vCPUs: the 5-minute load average says how much, before and after.
    run["load_average_5m"] = [load_before, os.getloadavg()[1]]
    run["machine"] = bench_common.machine("no GPU")
    run["date"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    run["elapsed_s"] = time.perf_counter() - started
    run["checks"] = checks(run)
    run["targets"] = targets(run)
    out = ROOT / "bench" / "results" / "e2e.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(run, indent=2))
    if write_doc is not None:
        from bench.e2e import report

        report.plot(run, ROOT / "docs" / "img")
        write_doc("e2e", HEADING, report.render(run))
    return run


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.e2e")
    parser.add_argument("--quick", action="store_true", help="1k and 4k tokens, fewer repeats")
    parser.add_argument("--no-doc", action="store_true", help="do not rewrite docs/benchmarks.md")
    parser.add_argument("--model", default="bench", choices=sorted(layout.SPECS))
    parser.add_argument("--lengths", default="", help="comma-separated context lengths")
    args = parser.parse_args()
    write_doc = None
    if not args.no_doc:
        from bench.run import update_doc

        write_doc = update_doc
    lengths = [int(n) for n in args.lengths.split(",") if n]
    run = run_section(args.quick, write_doc, args.model, lengths)
    if "restored" in run:
        from bench.e2e import report

        print(report.table(run))
    for check in run["targets"]:
        print(f"{'ok  ' if check['ok'] else 'MISS'} {check['target']}: {check['ratio']:.2f} "
              f"({check['detail']})")  # fmt: skip
    return 0 if all(c["ok"] for c in run["targets"]) else 1
