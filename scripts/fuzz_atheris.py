"""Coverage-guided fuzzing (atheris, i.e. libFuzzer for Python) of the SigV4 parser and the
aws-chunked decoder. Not part of CI: the property-based fuzz tests (tests/fuzz) run there; this
is for long runs that let coverage steer the inputs (docs/fuzzing.md).

    .venv/bin/pip install atheris     # a manylinux wheel: no compiler needed
    .venv/bin/python scripts/fuzz_atheris.py sigv4 -max_total_time=300 [corpus_dir ...]
    .venv/bin/python scripts/fuzz_atheris.py chunked -max_total_time=300

Arguments after the target go to libFuzzer (-max_total_time=S, -runs=N, -jobs=N, corpus
directories). A crash is any exception but the module's documented refusal (S3AuthError):
libFuzzer stops and writes the input to ./crash-<sha1>; replay it with
`scripts/fuzz_atheris.py <target> crash-<sha1>`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import atheris  # type: ignore[import-not-found,import-untyped,unused-ignore]

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "libs")]

with atheris.instrument_imports(include=["services"]):
    from services.gateway.s3 import chunked, sigv4

SECRET = "fuzz/secret+KEY"
NOW = 1767323045.0  # 2026-01-02T03:04:05Z, the date the seeds below are signed at
_HEADER_NAMES = [
    "authorization", "x-amz-date", "date", "x-amz-content-sha256", "host",
    "x-amz-decoded-content-length", "x-amz-trailer", "x-amz-security-token", "x-amz-meta-a",
]  # fmt: skip


def _text(fdp: Any, most: int) -> str:
    """Text as aiohttp hands it over: any bytes, decoded UTF-8 with surrogate escapes."""
    raw: bytes = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, most))
    return raw.decode("utf-8", "surrogateescape")


# Near-valid values, so that coverage reaches past the first checks: "{}" takes fuzzed text.
_TEMPLATES = {
    "authorization": [
        "AWS4-HMAC-SHA256 Credential=AK/20260102/us-east-1/s3/aws4_request,"
        "SignedHeaders=host;x-amz-date,Signature={}",
        "AWS4-HMAC-SHA256 Credential={},SignedHeaders={},Signature={}",
    ],
    "x-amz-date": ["20260102T030405Z", "{}"],
    "x-amz-content-sha256": [
        "UNSIGNED-PAYLOAD", "STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILER", sigv4.EMPTY_SHA256, "{}",
    ],
    "query": [
        "X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AK%2F20260102%2Fus-east-1%2Fs3%2F"
        "aws4_request&X-Amz-Date=20260102T030405Z&X-Amz-Expires={}&X-Amz-SignedHeaders=host"
        "&X-Amz-Signature={}",
        "{}",
    ],
}  # fmt: skip


def _value(fdp: Any, name: str, most: int) -> str:
    template = fdp.PickValueInList(_TEMPLATES.get(name, ["{}"]))
    return str(template).format(*(_text(fdp, most) for _ in range(template.count("{}"))))


def fuzz_sigv4(data: bytes) -> None:
    """parse + verify of a request built from data: only S3AuthError may escape."""
    fdp = atheris.FuzzedDataProvider(data)
    method = fdp.PickValueInList(["GET", "PUT", "POST", "HEAD", "DELETE"])
    raw_path, raw_query = _text(fdp, 256), _value(fdp, "query", 256)
    headers = []
    for _ in range(fdp.ConsumeIntInRange(0, 8)):
        name = fdp.PickValueInList(_HEADER_NAMES)
        headers.append((name, _value(fdp, name, 256)))
    try:
        auth = sigv4.parse(method=method, raw_path=raw_path, raw_query=raw_query, headers=headers)
        if auth is not None:
            sigv4.verify(auth, SECRET, now=NOW)
    except sigv4.S3AuthError:
        pass


def _verified(mode: sigv4.PayloadMode, length: int | None) -> sigv4.Verified:
    request = sigv4.AuthRequest(
        access_key="AKIAFUZZ", day="20260102", region="us-east-1", amz_date="20260102T030405Z",
        timestamp=NOW, signed_headers=("host",), signature="5eed" * 16, presigned=False,
        expires_s=0, payload_mode=mode, content_sha256=mode.value, decoded_content_length=length,
        trailer_names=("x-amz-checksum-crc32",), canonical_request="", string_to_sign="",
    )  # fmt: skip
    key = sigv4.signing_key(SECRET, "20260102", "us-east-1")
    return sigv4.Verified(request=request, signing_key=key)


_MODES = [mode for mode in sigv4.PayloadMode if mode.chunked]


def fuzz_chunked(data: bytes) -> None:
    """A body decoded in pieces cut where data says: only S3AuthError may escape, and the
    decoder never hands out more than the declared length."""
    fdp = atheris.FuzzedDataProvider(data)
    mode = fdp.PickValueInList(_MODES)
    length = fdp.ConsumeIntInRange(0, 1 << 20) if fdp.ConsumeBool() else None
    cuts = sorted(fdp.ConsumeIntInRange(0, 4096) for _ in range(fdp.ConsumeIntInRange(0, 8)))
    body = fdp.ConsumeBytes(fdp.remaining_bytes())
    decoder = chunked.ChunkDecoder(
        mode=mode,
        signing=_verified(mode, length) if mode.signed_chunks else None,
        decoded_content_length=length,
        trailer_names=("x-amz-checksum-crc32",) if mode.trailer else (),
        min_chunk_bytes=16,
    )
    try:
        start = 0
        for end in [*cuts, len(body)]:
            decoder.feed(body[start : max(start, end)])
            start = max(start, end)
        decoder.finish()
    except sigv4.S3AuthError:
        pass
    if length is not None and decoder.decoded_bytes > length:
        raise AssertionError(f"decoded {decoder.decoded_bytes} bytes of {length} declared")


TARGETS: dict[str, Callable[[bytes], None]] = {"sigv4": fuzz_sigv4, "chunked": fuzz_chunked}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: {sys.argv[0]} {{{','.join(TARGETS)}}} [libFuzzer arguments]")
    target = TARGETS[sys.argv[1]]
    atheris.Setup([sys.argv[0], *sys.argv[2:]], target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
