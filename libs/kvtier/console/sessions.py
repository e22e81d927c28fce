"""Console sessions: a random id in an HttpOnly cookie names a server-side record.

The record holds what the login got from the cluster (session token, tenant, admin flag) and a
CSRF token of its own; never the user's secret. A session ends at logout or at its expiry
(`session_ttl_s` from login, never after the cluster's token), whichever comes first; expired
records are dropped when met and when the store is full. Never imports grpc or aiohttp.
"""

from __future__ import annotations

import dataclasses
import hmac
import secrets
import time
from collections import OrderedDict

COOKIE = "kvtier_console"
#: The login form's double-submit cookie (no session exists yet to hold a CSRF token).
LOGIN_COOKIE = "kvtier_console_login"
_MAX_SESSIONS = 10_000


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Session:
    """One logged-in user."""

    session_id: str = dataclasses.field(repr=False)
    access_key: str
    tenant: str
    is_admin: bool
    #: The cluster's session token: every page calls the cluster with it.
    token: str = dataclasses.field(repr=False)
    csrf: str = dataclasses.field(repr=False)
    #: time.monotonic() at which the session ends.
    expires_at: float

    def seconds_left(self) -> float:
        """Time until expiry (<= 0: expired)."""
        return self.expires_at - time.monotonic()

    def csrf_ok(self, presented: str) -> bool:
        """Whether a form's CSRF token is this session's (constant time)."""
        return bool(presented) and hmac.compare_digest(presented, self.csrf)


class SessionStore:
    """Sessions of one console process, oldest first (bounded)."""

    def __init__(self, max_sessions: int = _MAX_SESSIONS) -> None:
        self._sessions: OrderedDict[str, Session] = OrderedDict()
        self._max = max_sessions

    def create(
        self, *, access_key: str, tenant: str, is_admin: bool, token: str, ttl_s: float
    ) -> Session:
        """A new session for a login that the cluster accepted."""
        self._drop_expired()
        while len(self._sessions) >= self._max:
            self._sessions.popitem(last=False)
        session = Session(
            session_id=secrets.token_urlsafe(32),
            access_key=access_key,
            tenant=tenant,
            is_admin=is_admin,
            token=token,
            csrf=secrets.token_urlsafe(32),
            expires_at=time.monotonic() + ttl_s,
        )
        self._sessions[session.session_id] = session
        return session

    def get(self, session_id: str) -> Session | None:
        """The live session of a cookie (None: none, logged out or expired)."""
        session = self._sessions.get(session_id)
        if session is None:
            return None
        if session.seconds_left() <= 0:
            del self._sessions[session_id]
            return None
        return session

    def end(self, session_id: str) -> None:
        """Log out (idempotent)."""
        self._sessions.pop(session_id, None)

    def end_user(self, access_key: str) -> int:
        """End every session of access_key (its user was deleted: the cluster keeps accepting
        its token until the token expires, so the console must stop using it); how many."""
        ended = [sid for sid, s in self._sessions.items() if s.access_key == access_key]
        for sid in ended:
            del self._sessions[sid]
        return len(ended)

    def __len__(self) -> int:
        return len(self._sessions)

    def _drop_expired(self) -> None:
        now = time.monotonic()
        for sid in [s for s, v in self._sessions.items() if v.expires_at <= now]:
            del self._sessions[sid]
