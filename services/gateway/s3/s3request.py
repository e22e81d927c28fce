"""What an S3 operation handler gets: the parsed request (`S3Request`) and the door it came
through (`Door`: the object front, authentication, settings). The router (`server`) builds both
and imports the handlers; the handlers import this module only, so the S3 package has no
import cycle (checked by an import-linter contract)."""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable
from typing import Protocol

from aiohttp import web

from kvtier.proto.metadata.v1 import metadata_pb2
from services.gateway import front as front_mod
from services.gateway import objectlayer
from services.gateway.s3 import auth, body, kv_clients


@dataclasses.dataclass(slots=True)
class S3Request:
    """One request, parsed."""

    http: web.Request
    request_id: str
    bucket: str
    key: str
    query: dict[str, str]
    principal: auth.Principal
    payload: body.Payload
    op: str = ""
    #: The tenant owning the request's bucket ("" when not looked up: no bucket, or one made by
    #: this request): the owner of its objects and ACLs.
    bucket_owner: str = ""
    #: The bucket's S3 Object Ownership setting (`ownership`; 0: none or not looked up).
    object_ownership: metadata_pb2.ObjectOwnership.ValueType = (
        metadata_pb2.OBJECT_OWNERSHIP_UNSPECIFIED
    )

    def header(self, name: str, default: str = "") -> str:
        """A request header ('' when absent)."""
        return self.http.headers.get(name, default)

    @property
    def owner(self) -> tuple[str, str]:
        """(canonical id, display name) of the owner of the bucket's objects: its tenant's
        name both (the principal's tenant where no bucket was looked up)."""
        tenant = self.bucket_owner or self.principal.tenant
        return tenant, tenant

    @property
    def resource(self) -> str:
        """The path the request concerns (for error bodies)."""
        return f"/{self.bucket}/{self.key}" if self.key else f"/{self.bucket}"


class Door(Protocol):
    """The S3 server as its handlers see it (`server.S3Server` is the one implementation)."""

    front: front_mod.ObjectFront
    auth: auth.Authenticator
    region: str
    kv_buckets: kv_clients.KVBuckets
    body_timeout_s: float
    send_timeout_s: float
    #: Seconds in a lifecycle rule's day (the TTL of KV objects).
    lifecycle_day_s: float

    def target(self, http: web.Request) -> tuple[str, str]:
        """(bucket, key) of a request."""
        ...

    async def owned_bucket(self, request: S3Request) -> metadata_pb2.BucketInfo:
        """The request's bucket: NoSuchBucket, or AccessDenied unless the principal may use it
        or the ACL gate admitted the request to it."""
        ...

    async def layer(self, request: S3Request) -> objectlayer.ObjectLayer:
        """The object layer of the request's bucket, by the bucket's kind (erasure-coded or
        KV), once owned_bucket admitted the request."""
        ...


Handler = Callable[[Door, S3Request], Awaitable[web.StreamResponse]]
