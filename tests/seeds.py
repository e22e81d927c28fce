"""One random seed per test run, the same in every pytest-xdist worker (workers must collect the
same test ids, and a test's id carries its seed): `KVTIER_TEST_SEED` when set (to replay a
failure), else derived from xdist's run id, else drawn at random."""

from __future__ import annotations

import os
import random
import zlib


def _run_seed() -> int:
    if fixed := os.environ.get("KVTIER_TEST_SEED"):
        return int(fixed)
    if run_id := os.environ.get("PYTEST_XDIST_TESTRUNUID"):
        return zlib.crc32(run_id.encode())
    return random.randrange(2**32)


RUN_SEED = _run_seed()
