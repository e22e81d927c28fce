"""What a datanode's own wall clock may do to data (issue 16, clock skew on the datanodes).

The only age a datanode computes from its clock is that of the staged writes in its drives'
`.kvtier/tmp` (`sweep_tmp`): file mtimes, which the kernel stamps from the same clock, against
`time.time()`. A constant skew cancels out; a clock stepped forward (NTP correcting a host that
ran behind) makes every staged write look old at once, so a write in progress must never be
swept by its age. Version stamps come from the gateways (tests/fault/test_datanode_clock_skew.py).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from services.datanode import shards
from tests.unit import test_shards

MIB = test_shards.MIB
KEY = test_shards.KEY


@pytest.fixture
def drive_dir(tmp_path: Path) -> Path:
    return tmp_path / "drive"


def test_a_write_in_progress_survives_a_clock_stepped_forward(drive_dir: Path) -> None:
    store = test_shards.open_store(drive_dir)
    data = test_shards.content("live", 2 * MIB)
    live = test_shards.stage(store, [data], write_id="live")
    tmp = drive_dir / shards.TMP_DIR
    hours_ago = os.stat(tmp / "live").st_mtime - 7200  # as seen after a 2 h step forward
    for root, dirs, files in os.walk(tmp / "live"):
        for name in [*dirs, *files, "."]:
            os.utime(os.path.join(root, name), (hours_ago, hours_ago))
    assert store.sweep_tmp(3600) == 0
    assert os.listdir(tmp) == ["live"]
    live.commit(test_shards.make_meta(KEY, [data]))
    assert test_shards.read_parts(store, KEY) == [data]
    store.close()
