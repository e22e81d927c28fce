"""A client speaking the wrong protocol at the gateway's S3 port (gRPC, HTTP/2) gets its
connection closed and leaves one warning line in the gateway's log, not a traceback (issue 17);
S3 on the same port keeps working."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvtier import etcdserver, membership
from services.gateway import __main__ as gateway_main
from services.gateway import config as gateway_config
from services.metadata import __main__ as metadata_main
from services.metadata import config as metadata_config
from tests import pki as test_pki
from tests.component import harness

#: The HTTP/2 connection preface and an empty SETTINGS frame: what a gRPC client sends first.
H2_START = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
WARNING = (
    "S3 port: not an HTTP/1.1 request from 127.0.0.1: Pause on PRI/Upgrade (an HTTP/2 or gRPC "
    "client? this port speaks S3 (HTTP/1.1); `kvtier status` lists the gRPC ports)"
)


@contextlib.asynccontextmanager
async def _gateway(
    etcd: etcdserver.EtcdServer, prefix: str, store: membership.EtcdMembership, tmp: Path
) -> AsyncIterator[harness.Running]:
    common = {"etcd_endpoints": (etcd.endpoint,), "etcd_prefix": prefix}
    async with (
        harness.run(
            metadata_config.MetadataConfig, "metadata", metadata_main.build, store, **common
        ),
        harness.run(
            gateway_config.GatewayConfig, "gateway", gateway_main.build, store,
            client_port=0, **common,
        ) as gateway,
    ):  # fmt: skip
        yield gateway


async def _exchange(port: int, payload: bytes, context: ssl.SSLContext) -> bytes:
    """Send payload on a new TLS connection; what comes back before the server closes it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
    try:
        writer.write(payload)
        await writer.drain()
        async with asyncio.timeout(10):
            return await reader.read()
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await writer.wait_closed()


async def test_grpc_at_the_s3_port_is_one_warning_line(
    etcd: etcdserver.EtcdServer,
    etcd_prefix: str,
    store: membership.EtcdMembership,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with _gateway(etcd, etcd_prefix, store, tmp_path) as gateway:
        port = int(gateway.info.s3_address.rsplit(":", 1)[1])
        context = ssl.create_default_context(cafile=test_pki.session().ca_file)
        caplog.clear()
        with caplog.at_level(logging.DEBUG):
            reply = await _exchange(port, H2_START, context)
            assert reply.startswith(b"HTTP/1.0 400 Bad Request")  # and the connection closed
            # A real gRPC client over TLS: refused (no h2 here), and nothing logged as an error.
            ca_pem = await asyncio.to_thread(Path(test_pki.session().ca_file).read_bytes)
            creds = grpc.ssl_channel_credentials(ca_pem)
            async with grpc.aio.secure_channel(f"127.0.0.1:{port}", creds) as channel:
                stub: Any = health_pb2_grpc.HealthStub(channel)  # the stubs type no methods
                with pytest.raises(grpc.aio.AioRpcError) as failed:
                    await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
            # S3 still answers on the port (an anonymous ListBuckets: AccessDenied).
            s3 = await _exchange(
                port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", context
            )
            assert s3.startswith(b"HTTP/1.1 403 ")
            await asyncio.sleep(0.2)  # the handler logs after it answered
        mine = [r for r in caplog.records if r.name in ("aiohttp.server", "services.gateway.s3")]
        assert [(r.levelno, r.getMessage()) for r in mine] == [(logging.WARNING, WARNING)]
        assert all(r.exc_info is None for r in caplog.records), [
            r.getMessage() for r in caplog.records if r.exc_info
        ]
