"""The S3 HTTP front of the gateway: aiohttp on the gateway's event loop, next to gRPC.

Every request: an id (`x-amz-request-id`) → the bucket and key (path style, or virtual-host
style under the configured domain) → SigV4 authentication (`auth.Authenticator`; no credential
at all: anonymous) → the user bound as the request's `kvtier.principal` (so the object front
checks S3 and gRPC callers alike: its tenant's buckets only, admins all, never the KV tier's
internal bucket) → the ACL gate (`acl_ops.admit`: what a grant lets an anonymous request or
another tenant's user do, admitted to that bucket for that alone) → the operation
(`bucket_ops`, `object_ops`, `multipart_ops`) on the gateway's object front. Errors become S3 XML
bodies with the right status. `Expect: 100-continue` is answered only once the headers
authenticate and pass the ACL gate (`S3Server.expect`). Bodies stream both ways through the
engine's staging slots: a PUT never holds more than one call's stripes, a GET one slot of the
object at a time, and neither holds a slot while its client sends or reads nothing (`body`,
`response_body`; idle ones end after body_timeout_s / send_timeout_s).
"""

from __future__ import annotations

import functools
import logging
import secrets
import time
import urllib.parse
from typing import Any

import aiohttp
import prometheus_client
from aiohttp import hdrs, web

from kvtier import errors, tracing
from kvtier import principal as principal_mod
from kvtier.proto.common.v1 import common_pb2
from kvtier.proto.metadata.v1 import metadata_pb2
from services.gateway import front as front_mod
from services.gateway import objectlayer
from services.gateway.s3 import (
    access_log,
    acl_ops,
    attributes_ops,
    auth,
    body,
    bucket_ops,
    cors,
    kv_clients,
    kv_layer,
    kv_ops,
    kv_score,
    lifecycle_ops,
    multipart_ops,
    object_ops,
    ownership,
    ownership_ops,
    policy_ops,
    post_object,
    public_access,
    s3errors,
    s3request,
    sigv4,
    tagging_ops,
    versioning_ops,
    xmlio,
)

log = logging.getLogger(__name__)

REQUESTS = prometheus_client.Counter(
    "kvtier_gateway_s3_requests_total", "S3 requests", ["op", "status"]
)
LATENCY = prometheus_client.Histogram(
    "kvtier_gateway_s3_request_seconds", "S3 request latency (to the response's start)", ["op"]
)

#: Sub-resources we do not implement: NotImplemented rather than a wrong answer.
UNSUPPORTED = frozenset(
    {
        "policy", "website", "replication", "logging",
        "notification", "encryption", "object-lock", "retention", "legal-hold", "torrent",
        "accelerate", "requestPayment", "inventory", "metrics", "analytics", "ownershipControls",
        "intelligent-tiering", "restore", "select", "attributes",
        "policyStatus",
        # Else routed as the plain operation: CreateBucket, DeleteBucket (deleting the bucket),
        # PutObject (overwriting the object), DeleteObject.
        "abac", "default-storage-class", "metadataConfiguration", "metadataTable",
        "metadataAnnotationTable", "metadataInventoryTable", "metadataJournalTable", "session",
        "annotation", "renameObject",
    }
)  # fmt: skip
#: Where `S3Server.handle` leaves the request's id (for responses prepared by their handler).
_REQUEST_ID = "kvtier.s3.request_id"
#: Where `S3Server.expect` leaves the (principal, payload) it authenticated for `handle`.
_AUTHENTICATED = "kvtier.s3.authenticated"


#: The request and handler types live in `s3request` (the handlers import it, never this
#: router: no import cycle); named here too for the router's callers and tests.
S3Request = s3request.S3Request
Handler = s3request.Handler


#: The unauthenticated probes (docs/operations.md, docs/security.md). No bucket's path is one of
#: them: a bucket name cannot hold '_'. They answer up or ready and nothing else.
HEALTH_LIVE = "/_kvtier/health/live"
HEALTH_READY = "/_kvtier/health/ready"


class S3Server:
    """Routes S3 requests to the operation modules (see the module docstring)."""

    def __init__(
        self,
        front: front_mod.ObjectFront,
        authenticator: auth.Authenticator,
        *,
        region: str = "us-east-1",
        domain: str = "",
        body_timeout_s: float = body.BODY_TIMEOUT_S,
        send_timeout_s: float = body.BODY_TIMEOUT_S,
        lifecycle_day_s: float = 86400.0,
        access: access_log.AccessLog | None = None,
    ) -> None:
        self.front = front
        self.auth = authenticator
        self.region = region
        self.domain = domain.lower().strip(".")
        #: Seconds a request body may send nothing (RequestTimeout), a response wait unread.
        self.body_timeout_s, self.send_timeout_s = body_timeout_s, send_timeout_s
        self.routes = _routes()
        self.kv_buckets = kv_clients.KVBuckets(
            security=front.security, cluster_map=lambda: front.lister.view.current
        )
        #: Seconds in a lifecycle rule's day (the TTL of KV objects: kv_layer.KVLayer).
        self.lifecycle_day_s = lifecycle_day_s
        #: The object layers of erasure-coded and of KV buckets (`layer` picks one).
        self.objects = objectlayer.ErasureLayer(front)
        self.kv_objects = kv_layer.KVLayer(front, self.kv_buckets, lifecycle_day_s=lifecycle_day_s)
        #: One JSON line per request (off unless configured: `s3_access_log`).
        self.access = access or access_log.AccessLog("")

    def app(self) -> web.Application:
        """The aiohttp application (one catch-all route: S3 routes on query and headers)."""
        # Tracing on: one span per request (off: no middleware at all).
        traced = [_traced(self)] if tracing.enabled() else []
        app = web.Application(client_max_size=xmlio.MAX_BODY_BYTES, middlewares=traced)
        for path in (HEALTH_LIVE, HEALTH_READY):  # GET and HEAD, before routing and auth
            app.router.add_get(path, self.health)
        app.router.add_route("*", "/{tail:.*}", self.handle, expect_handler=self.expect)
        app.on_response_prepare.append(functools.partial(cors.add_headers, self))
        app.on_response_prepare.append(_stamp_streamed)
        return app

    async def health(self, http: web.Request) -> web.StreamResponse:
        """live: 200 while this gateway answers HTTP; ready: 200 when its cluster map has a
        metadata node and a pool whose every set has its data shards online, else 503. A
        virtual-host style request names an object of its bucket: served as S3."""
        host = http.headers.get("Host", "").split(":", 1)[0].lower()
        if self.domain and host.endswith("." + self.domain):
            return await self.handle(http)
        ok = http.path == HEALTH_LIVE or _ready(self.front.engine.view.current)
        return web.Response(status=200 if ok else 503, text="ok\n" if ok else "not ready\n")

    async def expect(self, http: web.Request) -> web.StreamResponse | None:
        """`Expect: 100-continue`, answered once the headers authenticate (the signature covers
        x-amz-content-sha256, not the body): a refused request gets its S3 error on a closing
        connection instead of `100 Continue` and an upload. Any other expectation is ignored,
        as S3 does (RFC 9110 lets a server answer it 417, but S3 clients do not expect that)."""
        expect = http.headers.get(hdrs.EXPECT, "")
        if http.version != aiohttp.HttpVersion11 or expect.lower() != "100-continue":
            return None
        op, resource = "Unknown", http.path
        try:
            bucket, key = self.target(http)
            resource = f"/{bucket}/{key}" if key else f"/{bucket}"
            op, _ = self.route(http.method, bucket, key, http.query)
            if op != "PostObject":  # its credentials are fields of the body
                http[_AUTHENTICATED] = await self.auth.authenticate(http)
                # Refused by the ACL gate (anonymous, another tenant): refused before the body.
                await acl_ops.admit(
                    self.front, op, bucket, http[_AUTHENTICATED][0], http.headers,
                    key=key, query=http.query, remote=http.remote or "",
                )  # fmt: skip
        except s3errors.S3Error as exc:
            request_id = secrets.token_hex(8).upper()
            response = _error(exc, resource, request_id, http.method)
            response.force_close()  # whatever body follows is never read
            _stamp(response, request_id)
            REQUESTS.labels(op, str(response.status)).inc()
            return response
        except errors.KVTierError:  # e.g. the users unavailable: handle() answers it
            pass
        await http.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        http.writer.output_size = 0  # the response proper has not started
        return None

    async def handle(self, http: web.Request) -> web.StreamResponse:
        """Serve one request; every answer carries x-amz-request-id."""
        request_id = secrets.token_hex(8).upper()
        http[_REQUEST_ID] = request_id  # for a response its handler streams (_stamp_streamed)
        op, resource = "Unknown", http.path
        started = time.perf_counter()
        bucket = key = error = ""
        principal: auth.Principal | None = None
        payload: body.Payload | None = None
        try:
            bucket, key = self.target(http)
            resource = f"/{bucket}/{key}" if key else f"/{bucket}"
            op, handler = self.route(http.method, bucket, key, http.query)
            principal, payload = http.get(_AUTHENTICATED) or await self._authenticate(http, op)
            payload.timeout_s = self.body_timeout_s
            request = S3Request(
                http, request_id, bucket, key, dict(http.query), principal, payload, op
            )
            bound = principal_mod.bind(kvtier_principal(principal))
            admitted = None
            try:
                admission, info = await acl_ops.admit(
                    self.front, op, bucket, principal, http.headers,
                    key=key, query=http.query, remote=http.remote or "",
                )  # fmt: skip
                request.bucket_owner = info.tenant if info is not None else ""
                if info is not None:
                    request.object_ownership = ownership.mode(info)
                await acl_ops.check_header_grantees(
                    self.auth, op, principal, http.headers, request.bucket_owner
                )
                if admission is not None:
                    admitted = front_mod.admit(admission)
                if bucket and op not in kv_ops.SHARED and op not in ("CreateBucket", kv_score.OP):
                    handler = await self._kv_handler(request, handler)
                response = await handler(self, request)
            finally:
                if admitted is not None:
                    front_mod.unadmit(admitted)
                principal_mod.unbind(bound)
        except s3errors.S3Error as exc:
            response, error = _error(exc, resource, request_id, http.method), exc.code
        except sigv4.S3AuthError as exc:  # from an aws-chunked body, mid-stream
            refused = auth.translate(exc)
            response, error = _error(refused, resource, request_id, http.method), refused.code
        except errors.KVTierError as exc:
            not_found = "NoSuchBucket" if op.endswith("Bucket") or op.startswith("List") else ""
            mapped = s3errors.from_domain(exc, default_not_found=not_found or "NoSuchKey")
            response, error = _error(mapped, resource, request_id, http.method), mapped.code
        except (ConnectionResetError, web.HTTPException):
            raise
        except Exception:
            log.exception("S3 %s %s failed", http.method, http.path)
            internal = s3errors.S3Error("InternalError", "We encountered an internal error.")
            response, error = _error(internal, resource, request_id, http.method), internal.code
        elapsed = time.perf_counter() - started
        LATENCY.labels(op).observe(elapsed)
        if not response.prepared:
            _stamp(response, request_id)
        REQUESTS.labels(op, str(response.status)).inc()
        if self.access.enabled:
            who = "-" if principal is None else principal.access_key or "anonymous"
            self.access.write(
                request_id=request_id, remote=http.remote or "", principal=who,
                tenant=principal.tenant if principal is not None else "", op=op,
                method=http.method, bucket=bucket, key=key, status=response.status,
                bytes_in=payload.read if payload is not None else 0,
                bytes_out=_bytes_out(response), latency_ms=round(elapsed * 1e3, 3), error=error,
            )  # fmt: skip
        return response

    def target(self, http: web.Request) -> tuple[str, str]:
        """(bucket, key) of a request: virtual-host style when Host is <bucket>.<domain>,
        else path style. The key is the percent-decoded rest of the path."""
        raw = http.rel_url.raw_path
        host = http.headers.get("Host", "").split(":", 1)[0].lower()
        if self.domain and host.endswith("." + self.domain):
            bucket, key = host[: -len(self.domain) - 1], raw.lstrip("/")
        else:
            bucket, _, key = raw.lstrip("/").partition("/")
            bucket = urllib.parse.unquote(bucket)
        try:
            return bucket, urllib.parse.unquote(key, errors="strict")
        except UnicodeDecodeError:
            raise s3errors.S3Error("InvalidURI", "Couldn't parse the specified URI.") from None

    def route(self, method: str, bucket: str, key: str, query: Any) -> tuple[str, Handler]:
        """The operation of a request: its name and handler."""
        if kv_score.is_score(bucket, key):  # Score over HTTP: on no bucket
            return kv_score.route(method)
        unsupported = UNSUPPORTED & set(query)
        if method == "GET" and key:  # GetObjectAttributes; ?attributes stays 501 elsewhere
            unsupported -= {"attributes"}
        if bucket and not key:  # the bucket policy's routes; ?policy stays 501 elsewhere
            unsupported -= policy_ops.SUBRESOURCES.get(method, frozenset())
            if method in ("GET", "PUT", "DELETE"):  # ownership_ops; 501 on objects
                unsupported -= {"ownershipControls"}
        # A preflight carries the actual request's parameters, whatever they are.
        if method != "OPTIONS" and unsupported:
            sub = sorted(unsupported)[0]
            raise s3errors.S3Error("NotImplemented", f"?{sub} is not implemented")
        level = "service" if not bucket else "bucket" if not key else "object"
        for (m, lvl, needs), (op, handler) in self.routes:
            if m == method and lvl == level and all(n in query for n in needs):
                return op, handler
        raise s3errors.S3Error(
            "MethodNotAllowed", "The specified method is not allowed against this resource."
        )

    async def _authenticate(
        self, http: web.Request, op: str
    ) -> tuple[auth.Principal, body.Payload]:
        """The user and body of a request: a POST form signs its policy (`post_object`), any
        other request its headers or query (`auth`)."""
        if op == "PostObject":
            return await post_object.authenticate(self, http)
        if op == cors.PREFLIGHT:  # never signed (browsers do not): it reads only CORS rules
            return cors.NOBODY, body.Payload(http.content, size=0)
        return await self.auth.authenticate(http)

    async def _kv_handler(self, request: S3Request, handler: Handler) -> Handler:
        """The handler on a KV bucket (ownership checked): the same one, through the bucket's
        object layer (`kv_ops.LAYERED`: the layer checks versionId, one version each), else
        NotImplemented."""
        info = await self.owned_bucket(request)
        if info.kind != metadata_pb2.BUCKET_KIND_KV or request.op in kv_ops.LAYERED:
            return handler
        raise s3errors.S3Error("NotImplemented", f"{request.op} is not implemented on KV buckets")

    async def layer(self, request: S3Request) -> objectlayer.ObjectLayer:
        """The object layer of the request's bucket, by its kind (owned_bucket's check)."""
        info = await self.owned_bucket(request)
        if info.kind == metadata_pb2.BUCKET_KIND_KV:
            return self.kv_objects
        return self.objects

    async def close(self) -> None:
        """Close the KV clients."""
        await self.kv_buckets.close()

    async def owned_bucket(self, request: S3Request) -> metadata_pb2.BucketInfo:
        """The request's bucket: NoSuchBucket, or AccessDenied unless the principal may use it
        or the ACL gate admitted the request to it (the front's check on the bound principal
        and admission: `ObjectFront.request_bucket`)."""
        return await self.front.request_bucket(request.bucket)


def _traced(server: S3Server) -> Any:
    """The tracing middleware: one SERVER span per request, named after its S3 operation
    (`S3 PutObject`), continuing a caller's W3C traceparent, with the bucket and status; the
    gateway's gRPC and data-plane calls for it are its children. Probes are not traced."""

    @web.middleware
    async def trace(http: web.Request, handler: Any) -> web.StreamResponse:
        if http.path in (HEALTH_LIVE, HEALTH_READY):
            return await handler(http)  # type: ignore[no-any-return]
        op, bucket = "Unknown", ""
        try:  # the route handle() will take (it raises the same error there, answered)
            bucket, key = server.target(http)
            op, _ = server.route(http.method, bucket, key, http.query)
        except s3errors.S3Error:
            pass
        attributes = {"http.request.method": http.method, "s3.operation": op}
        scope = tracing.server_scope(
            f"S3 {op}", tracing.extract(http.headers), {**attributes, "aws.s3.bucket": bucket}
        )
        if scope is None:
            return await handler(http)  # type: ignore[no-any-return]
        status = 500
        try:
            response: web.StreamResponse = await handler(http)
            status = response.status
            return response
        except web.HTTPException as exc:
            status = exc.status
            raise
        finally:
            scope.span.set_attribute("http.response.status_code", status)
            scope.span.set_attribute("aws.request_id", http.get(_REQUEST_ID, ""))
            scope.end(error=str(status) if status >= 500 else "")

    return trace


def _ready(cmap: common_pb2.ClusterMap) -> bool:
    """Whether a gateway with this map can serve S3 (a metadata node, readable sets)."""
    metadata = any(n.role == common_pb2.NODE_ROLE_METADATA for n in cmap.nodes)
    retired = common_pb2.POOL_STATE_RETIRED  # a tombstone: its drives may be gone for good
    sets = [es for pool in cmap.pools if pool.state != retired for es in pool.sets]
    online = common_pb2.DRIVE_STATE_ONLINE
    return (
        metadata
        and bool(sets)
        and all(sum(slot.state == online for slot in es.slots) >= es.data_shards for es in sets)
    )


def kvtier_principal(user: auth.Principal) -> principal_mod.Principal:
    """The kvtier principal of an S3 user (S3 never maps shared memory; an unsigned request
    is anonymous)."""
    if user.anonymous:
        return principal_mod.ANONYMOUS
    return principal_mod.user(
        user.access_key, user.tenant, is_admin=user.is_admin, shm_trusted=False
    )


def _bytes_out(response: web.StreamResponse) -> int:
    """Body bytes of a response: its Content-Length (a streamed one sent it all or failed
    mid-way, which the client sees), or what a plain one is about to send."""
    if response.prepared:
        length = response.content_length
        return length if length is not None else response.body_length
    raw = getattr(response, "body", None)
    return len(raw) if isinstance(raw, bytes | bytearray) else 0


async def _stamp_streamed(http: web.Request, response: web.StreamResponse) -> None:
    """Stamp a response its handler prepares itself (a GET's streamed body) before its headers
    go out: handle() stamps the others."""
    request_id = http.get(_REQUEST_ID)
    if request_id and "x-amz-request-id" not in response.headers:
        _stamp(response, request_id)


def _stamp(response: web.StreamResponse, request_id: str) -> None:
    response.headers["x-amz-request-id"] = request_id
    response.headers["x-amz-id-2"] = request_id
    response.headers["Server"] = "kvtier"


def _error(exc: s3errors.S3Error, resource: str, request_id: str, method: str) -> web.Response:
    if exc.status == 304 or method == "HEAD":
        response = web.Response(status=exc.status)
    else:
        response = web.Response(
            status=exc.status,
            body=xmlio.error(exc.code, exc.message, resource, request_id),
            content_type="application/xml",
        )
    response.headers.update(exc.headers)
    return response


def _routes() -> list[tuple[tuple[str, str, tuple[str, ...]], tuple[str, Handler]]]:
    """(method, level, query keys it needs) -> (op, handler); first match wins."""
    table: list[tuple[str, str, tuple[str, ...], str, Handler]] = [
        ("GET", "service", (), "ListBuckets", bucket_ops.list_buckets),
        ("GET", "bucket", ("location",), "GetBucketLocation", bucket_ops.get_location),
        ("GET", "bucket", ("versioning",), "GetBucketVersioning", bucket_ops.get_versioning),
        ("GET", "bucket", ("versions",), "ListObjectVersions", versioning_ops.list_versions),
        *lifecycle_ops.ROUTES,
        *tagging_ops.ROUTES,  # ?tagging: objects' tags; buckets' NotImplemented
        ("GET", "bucket", ("cors",), "GetBucketCors", cors.get_bucket_cors),
        ("PUT", "bucket", ("cors",), "PutBucketCors", cors.put_bucket_cors),
        ("DELETE", "bucket", ("cors",), "DeleteBucketCors", cors.delete_bucket_cors),
        *public_access.ROUTES,
        *ownership_ops.ROUTES,
        *policy_ops.ROUTES,
        ("OPTIONS", "bucket", (), cors.PREFLIGHT, cors.preflight),
        ("OPTIONS", "object", (), cors.PREFLIGHT, cors.preflight),
        ("GET", "bucket", ("acl",), "GetBucketAcl", acl_ops.get_bucket_acl),
        ("PUT", "bucket", ("acl",), "PutBucketAcl", acl_ops.put_bucket_acl),
        ("GET", "object", ("acl",), "GetObjectAcl", acl_ops.get_object_acl),
        ("PUT", "object", ("acl",), "PutObjectAcl", acl_ops.put_object_acl),
        ("GET", "bucket", ("uploads",), "ListMultipartUploads", multipart_ops.list_uploads),
        ("GET", "bucket", (), "ListObjects", bucket_ops.list_objects),
        ("PUT", "bucket", ("versioning",), "PutBucketVersioning", bucket_ops.put_versioning),
        ("PUT", "bucket", (), "CreateBucket", bucket_ops.create_bucket),
        ("HEAD", "bucket", (), "HeadBucket", bucket_ops.head_bucket),
        ("DELETE", "bucket", (), "DeleteBucket", bucket_ops.delete_bucket),
        ("POST", "bucket", ("delete",), "DeleteObjects", policy_ops.delete_objects),
        ("POST", "bucket", (), "PostObject", post_object.post_object),
        ("PUT", "object", ("partNumber", "uploadId"), "UploadPart", multipart_ops.upload_part),
        ("PUT", "object", (), "PutObject", object_ops.put_object),
        ("GET", "object", ("uploadId",), "ListParts", multipart_ops.list_parts),
        *attributes_ops.ROUTES,  # before GetObject: ?attributes
        ("GET", "object", (), "GetObject", object_ops.get_object),
        ("HEAD", "object", (), "HeadObject", object_ops.head_object),
        ("DELETE", "object", ("uploadId",), "AbortMultipartUpload", multipart_ops.abort),
        ("DELETE", "object", (), "DeleteObject", object_ops.delete_object),
        ("POST", "object", ("uploads",), "CreateMultipartUpload", multipart_ops.create),
        ("POST", "object", ("uploadId",), "CompleteMultipartUpload", multipart_ops.complete),
    ]
    return [((m, lvl, needs), (op, h)) for m, lvl, needs, op, h in table]
