"""Helpers for tests that run kvtier commands and services as real subprocesses."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kvtier import security
from tests import pki as test_pki

pytestmark = pytest.mark.integration


def cli_env(**extra: str) -> dict[str, str]:
    """The environment of a `kvtier` command: this process's, without the test session's own
    credentials (KVTIER_CA_FILE etc. name the test PKI, not the dev cluster's)."""
    env = {k: v for k, v in os.environ.items() if k not in _SESSION_CREDENTIALS}
    env.update(extra)
    return env


_SESSION_CREDENTIALS = frozenset({"KVTIER_CA_FILE", "KVTIER_CERT_FILE", "KVTIER_KEY_FILE"})


def cluster_security(state_dir: Path) -> security.ClientSecurity:
    """Mutual TLS as the operator of the dev cluster in state_dir (from its cluster.json)."""
    return security.ClientSecurity.from_cluster_file(state_dir / "cluster.json", as_operator=True)


def user_security(state_dir: Path) -> security.ClientSecurity:
    """The admin user of the dev cluster in state_dir (its keys and CA from cluster.json), as
    SDK users connect: session tokens over TLS to the client ports (`metadata_client`,
    `gateway_grpc`)."""
    return security.ClientSecurity.from_cluster_file(state_dir / "cluster.json")


#: Port flags of a service started as a subprocess in a test: any free ports, since the services'
#: own defaults are the fixed ports (docs/operations.md) that a dev cluster may hold.
EPHEMERAL_PORTS = ("--grpc-port=0", "--client-port=0", "--metrics-port=0")


def service_tls_flags(role: str) -> list[str]:
    """The TLS flags of a service of role started as a subprocess against the test session's
    etcd (tests/pki.py): its certificate from the session's PKI."""
    settings = test_pki.session().service_settings(role)
    return [f"--{name.replace('_', '-')}={value}" for name, value in settings.items()]


def kvtier_cmd(
    *args: str, timeout_s: float = 60, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run `kvtier ARGS` (through this interpreter) and capture its output. `up` gets
    `--ports auto` unless args name --ports: tests run many clusters at once."""
    if args[:1] == ("up",) and "--ports" not in args:
        args = ("up", "--ports", "auto", *args[1:])
    return subprocess.run(
        [sys.executable, "-m", "kvtier.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
        env=env or cli_env(),
    )


def wait_file_json(path: Path, proc: subprocess.Popen[str], timeout_s: float) -> dict[str, Any]:
    """Wait for a JSON file written by proc; fail with proc's output if it dies first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists():
            try:
                value = json.loads(path.read_text())
            except ValueError:
                value = None
            if isinstance(value, dict):
                return value
        if proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            raise AssertionError(f"exited with {proc.returncode} before writing {path}:\n{out}")
        time.sleep(0.1)
    raise AssertionError(f"{path} not written within {timeout_s}s")


def pid_alive(pid: int) -> bool:
    """Whether a process exists (zombies of our own children count as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def dump_logs(state_dir: Path) -> str:
    """Every service log of a dev cluster, for failure reports."""
    parts = []
    for log in sorted((state_dir / "logs").glob("*.log")):
        parts.append(f"===== {log.name}\n{log.read_text(errors='replace')[-4000:]}")
    return "\n".join(parts)


@contextlib.contextmanager
def running_cluster(state: Path, *options: str, **env: str) -> Iterator[dict[str, Any]]:
    """A detached dev cluster (6 datanodes, 1 kvcache node, short leases; options: more `kvtier
    up` flags) in state, its services with env added to theirs: its cluster.json, with "state"
    added; stopped when the block ends."""
    up = kvtier_cmd(
        "up", "--state-dir", str(state), "--detach", "--kvcache-nodes", "1",
        "--lease-ttl-s", "2", "--shutdown-grace-s", "2", *options, timeout_s=150,
        env=cli_env(**env),
    )  # fmt: skip
    assert up.returncode == 0, up.stdout + up.stderr + dump_logs(state)
    try:
        info = json.loads((state / "cluster.json").read_text())
        info["state"] = state
        yield info
    finally:
        kvtier_cmd("down", "--state-dir", str(state), timeout_s=90)


@contextlib.contextmanager
def running_s3_cluster(state: Path) -> Iterator[dict[str, Any]]:
    """running_cluster for the S3 tests: its services skip the lame-duck linger on shutdown
    (1 s per data-plane role of each `down`; the S3 tests stop no service,
    tests/fault/test_rolling.py covers the linger), and its kvcache node has a 1 GiB arena:
    the S3 modules sharing it write more KV-bucket bytes than the default 256 MiB holds, and
    its eviction would drop one module's blocks under another's writes (a multipart upload's
    parts between UploadPart and Complete: InvalidPart)."""
    roles = ("DATANODE", "KVCACHE", "GATEWAY")
    linger = {f"KVTIER_{role}_DRAIN_LINGER_S": "0" for role in roles}
    with running_cluster(state, "--kvcache-arena-mib", "1024", **linger) as info:
        yield info


@pytest.fixture(scope="package")
def s3_shared_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The dev cluster that the S3 acceptance modules share (through s3_cluster.s3_cluster):
    starting and stopping ten services costs 15-20 s on a 2-core machine, once per module
    before. The modules keep apart by names (each has its own tenants and buckets); a module
    that stops part of the cluster or starts it with other settings takes
    s3_cluster.own_s3_cluster instead."""
    with running_s3_cluster(tmp_path_factory.mktemp("s3-shared") / "state") as info:
        yield info


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The modules on the shared S3 cluster run last of this directory, one after another, so
    that it is up for them only (pytest tears a package fixture down at the package's end);
    every other order is kept."""
    here = Path(__file__).parent
    slots = [i for i, item in enumerate(items) if item.path.is_relative_to(here)]
    sharing = {
        items[i].path for i in slots if "s3_shared_cluster" in getattr(items[i], "fixturenames", ())
    }
    ordered = sorted((items[i] for i in slots), key=lambda item: item.path in sharing)
    for i, item in zip(slots, ordered, strict=True):
        items[i] = item


@pytest.fixture
def state_dir(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Path]:
    """A dev-cluster state dir whose logs are printed when the test fails, and whose detached
    cluster is stopped however the test ended (an assertion before its own `down` would
    otherwise leave the cluster running for the rest of the suite)."""
    path = tmp_path / "state"
    yield path
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        sys.stderr.write(dump_logs(path))
    if (path / "cluster.json").exists():
        kvtier_cmd("down", "--state-dir", str(path), timeout_s=60)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report
