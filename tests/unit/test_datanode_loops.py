"""A datanode's background work survives a failing drive: each pass (per drive) that raises is
logged, counted and left to the next one (`services.datanode.__main__._one_pass`); a loop that
raised would end the datanode (`kvtier.service`) and take its healthy drives out with it."""

from __future__ import annotations

import asyncio
import functools
import logging
import shutil
from pathlib import Path

import pytest

from services.datanode import __main__ as datanode_main
from services.datanode import shardbase
from tests.unit import test_shards as base


def _failures(task: str) -> float:
    return float(datanode_main.BACKGROUND_FAILURES.labels(task)._value.get())


def test_a_failing_drive_pass_is_logged_counted_and_retried(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = base.open_store(tmp_path / "drive")
    try:
        # The drive's staging directory is gone under the datanode (a failing or remounted
        # drive): its sweep raises FileNotFoundError.
        staging = tmp_path / "drive" / shardbase.TMP_DIR
        shutil.rmtree(staging)
        sweep = functools.partial(asyncio.to_thread, store.sweep_tmp, 0)
        before = _failures("staging sweep")
        with caplog.at_level(logging.ERROR, logger=datanode_main.__name__):
            assert not asyncio.run(datanode_main._one_pass("drive d0: staging sweep", sweep))
        assert _failures("staging sweep") == before + 1
        assert "drive d0: staging sweep failed" in caplog.text
        assert "FileNotFoundError" in caplog.text
        staging.mkdir()  # the drive is back: the next pass works
        assert asyncio.run(datanode_main._one_pass("drive d0: staging sweep", sweep))
        assert _failures("staging sweep") == before + 1
    finally:
        store.close()
