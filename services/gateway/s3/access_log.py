"""The S3 access log: one JSON line per request (what operators grep for a request id from a
client's error, bill by bytes, or feed a log pipeline), written by `S3Server.handle` once the
response is done.

Fields: `time` (ISO 8601 UTC, ms), `request_id` (the `x-amz-request-id` the client got),
`remote` (the peer address), `principal` (the access key; "anonymous" for unsigned requests,
"-" before authentication), `tenant`, `op` (the S3 operation, "Unknown" when the request did not
route), `method`, `bucket`, `key`, `status`, `bytes_in` (request body bytes read), `bytes_out`
(response bytes sent), `latency_ms`, `error` (the S3 error code, "" on success).

Destination (`s3_access_log`): "" off, "-" the service's own log (logger
`kvtier.s3.access`, INFO), or a file path (mode 0600): JSON lines appended by a thread of their
own, so the event loop never waits for the disk. That thread writes the lines of up to BATCH_S
at once (one wake-up and one write(2) for many requests, where a logging handler took a
LogRecord, a queue hand-off, a thread wake-up and a write each): a line reaches the file at most
BATCH_S after its response, and those of the last BATCH_S before a crash may be lost, as lines
still queued always were. Secrets never appear: no headers, no query strings (presigned URLs
carry signatures), keys as sent.
"""

from __future__ import annotations

import collections
import datetime
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from kvtier import config

#: The logger access lines go through with destination "-".
LOGGER = logging.getLogger("kvtier.s3.access")
#: How long the file writer gathers lines before it writes them.
BATCH_S = 0.05

log = logging.getLogger(__name__)


class AccessLog:
    """Where access lines go (see the module docstring); close() flushes a file."""

    def __init__(self, destination: str) -> None:
        self.enabled = bool(destination)
        self._file: _FileWriter | None = None
        if destination in ("", "-"):
            return
        path = Path(destination)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # Owner-only, like every log of ours: access lines name users and keys.
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
            os.chmod(path, 0o600)
        except OSError as exc:
            raise config.ConfigError(f"s3_access_log: {path}: {exc.strerror or exc}") from None
        self._file = _FileWriter(path, fd)

    def write(self, **fields: Any) -> None:
        """Log one request (fields as in the module docstring; time added here)."""
        if not self.enabled:
            return
        now = datetime.datetime.now(datetime.UTC)
        line = {"time": now.isoformat(timespec="milliseconds").replace("+00:00", "Z"), **fields}
        text = json.dumps(line, separators=(",", ":"), ensure_ascii=False)
        if self._file is not None:
            self._file.put(text)
        else:
            LOGGER.info("%s", text)

    def close(self) -> None:
        """Flush and stop the file writer (idempotent)."""
        if self._file is not None:
            self._file.close()
            self._file = None


class _FileWriter:
    """Appends lines to a file from a thread of its own, the lines of BATCH_S in one write(2);
    `put` only appends to a deque (and wakes the thread for the first line of a batch)."""

    def __init__(self, path: Path, fd: int) -> None:
        self._path = path
        self._fd = fd
        self._lines: collections.deque[str] = collections.deque()
        self._wake = threading.Event()
        self._closing = False
        self._failed = False
        self._thread = threading.Thread(target=self._run, name="s3-access-log", daemon=True)
        self._thread.start()

    def put(self, line: str) -> None:
        """Queue one line (any thread; never blocks)."""
        self._lines.append(line)
        if not self._wake.is_set():
            self._wake.set()

    def _run(self) -> None:
        while True:
            self._wake.wait()
            if not self._closing:
                time.sleep(BATCH_S)  # the lines of the next BATCH_S go in the same write
            self._wake.clear()  # before draining: a line put after this wakes us again
            self._write()
            if self._closing and not self._lines:
                return

    def _write(self) -> None:
        lines = []
        while self._lines:
            lines.append(self._lines.popleft())
        if not lines:
            return
        data = memoryview(("\n".join(lines) + "\n").encode())
        try:
            while data:
                data = data[os.write(self._fd, data) :]
        except OSError as exc:
            if not self._failed:  # once: a full disk must not flood the service log
                log.warning("s3 access log %s: lines lost: %s", self._path, exc)
            self._failed = True
        else:
            self._failed = False

    def close(self) -> None:
        """Write what is queued, stop the thread, close the file (idempotent)."""
        if not self._closing:
            self._closing = True
            self._wake.set()
            self._thread.join()
            os.close(self._fd)
