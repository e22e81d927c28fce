"""The gateway's C heap: fixed glibc malloc thresholds, so body-sized buffers are reused.

glibc serves an allocation of at least its mmap threshold (128 KiB at start) with a fresh
mapping and unmaps it on free: every page of it is faulted in and zeroed by the kernel on first
touch, every time. A PUT's body arrives in chunks of that size and more (a TLS read of up to
256 KiB, the bytes objects aiohttp and uvloop make of it), so each chunk paid for new memory.
glibc raises the threshold by itself once it frees a large mapping (up to 32 MiB): a gateway
used to get there by the 24 MiB copies of its large GETs, and once those went (its GETs gather
into mappings of their own, s3/response_body.py) its PUTs cost 7 to 10% more gateway CPU per
MiB in A/B runs (docs/benchmarks.md, "S3 API: kvtier against Ceph RGW"). Fixing the thresholds
at start gives every gateway that state from its first request: chunks up to
MMAP_THRESHOLD_BYTES come from the heap and reuse its pages, and up to TRIM_THRESHOLD_BYTES of
free heap stay mapped rather than being returned and faulted in again.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

#: mallopt parameters (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
#: Allocations from this size on get their own mapping (a GET's 24 MiB pieces and other
#: staging-sized buffers are mappings of their own anyway).
MMAP_THRESHOLD_BYTES = 4 << 20
#: Free memory at the top of the heap kept mapped before it is given back.
TRIM_THRESHOLD_BYTES = 64 << 20


def tune() -> bool:
    """Set the thresholds (see the module docstring); False where the C library has no
    mallopt (not glibc) or refuses them."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    )
    if not ok:
        log.info("malloc thresholds left as they are (mallopt refused them)")
    return ok
