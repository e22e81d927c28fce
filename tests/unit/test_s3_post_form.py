"""The form of a POST Object read by a real aiohttp server (port 0): fields up to the file,
the file streamed through `FilePayload`, and every malformed body a typed S3 error."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from services.gateway.s3 import post_object, s3errors

FORM = "multipart/form-data; boundary=b"


async def _handler(request: web.Request) -> web.Response:
    try:
        fields, sent, part = await post_object.read_fields(request)
        payload = post_object.FilePayload(part, min_bytes=int(request.query.get("min", "0")))
        data = bytearray(1 << 20)
        got = await payload.fill_to_end(memoryview(data))
        await payload.finish()
    except s3errors.S3Error as exc:
        return web.Response(status=exc.status, text=exc.code)
    return web.json_response(
        {"fields": fields, "sent": sent, "filename": part.filename, "file": data[:got].hex()}
    )


@pytest.fixture
async def url() -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_post("/", _handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield f"http://127.0.0.1:{port}/"
    await runner.cleanup()


async def _post(url: str, body: bytes, content_type: str = FORM) -> tuple[int, str]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, data=body, headers={"Content-Type": content_type}) as response,
    ):
        return response.status, await response.text()


def _part(name: str, value: bytes, extra: str = "") -> bytes:
    head = f'--b\r\nContent-Disposition: form-data; name="{name}"{extra}\r\n\r\n'
    return head.encode() + value + b"\r\n"


async def test_fields_then_file_and_fields_after_it_ignored(url: str) -> None:
    body = (
        _part("Key", b"up/${filename}")
        + _part("X-Amz-Meta-A", "é".encode())
        + _part("FILE", b"\x00data\r\n-b--", '; filename="f.txt"')
        + _part("policy", b"after the file")
        + b"--b--\r\n"
    )
    status, text = await _post(url, body)
    assert status == 200, text
    assert json.loads(text) == {
        "fields": {"key": "up/${filename}", "x-amz-meta-a": "é"},
        "sent": ["Key", "X-Amz-Meta-A"],
        "filename": "f.txt",
        "file": b"\x00data\r\n-b--".hex(),
    }


@pytest.mark.parametrize(
    ("body", "content_type", "status", "code"),
    [
        (b"key=a", "application/x-www-form-urlencoded", 412, "PreconditionFailed"),
        (b"x", "multipart/form-data", 400, "MalformedPOSTRequest"),
        (b"garbage", FORM, 400, "MalformedPOSTRequest"),
        (b'--b\r\nContent-Disposition: form-data; name="k"\r\nBad Line\r\n\r\nv\r\n--b--\r\n',
         FORM, 400, "MalformedPOSTRequest"),
        (b"--b\r\nContent-Disposition: form-data\r\n\r\nv\r\n--b--\r\n", FORM, 400,
         "MalformedPOSTRequest"),
        (b"--b\r\nX: " + b"a" * 100000 + b"\r\n\r\n--b--\r\n", FORM, 400,
         "MalformedPOSTRequest"),
        (_part("key", b"v") + b"--b--\r\n", FORM, 400, "InvalidArgument"),
        (_part("key", b"\xff\xfe") + _part("file", b"x") + b"--b--\r\n", FORM, 400,
         "InvalidArgument"),
        (_part("x-ignore-pad", b"p" * 20481) + _part("file", b"x") + b"--b--\r\n", FORM, 400,
         "MaxPostPreDataLengthExceeded"),
        (_part("a", b"p" * 10000) + _part("b", b"p" * 10000) + _part("c", b"p" * 1000)
         + _part("file", b"x") + b"--b--\r\n", FORM, 400, "MaxPostPreDataLengthExceeded"),
    ],
)  # fmt: skip
async def test_malformed_forms_are_typed_errors(
    url: str, body: bytes, content_type: str, status: int, code: str
) -> None:
    assert await _post(url, body, content_type) == (status, code)


async def test_file_shorter_than_the_policy_minimum(url: str) -> None:
    body = _part("key", b"k") + _part("file", b"abc") + b"--b--\r\n"
    assert await _post(url + "?min=4", body) == (400, "EntityTooSmall")
    assert (await _post(url + "?min=3", body))[0] == 200


def _b64(size: int) -> str:
    return base64.b64encode(bytes(range(size))).decode()


def test_checksum_fields_are_digests_of_their_algorithm() -> None:
    """x-amz-checksum-* fields: the base64 of a digest of the algorithm's size is kept for the
    write to check (BadDigest there); anything else is BadDigest before the file is read, as a
    PUT answers it (s3-tests' 'sailorjerry', a SHA1 digest sent as a SHA256 one, bad base64,
    an empty value)."""
    sizes = {"crc32": 4, "crc32c": 4, "crc64nvme": 8, "sha1": 20, "sha256": 32}
    for name, size in sizes.items():
        fields = {f"x-amz-checksum-{name}": _b64(size), "x-amz-checksum-algorithm": name}
        assert post_object._checksums(fields) == ([name.upper()], {name.upper(): _b64(size)})
    for value in ("sailorjerry", _b64(20), _b64(32)[:-1], "", "é" * 44):
        with pytest.raises(s3errors.S3Error) as refused:
            post_object._checksums({"x-amz-checksum-sha256": value})
        assert (refused.value.code, refused.value.status) == ("BadDigest", 400)
        assert "x-amz-checksum-sha256" in str(refused.value)
    with pytest.raises(s3errors.S3Error) as unknown:
        post_object._checksums({"x-amz-checksum-md5": _b64(16)})
    assert unknown.value.code == "InvalidRequest"
