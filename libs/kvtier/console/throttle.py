"""Login throttling: repeated wrong credentials from one client address, or for one access key,
make the console refuse further tries for a while (429 with Retry-After) without asking the
cluster.

Per client address (an IPv6 address counts by its /64, what one host usually holds): after
`max_failures` failed logins within `window_s`, the address is locked out for `lockout_s`; each
further lockout of the same address (before it has been quiet for `forget_s`) lasts twice the
previous one, at most `max_lockout_s`. Per access key, the same with `key_max_failures`: a
guessing attack spread over many addresses is slowed too, while one address guessing cannot lock
the key's owner out from their own address (the key's threshold is higher). A successful login
forgets the address's and the key's failures. Tries refused while locked out are not counted.

Memory is bounded: at most `max_entries` addresses and as many keys are remembered; when full,
the least recently failing entry is forgotten first. Never imports aiohttp or grpc.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import time
from collections import OrderedDict
from collections.abc import Callable

#: Access keys are remembered by at most this many characters (the login form's maxlength).
_KEY_CHARS = 128


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class ThrottleLimits:
    """How many failures lock out, for how long, and how much is remembered."""

    #: Failed logins from one address within window_s before it is locked out.
    max_failures: int = 5
    #: Failed logins for one access key (from any address) within window_s before it is.
    key_max_failures: int = 20
    window_s: float = 60.0
    #: The first lockout; each next one doubles, up to max_lockout_s.
    lockout_s: float = 15.0
    max_lockout_s: float = 900.0
    #: Quiet time after which an address's or key's past lockouts are forgotten.
    forget_s: float = 3600.0
    #: Addresses (and, separately, keys) remembered at most.
    max_entries: int = 10_000

    def __post_init__(self) -> None:
        if min(self.max_failures, self.key_max_failures, self.max_entries) < 1:
            raise ValueError("max_failures, key_max_failures and max_entries must be >= 1")
        if not 0 < self.lockout_s <= self.max_lockout_s or self.window_s <= 0:
            raise ValueError("need window_s > 0 and 0 < lockout_s <= max_lockout_s")


@dataclasses.dataclass(slots=True)
class _Record:
    failures: int = 0
    window_start: float = 0.0
    lockouts: int = 0
    locked_until: float = 0.0
    last_failure: float = 0.0


class _Table:
    """Failure records of one kind (addresses or keys), least recently failing first."""

    def __init__(self, limits: ThrottleLimits, max_failures: int) -> None:
        self._limits = limits
        self._max_failures = max_failures
        self._records: OrderedDict[str, _Record] = OrderedDict()

    def wait_s(self, name: str, now: float) -> float:
        record = self._records.get(name)
        return 0.0 if record is None else max(0.0, record.locked_until - now)

    def fail(self, name: str, now: float) -> None:
        limits = self._limits
        record = self._records.pop(name, None) or _Record(window_start=now)
        if now - record.last_failure >= limits.forget_s:
            record.lockouts = 0
        if now - record.window_start >= limits.window_s:
            record.failures, record.window_start = 0, now
        record.failures += 1
        record.last_failure = now
        if record.failures >= self._max_failures:
            lockout = min(limits.max_lockout_s, limits.lockout_s * 2 ** min(record.lockouts, 30))
            record.locked_until = now + lockout
            record.lockouts += 1
            record.failures, record.window_start = 0, now
        self._records[name] = record  # most recent last
        while len(self._records) > limits.max_entries:
            self._records.popitem(last=False)

    def forget(self, name: str) -> None:
        self._records.pop(name, None)

    def __len__(self) -> int:
        return len(self._records)


def client_key(address: str) -> str:
    """The name an address is counted under: itself, or its /64 for IPv6."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address[:64]
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


class LoginThrottle:
    """The console's login throttle (see the module docstring)."""

    def __init__(
        self,
        limits: ThrottleLimits | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limits = limits or ThrottleLimits()
        self._clock = clock
        self._addresses = _Table(self.limits, self.limits.max_failures)
        self._keys = _Table(self.limits, self.limits.key_max_failures)

    def retry_after_s(self, address: str, access_key: str) -> float:
        """Seconds until this address may try this key again (0: now)."""
        now = self._clock()
        return max(
            self._addresses.wait_s(client_key(address), now),
            self._keys.wait_s(access_key[:_KEY_CHARS], now),
        )

    def failed(self, address: str, access_key: str) -> None:
        """Count a login the cluster refused."""
        now = self._clock()
        self._addresses.fail(client_key(address), now)
        self._keys.fail(access_key[:_KEY_CHARS], now)

    def succeeded(self, address: str, access_key: str) -> None:
        """A login the cluster accepted: forget the address's and the key's failures."""
        self._addresses.forget(client_key(address))
        self._keys.forget(access_key[:_KEY_CHARS])

    def remembered(self) -> tuple[int, int]:
        """(addresses, keys) held: what bounds its memory."""
        return len(self._addresses), len(self._keys)
