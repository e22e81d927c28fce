"""The shared server interceptor: error mapping, request ids, epoch checks."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
from grpc_health.v1 import health_pb2

from kvtier import errors, rpc, security, telemetry

Req = health_pb2.HealthCheckRequest
Rep = health_pb2.HealthCheckResponse

#: The test servers here are built without an authenticator: plaintext, every right.
INSECURE = security.ClientSecurity(insecure=True)


async def _boom(request: Req, context: rpc.ServicerContext) -> Rep:
    kind = request.service
    if kind == "value":
        raise ValueError("secret internal detail")
    if kind == "notfound":
        raise errors.NotFound("no such thing")
    if kind == "quota":
        raise errors.QuotaExceeded("tenant over quota")
    return Rep(status=Rep.SERVING)


async def _echo_rid(request: Req, context: rpc.ServicerContext) -> Rep:
    # The handler sees the caller's request id in its logging context.
    return Rep(status=Rep.SERVING) if telemetry.request_id.get() == request.service else Rep()


@pytest.fixture
async def server_address() -> AsyncIterator[str]:
    epoch = {"value": 7}
    server, _health = rpc.build_server(
        service_label="test", max_message_bytes=1 << 20, epoch_source=lambda: epoch["value"]
    )
    handlers = {
        "Boom": grpc.unary_unary_rpc_method_handler(_boom, Req.FromString, Rep.SerializeToString),
        "EchoRid": grpc.unary_unary_rpc_method_handler(
            _echo_rid, Req.FromString, Rep.SerializeToString
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("t.S", handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield f"127.0.0.1:{port}"
    await server.stop(0)


def _method(channel: grpc.aio.Channel, name: str) -> grpc.aio.UnaryUnaryMultiCallable[Req, Rep]:
    return channel.unary_unary(
        f"/t.S/{name}",
        request_serializer=Req.SerializeToString,
        response_deserializer=Rep.FromString,
    )


async def test_unknown_exception_becomes_internal_without_details(server_address: str) -> None:
    async with rpc.open_channel(server_address, security=INSECURE) as channel:
        with pytest.raises(errors.Internal) as caught:
            await rpc.invoke(_method(channel, "Boom"), Req(service="value"), timeout_s=5)
    assert "secret" not in caught.value.message
    assert "Traceback" not in caught.value.message
    assert caught.value.message.startswith("internal error (request id ")


@pytest.mark.parametrize(
    ("kind", "expected"), [("notfound", errors.NotFound), ("quota", errors.QuotaExceeded)]
)
async def test_domain_errors_round_trip(
    server_address: str, kind: str, expected: type[errors.KVTierError]
) -> None:
    async with rpc.open_channel(server_address, security=INSECURE) as channel:
        with pytest.raises(expected) as caught:
            await rpc.invoke(_method(channel, "Boom"), Req(service=kind), timeout_s=5)
    # QuotaExceeded and Overloaded share RESOURCE_EXHAUSTED: the kind key keeps them apart.
    assert type(caught.value) is expected


async def test_epoch_checks(server_address: str) -> None:
    async with rpc.open_channel(server_address, security=INSECURE) as channel:
        method = _method(channel, "Boom")
        with pytest.raises(errors.StaleEpoch) as caught:
            await rpc.invoke(method, Req(service="ok"), timeout_s=5, epoch=6)
        assert caught.value.current_epoch == 7
        for epoch in (None, 7, 8):
            reply = await rpc.invoke(method, Req(service="ok"), timeout_s=5, epoch=epoch)
            assert reply.status == Rep.SERVING
        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await method(Req(service="ok"), metadata=((errors.EPOCH_KEY, "seven"),), timeout=5)
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_request_id_reaches_the_handler(server_address: str) -> None:
    async with rpc.open_channel(server_address, security=INSECURE) as channel:
        method = _method(channel, "EchoRid")
        reply = await method(
            Req(service="rid-123"), metadata=((rpc.REQUEST_ID_KEY, "rid-123"),), timeout=5
        )
    assert reply.status == Rep.SERVING
