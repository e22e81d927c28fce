"""What every typed client shares: a channel, deadlines, epochs, and StaleEpoch handling."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, TypeVar

from kvtier import errors, rpc

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
    ) -> None:
        self.address = address
        self._timeout_s = timeout_s
        self._epoch_source = epoch_source
        self._on_stale = on_stale
        self._channel = rpc.open_channel(address)

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

    async def _unary(
        self, method: Callable[..., Awaitable[T]], request: Any, *, timeout_s: float | None = None
    ) -> T:
        timeout = self._timeout_s if timeout_s is None else timeout_s
        try:
            return await rpc.invoke(method, request, timeout_s=timeout, epoch=self._epoch())
        except errors.StaleEpoch as stale:
            if self._on_stale is None:
                raise
            await self._on_stale(stale.current_epoch)
            return await rpc.invoke(method, request, timeout_s=timeout, epoch=self._epoch())
