"""How the S3 objects and multipart uploads of a KV bucket are laid out as KV blocks of the
bucket's namespace (`kv_ops.namespace`), and how a request body becomes them.

A *blob* (an object's or a part's bytes) is one data block, a 16-byte version id then the
bytes, and, only when the bytes do not fit one block with the id, a tail block: the same
version id then the rest (at most 16 bytes for a 64 MiB blob). The id binds a blob's blocks to
its metadata block (a serialized `ObjectInfo` whose `checksums["VERSION"]` holds the id): a
reader that finds another id (a concurrent overwrite) never mixes writers.

Keys (object keys never hold NUL, so internal keys, which start with NUL, never collide):
- object: data block under the key's bytes, tail under NUL "t" NUL + key, metadata under
  NUL "m" NUL + key;
- upload: record (the CreateMultipartUpload request: key, headers, checksum algorithm) under
  NUL "u" NUL + upload id; part N under NUL "p" NUL + upload id + NUL + "d" (data), "t" (tail)
  or "m" (metadata) + N as 5 digits. Upload ids are 32 hex digits, the first 16 the initiation
  time in ns, so they sort by initiation.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
from collections.abc import Mapping, Sequence

import prometheus_client

from kvtier import blocksums, checksums, errors, kv
from kvtier.proto.gateway.v1 import objects_pb2 as pb
from services.gateway import conditional, objectlayer
from services.gateway.s3 import s3errors

#: The largest KV object, the S3 body of a PUT or of a completed multipart upload.
MAX_KV_OBJECT_BYTES = 64 << 20
#: The largest block a kvcache node stores: its slab allocator's largest class with the default
#: 64 MiB pages (services/kvcache/slab.py MAX_BLOCK_BYTES; smaller `page_bytes` make it smaller,
#: and then objects near MAX_KV_OBJECT_BYTES are refused as ServiceUnavailable).
KV_BLOCK_BYTES = 64 << 20
VERSION_BYTES = 16
#: Bytes of a blob in its data block; the rest goes to the tail block.
HEAD_BYTES = KV_BLOCK_BYTES - VERSION_BYTES
META_MAX_BYTES = 16 << 10
META_PREFIX = b"\x00m\x00"
TAIL_PREFIX = b"\x00t\x00"
UPLOAD_PREFIX = b"\x00u\x00"
PART_PREFIX = b"\x00p\x00"
_VERSION = "VERSION"
#: The part sizes of a completed upload, in its metadata block ("size,size,...").
_PART_SIZES = "PART_SIZES"
#: The upload a completed object was made by, in its metadata block (a Complete sent again).
_UPLOAD = "UPLOAD"
#: The part checksums of a completed upload ("ALGORITHM:value,value,..."; at most 13 parts fit
#: MAX_KV_OBJECT_BYTES with S3's 5 MiB parts: well within META_MAX_BYTES).
_PART_CHECKSUMS = "PART_CHECKSUMS"
#: What a metadata block's checksums hold that is no S3 checksum.
_INTERNAL = frozenset({_VERSION, _PART_SIZES, _UPLOAD, _PART_CHECKSUMS})
_GET_ATTEMPTS = 4
_INLINE_DIGEST_BYTES = 256 << 10
#: Checksums computed on the loop up to _INLINE_CRC_BYTES when they are all a body needs (no
#: MD5, no SHA): awscrt's hardware CRCs run at tens of GB/s (~40 µs per 2 MiB here), while
#: the hop to a worker thread and back costs more CPU than that (~2-4 ms per 16 x 2 MiB
#: NIXL transfer, docs/benchmarks.md). zlib's CRC32 (~4 GB/s) is not among them. Bounded so
#: that the loop is never held for more than ~0.1 ms by it (issue 14: no hashing on the loop
#: beyond what a thread hop costs); larger bodies go to a thread as before.
_INLINE_CRCS = frozenset({"CRC32C", "CRC64NVME"})
_INLINE_CRC_BYTES = 4 << 20
#: The first read of a body of unknown length (the blocks then double as it keeps coming).
_FIRST_READ_BYTES = 1 << 20

#: The message of a conditional write refused because another write of the key is in flight
#: (S3's 409 ConditionalRequestConflict: the client may retry).
CONFLICT_TEXT = "A conflicting conditional operation is currently in progress; please retry"

log = logging.getLogger(__name__)

KV_CONDITIONAL = prometheus_client.Counter(
    "kvtier_gateway_kv_conditional_writes_total",
    "If-Match writes to KV buckets by how the condition was held: atomic (compare-and-swap of "
    "the metadata block on its node) or checked (read, then written: an owner node that does "
    "not advertise kvcache.compare-and-swap, during a rolling upgrade)",
    ["held"],
)


class Blob:
    """A blob's bytes held as its blocks ([version | head], then [version | tail] when the
    bytes exceed HEAD_BYTES), so that they go to and come from the KV tier without a copy."""

    def __init__(self, size: int, version: bytes | None = None) -> None:
        self.size = size
        self.version = secrets.token_bytes(VERSION_BYTES) if version is None else version
        self.blocks = [bytearray(VERSION_BYTES + min(size, HEAD_BYTES))]
        if size > HEAD_BYTES:
            self.blocks.append(bytearray(VERSION_BYTES + size - HEAD_BYTES))
        for block in self.blocks:
            block[:VERSION_BYTES] = self.version

    def resize(self, size: int) -> None:
        """Make the blob size bytes long, the bytes it holds kept (up to size); no view of its
        blocks may be alive (BufferError)."""
        if size > HEAD_BYTES and len(self.blocks) == 1:
            self.blocks.append(bytearray(self.version))
        elif size <= HEAD_BYTES:
            del self.blocks[1:]
        lengths = (min(size, HEAD_BYTES), size - HEAD_BYTES)
        for block, length in zip(self.blocks, lengths[: len(self.blocks)], strict=True):
            want = VERSION_BYTES + length
            if len(block) < want:
                block += bytes(want - len(block))
            else:
                del block[want:]
        self.size = size

    def pieces(self, first: int = 0, last: int | None = None) -> list[memoryview]:
        """The bytes first..last (inclusive; default: all) as views into the blocks."""
        end = self.size if last is None else last + 1
        out, offset = [], 0
        for block in self.blocks:
            data = memoryview(block)[VERSION_BYTES:]
            lo, hi = max(first - offset, 0), min(end - offset, len(data))
            if lo < hi:
                out.append(data[lo:hi])
            offset += len(data)
        return out

    def intact(self, sizes: Sequence[int | None]) -> bool:
        """Whether blocks read with these sizes are this blob's whole blocks, of its version."""
        return all(
            size == len(block) and block[:VERSION_BYTES] == self.version
            for block, size in zip(self.blocks, sizes, strict=True)
        )


def object_keys(key: str) -> tuple[bytes, bytes]:
    """(data, tail) block keys of an object."""
    return key.encode(), TAIL_PREFIX + key.encode()


def meta_key(key: str) -> bytes:
    """The metadata block's key of an object key."""
    return META_PREFIX + key.encode()


def record_key(upload_id: str) -> bytes:
    """The record block's key of an upload."""
    return UPLOAD_PREFIX + upload_id.encode()


def parts_prefix(upload_id: str, kind: bytes = b"") -> bytes:
    """The prefix of an upload's part blocks (of one kind: b"d", b"t" or b"m")."""
    return PART_PREFIX + upload_id.encode() + b"\x00" + kind


def part_keys(upload_id: str, number: int) -> tuple[bytes, bytes, bytes]:
    """(data, tail, metadata) block keys of part number of an upload."""
    suffix = f"{number:05d}".encode()
    return (
        parts_prefix(upload_id, b"d") + suffix,
        parts_prefix(upload_id, b"t") + suffix,
        parts_prefix(upload_id, b"m") + suffix,
    )


def stored(status: kv.PutStatus) -> None:
    """Raise the S3 error of a put that did not store its block."""
    if status == kv.PutStatus.QUOTA_EXCEEDED:
        raise s3errors.S3Error("QuotaExceeded", "the bucket's tenant is over its KV quota")
    if status not in (kv.PutStatus.STORED, kv.PutStatus.EXISTS):
        raise s3errors.S3Error("ServiceUnavailable", f"the KV tier refused the block: {status}")


async def read_info(client: kv.AsyncKVClient, key: bytes) -> pb.ObjectInfo | None:
    """A metadata block (of an object or a part), None when absent."""
    (info,) = await read_infos(client, [key])
    return info


async def read_meta(client: kv.AsyncKVClient, key: bytes) -> bytes | None:
    """A metadata block's bytes as stored, None when absent."""
    buffer = bytearray(META_MAX_BYTES)
    (size,) = await client.get_batch([key], [buffer])
    return None if size is None else bytes(buffer[:size])


async def read_infos(client: kv.AsyncKVClient, keys: Sequence[bytes]) -> list[pb.ObjectInfo | None]:
    """Metadata blocks, None for each absent one."""
    buffers = [bytearray(META_MAX_BYTES) for _ in keys]
    sizes = await client.get_batch(keys, buffers)
    return [
        None if size is None else pb.ObjectInfo.FromString(bytes(buffer[:size]))
        for buffer, size in zip(buffers, sizes, strict=True)
    ]


def encode_info(info: pb.ObjectInfo, version: bytes) -> bytes:
    """The metadata block of a blob of this version id (recorded); MetadataTooLarge past the
    limit."""
    info.checksums[_VERSION] = version.hex()
    meta = info.SerializeToString()
    if len(meta) > META_MAX_BYTES:
        raise s3errors.S3Error("MetadataTooLarge", "the object's headers are too large")
    return meta


def public_checksums(info: pb.ObjectInfo) -> dict[str, str]:
    """The S3 checksums of a metadata block (without the version id, part sizes, upload id)."""
    return {k: v for k, v in info.checksums.items() if k not in _INTERNAL}


def keep_part_sizes(info: pb.ObjectInfo, sizes: Sequence[int]) -> None:
    """Record a completed upload's part sizes in its metadata block (for `part_span`)."""
    info.checksums[_PART_SIZES] = ",".join(str(size) for size in sizes)


def keep_part_checksums(info: pb.ObjectInfo, algorithm: str, values: Sequence[str]) -> None:
    """Record a completed upload's part checksums (its checksum algorithm's), for
    GetObjectAttributes (`uploaded_parts`)."""
    info.checksums[_PART_CHECKSUMS] = f"{algorithm}:{','.join(values)}"


def uploaded_parts(info: pb.ObjectInfo) -> list[objectlayer.Part]:
    """The parts of a completed upload's object: sizes (`part_span`) and the part checksums
    kept (none for an upload completed before they were kept, or without an algorithm)."""
    algorithm, _, text = info.checksums.get(_PART_CHECKSUMS, "").partition(":")
    values = text.split(",") if text else []
    parts = []
    for number in range(1, max(info.parts, 1) + 1):
        span = part_span(info, number)
        if span is None:
            break
        sums = {algorithm: values[number - 1]} if number <= len(values) else {}
        parts.append(objectlayer.Part(span[1], sums))
    return parts


def keep_upload_id(info: pb.ObjectInfo, upload_id: str) -> None:
    """Record in a completed upload's metadata block which upload made it."""
    info.checksums[_UPLOAD] = upload_id


def completed_upload(info: pb.ObjectInfo) -> str:
    """The id of the upload an object was completed from ('' for any other object)."""
    return info.checksums.get(_UPLOAD, "")


def part_span(info: pb.ObjectInfo, number: int) -> tuple[int, int] | None:
    """(offset, size) of part number of an object (GetObject's partNumber, counted 1.. as
    x-amz-mp-parts-count counts them); None past the last part. A PUT's object has one part:
    all of it (as has an upload completed before part sizes were kept)."""
    text = info.checksums.get(_PART_SIZES, "")
    sizes = [int(size) for size in text.split(",")] if text else [info.size]
    if not 1 <= number <= len(sizes):
        return None
    return sum(sizes[: number - 1]), sizes[number - 1]


async def write_blob(
    client: kv.AsyncKVClient, keys: Sequence[bytes], blob: Blob, *, ttl_s: float | None = None
) -> None:
    """Store a blob's blocks (overwriting) under keys (data, tail)."""
    n = len(blob.blocks)
    statuses = await client.put_batch(keys[:n], blob.blocks, overwrite=True, ttl_s=ttl_s)
    for status in statuses:
        stored(status)


async def read_blob(
    client: kv.AsyncKVClient, keys: Sequence[bytes], info: pb.ObjectInfo
) -> Blob | None:
    """The blob info describes, None when a block is gone or of another version."""
    try:
        blob = Blob(info.size, bytes.fromhex(info.checksums[_VERSION]))
    except (KeyError, ValueError):
        return None
    try:
        sizes = await client.get_batch(keys[: len(blob.blocks)], blob.blocks)
    except errors.InvalidArgument:  # overwritten by a larger version meanwhile
        return None
    return blob if blob.intact(sizes) else None


async def check_if_match(client: kv.AsyncKVClient, key: str, if_match: str) -> bytes | None:
    """A write's If-Match (if_match; "": none) against the object's metadata block: NoSuchKey
    when there is none, PreconditionFailed when its ETag differs; else the block's bytes, for
    `store_object` to replace only while they are still there (compare-and-swap). None
    without If-Match."""
    if not if_match:
        return None
    meta = await read_meta(client, meta_key(key))
    if meta is None:
        raise errors.NotFound("The specified key does not exist.", reason="NoSuchKey")
    if not conditional.etag_named(if_match, pb.ObjectInfo.FromString(meta).etag):
        raise errors.PreconditionFailed(f"{key}: If-Match does not match")
    return meta


async def store_object(
    client: kv.AsyncKVClient,
    key: str,
    blob: Blob,
    info: pb.ObjectInfo,
    *,
    if_none_match: bool,
    matched: bytes | None = None,
    ttl_s: float | None = None,
) -> None:
    """Make blob the object key: the data blocks, then the metadata block; with a condition
    the metadata block is taken first, so that a writer that loses stores nothing (the data
    blocks are the key's, not the version's): If-None-Match: * puts it if absent, If-Match
    (matched: the metadata block `check_if_match` read) swaps it for the new one only while
    it is still that one (`swap_meta`); PreconditionFailed otherwise. Every block expires
    after ttl_s (None: never; the bucket's lifecycle rules)."""
    meta = encode_info(info, blob.version)
    if if_none_match:
        (claimed,) = await client.put_batch([meta_key(key)], [meta], ttl_s=ttl_s)
        if claimed == kv.PutStatus.EXISTS:
            raise s3errors.S3Error(
                "PreconditionFailed", "At least one of the pre-conditions failed"
            )
        stored(claimed)
        await write_blob(client, object_keys(key), blob, ttl_s=ttl_s)
    elif matched is not None and await swap_meta(client, key, matched, meta, ttl_s=ttl_s):
        try:
            await write_blob(client, object_keys(key), blob, ttl_s=ttl_s)
        except BaseException:
            # The old data blocks are intact unless one was replaced: put the old metadata
            # block back (only while it is still ours), and the object is what it was.
            await restore_meta(client, key, meta, matched, ttl_s=ttl_s)
            raise
    else:
        await write_blob(client, object_keys(key), blob, ttl_s=ttl_s)
        (status,) = await client.put_batch([meta_key(key)], [meta], overwrite=True, ttl_s=ttl_s)
        stored(status)


async def swap_meta(
    client: kv.AsyncKVClient, key: str, matched: bytes, meta: bytes, *, ttl_s: float | None
) -> bool:
    """Replace key's metadata block matched (what If-Match was checked against) with meta,
    atomically on its node (compare-and-swap on matched's checksum): True when swapped;
    PreconditionFailed when another write replaced or deleted it since (409
    ConditionalRequestConflict while another put of it is in flight). False where an owner
    node does not advertise compare-and-swap (a rolling upgrade): nothing done, and the caller
    writes as without a condition, which was checked before, not atomically (counted)."""
    keys = [meta_key(key)]
    if not await client.compare_and_swap(keys):
        KV_CONDITIONAL.labels("checked").inc()
        return False
    KV_CONDITIONAL.labels("atomic").inc()
    (status,) = await client.put_batch(
        keys, [meta], if_checksums=[blocksums.checksum(matched)], ttl_s=ttl_s
    )
    # EXISTS: a node that dropped the condition refused the present block (overwrite is off).
    if status in (kv.PutStatus.MISMATCH, kv.PutStatus.EXISTS):
        raise s3errors.S3Error("PreconditionFailed", "At least one of the pre-conditions failed")
    if status == kv.PutStatus.BUSY:
        raise s3errors.S3Error(conditional.CONFLICT, CONFLICT_TEXT)
    stored(status)
    return True


async def restore_meta(
    client: kv.AsyncKVClient, key: str, meta: bytes, old: bytes, *, ttl_s: float | None
) -> None:
    """Put key's metadata block old back where meta (this write's, whose data blocks failed)
    is still the one there; best effort (logged)."""
    try:
        await client.put_batch(
            [meta_key(key)], [old], if_checksums=[blocksums.checksum(meta)], ttl_s=ttl_s
        )
    except Exception:  # the write's own error is what the caller reports
        log.warning("restoring the metadata block of KV object %r failed", key, exc_info=True)


async def fetch_object(client: kv.AsyncKVClient, key: str) -> tuple[pb.ObjectInfo, Blob]:
    """An object's info and bytes, consistent with each other (NoSuchKey when gone)."""
    for _ in range(_GET_ATTEMPTS):
        info = await read_info(client, meta_key(key))
        if info is None:
            break
        blob = await read_blob(client, object_keys(key), info)
        if blob is not None:
            return info, blob
        await asyncio.sleep(0.01)
    raise errors.NotFound("The specified key does not exist.", reason="NoSuchKey")


def object_block_keys(key: str) -> list[bytes]:
    """Every block key of an object (metadata first: a reader then sees it gone)."""
    return [meta_key(key), *object_keys(key)]


def version_etag(version: bytes) -> str:
    """The ETag of a KV object stored without an MD5 (`object_ops.trailer_checked`): its
    version id in hex and "-1". Never mistaken for an MD5: clients that compare ETags with MD5s
    skip ETags with a "-" (multipart uploads), and it changes with every write, as an entity
    tag must."""
    return f"{version.hex()}-1"


async def receive(
    body: objectlayer.PutBody,
    *,
    most: int,
    algorithms: Sequence[str] = (),
    expected: Mapping[str, str] | None = None,
    expected_md5: str = "",
    md5: bool = True,
    read: Blob | None = None,
) -> tuple[Blob, str, dict[str, str]]:
    """Read a PUT's or a part's body into a blob (`read_body`; read: a blob that holds its
    bytes already) and check it: (the blob, its hex MD5, '' unless md5 or expected_md5;
    {algorithm: base64} of algorithms, of the expected checksums and of the body's trailing
    ones). Raises InvalidArgument (EntityTooLarge) and DigestMismatch (MD5 or the algorithm's
    name), before any block is stored."""
    blob = await read_body(body, most) if read is None else read
    etag, sums = await check(
        await body.finish(), blob.pieces(), blob.size, algorithms=algorithms,
        expected=expected, expected_md5=expected_md5, md5=md5,
    )  # fmt: skip
    return blob, etag, sums


async def check(
    trailers: Mapping[str, str],
    pieces: Sequence[memoryview],
    size: int,
    *,
    algorithms: Sequence[str] = (),
    expected: Mapping[str, str] | None = None,
    expected_md5: str = "",
    md5: bool = True,
) -> tuple[str, dict[str, str]]:
    """Check a body read whole into pieces (size bytes) with its trailers: (its hex MD5, its
    checksums) as `receive` returns them, or DigestMismatch."""
    wanted = dict(expected or {})
    for name, value in trailers.items():
        if name.lower().startswith(objectlayer.CHECKSUM_TRAILER):
            wanted[name[len(objectlayer.CHECKSUM_TRAILER) :].upper()] = value
    names = sorted({*(a.upper() for a in algorithms if a), *wanted})
    with_md5 = md5 or bool(expected_md5)
    if _inline_digests(size, names, with_md5):
        etag, sums, _ = digests(pieces, names, False, with_md5)
    else:
        etag, sums, _ = await asyncio.to_thread(digests, pieces, names, False, with_md5)
    if expected_md5 and expected_md5.lower() != etag:
        raise errors.DigestMismatch("The Content-MD5 you specified did not match.", algorithm="MD5")
    for name, value in wanted.items():
        if sums.get(name) != value:
            raise errors.DigestMismatch(
                f"The {name} you specified did not match the calculated checksum.", algorithm=name
            )
    return etag, sums


def _inline_digests(size: int, names: Sequence[str], with_md5: bool) -> bool:
    """Whether `receive` hashes a body on the loop: where a thread hop would cost more than
    the hashing (a small body, or one that needs only hardware CRCs)."""
    if size < _INLINE_DIGEST_BYTES:
        return True
    return not with_md5 and size <= _INLINE_CRC_BYTES and _INLINE_CRCS.issuperset(names)


def too_large(most: int) -> errors.InvalidArgument:
    """S3's error for a body over a KV bucket's limit."""
    return errors.InvalidArgument(
        f"Your proposed upload exceeds the maximum allowed size: a KV bucket's objects and "
        f"parts hold {most} bytes at most",
        reason="EntityTooLarge",
    )


async def read_body(body: objectlayer.PutBody, most: int) -> Blob:
    """A body's bytes in a blob's blocks: body.size of them (IncompleteBody when it ends
    first), or for a body of unknown length (body.size -1: plain HTTP chunked) as many as
    come, the blocks growing as they do; over most bytes either way is InvalidArgument
    (EntityTooLarge), before any block is stored."""
    if body.size > most:
        raise too_large(most)
    if body.size >= 0:
        blob = Blob(body.size)
        if body.spilled:  # a put in place stalled (`kv_inplace`): its bytes so far, the rest
            await body.spill(body.size)
            for piece in blob.pieces():
                await body.stage(piece)
            return blob
        for piece in blob.pieces():
            await body.fill(piece)
        return blob
    blob, size = Blob(0), 0
    while size < most:
        target = min(max(2 * size, _FIRST_READ_BYTES), most)
        blob.resize(target)
        size += await _fill(body, blob, size, target)
        if size < target:  # the body ended
            blob.resize(size)
            return blob
    if not await body.at_end():
        raise too_large(most)
    return blob


async def _fill(body: objectlayer.PutBody, blob: Blob, first: int, end: int) -> int:
    """Fill bytes first..end (exclusive) of blob from body as far as it goes; how many."""
    got, offset = 0, 0
    for block in blob.blocks:
        length = len(block) - VERSION_BYTES
        lo, hi = max(first - offset, 0), min(end - offset, length)
        offset += length
        if lo >= hi:
            continue
        with memoryview(block) as whole:  # released before the blocks grow again
            n = await body.fill_to_end(whole[VERSION_BYTES + lo : VERSION_BYTES + hi])
        got += n
        if n < hi - lo:
            break
    return got


def digests(
    pieces: Sequence[memoryview], names: Sequence[str], signed: bool, with_md5: bool = True
) -> tuple[str, dict[str, str], str]:
    """(hex MD5 when with_md5, base64 checksums, hex SHA-256 when signed) of the pieces (off
    the loop)."""
    md5 = hashlib.md5() if with_md5 else None
    hashers = {name: checksums.new(name) for name in names}
    sha256 = hashlib.sha256() if signed else None
    for piece in pieces:
        if md5 is not None:
            md5.update(piece)
        for hasher in hashers.values():
            hasher.update(piece)
        if sha256 is not None:
            sha256.update(piece)
    sums = {name: checksums.b64(h.digest()) for name, h in hashers.items()}
    etag = md5.hexdigest() if md5 is not None else ""
    return etag, sums, sha256.hexdigest() if sha256 is not None else ""
