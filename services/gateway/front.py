"""The gateway's object front: buckets through the metadata service, who may use them, calls to
the engine.

Buckets live in etcd, kept by the metadata service; the gateway asks a metadata node of the
map and caches a bucket's record for a moment (`bucket_cache_s`) so that each object request
does not cost a metadata round trip (access is denied on a fresh record only). Deleting a
bucket first lists it: only a bucket without objects is deleted, and only the incarnation that
was listed (its generation); its multipart uploads in progress are aborted with it.

**Who.** Every operation acts for the caller, `kvtier.principal.current()` (bound by the gRPC
interceptor, and by the S3 front for each request): a bucket is used only by its tenant's users
and by privileged callers (operators, admins; kvcache nodes use the durable KV bucket only;
PermissionDenied "AccessDenied" otherwise, copy sources included); CreateBucket creates for the
caller's tenant; ListBuckets lists its buckets (privileged callers: all). A write begun here (a
BeginPut, a part, a copy) is the caller's tenant's ("" for callers acting for no tenant): only that
tenant or a privileged caller may send its stripes, commit or abort it.

**ACL grants.** The S3 front alone may admit a request that `bucket_for` refuses (an anonymous
one, another tenant's user) to one bucket for one scope, once an ACL grant allowed its
operation (`Admission`, `admit`; `s3.acl_ops`): listing ("read"), writing objects ("write"),
reading an object or its ACL, or setting its ACL, as the version's own ACL decides ("object",
checked here on the resolved version), the bucket's ACL ("read_acp", "write_acp"). Only the
methods that name a scope honour it; deleting the bucket, its other configuration and
multipart listings stay `bucket_for`'s. A copy's source is read as the admission's `source`
allows (its version's ACL checked on the version copied), else `bucket_for`'s.

**Names.** Users see a bucket's name; the engine, listings, multipart uploads and healing work
on its storage name (`names.storage_name`: `<name>@<storage_id>`), resolved here, so the objects
of a deleted bucket are never visible to the next bucket of that name. Replies carry the
user-facing name (`versions.info`, listings). The kvcache nodes' durable KV bucket
(`names.KV_DURABLE_BUCKET`) is implicit: never recorded at the metadata service, never listed,
usable by kvcache nodes only.

**Data plane.** Calls carry their session's principal (`tenant/who/suffix`; `@role/...` for a
session acting for no tenant, privileged but for `@kvcache`): READ_RANGE checks the bucket's
tenant against it, WRITE_STRIPES the write's owner. A front built with `insecure=True` (a cluster
run without authentication, whose sessions are all `default/...`) lets every session in.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

from google.protobuf import message

from kvtier import buckets, clustermap, errors, names, principal
from kvtier import security as security_mod
from kvtier.clients import metadata as metadata_client
from kvtier.proto.common.v1 import acl_pb2, common_pb2
from kvtier.proto.datanode.v1 import datanode_pb2
from kvtier.proto.gateway.v1 import objects_pb2 as pb
from kvtier.proto.metadata.v1 import metadata_pb2
from services.gateway import (
    access,
    frontcalls,
    listing,
    multipart,
    objects,
    versioned,
    versionlisting,
    versions,
)

log = logging.getLogger(__name__)

#: A metadata service that cannot answer now: down (UNAVAILABLE, or gone from the map) or
#: stopped (its calls time out).
METADATA_AWAY = (errors.Unavailable, errors.DeadlineExceeded)
#: The durable KV bucket's record (implicit: no tenant, stored under its own name).
_DURABLE = metadata_pb2.BucketInfo(name=names.KV_DURABLE_BUCKET)
#: Multipart uploads aborted at once when their bucket is deleted.
_ABORTS_IN_FLIGHT = 8

M = TypeVar("M", bound=message.Message)


def _bucket(info: metadata_pb2.BucketInfo) -> pb.BucketInfo:
    return pb.BucketInfo(name=info.name, created_at_unix_ms=info.created_at_unix_ms)


def storage(info: metadata_pb2.BucketInfo) -> str:
    """The storage name of a bucket's objects."""
    return names.storage_name(info.name, info.storage_id)


def _with(req: M, **fields: str) -> M:
    """A copy of req with fields replaced (bucket names mapped to storage names)."""
    copy = type(req)()
    copy.CopyFrom(req)
    for name, value in fields.items():
        setattr(copy, name, value)
    return copy


# Who may use what lives in `access`; its names are re-exported here for importers.
KV_ROLE = access.KV_ROLE
Admission = access.Admission
OWN = access.OWN
admit = access.admit
unadmit = access.unadmit
may_use = access.may_use
may_use_durable = access.may_use_durable
owner_of = access.owner_of
_denied = access.denied
#: Raises unless the caller may read the version of a copy's source found (`_copy_source`).
_SourceCheck = Callable[[datanode_pb2.ShardMeta], None]


class ObjectFront(frontcalls.DataPlaneCalls):
    """What the object servicer, the S3 front and the gateway's data-plane calls use."""

    def __init__(
        self,
        view: clustermap.MapView,
        engine: objects.ObjectEngine,
        lister: listing.Lister,
        *,
        bucket_cache_s: float = 2.0,
        watched: buckets.BucketCache | None = None,
        insecure: bool = False,
        security: security_mod.ClientSecurity | None = None,
    ) -> None:
        """insecure: a cluster run without authentication (every data-plane session may use
        everything; gRPC callers are all `principal.INSECURE` there anyway)."""
        self._view = view
        #: How this gateway calls the metadata service (mutual TLS as itself).
        self.security = security
        self.engine = engine
        self.lister = lister
        self.version_lister = versionlisting.VersionLister(lister.view, lister.nodes)
        self._bucket_cache_s = bucket_cache_s
        self._insecure = insecure
        self._infos: dict[str, tuple[float, metadata_pb2.BucketInfo]] = {}
        #: Every bucket as etcd last said (kept current by the gateway's bucket loop).
        self._watched = watched
        self._metadata: metadata_client.MetadataClient | None = None
        #: NodeInfo.started_at_unix_ms of the metadata node incarnation _metadata reaches.
        self._metadata_started_at = 0
        #: Whether bucket lists come from the watched records (the metadata service is away).
        self._listing_watched = False
        self.multipart = multipart.Multipart(engine, lister)

    def _meta(self) -> metadata_client.MetadataClient:
        nodes = [n for n in self._view.current.nodes if n.role == common_pb2.NODE_ROLE_METADATA]
        if not nodes:
            raise errors.Unavailable("no metadata service in the cluster map")
        current = {(n.grpc_address, n.started_at_unix_ms) for n in nodes}
        if self._metadata is not None:
            if (self._metadata.address, self._metadata_started_at) in current:
                return self._metadata
            # Gone, or a new incarnation (restarted, maybe at the same address): a new channel.
            # The old one may sit in gRPC's reconnect backoff after the outage (~15 s after a
            # minute of refused connects), failing every bucket operation meanwhile.
            asyncio.ensure_future(self._metadata.close())  # noqa: RUF006 - best effort
        self._metadata = metadata_client.MetadataClient(
            nodes[0].grpc_address, security=self.security
        )
        self._metadata_started_at = nodes[0].started_at_unix_ms
        return self._metadata

    def metadata_address(self) -> str:
        """The gRPC address of a metadata node of the map."""
        return self._meta().address

    async def close(self) -> None:
        """Close the metadata channel."""
        if self._metadata is not None:
            await self._metadata.close()

    # Buckets, as the gateway itself sees them (no access check).

    async def bucket_info(self, name: str, *, fresh: bool = False) -> metadata_pb2.BucketInfo:
        """The bucket's record (tenant, generation, storage id, configuration): unless fresh,
        one this gateway read or wrote within bucket_cache_s, else the watched one
        (`buckets.BucketCache`, no call), else read from the metadata service. A fresh read
        that finds etcd or the metadata service away falls back to the watched record, so
        object traffic goes on through an etcd outage. NotFound (NoSuchBucket) only from a
        read (a bucket created a moment ago may not be watched yet), InvalidArgument for a
        name S3 refuses, Unavailable."""
        names.check_bucket(name)
        cached = self._infos.get(name)
        if not fresh and cached is not None and time.monotonic() - cached[0] < self._bucket_cache_s:
            return cached[1]
        watched = self._watched.get(name) if self._watched is not None else None
        if not fresh and watched is not None:
            return watched
        try:
            info = await self._meta().get_bucket(name)
        except errors.NotFound:
            self._infos.pop(name, None)
            raise errors.NotFound(f"bucket {name} does not exist", reason="NoSuchBucket") from None
        except METADATA_AWAY:
            if watched is None:
                raise
            log.debug("bucket %s: the metadata service is away, serving the watched record", name)
            return watched
        self._infos[name] = (time.monotonic(), info)
        return info

    async def storage_name(self, name: str) -> str:
        """The storage name of a bucket (the durable KV bucket's own); NotFound."""
        if name == names.KV_DURABLE_BUCKET:
            return name
        return storage(await self.bucket_info(name, fresh=True))

    async def storage_buckets(self) -> list[str]:
        """The storage names of every bucket, the durable KV bucket's included, sorted (what
        healing walks)."""
        infos = await self._bucket_records(None)
        return sorted([storage(b) for b in infos] + [names.KV_DURABLE_BUCKET])

    async def _bucket_records(self, tenant: str | None) -> list[metadata_pb2.BucketInfo]:
        """Every bucket's record (tenant's, when given), sorted by name: from the metadata
        service or, while it cannot answer, from the watched records (the scanner, the
        lifecycle pass and ListBuckets go on through a metadata outage; a warning when that
        begins). Unavailable when neither answers."""
        try:
            infos = await self._meta().list_buckets("" if tenant is None else tenant)
        except METADATA_AWAY as exc:
            watched = self._watched.records(tenant) if self._watched is not None else None
            if watched is None:
                raise
            if not self._listing_watched:
                self._listing_watched = True
                log.warning(
                    "the metadata service cannot answer (%s): bucket lists come from the "
                    "watched records until it does", exc,
                )  # fmt: skip
            return watched
        if self._listing_watched:
            self._listing_watched = False
            log.info("the metadata service answers again: bucket lists come from it")
        return infos

    # Buckets, for the caller.

    async def bucket_for(self, name: str, *, fresh: bool = False) -> metadata_pb2.BucketInfo:
        """The record of a bucket the caller may use: NotFound (NoSuchBucket),
        PermissionDenied (AccessDenied), InvalidArgument."""
        caller = principal.current()
        if name == names.KV_DURABLE_BUCKET:
            if not may_use_durable(caller):
                raise _denied(f"{name} is internal to the KV tier")
            return _DURABLE
        if access.is_kv_node(caller):  # the durable bucket alone: no bucket of any tenant
            raise _denied(f"{caller.describe()} may use the KV tier's internal bucket only")
        info = await self.bucket_info(name, fresh=fresh)
        if not fresh and not may_use(caller, info.tenant):
            # Deny on a fresh record only: a cached one may name a bucket deleted (or created
            # again by the caller's tenant) through another gateway since: NoSuchBucket then.
            info = await self.bucket_info(name, fresh=True)
        if not may_use(caller, info.tenant):
            raise _denied(f"{caller.describe()} may not use bucket {name}")
        return info

    async def storage_of(self, name: str) -> str:
        """The storage name of a bucket the caller may use (see bucket_for)."""
        return storage(await self.bucket_for(name))

    async def _granted(self, name: str, scope: str) -> metadata_pb2.BucketInfo | None:
        """The record of bucket name when the request's admission covers scope there."""
        admission = access.current()
        if admission is None or admission.bucket != name or name == names.KV_DURABLE_BUCKET:
            return None
        if admission.scope == access.OWN or (scope != "any" and admission.scope != scope):
            return None
        return await self.bucket_info(name)

    async def request_bucket(self, name: str) -> metadata_pb2.BucketInfo:
        """The record of a bucket the caller may use (bucket_for) or that the request was
        admitted to by an ACL grant (`Admission`, any scope). The record only: an admitted
        request reaches objects through the methods that check its scope (resolve, head_object,
        list_objects, begin_put...), never through the engine with the storage name."""
        info = await self._granted(name, "any")
        return info if info is not None else await self.bucket_for(name)

    async def _storage_for(self, name: str, scope: str) -> str:
        """storage_of, or the storage name of a bucket admitted for scope."""
        return storage(await self._info_for(name, scope))

    async def _info_for(self, name: str, scope: str) -> metadata_pb2.BucketInfo:
        """bucket_for, or the record of a bucket admitted for scope."""
        info = await self._granted(name, scope)
        return info if info is not None else await self.bucket_for(name)

    async def _admitted_object(
        self, bucket: str, key: str, *, source: bool = False
    ) -> tuple[str, Admission] | None:
        """(storage name, admission) when the request was admitted to bucket's objects by
        their own ACLs (source: as a copy's source, `Admission.source`)."""
        admission = access.current()
        if source:
            admission = admission.source if admission is not None else None
            if admission is None or admission.bucket != bucket or bucket == names.KV_DURABLE_BUCKET:
                return None
            return storage(await self.bucket_info(bucket)), admission
        info = await self._granted(bucket, "object")
        if info is None or admission is None or admission.check_object is None:
            return None
        return storage(info), admission

    async def create_bucket(
        self,
        name: str,
        tenant: str = "",
        kind: metadata_pb2.BucketKind.ValueType = metadata_pb2.BUCKET_KIND_OBJECTS,
    ) -> pb.BucketInfo:
        """Create a bucket for the caller's tenant (a privileged caller's: for tenant, "default"
        when empty); AlreadyExists when taken, PermissionDenied for a user naming another
        tenant, InvalidArgument for a name S3 refuses (the durable KV bucket's included)."""
        names.check_bucket(name)
        if access.is_kv_node(principal.current()):
            raise _denied("a kvcache node creates no bucket")
        owner = principal.current().acting_tenant(tenant)
        info = await self._meta().create_bucket(name, owner, kind)
        self._infos[name] = (time.monotonic(), info)
        return _bucket(info)

    async def head_bucket(self, name: str) -> pb.BucketInfo:
        """The bucket (NotFound, PermissionDenied)."""
        return _bucket(await self.bucket_for(name, fresh=True))

    async def set_bucket_config(
        self, name: str, request: metadata_pb2.SetBucketConfigRequest
    ) -> metadata_pb2.BucketInfo:
        """Replace one part of the configuration (ACL, CORS, lifecycle) of a bucket the caller
        may use (bucket_for: its tenant's users and privileged callers; the ACL alone also
        when the request was admitted for "write_acp": the S3 gate checked the grant on a
        fresh record); returns the stored record. The change is
        seen here at once and by other gateways within bucket_cache_s. NotFound,
        PermissionDenied, InvalidArgument."""
        if name == names.KV_DURABLE_BUCKET:
            raise _denied(f"{name} is internal to the KV tier")
        info = None
        if request.WhichOneof("config") == "acl":  # a WRITE_ACP grant admits the ACL alone
            info = await self._granted(name, "write_acp")
        if info is None:
            info = await self.bucket_for(name, fresh=True)
        else:
            info = await self.bucket_info(name, fresh=True)
        request.name = name
        request.expected_generation = info.generation  # never another incarnation's
        stored = await self._meta().set_bucket_config(request)
        self._infos[name] = (time.monotonic(), stored)
        return stored

    async def list_buckets(self) -> list[pb.BucketInfo]:
        """The caller's tenant's buckets (a privileged caller's: every bucket), sorted by name;
        never the durable KV bucket."""
        caller = principal.current()
        if access.is_kv_node(caller):
            return []  # it uses the durable bucket alone, which is never listed
        if caller.privileged:
            infos = await self._bucket_records(None)
        else:
            infos = await self._bucket_records(caller.acting_tenant())
        return [_bucket(b) for b in infos]

    async def delete_bucket(self, name: str) -> None:
        """Delete a bucket that holds no object (PreconditionFailed: BucketNotEmpty;
        PermissionDenied). Its multipart uploads in progress go with it, as in S3: once the
        record is gone no request reaches them (they live under this incarnation's storage
        name), and their parts are deleted before this returns (what a failure leaves, the
        multipart expiry sweep deletes)."""
        if name == names.KV_DURABLE_BUCKET:
            raise _denied(f"{name} is internal to the KV tier")
        info = await self.bucket_for(name, fresh=True)
        stored = storage(info)
        page = await self.lister.list_objects(pb.ListObjectsRequest(bucket=stored, max_keys=1))
        held = bool(page.objects or page.common_prefixes)
        if not held and info.versioning.status:  # delete markers and non-current versions
            held = bool((await self.version_lister.list_versions(stored, max_keys=1)).versions)
        if held:
            raise errors.PreconditionFailed(f"bucket {name} is not empty", reason="BucketNotEmpty")
        await self._meta().delete_bucket(name, expected_generation=info.generation)
        self._infos.pop(name, None)
        await self._abort_uploads(stored)

    async def _abort_uploads(self, stored: str) -> None:
        """Abort every multipart upload of a deleted bucket's storage name (failures logged)."""
        gate = asyncio.Semaphore(_ABORTS_IN_FLIGHT)

        async def abort(upload: pb.MultipartUploadInfo) -> None:
            async with gate:
                try:
                    await self.multipart.abort(
                        pb.AbortMultipartUploadRequest(
                            bucket=stored, key=upload.key, upload_id=upload.upload_id
                        )
                    )
                except errors.KVTierError as exc:  # gone meanwhile, or a drive unreachable
                    log.warning("aborting upload %s of %s: %s", upload.upload_id, stored, exc)

        tried: set[str] = set()
        while True:  # from the start each time: what is aborted leaves the listing
            try:
                page = await self.multipart.list_uploads(
                    pb.ListMultipartUploadsRequest(bucket=stored)
                )
            except errors.KVTierError as exc:  # the bucket is gone: the sweep finishes
                log.warning("listing the uploads of deleted %s: %s", stored, exc)
                return
            todo = [u for u in page.uploads if u.upload_id not in tried]
            if not todo:
                return
            tried.update(u.upload_id for u in todo)
            await asyncio.gather(*(abort(u) for u in todo))

    # Objects.

    def _check_write(self, upload_id: str) -> None:
        """PermissionDenied unless the caller may continue the begun write (NotFound)."""
        owner = self.engine.upload_owner(upload_id)
        caller = principal.current()
        if not may_use(caller, owner):
            raise _denied(f"{caller.describe()} may not use upload {upload_id}")

    async def begin_put(self, req: pb.BeginPutRequest) -> pb.BeginPutResponse:
        """Plan a PUT into a bucket the caller may use (Overloaded: too many in flight)."""
        info = await self._info_for(req.bucket, "write")
        begun = _with(req, bucket=storage(info))
        versions.mark_versioning(begun.headers, info.versioning.status)
        return self.engine.begin_put(begun, owner=owner_of(principal.current()))

    async def commit_put(self, req: pb.CommitPutRequest) -> pb.CommitPutResponse:
        """Finish a PUT or a part's upload begun by the caller's tenant."""
        self._check_write(req.upload_id)
        meta = await self.engine.commit_meta(req.upload_id)
        if meta.bucket == names.MULTIPART_BUCKET:
            return pb.CommitPutResponse(part=multipart.part_info(meta))
        return pb.CommitPutResponse(object=versions.info(meta))

    async def abort_put(self, req: pb.AbortPutRequest) -> None:
        """Drop a write begun by the caller's tenant (unknown ids are ignored)."""
        try:
            self._check_write(req.upload_id)
        except errors.NotFound:
            return
        await self.engine.abort_put(req)

    async def resolve(
        self,
        bucket: str,
        key: str,
        version_id: str = "",
        *,
        source: bool = False,
        data: bool = True,
    ) -> versions.Resolved:
        """The current version (version_id: that S3 version) of an object of a bucket the
        caller may use, or of one whose own ACL admits the request (PermissionDenied
        otherwise, and for a missing object when the caller may not list the bucket);
        versions.DeleteMarker (a NotFound) for a delete marker. source: read as a copy's
        source (`Admission.source`); data False: for its info only (engine.resolve)."""
        admitted = await self._admitted_object(bucket, key, source=source)
        if admitted is None:
            stored = await self.storage_of(bucket)
            return await self.engine.resolve(stored, key, version_id=version_id, data=data)
        stored, admission = admitted
        try:
            found = await self.engine.resolve(stored, key, version_id=version_id, data=data)
        except errors.NotFound:
            if not admission.may_list:
                who = principal.current().describe()
                raise _denied(f"{who} may not read {bucket}/{key}") from None
            raise
        assert admission.check_object is not None
        admission.check_object(found.meta.acl)
        return found

    async def head_object(self, bucket: str, key: str, version_id: str = "") -> pb.ObjectInfo:
        """An object's info (admitted as in resolve)."""
        if version_id or await self._admitted_object(bucket, key) is not None:
            return versions.info((await self.resolve(bucket, key, version_id, data=False)).meta)
        return await self.engine.head(await self.storage_of(bucket), key)

    async def set_object_acl(
        self, bucket: str, key: str, acl: acl_pb2.Acl, version_id: str = ""
    ) -> pb.ObjectInfo:
        """Replace the ACL of an object's current version (or version_id's) in place, where the
        caller may use the bucket or its own ACL admits it; its info (NotFound, AccessDenied)."""
        admitted = await self._admitted_object(bucket, key)
        if admitted is None:
            stored = await self.storage_of(bucket)
        else:
            await self.resolve(bucket, key, version_id)  # its ACL decides (WRITE_ACP)
            stored = admitted[0]
        update = self.engine.meta_updater.update
        return versions.info(await update(stored, key, acl=acl, version_id=version_id))

    async def delete_object(self, bucket: str, key: str, version_id: str = "") -> pb.ObjectInfo:
        """Delete an object (absent: fine). In a versioned bucket: without version_id, write
        a delete marker (its info); with one, remove that version for good (the info of what
        was removed: its version id, whether it was a marker; absent: fine). An empty info
        for an unversioned bucket's delete."""
        info = await self._info_for(bucket, "write")
        status = info.versioning.status
        owner = access.marker_owner(principal.current(), info)  # a marker's: its deleter
        return await versioned.delete(
            self.engine, storage(info), key, status, version_id, owner=owner
        )

    async def copy_object(self, req: pb.CopyObjectRequest) -> pb.ObjectInfo:
        """A server-side copy between buckets the caller may use (into one a WRITE grant
        admits it to; from one its admission's `source` admits it to)."""
        src, check = await self._copy_source(req.src_bucket)
        info = await self._info_for(req.dst_bucket, "write")
        copy = _with(req, src_bucket=src, dst_bucket=storage(info))
        versions.mark_versioning(copy.headers, info.versioning.status)
        return await self.engine.copy(copy, owner=owner_of(principal.current()), check=check)

    async def _copy_source(self, bucket: str) -> tuple[str, _SourceCheck | None]:
        """(storage name, the check of the version copied: None for the caller's own bucket)
        of a copy's source bucket."""
        admitted = await self._admitted_object(bucket, "", source=True)
        if admitted is None:
            return await self.storage_of(bucket), None
        check_object = admitted[1].check_object
        assert check_object is not None  # a source admission is an "object" one

        def check(meta: datanode_pb2.ShardMeta) -> None:
            check_object(meta.acl)

        return admitted[0], check

    async def list_objects(self, req: pb.ListObjectsRequest) -> pb.ListObjectsResponse:
        """A page of a bucket's objects."""
        stored = await self._storage_for(req.bucket, "read")
        return await self.lister.list_objects(_with(req, bucket=stored))

    async def list_versions(self, bucket: str, **page: str | int) -> versionlisting.VersionPage:
        """A page of a bucket's S3 versions (the caller's own bucket, or one admitted for
        reading: VersionLister)."""
        stored = await self._storage_for(bucket, "read")
        return await self.version_lister.list_versions(stored, **page)  # type: ignore[arg-type]

    # Multipart uploads (an upload lives under its bucket's storage name: only who may use
    # the bucket reaches it).

    async def create_multipart(
        self, req: pb.CreateMultipartUploadRequest
    ) -> pb.CreateMultipartUploadResponse:
        """Start a multipart upload into a bucket the caller may use."""
        info = await self._info_for(req.bucket, "write")
        begun = _with(req, bucket=storage(info))
        versions.mark_versioning(begun.headers, info.versioning.status)  # pool 0 if versioned
        initiator = access.writer_of(principal.current(), info.tenant)
        upload_id = await self.multipart.create(begun, initiator=initiator)
        return pb.CreateMultipartUploadResponse(upload_id=upload_id)

    async def begin_part(
        self, req: pb.BeginUploadPartRequest, *, checksum_algorithms: Sequence[str] = ()
    ) -> pb.BeginUploadPartResponse:
        """Plan one part's upload (hashed also with checksum_algorithms: trailers to come)."""
        stored = await self._storage_for(req.bucket, "write")
        return await self.multipart.begin_part(
            _with(req, bucket=stored),
            owner=owner_of(principal.current()),
            checksum_algorithms=checksum_algorithms,
        )

    async def copy_part(self, req: pb.UploadPartCopyRequest) -> pb.UploadPartCopyResponse:
        """A part copied from another object (its bucket as copy_object's source)."""
        stored = await self._storage_for(req.bucket, "write")
        src, check = await self._copy_source(req.src_bucket)
        return await self.multipart.copy_part(
            _with(req, bucket=stored, src_bucket=src),
            owner=owner_of(principal.current()),
            check=check,
        )

    async def complete_multipart(
        self, req: pb.CompleteMultipartUploadRequest
    ) -> pb.CompleteMultipartUploadResponse:
        """Make the listed parts the object."""
        bucket = await self._info_for(req.bucket, "write")
        info = await self.multipart.complete(
            _with(req, bucket=storage(bucket)), versioning=bucket.versioning.status
        )
        return pb.CompleteMultipartUploadResponse(object=info)

    async def abort_multipart(self, req: pb.AbortMultipartUploadRequest) -> None:
        """Drop an upload and its parts."""
        stored = await self._storage_for(req.bucket, "write")
        await self.multipart.abort(_with(req, bucket=stored))

    async def list_parts(self, req: pb.ListPartsRequest) -> pb.ListPartsResponse:
        """A page of an upload's parts (in a bucket admitted for "write": a policy's Allow)."""
        stored = await self._storage_for(req.bucket, "write")
        return await self.multipart.list_parts(_with(req, bucket=stored))

    async def list_uploads(
        self, req: pb.ListMultipartUploadsRequest
    ) -> pb.ListMultipartUploadsResponse:
        """A page of a bucket's uploads in progress (the caller's own bucket, or one admitted
        for reading)."""
        return await self.multipart.list_uploads(
            _with(req, bucket=await self._storage_for(req.bucket, "read"))
        )
