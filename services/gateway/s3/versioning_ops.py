"""S3 bucket versioning: ListObjectVersions, and what the object operations need of versions
(`versionId`, `x-amz-version-id`, delete markers, DeleteObjects' bodies); Get/PutBucketVersioning
are in bucket_ops.

A bucket's versioning status lives in its record (`BucketInfo.versioning`, set through
SetBucketConfig); writes into an Enabled bucket make versions with their own ids, into a
Suspended one the "null" version, as S3 does (ARCHITECTURE.md, docs/s3.md "Versioning").
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import Any

from aiohttp import web

from kvtier import errors, objversions
from kvtier.proto.datanode.v1 import datanode_pb2
from kvtier.proto.gateway.v1 import objects_pb2 as pb
from kvtier.proto.metadata.v1 import metadata_pb2
from services.gateway import versionlisting, versions
from services.gateway.s3 import ownership, params, s3errors, s3request, xmlio

STATUS = {
    "Enabled": metadata_pb2.VERSIONING_STATUS_ENABLED,
    "Suspended": metadata_pb2.VERSIONING_STATUS_SUSPENDED,
}
NAMES = {value: name for name, value in STATUS.items()}
VERSION_HEADER = "x-amz-version-id"
MARKER_HEADER = "x-amz-delete-marker"


def requested(req: s3request.S3Request) -> str:
    """The request's `versionId` ('' when absent); 400 InvalidArgument when it cannot be one."""
    if "versionId" not in req.query:
        return ""
    return check(req.query["versionId"])


def check(version: str) -> str:
    """version when it can be a version id, else 400 InvalidArgument (as S3)."""
    if not version:
        raise s3errors.S3Error("InvalidArgument", "Version id cannot be the empty string")
    try:
        return objversions.check(version)
    except errors.InvalidArgument:
        raise s3errors.S3Error("InvalidArgument", "Invalid version id specified") from None


async def status(s3: s3request.Door, bucket: str) -> int:
    """The bucket's versioning status (its cached record: callers checked access already)."""
    return (await s3.front.bucket_info(bucket)).versioning.status


def stamp(response: web.StreamResponse, info: pb.ObjectInfo, versioned: bool) -> None:
    """x-amz-version-id (and x-amz-delete-marker) of a version, in a versioned bucket.
    versioned: a DeleteObject's answer. A write's (PutObject, CopyObject, POST Object,
    CompleteMultipartUpload) of the null version (a Suspended bucket) has none, as in S3."""
    null_write = not versioned and info.headers.null_version
    if (versioned or info.headers.keep_versions) and not null_write:
        response.headers[VERSION_HEADER] = info.version_id or objversions.NULL
    if info.delete_marker:
        response.headers[MARKER_HEADER] = "true"


async def stamp_read(
    s3: s3request.Door, bucket: str, response: web.StreamResponse, meta: datanode_pb2.ShardMeta
) -> None:
    """x-amz-version-id of a GET or HEAD: a version's own, "null" for a version written
    before the bucket was versioned (its cached record: no I/O on an unversioned bucket's
    objects but a dict lookup)."""
    if meta.keep_versions or await status(s3, bucket):
        response.headers[VERSION_HEADER] = objversions.version_id(meta)


async def stamp_info(
    s3: s3request.Door, bucket: str, response: web.StreamResponse, info: pb.ObjectInfo
) -> None:
    """x-amz-version-id of a version's sub-resource (tagging, ACL), as stamp_read does."""
    if info.headers.keep_versions or await status(s3, bucket):
        response.headers[VERSION_HEADER] = info.version_id or objversions.NULL


def not_found(exc: errors.NotFound, version: str) -> s3errors.S3Error:
    """The S3 error of a read that found no version: a delete marker (404 NoSuchKey when it
    is the current version, 405 MethodNotAllowed when asked for by id, both with
    x-amz-delete-marker), a missing version (NoSuchVersion) or a missing key (NoSuchKey)."""
    if isinstance(exc, versions.DeleteMarker):
        headers = {MARKER_HEADER: "true", VERSION_HEADER: exc.version_id}
        if exc.by_id:
            return s3errors.S3Error(
                "MethodNotAllowed",
                "The specified method is not allowed against this resource.",
                headers=headers,
            )
        return s3errors.S3Error("NoSuchKey", "The specified key does not exist.", headers=headers)
    if version:
        return s3errors.S3Error("NoSuchVersion", "The specified version does not exist.")
    return s3errors.S3Error("NoSuchKey", "The specified key does not exist.")


async def list_versions(s3: s3request.Door, req: s3request.S3Request) -> web.Response:
    """ListObjectVersions: versions and delete markers by key, newest first, with IsLatest;
    key-marker / version-id-marker pages, prefix, delimiter, max-keys, encoding-type."""
    await s3.owned_bucket(req)
    query = req.query
    enc = xmlio.Encoder(query.get("encoding-type", ""))
    most = params.uint(query.get("max-keys", "1000"))
    if most is None:
        raise s3errors.S3Error("InvalidArgument", "max-keys must be a non-negative integer")
    key_marker = query.get("key-marker", "")
    version_marker = query.get("version-id-marker", "")
    if version_marker and not key_marker:
        raise s3errors.S3Error(
            "InvalidArgument", "A version-id marker cannot be specified without a key marker."
        )
    if version_marker:
        check(version_marker)
    page = await s3.front.list_versions(
        req.bucket, prefix=query.get("prefix", ""), delimiter=query.get("delimiter", ""),
        key_marker=key_marker, version_marker=version_marker, max_keys=min(most, 1000),
    )  # fmt: skip
    owners = ownership.listed_owners(req.object_ownership, req.owner[0])
    body = _versions_xml(req.bucket, page, query, enc, owners)
    return web.Response(body=body, content_type="application/xml")


def _versions_xml(
    bucket: str,
    page: versionlisting.VersionPage,
    query: dict[str, str],
    enc: xmlio.Encoder,
    owner: xmlio.Owners,
) -> bytes:
    root = xmlio._root("ListVersionsResult")
    xmlio._add(root, "Name", bucket)
    xmlio._add(root, "Prefix", enc(query.get("prefix", "")))
    xmlio._add(root, "KeyMarker", enc(query.get("key-marker", "")))
    xmlio._add(root, "VersionIdMarker", query.get("version-id-marker", ""))
    if page.is_truncated:
        xmlio._add(root, "NextKeyMarker", enc(page.next_key_marker))
        xmlio._add(root, "NextVersionIdMarker", page.next_version_marker)
    xmlio._add(root, "MaxKeys", query.get("max-keys", "1000"))
    if query.get("delimiter"):
        xmlio._add(root, "Delimiter", enc(query["delimiter"]))
    if enc.url:
        xmlio._add(root, "EncodingType", "url")
    xmlio._add(root, "IsTruncated", page.is_truncated)
    for entry in page.versions:
        _version(root, entry, enc, owner)
    for prefix in page.common_prefixes:
        xmlio._add(xmlio._add(root, "CommonPrefixes"), "Prefix", enc(prefix))
    return xmlio._doc(root)


def _version(root: ET.Element, entry: Any, enc: xmlio.Encoder, owner: xmlio.Owners) -> None:
    item = xmlio._add(root, "DeleteMarker" if entry.delete_marker else "Version")
    xmlio._add(item, "Key", enc(entry.key))
    xmlio._add(item, "VersionId", entry.version_id or objversions.NULL)
    xmlio._add(item, "IsLatest", entry.is_latest)
    xmlio._add(item, "LastModified", xmlio.iso_time(entry.mtime_unix_ns // 1_000_000))
    if not entry.delete_marker:
        xmlio._add(item, "ETag", xmlio.quoted(entry.etag))
        xmlio._add(item, "Size", entry.size)
        xmlio._add(item, "StorageClass", "STANDARD")
    xmlio._owner(item, *owner(entry.owner))


def parse_delete(body: bytes) -> tuple[bool, list[tuple[str, str]]]:
    """Delete (DeleteObjects): (quiet, [(key, version id or '')]), at most 1000 objects; a
    VersionId that cannot be one is 400 InvalidArgument for the whole request."""
    quiet, keys = xmlio.parse_delete(body)
    found: list[str] = []

    def take(child: ET.Element) -> None:
        if child.tag == "Object":
            found.append(xmlio._text(child, "VersionId") or "")

    xmlio._parse(body, take, max_children=xmlio.MAX_DELETE_KEYS + 8)
    return quiet, [(k, check(v) if v else "") for k, v in zip(keys, found, strict=True)]


def delete_result(
    targets: list[tuple[str, str]],
    results: list[pb.ObjectInfo | s3errors.S3Error],
    *,
    quiet: bool,
) -> bytes:
    """DeleteResult: each Deleted (omitted when quiet) with its VersionId and, for a delete
    marker written or removed, DeleteMarker and DeleteMarkerVersionId; each Error."""
    root = xmlio._root("DeleteResult")
    for (key, version), result in zip(targets, results, strict=True):
        if isinstance(result, s3errors.S3Error):
            item = xmlio._add(root, "Error")
            xmlio._add(item, "Key", key)
            if version:
                xmlio._add(item, "VersionId", version)
            xmlio._add(item, "Code", result.code)
            xmlio._add(item, "Message", result.message)
        elif not quiet:
            item = xmlio._add(root, "Deleted")
            xmlio._add(item, "Key", key)
            if version:
                xmlio._add(item, "VersionId", version)
            if result.delete_marker:
                xmlio._add(item, "DeleteMarker", True)
                xmlio._add(item, "DeleteMarkerVersionId", result.version_id)
    return xmlio._doc(root)
