"""A container health check: is the kvtier service configured in this environment SERVING?

    python -m kvtier.healthprobe [HOST:PORT]     (default 127.0.0.1:7000)

The check of `kvtier health --from-env`: the gRPC health service of the node, called with the
node's own certificate (its KVTIER_<SERVICE>_TLS_CA_FILE / _CERT_FILE / _KEY_FILE, or plain
text when KVTIER_<SERVICE>_INSECURE is true). It imports nothing but grpc: Docker runs it in
every container at every interval, and the CLI's imports (etcd client, aiohttp, the console)
cost seconds of CPU each time on a busy 2-core host, which made ten probing containers miss
their timeouts. Prints the status; exit 0 when SERVING, 1 otherwise, 2 for a bad environment.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

DEFAULT_ADDRESS = "127.0.0.1:7000"
_TRUE = frozenset({"1", "true", "yes", "on"})


class ProbeError(Exception):
    """The environment configures no single kvtier service, or its TLS files are unreadable."""


def service_tls(environ: Mapping[str, str]) -> dict[str, str] | None:
    """The TLS settings (CA_FILE, CERT_FILE, KEY_FILE) of the one kvtier service configured in
    environ, or None when it runs insecure. Raises ProbeError when there is not exactly one."""
    found: dict[str, dict[str, str]] = {}
    for name, value in environ.items():
        parts = name.split("_", 2)
        if len(parts) == 3 and parts[0] == "KVTIER":
            found.setdefault(parts[1], {})[parts[2]] = value
    services = [v for v in found.values() if "TLS_CERT_FILE" in v or "INSECURE" in v]
    if len(services) != 1:
        raise ProbeError("no single kvtier service configured in this environment")
    settings = services[0]
    if settings.get("INSECURE", "").strip().lower() in _TRUE:
        return None
    return {key: settings.get(f"TLS_{key}", "") for key in ("CA_FILE", "CERT_FILE", "KEY_FILE")}


def check(address: str, tls: dict[str, str] | None, timeout_s: float) -> str:
    """The health status name of the node at address ("SERVING", ...) or "UNREACHABLE"."""
    import grpc  # here, not at import: `--help` and bad environments stay instant
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    if tls is None:
        channel = grpc.insecure_channel(address)
    else:
        try:
            pem = {key: Path(path).read_bytes() if path else None for key, path in tls.items()}
        except OSError as exc:
            raise ProbeError(f"TLS file unreadable: {exc}") from None
        credentials = grpc.ssl_channel_credentials(
            root_certificates=pem["CA_FILE"],
            private_key=pem["KEY_FILE"],
            certificate_chain=pem["CERT_FILE"],
        )
        channel = grpc.secure_channel(address, credentials)
    with channel:
        stub: Any = health_pb2_grpc.HealthStub(channel)  # the stubs type no methods
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout_s)
        except grpc.RpcError:
            return "UNREACHABLE"
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """Entry point; returns the exit code (0 SERVING, 1 not, 2 bad arguments/environment)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) > 1 or (args and args[0].startswith("-")):
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)  # noqa: T201
        return 2
    address = args[0] if args else DEFAULT_ADDRESS
    try:
        status = check(address, service_tls(os.environ if environ is None else environ), 5.0)
    except ProbeError as exc:
        print(f"healthprobe: {exc}", file=sys.stderr)  # noqa: T201
        return 2
    print(status)  # noqa: T201
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
