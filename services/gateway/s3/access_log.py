"""The S3 access log: one JSON line per request (what operators grep for a request id from a
client's error, bill by bytes, or feed a log pipeline), written by `S3Server.handle` once the
response is done.

Fields: `time` (ISO 8601 UTC, ms), `request_id` (the `x-amz-request-id` the client got),
`remote` (the peer address), `principal` (the access key; "anonymous" for unsigned requests,
"-" before authentication), `tenant`, `op` (the S3 operation, "Unknown" when the request did not
route), `method`, `bucket`, `key`, `status`, `bytes_in` (request body bytes read), `bytes_out`
(response bytes sent), `latency_ms`, `error` (the S3 error code, "" on success).

Destination (`s3_access_log`): "" off, "-" the service's own log (logger
`kvtier.s3.access`, INFO), or a file path (mode 0600): JSON lines appended, through a queue so
the event loop never waits for the disk. Secrets never appear: no headers, no query strings
(presigned URLs carry signatures), keys as sent.
"""

from __future__ import annotations

import datetime
import json
import logging
import logging.handlers
import os
import queue
from pathlib import Path
from typing import Any

from kvtier import config

#: The logger every access line goes through.
LOGGER = logging.getLogger("kvtier.s3.access")


class AccessLog:
    """Where access lines go (see the module docstring); close() flushes a file."""

    def __init__(self, destination: str) -> None:
        self.enabled = bool(destination)
        self._listener: logging.handlers.QueueListener | None = None
        if destination in ("", "-"):
            return
        path = Path(destination)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # Owner-only, like every log of ours: access lines name users and keys.
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))
            os.chmod(path, 0o600)
            handler = logging.FileHandler(path, encoding="utf-8")
        except OSError as exc:
            raise config.ConfigError(f"s3_access_log: {path}: {exc.strerror or exc}") from None
        handler.setFormatter(logging.Formatter("%(message)s"))
        lines: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
        self._listener = logging.handlers.QueueListener(lines, handler)
        self._listener.start()
        LOGGER.addHandler(logging.handlers.QueueHandler(lines))
        LOGGER.propagate = False  # a file of its own: not also in the service log
        LOGGER.setLevel(logging.INFO)

    def write(self, **fields: Any) -> None:
        """Log one request (fields as in the module docstring; time added here)."""
        if not self.enabled:
            return
        now = datetime.datetime.now(datetime.UTC)
        line = {"time": now.isoformat(timespec="milliseconds").replace("+00:00", "Z"), **fields}
        LOGGER.info("%s", json.dumps(line, separators=(",", ":"), ensure_ascii=False))

    def close(self) -> None:
        """Flush and stop the file writer (idempotent)."""
        if self._listener is not None:
            self._listener.stop()
            self._listener = None
            for handler in list(LOGGER.handlers):
                LOGGER.removeHandler(handler)
            LOGGER.propagate = True
