"""`kvtier cp`: upload a local file to s3://bucket/key, or download an object to a local file,
through a gateway's object API (`kvtier.objects.AsyncObjectClient`: control over gRPC, bytes
over the data plane), with progress (bytes, rate, ETA) on stderr.

Memory stays bounded whatever the size: a single PUT streams the file one call at a time, a
multipart upload (files of `--multipart-threshold` and more) holds one part, a download one
read buffer. A download is written to a temporary file beside the destination and renamed at
the end, so a failed one leaves no partial file; a failed multipart upload is aborted.

Credentials: the KVTIER_* variables when any is set (a user: KVTIER_ACCESS_KEY /
KVTIER_SECRET_KEY and KVTIER_CA_FILE), else the admin user of the dev cluster in --state-dir.
Exit codes: 0 done; 1 the cluster refused or failed (one line naming the error and its
cause, e.g. `NotFound: bucket ... does not exist`); 2 bad arguments (one line).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import io
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, TextIO

from kvtier import devstate, errors, kv_stats, objects, security
from kvtier.cli import admin as admin_cmd
from kvtier.cli import kvadmin
from kvtier.cli import progress as progress_mod

S3_SCHEME = "s3://"
#: S3's smallest part (all but the last) and most parts.
MIN_PART_BYTES = 5 << 20
MAX_PARTS = 10_000
#: A download's read buffer: one call's bytes, reused.
READ_BYTES = 8 << 20
_PLAIN_EVERY_S = 2.0
_TICK_S = 0.2
_EXIT_FAILED, _EXIT_USAGE = 1, 2


class BadArguments(Exception):
    """Arguments that cannot work (exit 2)."""


@dataclasses.dataclass(frozen=True, slots=True)
class S3Path:
    """s3://bucket/key."""

    bucket: str
    key: str

    def __str__(self) -> str:
        return f"{S3_SCHEME}{self.bucket}/{self.key}"


def parse_s3(text: str) -> S3Path | None:
    """The S3 location text names; None when it is a local path. BadArguments when it has no
    bucket, or no key and no trailing slash (`s3://BUCKET/` names the bucket itself: an upload
    takes the file's name there, as awscli does)."""
    if not text.startswith(S3_SCHEME):
        return None
    bucket, slash, key = text.removeprefix(S3_SCHEME).partition("/")
    if not bucket or not slash:
        raise BadArguments(f"{text!r}: expected s3://BUCKET/KEY")
    return S3Path(bucket, key)


def _size(text: str) -> int:
    return kvadmin.byte_count(text)


def add_parser(sub: Any, state_dir_default: str) -> None:
    """Add `cp` to the top-level subcommands."""
    cp = sub.add_parser(  # the top-level parser's class: defaults in --help, one-line errors
        "cp", help="upload a file to s3://BUCKET/KEY or download one, with progress"
    )
    cp.add_argument("source", help="a local file, or s3://BUCKET/KEY")
    cp.add_argument("destination", help="s3://BUCKET/KEY (or .../ for the file's name), or a file")
    cp.add_argument("--state-dir", default=state_dir_default, help="a dev cluster's")
    cp.add_argument("--gateway", default="", help="host:port; default: the state dir's gateway")
    cp.add_argument(
        "--multipart-threshold", type=_size, default=64 << 20, help="multipart from this size"
    )
    cp.add_argument("--part-size", type=_size, default=16 << 20, help="multipart part size")
    cp.add_argument("--timeout-s", type=float, default=60.0, help="per call")
    cp.add_argument("--quiet", action="store_true", help="no progress, only errors")


@dataclasses.dataclass(frozen=True, slots=True)
class Plan:
    """What one `kvtier cp` does."""

    upload: bool
    local: Path
    remote: S3Path


def plan(args: argparse.Namespace) -> Plan:
    """Check the arguments against the local file system (BadArguments)."""
    source, destination = parse_s3(args.source), parse_s3(args.destination)
    if (source is None) == (destination is None):
        raise BadArguments("one of SOURCE and DESTINATION must be s3://BUCKET/KEY, not both")
    if args.part_size < MIN_PART_BYTES:
        raise BadArguments(f"--part-size must be at least {MIN_PART_BYTES} bytes (5 MiB)")
    if destination is not None:
        local = Path(args.source)
        if not local.is_file():
            why = "is a directory" if local.is_dir() else "is not a readable file"
            raise BadArguments(f"{args.source}: {why}")
        if not destination.key or destination.key.endswith("/"):
            destination = S3Path(destination.bucket, destination.key + local.name)
        return Plan(upload=True, local=local, remote=destination)
    assert source is not None
    if not source.key or source.key.endswith("/"):
        raise BadArguments(f"{args.source!r}: name an object to download (s3://BUCKET/KEY)")
    local = Path(args.destination)
    if local.is_dir():
        local = local / source.key.rsplit("/", 1)[-1]
    elif args.destination.endswith(os.sep) or not local.parent.is_dir():
        raise BadArguments(f"{args.destination}: no such directory")
    return Plan(upload=False, local=local, remote=source)


class Display:
    """Progress on a stream: a bar redrawn in place on a terminal, else a line every few
    seconds and one at the end."""

    def __init__(self, stream: TextIO, verb: str, total_bytes: int, *, quiet: bool) -> None:
        self._stream = stream
        self._verb = verb
        self._totals = progress_mod.Totals(objects=1, bytes=total_bytes)
        self._tty = stream.isatty()
        self._quiet = quiet
        self._meter = progress_mod.Meter()
        self._printed = time.monotonic()
        self.done_bytes = 0

    def line(self) -> str:
        """'upload: [#####-----] 50% 8.0 MiB of 16.0 MiB, 4.0 MiB/s, ETA 2s'."""
        fraction = self._meter.fraction(1, self.done_bytes, self._totals) or 0.0
        filled = int(fraction * 20)
        bar = "#" * filled + "-" * (20 - filled)
        rate = self._meter.text(1, self.done_bytes, self._totals)
        return f"{self._verb}: [{bar}] {fraction:4.0%} {rate}"

    def tick(self) -> None:
        """Redraw (terminal) or print a line now and then."""
        if self._quiet:
            return
        if self._tty:
            width = shutil.get_terminal_size((100, 20)).columns - 1
            self._stream.write("\r" + self.line()[:width].ljust(width))
        elif time.monotonic() - self._printed >= _PLAIN_EVERY_S:
            self._printed = time.monotonic()
            self._stream.write(self.line() + "\n")
        self._stream.flush()

    def finish(self) -> None:
        """The last state, on a line of its own."""
        if not self._quiet:
            self._stream.write(("\r" if self._tty else "") + self.line() + "\n")
            self._stream.flush()


class _CountingReader:
    """A binary file for `put_object` that counts what the client has read from it."""

    def __init__(self, handle: io.BufferedReader, display: Display) -> None:
        self._handle = handle
        self._display = display

    def readinto(self, buffer: Any) -> int:
        got = self._handle.readinto(buffer)
        self._display.done_bytes += got
        return got

    def fileno(self) -> int:
        return self._handle.fileno()

    def tell(self) -> int:
        return self._handle.tell()


async def _ticking(display: Display) -> None:
    while True:
        await asyncio.sleep(_TICK_S)
        display.tick()


async def upload(
    client: objects.AsyncObjectClient,
    local: Path,
    remote: S3Path,
    display: Display,
    *,
    threshold: int,
    part_bytes: int,
) -> objects.ObjectInfo:
    """Store the file as remote: one streamed PUT, or a multipart upload from threshold."""
    handle = await asyncio.to_thread(open, local, "rb")
    with contextlib.closing(handle):
        size = os.fstat(handle.fileno()).st_size
        if size < threshold:
            return await client.put_object(
                remote.bucket, remote.key, _CountingReader(handle, display)
            )
        part_bytes = max(part_bytes, math.ceil(size / MAX_PARTS))
        return await _multipart(client, handle, size, remote, display, part_bytes)


async def _multipart(
    client: objects.AsyncObjectClient,
    handle: io.BufferedReader,
    size: int,
    remote: S3Path,
    display: Display,
    part_bytes: int,
) -> objects.ObjectInfo:
    upload_id = await client.create_multipart_upload(remote.bucket, remote.key)
    buffer = memoryview(bytearray(part_bytes))
    parts = []
    try:
        for number, at in enumerate(range(0, size, part_bytes), start=1):
            n = min(part_bytes, size - at)
            got = await asyncio.to_thread(handle.readinto, buffer[:n])
            if got != n:
                raise errors.InvalidArgument(f"the file shrank while being read ({at + got})")
            parts.append(
                await client.upload_part(remote.bucket, remote.key, upload_id, number, buffer[:n])
            )
            display.done_bytes += n
        return await client.complete_multipart_upload(remote.bucket, remote.key, upload_id, parts)
    except BaseException:
        with contextlib.suppress(errors.KVTierError):  # else the gateway's sweep drops it
            await client.abort_multipart_upload(remote.bucket, remote.key, upload_id)
        raise


async def download(
    client: objects.AsyncObjectClient, remote: S3Path, local: Path, display: Display
) -> objects.ObjectInfo:
    """Write the object to local through a temporary file beside it (renamed at the end)."""
    buffer = memoryview(bytearray(READ_BYTES))
    fd, temp = tempfile.mkstemp(prefix=f".{local.name}.", suffix=".part", dir=local.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            offset, etag = 0, ""
            while True:
                info = await client.get_object_into(
                    remote.bucket, remote.key, buffer, offset=offset, if_match=etag
                )
                etag = info.etag  # every later range must be of the same version
                n = max(0, min(READ_BYTES, info.size - offset))
                await asyncio.to_thread(handle.write, buffer[:n])
                offset += n
                display.done_bytes = offset
                if offset >= info.size:
                    break
        os.replace(temp, local)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    return info


async def _copy(
    job: Plan,
    args: argparse.Namespace,
    address: str,
    sec: security.ClientSecurity,
    err: TextIO,
) -> objects.ObjectInfo:
    async with objects.AsyncObjectClient(address, timeout_s=args.timeout_s, security=sec) as obj:
        total = job.local.stat().st_size if job.upload else (await _head(obj, job.remote)).size
        display = Display(err, "upload" if job.upload else "download", total, quiet=args.quiet)
        ticker = asyncio.ensure_future(_ticking(display))
        try:
            if job.upload:
                info = await upload(
                    obj, job.local, job.remote, display,
                    threshold=args.multipart_threshold, part_bytes=args.part_size,
                )  # fmt: skip
            else:
                info = await download(obj, job.remote, job.local, display)
        finally:
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker
        display.finish()
        return info


async def _head(client: objects.AsyncObjectClient, remote: S3Path) -> objects.ObjectInfo:
    """The object's info; a missing object is NotFound naming s3://bucket/key as the user
    wrote it (the gateway's message names its internal storage name)."""
    try:
        return await client.head_object(remote.bucket, remote.key)
    except errors.NotFound as exc:
        if exc.reason == "NoSuchBucket":
            raise
        raise errors.NotFound(f"{remote}: no such object", reason=exc.reason) from None


def client_security(
    state_dir: str, environ: dict[str, str] | None = None
) -> security.ClientSecurity:
    """A user's credentials: the KVTIER_* variables when any is set, else the dev cluster's
    admin user (its cluster.json in state_dir)."""
    env = dict(os.environ if environ is None else environ)
    names = (
        security.ENV_ACCESS_KEY, security.ENV_SECRET_KEY, security.ENV_CA_FILE,
        security.ENV_CERT_FILE, security.ENV_CLUSTER_FILE, security.ENV_INSECURE,
    )  # fmt: skip
    info = Path(state_dir) / "cluster.json"
    if not any(env.get(name) for name in names) and info.exists():
        return security.ClientSecurity.from_cluster_file(info)
    return security.ClientSecurity.from_env(env)


def run(
    args: argparse.Namespace,
    out: TextIO | None = None,
    err: TextIO | None = None,
    sec: security.ClientSecurity | None = None,
) -> int:
    """`kvtier cp`: 0 done, 1 refused or failed, 2 bad arguments (one line on err; out and
    err default to sys.stdout and sys.stderr at the call)."""
    out, err = out or sys.stdout, err or sys.stderr
    try:
        job = plan(args)
    except BadArguments as exc:
        err.write(f"kvtier cp: error: {exc}\n")
        return _EXIT_USAGE
    started = time.monotonic()
    try:
        sec = sec or client_security(args.state_dir)
        address = admin_cmd.gateway_address(args.gateway, args.state_dir, sec)
        info = asyncio.run(_copy(job, args, address, sec, err))
    except devstate.ClusterError as exc:  # no --gateway and no dev cluster
        err.write(f"kvtier cp: error: {exc}\n")
        return _EXIT_FAILED
    except errors.KVTierError as exc:
        err.write(f"kvtier cp: error: {type(exc).__name__}: {exc}\n")
        return _EXIT_FAILED
    except OSError as exc:  # the local file: unreadable, disk full...
        err.write(f"kvtier cp: error: {job.local}: {exc.strerror or exc}\n")
        return _EXIT_FAILED
    arrow = f"{job.local} -> {job.remote}" if job.upload else f"{job.remote} -> {job.local}"
    took = progress_mod.duration_text(time.monotonic() - started)
    out.write(f"{arrow} ({kv_stats.human_bytes(info.size)}, ETag {info.etag}, {took})\n")
    return 0
