"""Pure parts of healing: which stripes can be rebuilt, and what `kvtier admin heal` prints."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from kvtier import devcluster, errors, security
from kvtier.cli import admin
from kvtier.cli import progress as progress_cli
from kvtier.proto.common.v1 import common_pb2
from kvtier.proto.gateway.v1 import admin_pb2
from services.gateway import rebuild
from tests import pki as test_pki

State = rebuild.State
MIB, GIB = 1 << 20, 1 << 30


def _drive(index: int, state: rebuild.State, *bad: tuple[int, int]) -> rebuild.Drive:
    return rebuild.Drive(index, common_pb2.DriveSlot(drive_id=f"d{index}"), state, frozenset(bad))


def test_worst_stripe_counts_intact_holders_per_stripe() -> None:
    drives = [_drive(i, State.OK) for i in range(8)]
    assert rebuild.worst_stripe(drives) == 8
    drives += [_drive(8, State.BAD, (1, 0)), _drive(9, State.BAD, (1, 0), (1, 3))]
    drives += [_drive(10, State.STALE), _drive(11, State.UNREACHABLE)]
    assert rebuild.worst_stripe(drives) == 8  # stripe 0: 10 holders, 2 bad
    drives[0] = _drive(0, State.BAD, (1, 0))
    assert rebuild.worst_stripe(drives) == 7


def test_split_target() -> None:
    assert admin.split_target("") == ("", "")
    assert admin.split_target("models") == ("models", "")
    assert admin.split_target("models/llama/") == ("models", "llama/")
    with pytest.raises(errors.InvalidArgument):
        admin.split_target("/prefix")


def test_summary_and_plain_progress() -> None:
    progress = admin_pb2.HealProgress(scanned=12, healed=3, unrecoverable=1, healthy=8)
    assert admin.summary(progress, dry_run=False) == "scanned 12, healed 3, unrecoverable 1"
    progress.skipped = 2
    assert admin.summary(progress, dry_run=True) == (
        "scanned 12, healed 3, unrecoverable 1, skipped 2 (drives unreachable: the gateway "
        "retries them) (dry run: nothing was written)"
    )
    progress.bytes_scanned = 12 * MIB
    out = io.StringIO()
    now = [50.0]
    display = admin.Display(out, tty=False, clock=lambda: now[0])
    now[0] += 4.0
    totals = progress_cli.Totals(objects=40, bytes=40 * MIB)
    display.show(progress, totals)
    now[0] += 1.0
    display.show(progress, totals)  # within 5 s: no second line
    assert out.getvalue() == (
        "heal: scanned 12 of 40, healed 3, unrecoverable 1, skipped 2; "
        "12.0 MiB of 40.0 MiB, 3.0 MiB/s, ETA 9s\n"
    )
    now[0] += 4.0
    display.show(progress, None)  # 5 s on: a line; no total, no ETA
    assert out.getvalue().splitlines()[-1] == (
        "heal: scanned 12, healed 3, unrecoverable 1, skipped 2; 12.0 MiB, 1.3 MiB/s"
    )
    display.clear()  # nothing drawn in place: nothing to clear
    assert out.getvalue().count("\n") == 2


def test_bar_by_bytes_then_objects() -> None:
    meter = progress_cli.Meter(clock=iter([0.0, 10.0, 10.0, 10.0]).__next__)
    progress = admin_pb2.HealProgress(scanned=5, current_key="b/k", bytes_scanned=3 * GIB)
    assert admin.render_bar(progress, None, meter) == (
        "3.0 GiB, 307.2 MiB/s; scanned 5, healed 0, unrecoverable 0  b/k"
    )
    # By bytes: 3 GiB of 4 GiB is 75 % though only half the objects are done.
    totals = progress_cli.Totals(objects=10, bytes=4 * GIB)
    assert admin.render_bar(progress, totals, meter) == (
        "[" + "#" * 18 + "." * 6 + "]  75% 3.0 GiB of 4.0 GiB, 307.2 MiB/s, ETA 3s; "
        "scanned 5 of 10, healed 0, unrecoverable 0  b/k"
    )
    # Empty objects only: by objects (5 of 10 in 10 s: 10 s left).
    empty = admin_pb2.HealProgress(scanned=5, current_key="b/e")
    assert admin.render_bar(empty, progress_cli.Totals(objects=10, bytes=0), meter) == (
        "[" + "#" * 12 + "." * 12 + "]  50% 0 B of 0 B, 0.5 objects/s, ETA 10s; "
        "scanned 5 of 10, healed 0, unrecoverable 0  b/e"
    )


def test_durations() -> None:
    assert [progress_cli.duration_text(s) for s in (0, 44.6, 185, 7620)] == [
        "0s",
        "45s",
        "3m05s",
        "2h07m",
    ]


def test_gateway_address(tmp_path: Path) -> None:
    user = security.ClientSecurity(access_key="AK", secret_key="secret-secret")
    operator = test_pki.session().client("operator")
    assert admin.gateway_address("h:1", str(tmp_path), user) == "h:1"
    with pytest.raises(devcluster.ClusterError, match="pass --gateway"):
        admin.gateway_address("", str(tmp_path), user)
    info = {"gateway_grpc": "127.0.0.1:7", "gateway_grpc_service": "127.0.0.1:8"}
    (tmp_path / "cluster.json").write_text(json.dumps(info))
    # Users reach the gateway's client port, certificate holders its service port.
    assert admin.gateway_address("", str(tmp_path), user) == "127.0.0.1:7"
    assert admin.gateway_address("", str(tmp_path), operator) == "127.0.0.1:8"
