"""A KV PUT's body read straight into the node's memory (issue 14): no block buffer in the
gateway and no copy of it into the data plane.

Where the bucket's node is reached over a transport that takes a call's bytes in place (shm:
`base.FillsSinks`), the data block's put is a call whose sink, an extent of the node's arena
mapped in this process, is filled from the HTTP body as it arrives: the version id, then the
bytes. The digests are computed over the extent; only then, and only when they match, is the
call completed (the node commits the block; with If-None-Match the metadata block is claimed
first, and with If-Match swapped, while the data block is still uncommitted), else it is
released unfinished and the node
aborts it: a bad digest, a body cut short or too long, a client gone, a claim lost, all store
nothing and free the extent. The node checksums the block itself (xxh3, as for any bytes it did
not see checksummed by an SDK).

Bounded so that it holds no more than a staging slot does: bodies of a known size up to
`IN_PLACE_MAX_BYTES` only (one block), only while the bytes keep coming and for
`IN_PLACE_MAX_S` at most (`body.stage`; well within the node's put timeout and the call's
lease, so that no byte is ever written into an extent the node has given up on): a body that
pauses longer than `body.SLOT_IDLE_S`, or is not in by then, moves its bytes so far out of the
extent (`Stalled`; trailers late: into a blob), the put is aborted and the body read into a
blob as before (`kv_layout.receive`). Everything else (unknown sizes, larger bodies, other
transports) takes that path too. With If-Match the metadata block is swapped for the new one
(`kv_layout.swap_meta`) where If-None-Match claims it: a writer that loses stores nothing.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Mapping, Sequence

from kvtier import errors, kv
from kvtier.proto.gateway.v1 import objects_pb2 as pb
from services.gateway import conditional, objectlayer
from services.gateway.s3 import kv_layout, s3errors

#: The largest body read in place: engine KV blocks (2 MiB for NIXL's OBJ backend) and more,
#: while a body's bytes in flight (the data plane's byte budget per node: 256 MiB) stay
#: shared by many requests.
IN_PLACE_MAX_BYTES = 16 << 20
#: Seconds a body may take to arrive in place, trailers included (16 MiB: ≥ 3.4 MB/s). The
#: kvcache node aborts a put after `put_timeout_s` (30 s by default) and a call's lease ends
#: after `calls.LEASE_S` (60 s); the digests and an If-None-Match claim (≤ the client's 10 s
#: timeout) come on top.
IN_PLACE_MAX_S = 5.0


class _Late(Exception):
    """The body's bytes came in place but its trailers did not in time: the bytes, moved out."""

    def __init__(self, blob: kv_layout.Blob) -> None:
        super().__init__("trailers late")
        self.blob = blob


async def put_in_place(
    client: kv.AsyncKVClient,
    key: str,
    body: objectlayer.PutBody,
    info: pb.ObjectInfo,
    *,
    algorithms: Sequence[str],
    expected: Mapping[str, str],
    expected_md5: str,
    md5: bool,
    if_none_match: bool,
    ttl_s: float | None,
    matched: bytes | None = None,
) -> dict[str, str] | kv_layout.Blob | None:
    """Store body as object key in place (see the module docstring): its checksums, info
    completed (size, ETag, time, checksums; the version id recorded); matched: the metadata
    block If-Match was checked against (`kv_layout.check_if_match`). Where it cannot be done
    in place, before any byte was stored: None (the caller reads the body into a blob) or a
    blob holding all of the body's bytes (its trailers still to read: `kv_layout.receive`'s
    read). Raises as `kv_layout.receive` and `kv_layout.store_object` do."""
    size = body.size
    if not 0 <= size <= IN_PLACE_MAX_BYTES:
        return None
    version = secrets.token_bytes(kv_layout.VERSION_BYTES)
    found: dict[str, str] = {}
    meta: list[bytes] = []
    swapped: list[bool] = []

    async def fill(views: Sequence[memoryview | None]) -> None:
        (view,) = views
        if view is None:  # the node took the key but not its bytes: never so for a put
            raise errors.Internal("the kvcache node dropped a KV object's bytes")
        view[: kv_layout.VERSION_BYTES] = version
        data = view[kv_layout.VERSION_BYTES :]
        until = asyncio.get_running_loop().time() + IN_PLACE_MAX_S
        await body.stage(data, until=until)
        try:
            async with asyncio.timeout_at(until):
                trailers = await body.finish()
        except TimeoutError:
            late = kv_layout.Blob(size)
            (piece,) = late.pieces()
            piece[:] = data
            raise _Late(late) from None
        etag, sums = await kv_layout.check(
            trailers, [data], size, algorithms=algorithms, expected=expected,
            expected_md5=expected_md5, md5=md5,
        )  # fmt: skip
        info.size = size
        info.etag = etag if md5 else kv_layout.version_etag(version)
        info.mtime_unix_ms = int(time.time() * 1000)
        info.checksums.update(sums)
        meta.append(kv_layout.encode_info(info, version))
        if if_none_match:  # claimed before the data block is committed, as `store_object`
            await _claim(client, key, meta[0], ttl_s)
        elif matched is not None:  # swapped before it, likewise (False: an older node)
            swapped.append(await kv_layout.swap_meta(client, key, matched, meta[0], ttl_s=ttl_s))
        found.update(sums)

    data_key, _ = kv_layout.object_keys(key)
    try:
        result = await client.put_filled(
            data_key, kv_layout.VERSION_BYTES + size, fill, overwrite=True, ttl_s=ttl_s
        )
        if result is not None:
            if result.status == kv.PutStatus.BUSY and (if_none_match or matched is not None):
                # Another write of the key is in flight: S3's answer to a conditional write then.
                raise s3errors.S3Error(conditional.CONFLICT, kv_layout.CONFLICT_TEXT)
            kv_layout.stored(result.status)
    except objectlayer.Stalled:  # its bytes so far are in the body's spill: read on there
        return None
    except _Late as late:
        return late.blob
    except BaseException:
        if swapped[:1] == [True] and matched is not None:  # the data block was not replaced:
            await kv_layout.restore_meta(client, key, meta[0], matched, ttl_s=ttl_s)  # as it was
        raise
    if result is None:
        return None
    if not if_none_match and swapped[:1] != [True]:
        (status,) = await client.put_batch(
            [kv_layout.meta_key(key)], meta, overwrite=True, ttl_s=ttl_s
        )
        kv_layout.stored(status)
    return found


async def _claim(client: kv.AsyncKVClient, key: str, meta: bytes, ttl_s: float | None) -> None:
    """Put the metadata block if absent (PreconditionFailed when taken)."""
    (claimed,) = await client.put_batch([kv_layout.meta_key(key)], [meta], ttl_s=ttl_s)
    if claimed == kv.PutStatus.EXISTS:
        raise s3errors.S3Error("PreconditionFailed", "At least one of the pre-conditions failed")
    kv_layout.stored(claimed)
