"""Pure parts of healing: which stripes can be rebuilt, and what `kvtier admin heal` prints."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from kvtier import devcluster, errors, security
from kvtier.cli import admin
from kvtier.proto.common.v1 import common_pb2
from kvtier.proto.gateway.v1 import admin_pb2
from services.gateway import rebuild
from tests import pki as test_pki

State = rebuild.State


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
    out = io.StringIO()
    display = admin.Display(out, tty=False)
    display.show(progress, 40)
    display.show(progress, 40)  # within 5 s: no second line
    assert out.getvalue() == "heal: scanned 12 of 40, healed 3, unrecoverable 1, skipped 2\n"
    display.clear()  # nothing drawn in place: nothing to clear
    assert out.getvalue().count("\n") == 1


def test_bar_without_a_total() -> None:
    progress = admin_pb2.HealProgress(scanned=5, current_key="b/k")
    assert admin.render_bar(progress, None) == "scanned 5, healed 0, unrecoverable 0  b/k"
    assert admin.render_bar(progress, 10).startswith("[" + "#" * 12 + "." * 12 + "]  50% ")


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
