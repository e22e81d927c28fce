"""`kvtier admin user` (S3 users) and `kvtier admin bucket` (buckets of either kind, for any
tenant), through the metadata service, and `kvtier admin heal`: heal a bucket, a prefix or
everything through a gateway, with progress.

Progress goes to stderr: one line redrawn in place (carriage return) when stderr is a terminal,
a plain line every few seconds otherwise; both show objects and bytes done of the total, the
rate and the time left. The objects and their bytes are counted alongside (a listing, which
reads no object data) so that the bar can show how far the heal is. Unrecoverable objects and
the summary (`scanned N, healed N, unrecoverable N`) go to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from kvtier import devstate, errors, security, users
from kvtier.cli import progress as progress_mod
from kvtier.clients import gateway as gateway_client
from kvtier.clients import metadata as metadata_client
from kvtier.proto.gateway.v1 import admin_pb2
from kvtier.proto.gateway.v1 import objects_pb2 as pb
from kvtier.proto.metadata.v1 import metadata_pb2


def _cluster_info(state_dir: str, flag: str) -> dict[str, Any]:
    info_path = Path(state_dir) / "cluster.json"
    try:
        info = json.loads(info_path.read_text())
    except (OSError, ValueError):
        raise devstate.ClusterError(
            f"no running cluster at {info_path}; pass {flag} HOST:PORT"
        ) from None
    return info if isinstance(info, dict) else {}


def gateway_address(gateway: str, state_dir: str, sec: security.ClientSecurity) -> str:
    """--gateway, or the gateway of the dev cluster in state_dir (its cluster.json): its
    service port for a certificate holder, its client port for a user."""
    if gateway:
        return gateway
    info = _cluster_info(state_dir, "--gateway")
    key = "gateway_grpc_service" if sec.has_cert and "gateway_grpc_service" in info else (
        "gateway_grpc"
    )  # fmt: skip
    return str(info[key])


def metadata_address(metadata: str, state_dir: str, sec: security.ClientSecurity) -> str:
    """--metadata, or the metadata node of the dev cluster in state_dir (its cluster.json)."""
    if metadata:
        return metadata
    info = _cluster_info(state_dir, "--metadata")
    key = "metadata" if sec.has_cert or "metadata_client" not in info else "metadata_client"
    return str(info[key])


async def user_command(
    address: str,
    args: argparse.Namespace,
    out: TextIO,
    stdin: TextIO | None = None,
    *,
    security: security.ClientSecurity | None = None,
) -> int:
    """`kvtier admin user add|list|remove` against the metadata service at address."""
    async with metadata_client.MetadataClient(address, timeout_s=10.0, security=security) as client:
        if args.user_command == "add":
            await _add_user(client, args, out, stdin or sys.stdin)
        elif args.user_command == "list":
            found = [_user_dict(u) for u in await client.list_users(args.tenant)]
            if args.json:
                out.write(json.dumps(found) + "\n")
            else:
                out.write(f"{'ACCESS KEY':24} {'TENANT':16} {'NAME':16} RIGHTS\n")
            for u in [] if args.json else found:
                rights = [
                    r for r, on in (("admin", u["is_admin"]), ("shm", u["shm_trusted"])) if on
                ]
                row = f"{u['access_key']:24} {u['tenant']:16} {u['display_name'] or '-':16}"
                out.write(f"{row} {','.join(rights) or '-'}\n")
        else:
            await client.delete_user(args.access_key)
            removed = {"removed": args.access_key}
            out.write(json.dumps(removed) + "\n" if args.json else f"removed {args.access_key}\n")
    return 0


async def _add_user(
    client: metadata_client.MetadataClient, args: argparse.Namespace, out: TextIO, stdin: TextIO
) -> None:
    """Create the user and print its keys: the one time the secret is shown."""
    secret_text = stdin.readline().rstrip("\r\n") if args.secret_key == "-" else args.secret_key
    user = await client.create_user(
        tenant=args.tenant,
        display_name=args.name,
        is_admin=args.admin,
        access_key=args.access_key,
        secret=users.Secret(secret_text) if secret_text else None,
        shm_trusted=getattr(args, "trust_shm", False),
    )
    shown = _user_dict(user.info)
    shown["secret_key"] = user.secret.reveal()
    if args.json:
        out.write(json.dumps(shown) + "\n")
        return
    out.write(
        f"access key  {shown['access_key']}\nsecret key  {shown['secret_key']}\n"
        f"tenant      {shown['tenant']}{' (admin)' if shown['is_admin'] else ''}"
        f"{' (trusted for shared memory)' if shown['shm_trusted'] else ''}\n"
        "The secret is shown this once: it cannot be read back.\n"
    )


def _user_dict(info: metadata_pb2.UserInfo) -> dict[str, Any]:
    return {
        "access_key": info.access_key, "tenant": info.tenant,
        "display_name": info.display_name, "is_admin": info.is_admin,
        "shm_trusted": info.shm_trusted, "created_at_unix_ms": info.created_at_unix_ms,
    }  # fmt: skip


#: Bucket kinds by their CLI name (the S3 header x-kvtier-bucket-kind takes the same names).
BUCKET_KINDS = {"objects": metadata_pb2.BUCKET_KIND_OBJECTS, "kv": metadata_pb2.BUCKET_KIND_KV}


async def bucket_command(
    address: str,
    args: argparse.Namespace,
    out: TextIO,
    *,
    security: security.ClientSecurity | None = None,
) -> int:
    """`kvtier admin bucket create|list` against the metadata service at address: what an
    operator uses to make a KV bucket for S3 tools that cannot send x-kvtier-bucket-kind."""
    async with metadata_client.MetadataClient(address, timeout_s=10.0, security=security) as client:
        if args.bucket_command == "create":
            info = await client.create_bucket(args.name, args.tenant, BUCKET_KINDS[args.kind])
            made = _bucket_dict(info)
            text = f"created {made['kind']} bucket {made['name']} for tenant {made['tenant']}"
            out.write((json.dumps(made) if args.json else text) + "\n")
            return 0
        found = [_bucket_dict(b) for b in await client.list_buckets(args.tenant)]
        if args.json:
            out.write(json.dumps(found) + "\n")
        for b in [] if args.json else found:
            out.write(f"{b['name']:40} {b['kind']:8} {b['tenant']}\n")
    return 0


def _bucket_dict(info: metadata_pb2.BucketInfo) -> dict[str, Any]:
    kind = next((k for k, v in BUCKET_KINDS.items() if v == info.kind), str(info.kind))
    return {
        "name": info.name, "tenant": info.tenant, "kind": kind,
        "created_at_unix_ms": info.created_at_unix_ms,
    }  # fmt: skip


def split_target(target: str) -> tuple[str, str]:
    """'bucket/prefix' -> (bucket, prefix); '' -> every bucket."""
    bucket, _, prefix = target.partition("/")
    if not bucket and prefix:
        raise errors.InvalidArgument(f"{target!r}: give a bucket before the prefix")
    return bucket, prefix


async def count_objects(
    address: str, bucket: str, prefix: str, sec: security.ClientSecurity | None = None
) -> progress_mod.Totals:
    """How many objects, and bytes, the heal will look at (a listing: reads no object data)."""
    async with gateway_client.ObjectServiceClient(address, timeout_s=30.0, security=sec) as client:
        buckets = [bucket] if bucket else [b.name for b in await client.list_buckets()]
        total = nbytes = 0
        for name in buckets:
            token = ""
            while True:
                page = await client.list_objects(
                    pb.ListObjectsRequest(bucket=name, prefix=prefix, continuation_token=token)
                )
                total += len(page.objects)
                nbytes += sum(o.size for o in page.objects)
                if not page.is_truncated:
                    break
                token = page.next_continuation_token
    return progress_mod.Totals(objects=total, bytes=nbytes)


class Display:
    """Renders heal progress on a stream (`progress.Line`: a bar redrawn in place on a
    terminal, else a line now and then)."""

    def __init__(
        self,
        stream: TextIO,
        *,
        tty: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._line = progress_mod.Line(stream, tty=tty, clock=clock)
        self.meter = progress_mod.Meter(clock)

    def show(self, progress: admin_pb2.HealProgress, total: progress_mod.Totals | None) -> None:
        """Progress so far; total: the objects and bytes of the whole heal, when known."""

        def plain() -> str:
            rate = self.meter.text(progress.scanned, progress.bytes_scanned, total)
            return f"heal: {render_counts(progress, total)}; {rate}"

        self._line.show(lambda: render_bar(progress, total, self.meter), plain)

    def clear(self) -> None:
        """Remove the bar (before other output and at the end)."""
        self._line.clear()


def render_counts(progress: admin_pb2.HealProgress, total: progress_mod.Totals | None) -> str:
    """'scanned 5 of 9, healed 1, unrecoverable 0' (+ skipped when any)."""
    of = f" of {total.objects}" if total is not None else ""
    text = (
        f"scanned {progress.scanned}{of}, healed {progress.healed}, "
        f"unrecoverable {progress.unrecoverable}"
    )
    return text + (f", skipped {progress.skipped}" if progress.skipped else "")


def render_bar(
    progress: admin_pb2.HealProgress,
    total: progress_mod.Totals | None,
    meter: progress_mod.Meter,
) -> str:
    """One terminal line: a bar (once the total is known: by bytes, or objects when they are
    all empty), bytes, rate and time left (first: a narrow terminal cuts the end), the counts
    and the current key."""
    done = meter.fraction(progress.scanned, progress.bytes_scanned, total)
    bar = progress_mod.bar_text(done) if done is not None else ""
    rate = meter.text(progress.scanned, progress.bytes_scanned, total)
    return f"{bar}{rate}; {render_counts(progress, total)}  {progress.current_key}"


def summary(progress: admin_pb2.HealProgress, *, dry_run: bool) -> str:
    """The last line: 'scanned N, healed N, unrecoverable N' (+ skipped, dry run)."""
    text = (
        f"scanned {progress.scanned}, healed {progress.healed}, "
        f"unrecoverable {progress.unrecoverable}"
    )
    if progress.skipped:
        text += f", skipped {progress.skipped} (drives unreachable: the gateway retries them)"
    if dry_run:
        text += " (dry run: nothing was written)"
    return text


async def heal(
    address: str,
    target: str,
    *,
    dry_run: bool,
    out: TextIO,
    err: TextIO,
    tty: bool | None = None,
    security: security.ClientSecurity | None = None,
) -> admin_pb2.HealProgress:
    """Run a heal through the gateway at address, showing progress on err and unrecoverable
    objects on out; the final counts."""
    bucket, prefix = split_target(target)
    display = Display(err, tty=tty)
    counting = asyncio.ensure_future(count_objects(address, bucket, prefix, security))
    last = admin_pb2.HealProgress()
    try:
        async with gateway_client.AdminServiceClient(address, security=security) as client:
            async for progress in client.heal(bucket, prefix, dry_run=dry_run):
                last = progress
                if progress.unrecoverable_keys:
                    display.clear()
                    for name in progress.unrecoverable_keys:
                        out.write(f"unrecoverable: {name}\n")
                    out.flush()
                total = counting.result() if counting.done() and not counting.exception() else None
                if not progress.done:
                    display.show(progress, total)
    finally:
        display.clear()
        counting.cancel()
        with contextlib.suppress(asyncio.CancelledError, errors.KVTierError):
            await counting
    return last
