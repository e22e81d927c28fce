"""A data-plane node for fuzzing its transports over real sockets: one transport (tcp or shm),
a kvcache BlockService as its call handler, serving from a thread with its own event loop so
that a test talks to it with blocking sockets and timeouts.

`check_health` is the property every transport fuzz test ends an example with: another
client (the witness) still reads the right bytes, nothing reached the loop's exception handler
or was logged at ERROR, every fuzz connection is gone and no lease outlived it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import threading
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

from kvtier.transport import base, dataplane, registry
from services.kvcache import blocks
from services.kvcache import store as block_store

KIB, MIB = 1024, 1024 * 1024
TIMEOUT_S = 5.0  # what "never hangs" means in these tests
FUZZER = "fuzz/engine/1"
WITNESS = "witness/engine/2"
RW = base.Rights.READ | base.Rights.WRITE
T = TypeVar("T")


class Node:
    """A node serving `transport` from its own thread (see the module docstring)."""

    def __init__(self, transport: str) -> None:
        self.transport = transport
        self.loop = asyncio.new_event_loop()
        self.problems: list[str] = []  # loop exceptions and ERROR records
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.loop.set_exception_handler(lambda _loop, ctx: self.problems.append(str(ctx)))
        self.plane = dataplane.DataPlane("fuzz-node", [transport], registry.ServerSettings())
        self.witness = self.plane.regions.create(64 * KIB)
        self.witness.view[:] = hashlib.shake_256(b"witness").digest(64 * KIB)
        self.scratch = self.plane.regions.create(64 * KIB)
        self.arena = self.plane.regions.create(4 * MIB)
        self.fresh_blocks()
        self.endpoint = self.run(self.plane.start()).endpoints[0]
        self.client: Any = self.run(self._witness())

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run a coroutine on the node's loop; its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(TIMEOUT_S * 2)

    def on_loop(self, fn: Callable[..., T], *args: Any) -> T:
        """fn(*args) run on the node's loop (the server's state is not thread-safe)."""

        async def call() -> T:
            return fn(*args)

        return self.run(call())

    def fresh_blocks(self) -> None:
        """A new, empty block store behind the calls (examples do not see each other's keys)."""
        store = block_store.BlockStore(4 * MIB, page_bytes=1 * MIB)
        service = blocks.BlockService(store, self.arena, self.plane.issuer.grant)
        self.plane.ctx.call_handler = service.handle_call

    def token(self, principal: str) -> bytes:
        return self.plane.issuer.issue_token(principal, transport=self.transport)[0]

    async def _witness(self) -> Any:
        settings = registry.ClientSettings(connections=1, timeout_s=TIMEOUT_S)
        module = registry.load(self.transport)
        return await module.connect(self.endpoint, self.token(WITNESS), settings)

    def connections(self) -> int:
        return self.on_loop(self.plane.server(self.transport).connection_count)

    def settle(self) -> None:
        """Wait until the server has closed every connection but the witness's (polling: the
        server acts in loop callbacks, not awaitables)."""
        server = self.plane.server(self.transport)

        async def gone() -> None:
            async with asyncio.timeout(TIMEOUT_S):
                while server.connection_count() > 1:  # noqa: ASYNC110 (no event to wait on)
                    await asyncio.sleep(0.002)

        self.run(gone())

    def check_health(self) -> None:
        """See the module docstring."""
        self.settle()
        desc = self.plane.issuer.grant(self.witness, 0, self.witness.size, RW, WITNESS)
        out = bytearray(desc.length)
        self.run(self.client.read(desc, out))
        assert out == self.witness.view
        assert not self.problems, self.problems
        assert self.connections() == 1  # the witness's
        assert self.on_loop(len, self.plane.ctx.leases) == 0

    def close(self) -> None:
        async def stop() -> None:
            await self.client.close()
            await self.plane.stop()

        self.run(stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(TIMEOUT_S)
        self.loop.close()


class _Problems(logging.Handler):
    """Records every ERROR logged (anywhere) as a problem of the node."""

    def __init__(self, node: Node) -> None:
        super().__init__(logging.ERROR)
        self._node = node

    def emit(self, record: logging.LogRecord) -> None:
        self._node.problems.append(f"{record.name}: {record.getMessage()}")


@contextlib.contextmanager
def serving(transport: str) -> Iterator[Node]:
    """A node serving transport, its ERROR logs recorded, stopped at the end."""
    node = Node(transport)
    handler = _Problems(node)
    logging.getLogger().addHandler(handler)
    try:
        yield node
    finally:
        logging.getLogger().removeHandler(handler)
        node.close()
