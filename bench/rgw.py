"""Ceph RGW (Debian's radosgw) as the S3 peer: a throwaway single-host Ceph cluster.

`RGWCluster` (a context manager) installs Ceph from Debian when it is missing
(`apt-get install --no-install-recommends ceph-mon ceph-osd radosgw ceph-common`, as root or
through passwordless sudo), then starts, in a temp dir and on 127.0.0.1 only:

- one monitor (msgr2 on a free port; no manager: nothing here needs one, and without it the PG
  autoscaler and its warnings are off),
- one OSD, BlueStore on a sparse file (`bluestore_block_create`; Ceph picks its HDD or SSD
  tuning from what the disk under the file reports, as it would for a user), or MemStore when
  asked (`objectstore="memstore"`),
- pools of size 1 (`osd_pool_default_size = 1`, `min_size = 1`, `mon_allow_pool_size_one`,
  8 PGs each, CRUSH failure domain `osd`),
- one radosgw with the beast frontend on 127.0.0.1 and a free port, Ceph's defaults otherwise,
- an S3 user made with `radosgw-admin user create` (keys generated for the run).

cephx is off inside the cluster (`auth_*_required = none`: the daemons and the admin tools
need no keyrings); clients still sign every S3 request (SigV4, checked by RGW as usual). Every
daemon and tool gets `--conf <temp dir>/ceph.conf`; its data, logs, admin sockets and pid files
stay in the temp dir, and nothing under /etc or /var is written. `stop()` (also on a failed
start, and on leaving the `with`) terminates the daemons and removes the temp dir. A daemon that
does not come up raises `RuntimeError` with the tails of its logs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import subprocess
import tempfile
import types
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

from bench.kv_peers import base

GIB = 1024**3
PACKAGES = ("ceph-mon", "ceph-osd", "radosgw", "ceph-common")
BINARIES = ("ceph-mon", "ceph-osd", "radosgw", "radosgw-admin", "ceph", "monmaptool")
START_TIMEOUT_S = 180.0
TOOL_TIMEOUT_S = 60.0


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class RGWConfig:
    """Where and how the throwaway cluster runs (all paths under `root`)."""

    root: Path
    fsid: str
    mon_port: int
    rgw_port: int
    objectstore: str = "bluestore"  # or "memstore"
    block_bytes: int = 64 * GIB  # the BlueStore file's size (sparse) or MemStore's capacity

    def __post_init__(self) -> None:
        if self.objectstore not in ("bluestore", "memstore"):
            raise ValueError(f"objectstore must be bluestore or memstore, not {self.objectstore}")

    @property
    def conf_path(self) -> Path:
        return self.root / "ceph.conf"

    @property
    def log_dir(self) -> Path:
        return self.root / "log"


def render_conf(cfg: RGWConfig) -> str:
    """The ceph.conf of the cluster: everything in `cfg.root`, 127.0.0.1 only, size-1 pools."""
    root = cfg.root
    store = (
        f"bluestore_block_path = {root}/osd.0.block\n"
        "bluestore_block_create = true\n"
        f"bluestore_block_size = {cfg.block_bytes}\n"
        "bluestore_block_db_create = false\n"
        "bluestore_block_wal_create = false\n"
        if cfg.objectstore == "bluestore"
        else f"memstore_device_bytes = {cfg.block_bytes}\n"
    )
    return f"""\
[global]
fsid = {cfg.fsid}
mon_host = [v2:127.0.0.1:{cfg.mon_port}]
public_addr = 127.0.0.1
ms_bind_ipv6 = false
ms_bind_msgr1 = false
auth_cluster_required = none
auth_service_required = none
auth_client_required = none
run_dir = {root}/run
admin_socket = {root}/run/$name.asok
pid_file = {root}/run/$name.pid
log_file = {cfg.log_dir}/$name.log
mon_cluster_log_file = {cfg.log_dir}/cluster.log
crash_dir = {root}/crash
exec_dir = {root}/run
keyring = {root}/keyring
osd_pool_default_size = 1
osd_pool_default_min_size = 1
osd_pool_default_pg_num = 8
osd_pool_default_pgp_num = 8
osd_pool_default_pg_autoscale_mode = off
osd_crush_chooseleaf_type = 0
mon_allow_pool_size_one = true
mon_warn_on_pool_no_redundancy = false
mon_max_pg_per_osd = 1000
mon_data_avail_warn = 1
osd_objectstore = {cfg.objectstore}

[mon.a]
mon_data = {root}/mon.a

[osd.0]
osd_data = {root}/osd.0
{store}
[client.rgw.bench]
rgw_frontends = beast endpoint=127.0.0.1:{cfg.rgw_port}
rgw_data = {root}/rgw
ms_mon_client_mode = crc
"""


def missing_binaries() -> list[str]:
    return [b for b in BINARIES if shutil.which(b) is None]


def install() -> str | None:
    """apt-get install Ceph's packages when a binary is missing: None once they are there,
    else why not."""
    if not missing_binaries():
        return None
    sudo: list[str] = []
    if os.geteuid() != 0:
        if shutil.which("sudo") is None:
            return "Ceph is not installed, and apt-get needs root or passwordless sudo"
        sudo = ["sudo", "-n"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    apt = [*sudo, "env", f"DEBIAN_FRONTEND={env['DEBIAN_FRONTEND']}", "apt-get"]
    steps = [[*apt, "update", "-q"], [*apt, "install", "-y", "-q", "--no-install-recommends",
                                      *PACKAGES]]  # fmt: skip
    for argv in steps:
        done = subprocess.run(argv, capture_output=True, text=True, check=False, env=env)
        if done.returncode != 0:
            return f"{' '.join(argv)} failed:\n{(done.stdout + done.stderr)[-2000:]}"
    missing = missing_binaries()
    return f"still missing after apt-get: {', '.join(missing)}" if missing else None


def package_versions() -> dict[str, str]:
    """Installed Debian version of each of PACKAGES (dpkg-query)."""
    out = {}
    for package in PACKAGES:
        done = subprocess.run(
            ["dpkg-query", "-W", "-f", "${Version}", package],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        out[package] = done.stdout.strip() if done.returncode == 0 else "?"
    return out


class RGWCluster:
    """mon + OSD + radosgw + an S3 user (see the module docstring); `with RGWCluster() as c:`
    gives `c.endpoint`, `c.access_key`, `c.secret_key`."""

    def __init__(self, objectstore: str = "bluestore", block_bytes: int = 64 * GIB) -> None:
        self.objectstore = objectstore
        self.block_bytes = block_bytes
        self.cfg: RGWConfig | None = None
        self.access_key = ""
        self.secret_key = ""
        self._daemons: list[tuple[str, base.ServerProcess]] = []

    @property
    def endpoint(self) -> str:
        assert self.cfg is not None
        return f"http://127.0.0.1:{self.cfg.rgw_port}"

    def __enter__(self) -> RGWCluster:
        self.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None,
        tb: types.TracebackType | None,
    ) -> None:  # fmt: skip
        self.stop()

    def start(self) -> None:
        """Install if needed, start every daemon, make the user; RuntimeError with the logs'
        tails when something does not come up (everything started is stopped again)."""
        reason = install()
        if reason is not None:
            skip = "python -m bench.run --skip-rgw skips the section"
            raise RuntimeError(f"Ceph RGW unavailable ({skip}): {reason}")
        root = Path(tempfile.mkdtemp(prefix="rgw-", dir="/tmp"))  # short: admin socket paths
        self.cfg = RGWConfig(
            root=root, fsid=str(uuid.uuid4()), mon_port=base.free_port(),
            rgw_port=base.free_port(), objectstore=self.objectstore, block_bytes=self.block_bytes,
        )  # fmt: skip
        try:
            self._start_mon()
            self._start_osd()
            self._start_rgw()
            self._make_user()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop the daemons (radosgw, OSD, monitor) and remove the temp dir; idempotent."""
        for _, daemon in reversed(self._daemons):
            with contextlib.suppress(OSError):
                daemon.stop(grace_s=15.0)
        self._daemons = []
        if self.cfg is not None:
            shutil.rmtree(self.cfg.root, ignore_errors=True)
            self.cfg = None

    def describe(self) -> str:
        versions = package_versions()
        store = "BlueStore on a sparse file" if self.objectstore == "bluestore" else "MemStore"
        return (
            f"Ceph RGW {versions['radosgw']} (Debian {', '.join(PACKAGES)}): one monitor, one "
            f"OSD ({store}), size-1 pools, radosgw with the beast frontend, cephx off inside "
            "the cluster"
        )

    # Steps.

    def _tool(self, *argv: str, timeout_s: float = TOOL_TIMEOUT_S) -> str:
        """Run a Ceph tool with the cluster's conf; its stdout, or RuntimeError."""
        assert self.cfg is not None
        full = [argv[0], "--conf", str(self.cfg.conf_path), *argv[1:]]
        done = subprocess.run(full, capture_output=True, text=True, timeout=timeout_s, check=False)
        if done.returncode != 0:
            raise RuntimeError(
                f"{' '.join(full)} exited with {done.returncode}:\n{done.stderr[-2000:]}\n"
                f"{self.log_tails()}"
            )
        return done.stdout

    def _daemon(self, name: str, argv: Sequence[str]) -> base.ServerProcess:
        assert self.cfg is not None
        full = [argv[0], "-f", "--conf", str(self.cfg.conf_path), *argv[1:]]
        daemon = base.ServerProcess(full, self.cfg.log_dir / f"{name}.stdout")
        self._daemons.append((name, daemon))
        return daemon

    def _wait(self, daemon: base.ServerProcess, probe: Callable[[], bool], what: str) -> None:
        try:
            daemon.wait_ready(probe, what, timeout_s=START_TIMEOUT_S)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}\n{self.log_tails()}") from None

    def _start_mon(self) -> None:
        cfg = self.cfg
        assert cfg is not None
        for sub in ("run", "log", "crash", "mon.a", "osd.0", "rgw"):
            (cfg.root / sub).mkdir(parents=True, exist_ok=True)
        cfg.conf_path.write_text(render_conf(cfg))
        (cfg.root / "keyring").touch()
        monmap = str(cfg.root / "monmap")
        self._tool("monmaptool", "--create", "--fsid", cfg.fsid, "--addv", "a",
                   f"[v2:127.0.0.1:{cfg.mon_port}]", monmap)  # fmt: skip
        self._tool("ceph-mon", "--mkfs", "-i", "a", "--monmap", monmap)
        mon = self._daemon("mon.a", ["ceph-mon", "-i", "a"])
        self._wait(mon, lambda: self._quiet("ceph", "mon", "stat"), "ceph-mon")

    def _start_osd(self) -> None:
        osd_uuid = str(uuid.uuid4())
        osd_id = self._tool("ceph", "osd", "new", osd_uuid).strip()
        if osd_id != "0":
            raise RuntimeError(f"ceph osd new gave id {osd_id!r}, expected 0")
        self._tool("ceph-osd", "-i", "0", "--mkfs", "--osd-uuid", osd_uuid, timeout_s=120)
        osd = self._daemon("osd.0", ["ceph-osd", "-i", "0"])
        self._wait(osd, self._osd_up, "ceph-osd")

    def _start_rgw(self) -> None:
        rgw = self._daemon("rgw", ["radosgw", "-n", "client.rgw.bench"])
        self._wait(rgw, self._rgw_answers, "radosgw")

    def _make_user(self) -> None:
        out = self._tool("radosgw-admin", "user", "create", "--uid", "bench",
                         "--display-name", "bench")  # fmt: skip
        keys = json.loads(out)["keys"][0]
        self.access_key, self.secret_key = keys["access_key"], keys["secret_key"]

    # Probes.

    def _quiet(self, *argv: str) -> bool:
        try:
            self._tool(*argv, "--connect-timeout", "2", timeout_s=10)
        except (RuntimeError, subprocess.TimeoutExpired):
            return False
        return True

    def _osd_up(self) -> bool:
        try:
            dump = json.loads(self._tool("ceph", "osd", "dump", "-f", "json", timeout_s=10))
        except (RuntimeError, subprocess.TimeoutExpired, ValueError):
            return False
        return any(o["osd"] == 0 and o["up"] == 1 for o in dump.get("osds", []))

    def _rgw_answers(self) -> bool:
        """An anonymous GET / (ListBuckets) answers with any HTTP status."""
        try:
            with urllib.request.urlopen(self.endpoint + "/", timeout=2):
                return True
        except urllib.error.HTTPError:
            return True
        except OSError:
            return False

    def log_tails(self, lines: int = 20) -> str:
        """The last lines of every daemon's log (and its stdout), for error messages."""
        if self.cfg is None or not self.cfg.log_dir.exists():
            return ""
        out = []
        for log in sorted(self.cfg.log_dir.iterdir()):
            with contextlib.suppress(OSError):
                text = log.read_text(errors="replace").splitlines()[-lines:]
                if text:
                    out.append(f"===== {log.name}\n" + "\n".join(text))
        return "\n".join(out)
