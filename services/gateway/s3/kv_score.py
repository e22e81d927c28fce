"""`Score` over HTTP/JSON for routers that do not speak gRPC (docs/routing.md).

`POST /_kvtier/score` on the gateway's S3 port, signed like any S3 request (SigV4 header or
presigned URL; unsigned: AccessDenied), with a JSON body
`{"namespace": "...", "keys": ["<base64>", ...], "tenant": "..."}` (tenant optional) answers
`{"dram": n, "durable": m, "blocks": n + m}`: the chain's leading run in DRAM, then in the durable
tier, as `AsyncKVClient.score` computes it. Lookup's tenancy: a user scores its own tenant's
chains (naming another tenant is AccessDenied), an admin the tenant it names. The gateway then
asks the kvcache nodes for that tenant over its own mutual TLS (`kv_clients.KVBuckets.scoring`).
Errors are S3 XML errors like every other answer of the port. No bucket is named `_kvtier`
(bucket names cannot hold '_'), so the path shadows none.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from aiohttp import web

from kvtier import errors
from kvtier import principal as principal_mod
from services.gateway.s3 import s3errors, s3request

PATH = "/_kvtier/score"
#: What `S3Server.target` makes of PATH.
BUCKET, KEY = "_kvtier", "score"
OP = "KVScore"
#: The longest chain scored in one request (a kvcache node's batch limit).
MAX_KEYS = 16384
#: A kvcache node's limits on keys and namespace names (checked here: a refused request never
#: reaches a node).
MAX_KEY_BYTES = 1040
MAX_NAMESPACE_BYTES = 1024
#: The largest body read: MAX_KEYS keys of MAX_KEY_BYTES in base64 would be 22 MiB; chains of
#: real prompts (keys of 8-64 bytes) are far below this.
MAX_BODY_BYTES = 4 << 20


def is_score(bucket: str, key: str) -> bool:
    """Whether (bucket, key) of a request is the score path."""
    return bucket == BUCKET and key == KEY


def route(method: str) -> tuple[str, s3request.Handler]:
    """The operation of a request to PATH (POST only, else MethodNotAllowed)."""
    if method != "POST":
        raise s3errors.S3Error(
            "MethodNotAllowed", "The specified method is not allowed against this resource."
        )
    return OP, score


def parse(raw: bytes) -> tuple[str, str, list[bytes]]:
    """(tenant asked, namespace, chain) of a request body; InvalidRequest for JSON that is not
    an object, InvalidArgument for a field of the wrong type or size."""
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _invalid_request(f"the body is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise _invalid_request("the body must be a JSON object")
    unknown = sorted(set(doc) - {"namespace", "keys", "tenant"})
    if unknown:
        raise _invalid(f"unknown field {unknown[0]!r} (namespace, keys, tenant)")
    tenant, namespace = doc.get("tenant", ""), doc.get("namespace")
    if not isinstance(tenant, str):
        raise _invalid("tenant must be a string")
    if not isinstance(namespace, str) or not namespace:
        raise _invalid("namespace must be a non-empty string")
    if len(namespace.encode()) > MAX_NAMESPACE_BYTES:
        raise _invalid(f"namespace name longer than {MAX_NAMESPACE_BYTES} bytes")
    return tenant, namespace, _chain(doc.get("keys"))


def _chain(keys: Any) -> list[bytes]:
    if not isinstance(keys, list):
        raise _invalid("keys must be a list of base64 strings")
    if len(keys) > MAX_KEYS:
        raise _invalid(f"at most {MAX_KEYS} keys per request, got {len(keys)}")
    chain = []
    for index, text in enumerate(keys):
        try:
            key = base64.b64decode(text, validate=True) if isinstance(text, str) else b""
        except (binascii.Error, ValueError):
            key = b""
        if not 1 <= len(key) <= MAX_KEY_BYTES:
            raise _invalid(f"keys[{index}] must be base64 of 1..{MAX_KEY_BYTES} bytes")
        chain.append(key)
    return chain


async def score(door: s3request.Door, request: s3request.S3Request) -> web.StreamResponse:
    """Score a chain for the caller's tenant (see the module docstring)."""
    if request.principal.anonymous:
        raise s3errors.S3Error("AccessDenied", "Score needs a signed request")
    if request.payload.size > MAX_BODY_BYTES:
        raise s3errors.S3Error("EntityTooLarge", f"the body exceeds {MAX_BODY_BYTES} bytes")
    asked, namespace, chain = parse(await request.payload.read_all(MAX_BODY_BYTES))
    try:
        tenant = principal_mod.current().acting_tenant(asked)
    except errors.PermissionDenied as exc:
        raise s3errors.S3Error("AccessDenied", exc.message) from None
    async with door.kv_buckets.scoring(tenant, namespace) as client:
        found = await client.score(chain)
    body = {"dram": found.dram, "durable": found.durable, "blocks": found.blocks}
    return web.json_response(body)


def _invalid(message: str) -> s3errors.S3Error:
    return s3errors.S3Error("InvalidArgument", message)


def _invalid_request(message: str) -> s3errors.S3Error:
    return s3errors.S3Error("InvalidRequest", message)
