"""The `kvtier` command's flags, errors and port plan (no cluster: nothing here starts one)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import kvtier
from kvtier import devcluster, devports, errors, names
from kvtier.cli import main as cli_main
from kvtier.cli import parser as cli_parser
from kvtier.cli import status as status_cmd
from kvtier.proto.common.v1 import common_pb2
from services.gateway.s3 import server as s3_server


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `kvtier ARGV` in this process."""
    try:
        code = cli_main.main(list(argv))
    except SystemExit as exc:  # argparse: --help, --version and its errors
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(capsys, "--version")
    assert (code, out) == (0, f"kvtier {kvtier.__version__}\n")


def test_help_shows_defaults_and_the_fixed_ports(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(capsys, "up", "--help")
    assert code == 0
    text = " ".join(out.split())
    for shown in (
        "(default: .kvtier)",
        "(default: 6)",
        "(default: fixed)",
        "(default: 9000)",
        "(default: 7000)",
        "(default: 7001)",
        "(default: 7379)",
    ):
        assert shown in text, shown
    for command in (["status"], ["down"], ["admin", "kv", "quota"]):  # options without help too
        code, out, _ = _run(capsys, *command, "--help")
        assert code == 0
        assert "default: .kvtier" in out, command


def test_the_commands_not_run_keep_their_help() -> None:
    # main builds only the run command's options; the others' one-line help must not drift.
    assert cli_parser.build("").format_help() == cli_parser.build().format_help()
    assert cli_parser.ETCD_PREFIX == devcluster.ETCD_PREFIX


def test_help_and_usage_errors_import_no_grpc_crypto_or_aiohttp() -> None:
    # Start-up time: a fresh interpreter, as every `kvtier` command is.
    script = (
        "import sys\n"
        "from kvtier.cli import main\n"
        "assert main.main(['status', '--state-dir', '/proc/kvtier']) == 2\n"
        "try:\n"
        "    main.main(['--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & "
        "{'grpc', 'cryptography', 'aiohttp', 'aetcd', 'google'}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=30, check=True
    )
    assert done.stdout.splitlines()[-1] == "[]", done.stdout


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["up", "--state-dir", ""], "--state-dir: must not be empty"),
        (["up", "--state-dir", "/proc/kvtier"], "on /proc"),
        (["up", "--state-dir", "/sys"], "on /sys"),
        (["up", "--state-dir", "FILE"], "is not a directory"),
        (["status", "--state-dir", "FILE"], "is not a directory"),
        (["down", "--state-dir", "/proc"], "on /proc"),
        (["revive", "--state-dir", "/dev/kvtier"], "on /dev"),
        (["up", "--datanodes", "0"], "--datanodes: 0 must be at least 1"),
        (["up", "--kvcache-nodes", "x"], "--kvcache-nodes: 'x' is not an integer"),
        (["up", "--s3-port", "70000"], "--s3-port: 70000 is not in 1..65535"),
        (["up", "--ports", "some"], "invalid choice"),
        (["status", "--jsn"], "unrecognized arguments: --jsn"),
        (["health", "--timeout-s", "soon"], "--timeout-s"),
        (["admin", "heal", "b", "--json"], "--json and --limit go with `kvtier admin heal queue`"),
        (["admin", "heal", "queue", "--limit", "0"], "--limit 0: give at least 1"),
    ],
)
def test_a_bad_flag_or_state_dir_is_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, argv: list[str], says: str
) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("not a directory")
    argv = [str(a_file) if a == "FILE" else a for a in argv]
    code, out, err = _run(capsys, *argv)
    assert code == 2, (out, err)
    assert err.count("\n") == 1, err  # one line: no usage block, no traceback
    assert err.startswith(f"kvtier {argv[0]}: error: "), err
    assert says in err
    assert "usage:" not in err
    assert not (tmp_path / "kvtier").exists()


def test_a_directory_that_cannot_be_made_is_one_line_and_exit_1(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("not a directory")
    code, out, err = _run(capsys, "admin", "certs", "init", "--cluster", "c1", "--dir",
                          str(a_file / "certs"))  # fmt: skip
    assert code == 1, (out, err)
    assert err.count("\n") == 1, err  # one line: no traceback
    assert err.startswith("kvtier admin: error: "), err
    assert "Not a directory" in err


def test_a_taken_port_is_one_line_and_exit_2_before_anything_starts(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    state = tmp_path / "state"
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        taken = holder.getsockname()[1]
        # etcd's client port is the first one checked.
        code, out, err = _run(capsys, "up", "--state-dir", str(state), "--etcd-port", str(taken))
    assert code == 2, (out, err)
    assert err.count("\n") == 1, err
    assert f"port {taken} (etcd client) is in use" in err
    assert "--ports auto" in err
    assert not (state / "logs").exists()  # nothing was started
    assert not (state / "etcd").exists()


def test_the_fixed_plan() -> None:
    plan = devports.PortPlan()
    assert plan.etcd_ports() == (7379, 7380)
    assert plan.node_ports("gateway", 1) == {
        "grpc_port": 7000, "client_port": 7443, "metrics_port": 7050, "s3_port": 9000,
    }  # fmt: skip
    assert plan.node_ports("metadata", 1) == {
        "grpc_port": 7001, "client_port": 7444, "metrics_port": 7051,
    }  # fmt: skip
    assert plan.node_ports("datanode", 3) == {
        "grpc_port": 7103, "client_port": 0, "metrics_port": 7153,
    }  # fmt: skip
    assert plan.node_ports("kvcache", 2) == {
        "grpc_port": 7202, "client_port": 7302, "metrics_port": 7252,
    }  # fmt: skip
    moved = devports.PortPlan(offset=1000, s3=9500)
    assert moved.etcd_ports() == (8379, 8380)
    assert moved.node_ports("gateway", 1)["s3_port"] == 10500
    auto = devports.PortPlan(auto=True)
    assert auto.etcd_ports() == (0, 0)
    assert set(auto.node_ports("gateway", 1).values()) == {0}
    assert auto.every_port({"datanode": 500}) == []
    counts = {"metadata": 1, "datanode": 6, "kvcache": 2, "gateway": 1}
    ports = [p for _, p in plan.every_port(counts)]
    assert len(ports) == len(set(ports)) == 2 + 4 + 3 + 6 * 2 + 2 * 3


@pytest.mark.parametrize(
    ("plan", "counts", "says"),
    [
        (devports.PortPlan(), {"datanode": 50}, "room for 49 nodes per role"),
        (devports.PortPlan(s3=7000), {"gateway": 1}, "would both use port 7000"),
        (devports.PortPlan(offset=60000), {"gateway": 1}, "is not in 1..65535"),
    ],
)
def test_a_plan_that_cannot_work_is_refused(
    plan: devports.PortPlan, counts: dict[str, int], says: str
) -> None:
    with pytest.raises(devports.PortError, match=says):
        plan.check(counts)


def test_a_service_runs_in_a_process_group_of_its_own(tmp_path: Path) -> None:
    """A terminal's Ctrl-C (SIGINT to the foreground group) reaches the supervisor only, which
    then stops the services in order; not every service at once."""
    child = devcluster.Child(
        name="sleeper", role="datanode", argv=["sleep", "30"], log_path=tmp_path / "s.log"
    )
    child.start()
    assert child.proc is not None
    try:
        assert os.getpgid(child.proc.pid) == child.proc.pid
        assert os.getpgid(child.proc.pid) != os.getpgrp()
    finally:
        child.proc.kill()
        child.proc.wait()


def test_up_passes_the_plan_to_every_process(tmp_path: Path) -> None:
    fixed = devcluster.ClusterOptions(state_dir=tmp_path, ports=devports.PortPlan(offset=5))
    argv = {c.name: c.argv for c in devcluster._children(fixed, "127.0.0.1:7384")}
    assert {"--grpc-port=7005", "--s3-port=9005", "--metrics-port=7055"} <= set(argv["gateway-1"])
    assert {"--grpc-port=7111", "--metrics-port=7161"} <= set(argv["datanode-6"])
    assert {"--grpc-port=7207", "--client-port=7307"} <= set(argv["kvcache-2"])
    auto = devcluster.ClusterOptions(state_dir=tmp_path)  # the library's default: ephemeral
    for child in devcluster._children(auto, "127.0.0.1:2379"):
        ports = [a for a in child.argv if a.split("=")[0].endswith("-port")]
        assert ports, child.argv
        assert all(a.endswith("=0") for a in ports), child.argv


def _state(**changes: Any) -> dict[str, Any]:
    node = {
        "node_id": "gateway-1", "role": "gateway", "address": "127.0.0.1:7000",
        "metrics": "127.0.0.1:7050", "s3": "https://127.0.0.1:9000", "health": "SERVING",
        "epoch": 4, "dataplane": None, "dataplane_offered": [], "kvcache": None,
    }  # fmt: skip
    meta = {**node, "node_id": "metadata-1", "role": "metadata", "s3": None}
    state = {
        "epoch": 4, "deployment_id": "d", "nodes": [node, meta], "down": [], "pending_drives": 0,
        "pools": [{"index": 0, "sets": [
            {"index": 0, "layout": "EC:8+4", "online": 12, "drives": 12},
        ]}],
    }  # fmt: skip
    state.update(changes)
    state["problems"] = status_cmd.problems(state)
    state["healthy"] = not state["problems"]
    return state


def test_status_shows_the_endpoints_and_a_healthy_verdict() -> None:
    state = _state()
    assert state["healthy"]
    text = status_cmd.render(state)
    assert "S3 endpoint: https://127.0.0.1:9000" in text
    assert "METRICS" in text
    assert "127.0.0.1:7050" in text
    assert text.endswith("cluster healthy")


def test_status_names_what_degrades_the_cluster() -> None:
    sets = [{"index": 0, "layout": "EC:8+4", "online": 10, "drives": 12}]
    state = _state(down=["datanode-3"], pools=[{"index": 0, "sets": sets}])
    assert not state["healthy"]
    assert state["problems"] == ["datanode-3 is DOWN", "pool 0 set 0: 10/12 drives online"]
    assert "cluster DEGRADED: datanode-3 is DOWN; pool 0 set 0: 10/12" in status_cmd.render(state)
    assert status_cmd.render_health(state).splitlines()[-1].startswith("cluster DEGRADED")
    lonely = _state(nodes=[], pools=[], pending_drives=4)
    assert lonely["problems"] == [
        "no metadata in the cluster map",
        "no gateway in the cluster map",
        "no pool formed (4 drives pending)",
    ]


def _map(*, metadata: bool = True, online: int = 12) -> common_pb2.ClusterMap:
    cmap = common_pb2.ClusterMap(epoch=3)
    cmap.nodes.add(node_id="gateway-1", role=common_pb2.NODE_ROLE_GATEWAY)
    if metadata:
        cmap.nodes.add(node_id="metadata-1", role=common_pb2.NODE_ROLE_METADATA)
    es = cmap.pools.add(index=0).sets.add(index=0, data_shards=8, parity_shards=4)
    for i in range(12):
        state = common_pb2.DRIVE_STATE_ONLINE if i < online else common_pb2.DRIVE_STATE_OFFLINE
        es.slots.add(drive_id=f"d{i}", node_id=f"datanode-{i // 2 + 1}", state=state)
    return cmap


def test_the_s3_ready_probe_follows_the_map() -> None:
    assert s3_server._ready(_map())
    assert s3_server._ready(_map(online=8))  # 4 drives away: every object still readable
    assert not s3_server._ready(_map(online=7))
    assert not s3_server._ready(_map(metadata=False))
    assert not s3_server._ready(common_pb2.ClusterMap())
    # The probes' paths can never be a bucket's.
    for path in (s3_server.HEALTH_LIVE, s3_server.HEALTH_READY):
        with pytest.raises(errors.InvalidArgument):
            names.check_bucket(path.split("/")[1])
