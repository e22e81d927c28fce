"""What every fuzz test shares: the hypothesis profiles, the example budget, a memory bound and
strategies for text as an HTTP server hands it over.

Profiles: "ci" (the default) runs few examples, derandomized, so that CI runs the same inputs
every time and a failure replays by running the test again; "long" (KVTIER_FUZZ_EXAMPLES=N)
runs N examples per test from a random seed, and hypothesis prints the failing example and a
`@reproduce_failure` blob to replay it.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import tracemalloc
from collections.abc import Callable, Iterator
from typing import TypeVar

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

#: Set to a number of examples per test for a long run (the "long" profile).
EXAMPLES_ENV = "KVTIER_FUZZ_EXAMPLES"
CI_EXAMPLES = 60
#: Seconds a long run allows per example of a test (the slowest, with its 2x share, takes ~0.05).
LONG_S_PER_EXAMPLE = 0.2
KIB, MIB = 1024, 1024 * 1024
T = TypeVar("T")
#: Any character but a surrogate, as valid UTF-8 decodes. (st.text()'s default alphabet costs
#: seconds of set-up on a fresh checkout: it tabulates the utf-8 codec.)
UNICODE = st.characters(exclude_categories=["Cs"])


def register_profiles() -> None:
    """Register "ci" and "long" and load the one the environment asks for."""
    common = {
        "database": None,  # nothing written into the tree; the ci profile replays by itself
        "print_blob": True,
        "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
    }
    settings.register_profile(
        "ci",
        max_examples=CI_EXAMPLES,
        derandomize=True,
        deadline=datetime.timedelta(seconds=2),  # a 2-vCPU machine shared with other jobs
        **common,  # type: ignore[arg-type]
    )
    wanted = os.environ.get(EXAMPLES_ENV, "")
    if wanted:
        settings.register_profile(
            "long",
            max_examples=int(wanted),
            derandomize=False,
            deadline=datetime.timedelta(seconds=5),
            **common,  # type: ignore[arg-type]
        )
    settings.load_profile("long" if wanted else "ci")


def long_timeout_s() -> int | None:
    """The per-test timeout of a long run (None: the "ci" profile, the suite's timeout)."""
    wanted = os.environ.get(EXAMPLES_ENV, "")
    return 120 + int(int(wanted) * LONG_S_PER_EXAMPLE) if wanted else None


def budget(share: float = 1.0, *, deadline: bool = True) -> settings:
    """Settings of one fuzz test: `share` of the profile's examples (at least 10); without a
    per-example deadline for tests bounded by their own timeouts (sockets)."""
    assert settings.default is not None
    count = max(10, round(settings.default.max_examples * share))
    if deadline:
        return settings(max_examples=count)
    return settings(max_examples=count, deadline=None)


@contextlib.contextmanager
def bounded_memory(limit_bytes: int) -> Iterator[None]:
    """Fail when the body allocates more than limit_bytes at its peak (Python allocations,
    traced by tracemalloc for the body only: tracing slows hypothesis's own work tenfold)."""
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    before, _ = tracemalloc.get_traced_memory()
    tracemalloc.reset_peak()
    try:
        yield
    finally:
        _, peak = tracemalloc.get_traced_memory()
        if started:
            tracemalloc.stop()
        used = peak - before
        assert used <= limit_bytes, f"peak allocation {used} bytes > {limit_bytes}"


def attempt(call: Callable[[], T], refusal: type[Exception]) -> tuple[T | None, Exception | None]:
    """(call's result, None), or (None, the refusal it raised): anything else propagates."""
    try:
        return call(), None
    except refusal as exc:
        return None, exc


def http_text(max_size: int = 64) -> st.SearchStrategy[str]:
    """Text as aiohttp decodes raw bytes (UTF-8, surrogateescape): any bytes, mostly ASCII."""
    ascii_text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=max_size)
    raw = st.binary(max_size=max_size).map(lambda b: b.decode("utf-8", "surrogateescape"))
    unicode_text = st.text(UNICODE, max_size=max_size)
    return st.one_of(ascii_text, ascii_text, raw, unicode_text)


def digits_like() -> st.SearchStrategy[str]:
    """Text that is almost a number: digits of other scripts, signs, spaces, huge numbers."""
    return st.one_of(
        st.integers(min_value=-(2**70), max_value=2**70).map(str),
        st.sampled_from(["", " 7", "+7", "1_000", "²", "٣", "\uff10", "7.0", "1e3", "0x10", "-0"]),
        st.integers(min_value=1, max_value=5000).map(lambda n: "9" * n),
        st.text(st.characters(categories=["Nd", "No"]), min_size=1, max_size=8),
    )
