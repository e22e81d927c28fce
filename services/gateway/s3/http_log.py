"""The logger aiohttp's request handler uses on the S3 port: bytes that are not an HTTP/1.x
request (a gRPC or HTTP/2 client dialled at the S3 port, TLS to a plain port, a port scanner)
are one warning line naming the peer and the cause, not aiohttp's multi-line traceback.

Exceptions raised by S3 handlers still log their traceback: they are bugs.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from aiohttp import http_exceptions

log = logging.getLogger("services.gateway.s3")

_PROTOCOL_HINT = "an HTTP/2 or gRPC client? this port speaks S3 (HTTP/1.1); `kvtier status` lists "
_PROTOCOL_HINT += "the gRPC ports"


def describe(remote: object, exc: http_exceptions.HttpProcessingError) -> str:
    """One line: who sent what aiohttp could not parse, and the likely cause."""
    first = (exc.message or type(exc).__name__).strip().splitlines()[0].rstrip(":")
    hint = f" ({_PROTOCOL_HINT})" if "PRI" in exc.message else ""
    return f"S3 port: not an HTTP/1.1 request from {remote}: {first}{hint}"


class S3ServerLogger(logging.LoggerAdapter):  # type: ignore[type-arg]
    """aiohttp's `logger` for the S3 request handler (`web.AppRunner(..., logger=...)`)."""

    def __init__(self, logger: logging.Logger = log) -> None:
        super().__init__(logger, {})

    def exception(self, msg: object, *args: object, exc_info: Any = True, **kwargs: Any) -> None:
        """A request that could not be parsed: one warning line; anything else: as logged."""
        exc = exc_info if isinstance(exc_info, BaseException) else sys.exc_info()[1]
        if isinstance(exc, http_exceptions.HttpProcessingError):
            remote = args[0] if args else "?"
            self.warning("%s", describe(remote, exc))
            return
        super().exception(msg, *args, exc_info=exc_info, **kwargs)
