"""What s3-tests (bench/s3_conformance.py) found in object tags and Content-Encoding: a TagSet
comes back in byte order whatever order the stored map has, and a PUT's Content-Encoding keeps
its ", " separators once aws-chunked is taken out."""

from __future__ import annotations

import types
import xml.etree.ElementTree as ET
from typing import cast

from multidict import CIMultiDict, CIMultiDictProxy

from services.gateway.s3 import auth, object_ops, s3request, tags, xmlio


def test_tag_set_in_byte_order() -> None:
    body = tags.render({"key2": "val2", "1": "b", "key": "val", "0": "a"})
    root = ET.fromstring(body)
    keys = [t.findtext(f"{{{xmlio.NS}}}Key") for t in root.iter(f"{{{xmlio.NS}}}Tag")]
    assert keys == ["0", "1", "key", "key2"]


def test_content_encoding_without_aws_chunked() -> None:
    headers = CIMultiDictProxy(CIMultiDict({"Content-Encoding": "aws-chunked, deflate, gzip"}))
    req = types.SimpleNamespace(
        http=types.SimpleNamespace(headers=headers),
        header=lambda name: headers.get(name, ""),
        bucket_owner="acme",
        object_ownership=0,  # no Object Ownership setting
        principal=auth.Principal("AKACME", "acme", "acme"),  # the object's writer
    )
    out = object_ops.request_headers(cast(s3request.S3Request, req))
    assert out.content_encoding == "deflate, gzip"
