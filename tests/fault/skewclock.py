"""Run a Python module with its wall clock skewed: `python skewclock.py OFFSET_S MODULE ARGS...`.

The fault harness starts a node this way to skew its clock (`FaultCluster(clock_offsets=...)`):
`time.time_ns()`, the wall clock kvtier reads for everything that travels between hosts
(version stamps, session-token and descriptor expiries), returns real time + OFFSET_S from the
first line of the process on, whatever code it runs (this checkout's or an older release's).
`time.time()` keeps real time because gRPC computes its C core's call deadlines from it: a
process whose Python and C clocks disagree by 10 min sees every call expire at once (a real
skewed host has one clock). Monotonic clocks, sleeps and timeouts keep real time, as on a host
whose wall clock is off; so do `datetime.now()` and OpenSSL's certificate checks, which is why
a node skewed this way still accepts the certificates the harness issued a minute ago.

Why not libfaketime (`faketime`, LD_PRELOAD), which would skew the C library too: under it
(0.9.10, Debian) Python's `time.sleep` fails with EINVAL when monotonic time is left alone, and
condition waits (`threading.Event.wait`, which gRPC and every executor use) hang when it is not.

The pid is the service's own (the module runs in this process, as `python -m` runs it), so the
harness's signals reach it.
"""

from __future__ import annotations

import os
import runpy
import sys
import time


def main() -> None:
    offset_s = float(sys.argv[1])
    module = sys.argv[2]
    offset_ns = int(offset_s * 1_000_000_000)
    real_time_ns = time.time_ns
    time.time_ns = lambda: real_time_ns() + offset_ns
    sys.argv = [module, *sys.argv[3:]]
    sys.path[0] = os.getcwd()  # as `python -m` has it: the tree's services/ are importable
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
