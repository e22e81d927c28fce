"""The dashboard picture in docs/operations.md (issue 17), and the proof that the board's
expressions work on real data: a dev cluster (`kvtier up`, secure), Debian's Prometheus
scraping every node's metrics port (HTTPS, the operator's client certificate), a short mixed
workload, then every target of deploy/grafana/kvtier.json evaluated through Prometheus's HTTP
API over the run and drawn by bench/dashboard_render.py at the panels' gridPos.

The workload (about 90 s, a few MiB): S3 PUT/GET/HEAD of 4 KiB, 256 KiB and 2 MiB objects
through boto3 with a 404 each round; KV puts, gets and misses through `kvtier.KVClient` for
two tenants, one namespace of them write-through (the durable tier); one shard's bytes flipped
(a degraded read, healed by the gateway's heal queue) and one drive's shard of another object
deleted, then `kvtier admin heal` (rebuilt); lifecycle rules (with a 5-second "day") expiring
a small `tmp/` object of each round and aborting the multipart uploads left open under
`uploads/`. Every read is compared with what was written.

Fails (exit 1) when an expression is refused by Prometheus (a PromQL error), when an
expression answers no data (no series, or only NaN) unless EXPECTED_EMPTY says why it must, or
when the `tenant` variable finds no tenant; lists the expressions without data either way.

Usage: python -m bench.dashboard_figure  (`make dashboard`)
Writes docs/img/dashboard.png. Stops Prometheus and the cluster on every path.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import botocore.exceptions

from bench import dashboard_prom, dashboard_render, object_bench, s3_bench, secure

ROOT = Path(__file__).resolve().parent.parent
IMG = ROOT / "docs" / "img" / "dashboard.png"
KIB, MIB = 1024, 1024 * 1024
BUCKET = "board"
OBJECT_SIZES = (4 * KIB, 256 * KIB, 2 * MIB)
KV_BLOCK_BYTES = 64 * KIB
KV_BLOCKS = 8  # put per tenant and round
WORKLOAD_S = 90.0
ROUND_S = 5.0
HEAL_ROUND = 6
#: A lifecycle "day" of 5 s and a pass every 5 s (the gateway's lifecycle_day_s, as Ceph RGW's
#: rgw_lc_debug_interval), so that Days=1 rules act within the run.
LIFECYCLE_ENV = {"KVTIER_GATEWAY_LIFECYCLE_DAY_S": "5", "KVTIER_GATEWAY_LIFECYCLE_INTERVAL_S": "5"}
LIFECYCLE_RULES = [
    {"ID": "tmp", "Status": "Enabled", "Filter": {"Prefix": "tmp/"}, "Expiration": {"Days": 1}},
    {"ID": "uploads", "Status": "Enabled", "Filter": {"Prefix": "uploads/"},
     "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": 1}},
]  # fmt: skip
#: Targets (panel, refId) this run leaves without data, and why: labelled counters of faults the
#: workload does not cause have no series until the first event (prometheus_client exports a
#: labelled metric's series only once a label set is used), so they show "No data", not 0.
EXPECTED_EMPTY = {
    ("gRPC server errors by code", "A"): "no RPC failed on the server's side (UNAVAILABLE, "
    "INTERNAL, ...: kvtier_rpc_server_seconds_count; a miss's NOT_FOUND is not one)",
    ("S3 timeouts by kind", "A"): "no S3 request timed out (kvtier_gateway_s3_timeouts_total)",
    ("Corrupt blocks found", "A"): "no KV block was corrupt: the run damages an object shard, "
    "not a KV block (kvtier_kvcache_corrupt_blocks_total)",
    ("Read-through failures", "A"): "the durable tier stayed reachable "
    "(kvtier_kvcache_read_through_failures_total)",
    ("Spill failures, drops, backpressure", "A"): "no durable-tier upload or delete was given "
    "up (kvtier_kvcache_spill_failures_total)",
    ("Spill failures, drops, backpressure", "B"): "no block left DRAM without reaching the "
    "durable tier (kvtier_kvcache_spill_dropped_total)",
}


def _check(ok: bool, failure: str) -> None:
    """A workload check (not `assert`: it must hold under -O too)."""
    if not ok:
        raise RuntimeError(failure)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _admin_user(state: Path, tenant: str) -> secure.BenchUser:
    """A new admin user of tenant (`kvtier admin user add --admin`)."""
    made = subprocess.run(
        [sys.executable, "-m", "kvtier.cli.main", "admin", "user", "add", "--tenant", tenant,
         "--admin", "--json", "--state-dir", str(state)],
        capture_output=True, text=True, timeout=60, check=False, env=secure.cli_env(),
    )  # fmt: skip
    if made.returncode != 0:
        raise RuntimeError(f"kvtier admin user add failed: {made.stderr.strip()[-500:]}")
    user = json.loads(made.stdout)
    ca_file = json.loads((state / "cluster.json").read_text())["ca_file"]
    return secure.BenchUser(access_key=user["access_key"], secret_key=user["secret_key"],
                            tenant=user["tenant"], ca_file=ca_file)  # fmt: skip


class Workload:
    """The S3 and KV traffic of one run (rounds), and the faults healed in the middle."""

    def __init__(self, cluster: object_bench.DevCluster, seed: int) -> None:
        import kvtier

        self.cluster = cluster
        self.rng = random.Random(seed)
        info = cluster.info
        self.s3 = s3_bench._client(info["gateway_s3"], info["s3_access_key"],
                                   info["s3_secret_key"], info.get("ca_file", ""))  # fmt: skip
        self.s3.create_bucket(Bucket=BUCKET)
        self.s3.put_bucket_lifecycle_configuration(
            Bucket=BUCKET, LifecycleConfiguration={"Rules": LIFECYCLE_RULES}
        )
        other = _admin_user(cluster.state, "team-b")  # SetNamespacePolicy needs an admin
        self.kv = [
            kvtier.KVClient.connect(
                metadata=info["metadata_client"], namespace="prefixes", security=user.security()
            )
            for user in (cluster.user, other)
        ]
        durable = kvtier.KVClient.connect(metadata=info["metadata_client"], namespace="durable",
                                          security=other.security())  # fmt: skip
        durable.set_durability("write_through")
        self.kv.append(durable)
        self.objects: dict[str, str] = {}  # key -> sha256
        self.round = 0

    def close(self) -> None:
        for kv in self.kv:
            kv.close()

    def _bytes(self, size: int) -> bytes:
        return self.rng.randbytes(size)

    def s3_round(self) -> None:
        for size in OBJECT_SIZES:
            key = f"r{self.round}/{size}"
            data = self._bytes(size)
            self.s3.put_object(Bucket=BUCKET, Key=key, Body=data)
            self.objects[key] = _sha(data)
            got = self.s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()
            _check(_sha(got) == self.objects[key], f"GET {key}: other bytes than PUT")
        self.s3.head_object(Bucket=BUCKET, Key=f"r{self.round}/{OBJECT_SIZES[0]}")
        self.s3.put_object(Bucket=BUCKET, Key=f"tmp/r{self.round}", Body=self._bytes(KIB))
        if self.round % 3 == 0:  # left incomplete: the lifecycle rule aborts it
            self.s3.create_multipart_upload(Bucket=BUCKET, Key=f"uploads/r{self.round}")
        try:
            self.s3.get_object(Bucket=BUCKET, Key=f"missing/{self.round}")
        except botocore.exceptions.ClientError as exc:
            _check(exc.response["Error"]["Code"] == "NoSuchKey", f"missing key: {exc.response}")
        else:
            raise RuntimeError("GET of a missing key answered 200")

    def kv_round(self) -> None:
        for n, kv in enumerate(self.kv):
            keys = [f"t{n}/r{self.round}/{i}".encode() for i in range(KV_BLOCKS)]
            blocks = [self._bytes(KV_BLOCK_BYTES) for _ in keys]
            for key, block in zip(keys, blocks, strict=True):
                _check(kv.put(key, block), f"KV put {key!r} refused")
            for key, block in zip(keys, blocks, strict=True):
                out = bytearray(KV_BLOCK_BYTES)
                _check(kv.get(key, out) == len(block), f"KV get {key!r}: not found")
                _check(bytes(out) == block, f"KV get {key!r}: other bytes than put")
            for i in range(KV_BLOCKS // 4):  # misses
                missing = kv.get(f"absent/r{self.round}/{i}".encode(), bytearray(16))
                _check(missing is None, "KV get of an absent key found a block")

    def _shard_files(self, key: str) -> dict[Path, int]:
        """The part files of object key on every drive -> their shard index."""
        from services.datanode import shards

        found = {}
        for part in self.cluster.state.glob(f"nodes/*/drive*/objects/{BUCKET}@*/**/part.1"):
            meta = shards.decode_meta((part.parent.parent / "meta").read_bytes(), str(part))
            if meta.key == key:
                found[part] = meta.shard_index
        return found

    def faults(self) -> None:
        """A data shard's bytes flipped, then read (degraded; the heal queue rewrites it), and
        one drive's copy of another object deleted, then `kvtier admin heal` (rebuilt)."""
        key = f"r{HEAL_ROUND - 1}/{OBJECT_SIZES[-1]}"
        files = self._shard_files(key)
        data_files = sorted(f for f, index in files.items() if index < 8)  # parity: unread
        if not data_files:
            raise RuntimeError(f"no data shard file of {key} found: {files}")
        victim = self.rng.choice(data_files)
        damaged = bytearray(victim.read_bytes())
        damaged[:64] = bytes(b ^ 0xFF for b in damaged[:64])
        victim.write_bytes(bytes(damaged))
        got = self.s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()
        _check(_sha(got) == self.objects[key], "degraded GET returned other bytes")
        other = self._shard_files(f"r{HEAL_ROUND - 2}/{OBJECT_SIZES[-1]}")
        gone = self.rng.choice(sorted(other)).parent.parent  # <h>/: meta and the part
        shutil.rmtree(gone)
        heal = subprocess.run(
            [sys.executable, "-m", "kvtier.cli.main", "admin", "heal", BUCKET,
             "--state-dir", str(self.cluster.state)],
            capture_output=True, text=True, timeout=120, check=False, env=secure.cli_env(),
        )  # fmt: skip
        print(f"kvtier admin heal: {heal.stdout.strip()[-200:]}", flush=True)
        _check(heal.returncode == 0, f"kvtier admin heal failed: {heal.stdout}{heal.stderr}")
        _check((gone / "meta").exists(), f"kvtier admin heal did not rebuild {gone}")

    def run(self, duration_s: float) -> None:
        end = time.monotonic() + duration_s
        while time.monotonic() < end:
            started = time.monotonic()
            self.s3_round()
            self.kv_round()
            if self.round == HEAL_ROUND:
                self.faults()
            self.round += 1
            time.sleep(max(0.0, ROUND_S - (time.monotonic() - started)))


def _evaluate(
    prom: dashboard_prom.Prometheus, board: dict[str, Any], start: float, end: float
) -> list[dashboard_prom.Target]:
    step = dashboard_prom.SCRAPE_INTERVAL_S
    targets = dashboard_prom.panel_queries(board, step_s=step)
    for target in targets:
        prom.query_range(target, start, end, step)
    return targets


def _verdict(targets: list[dashboard_prom.Target], tenants: list[str]) -> list[str]:
    """Print what every target returned; the failures."""
    failures = []
    for t in targets:
        state = "ERROR " + t.error if t.error else (
            f"{len(t.series)} series" if t.has_data else "NO DATA")  # fmt: skip
        print(f"  {t.panel} [{t.ref}]: {state}")
        if t.error:
            failures.append(f"{t.panel} [{t.ref}]: {t.expr}: {t.error}")
    empty = [t for t in targets if not t.error and not t.has_data]
    print(f"targets without data ({len(empty)}):")
    for t in empty:
        why = EXPECTED_EMPTY.get((t.panel, t.ref))
        print(f"  {t.panel} [{t.ref}]: {why or 'UNEXPECTED'}")
        if why is None:
            failures.append(f"{t.panel} [{t.ref}]: {t.expr}: no data, not in EXPECTED_EMPTY")
    if not tenants:
        failures.append("the tenant variable (label_values) found no tenant")
    return failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.dashboard_figure")
    parser.add_argument("--out", type=Path, default=IMG, help="the PNG (default: %(default)s)")
    parser.add_argument("--workload-s", type=float, default=WORKLOAD_S, help="%(default)s")
    parser.add_argument("--seed", type=int, default=17, help="%(default)s")
    parser.add_argument("--board", type=Path, default=dashboard_prom.BOARD,
                        help="the dashboard JSON (default: %(default)s)")  # fmt: skip
    args = parser.parse_args(argv)
    board = dashboard_prom.load_board(args.board)
    with tempfile.TemporaryDirectory(prefix="kvtier-dashboard-") as work:
        cluster = object_bench.DevCluster(Path(work) / "state", "--kvcache-nodes", "1")
        try:
            info = cluster.start(service_env=LIFECYCLE_ENV)
            targets = dashboard_prom.metrics_targets(cluster.state)
            with dashboard_prom.Prometheus(Path(work) / "prometheus", info, targets) as prom:
                prom.wait_scraped()
                start = time.time() - 2 * dashboard_prom.SCRAPE_INTERVAL_S
                workload = Workload(cluster, args.seed)
                try:
                    workload.run(args.workload_s)
                finally:
                    workload.close()
                time.sleep(3 * dashboard_prom.SCRAPE_INTERVAL_S)  # the last rounds scraped
                if down := prom.targets_down():
                    raise RuntimeError(f"scrapes failing: {down}")
                end = time.time()
                answers = _evaluate(prom, board, start, end)
                tenants = prom.label_values("tenant", "kvtier_kvcache_tenant_bytes")
        finally:
            cluster.stop()
    print(f"tenant variable: {tenants}")
    failures = _verdict(answers, tenants)
    when = datetime.datetime.fromtimestamp(end, datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    note = (f"drawn by bench/dashboard_figure.py from Prometheus's answers, not Grafana; "
            f"dev cluster, {args.workload_s:g} s workload, {when}")  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    dashboard_render.render(board, answers, args.out, note, (start, end))
    print(f"wrote {args.out}")
    for failure in failures:
        print(f"FAIL {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
