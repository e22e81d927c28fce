"""A TCP load balancer in the test process: what stands in front of several gateways in a real
deployment (an L4 balancer: HAProxy, a cloud NLB, a Kubernetes Service).

Each client connection goes to the next backend in turn; a backend that refuses or does not
answer the connect within `connect_timeout_s` is skipped, and while every backend refuses the
balancer keeps trying for `retry_s` (a client sees a slow connect, not a refusal). Bytes are
relayed unchanged both ways (TLS passes through, so the client verifies the gateway's
certificate and SigV4 signs the Host header the gateway receives). A gateway that drains
closes its listening socket first, so new connections go elsewhere at once, and its open
connections end after their in-flight request (`Connection: close`): the balancer relays that
end to the client, whose next request opens a new connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading


class Balancer:
    """Round-robin TCP relay on 127.0.0.1:<port> to backends ("host:port"); `start()` then
    `close()`."""

    def __init__(
        self, backends: list[str], *, connect_timeout_s: float = 1.0, retry_s: float = 10.0
    ) -> None:
        self.backends = list(backends)
        self.connect_timeout_s = connect_timeout_s
        self.retry_s = retry_s
        self.port = 0
        #: Connections relayed, by backend (what the test reports).
        self.connections: dict[str, int] = dict.fromkeys(self.backends, 0)
        self._turn = itertools.count()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="balancer")
        self._server: asyncio.Server | None = None
        self._relays: set[asyncio.Task[None]] = set()

    def start(self) -> int:
        """Listen and serve in a thread of its own; returns the port."""
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(self._listen(), self._loop)
        self.port = future.result(10)
        return self.port

    def close(self) -> None:
        """Stop listening, cut every relayed connection, stop the thread."""
        if not self._thread.is_alive():
            return
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    async def _listen(self) -> int:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0, backlog=256)
        return int(self._server.sockets[0].getsockname()[1])

    async def _stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._relays):
            task.cancel()
        await asyncio.gather(*self._relays, return_exceptions=True)

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        deadline = self._loop.time() + self.retry_s
        while self._loop.time() < deadline:
            first = next(self._turn)
            for i in range(len(self.backends)):
                backend = self.backends[(first + i) % len(self.backends)]
                host, port = backend.rsplit(":", 1)
                try:
                    streams = await asyncio.wait_for(
                        asyncio.open_connection(host, int(port)), self.connect_timeout_s
                    )
                except (OSError, TimeoutError):
                    continue
                self.connections[backend] += 1
                return streams
            await asyncio.sleep(0.1)
        return None

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._relays.add(task)
        try:
            upstream = await self._connect()
            if upstream is None:
                return
            up_reader, up_writer = upstream
            try:
                await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
            finally:
                up_writer.close()
        finally:
            writer.close()
            self._relays.discard(task)


async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    """Copy src to dst until src ends, then half-close dst (a reset ends both)."""
    try:
        while data := await src.read(1 << 16):
            dst.write(data)
            await dst.drain()
        if dst.can_write_eof():
            dst.write_eof()
    except (OSError, RuntimeError):
        dst.close()
    with contextlib.suppress(OSError, RuntimeError):
        await dst.drain()
