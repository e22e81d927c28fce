"""What every typed client shares: a channel, deadlines, epochs, and StaleEpoch handling."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, TypeVar

from kvtier import errors, rpc
from kvtier import security as security_mod

T = TypeVar("T")

#: Called with the server's epoch after a StaleEpoch; it must refresh the caller's map.
StaleHandler = Callable[[int], Awaitable[None]]


class BaseClient:
    """A channel to one node. Use as `async with`, or call close().

    When `epoch_source` is given, every call carries the caller's cluster-map epoch; a server
    with a newer map answers StaleEpoch, `on_stale` refreshes the caller's map and the call is
    retried once with the new epoch (calls that carry epochs are idempotent reads or
    conditional writes, so one retry is safe).
    """

    def __init__(
        self,
        address: str,
        *,
        timeout_s: float = 5.0,
        epoch_source: rpc.EpochSource | None = None,
        on_stale: StaleHandler | None = None,
        security: security_mod.ClientSecurity | None = None,
        tokens: security_mod.TokenSource | None = None,
    ) -> None:
        self.address = address
        self._timeout_s = timeout_s
        self._epoch_source = epoch_source
        self._on_stale = on_stale
        self.security = security or security_mod.default()
        self._channel = rpc.open_channel(address, security=self.security)
        if tokens is None and self.security.has_user:
            tokens = security_mod.token_source(self.security, address)
        self._tokens = tokens

    @property
    def channel(self) -> Any:
        """The underlying grpc.aio channel."""
        return self._channel

    async def close(self) -> None:
        """Close the channel; idempotent."""
        await self._channel.close()

    async def __aenter__(self: T) -> T:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def _epoch(self) -> int | None:
        return self._epoch_source() if self._epoch_source is not None else None

    async def _token(self) -> str | None:
        """The session token to send (users only)."""
        return await self._tokens.token() if self._tokens is not None else None

    async def call_metadata(self) -> tuple[tuple[str, str], ...]:
        """Metadata for a streaming call: request id, epoch and session token."""
        return rpc.call_metadata(self._epoch(), await self._token())

    async def _unary(
        self, method: Callable[..., Awaitable[T]], request: Any, *, timeout_s: float | None = None
    ) -> T:
        timeout = self._timeout_s if timeout_s is None else timeout_s

        async def once() -> T:
            token = await self._token()
            return await rpc.invoke(
                method, request, timeout_s=timeout, epoch=self._epoch(), token=token
            )

        try:
            return await once()
        except errors.StaleEpoch as stale:
            if self._on_stale is None:
                raise
            await self._on_stale(stale.current_epoch)
            return await once()
        except errors.Unauthenticated:
            if self._tokens is None:
                raise
            self._tokens.invalidate()  # expired early, or the issuer's key rotated: once more
            return await once()
