"""Configuration: one frozen dataclass per service, loaded from CLI over env over defaults.

Each field has a default, a unit in its name and a help string (`setting(default, "help")`).
`load()` builds the argument parser from the dataclass, reads `KVTIER_<SERVICE>_<FIELD>` from the
environment, rejects unknown flags and unknown `KVTIER_<SERVICE>_*` variables, and turns every
problem into a `ConfigError` whose text is one line. `__main__` modules print it and exit 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import pathlib
import socket
import typing
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn, TypeVar

T = TypeVar("T")

EXIT_BAD_CONFIG = 2


class ConfigError(Exception):
    """A bad setting; the message is one line naming the setting and what is wrong."""


def setting(default: Any, help: str) -> Any:
    """A config field with its default and help text."""
    return dataclasses.field(default=default, metadata={"help": help})


def _check_port(name: str, value: int, *, allow_disabled: bool = False) -> None:
    low = -1 if allow_disabled else 0
    if not low <= value <= 65535:
        hint = " (-1 disables)" if allow_disabled else ""
        raise ConfigError(f"{name}: {value} is not a port number 0..65535{hint}")


#: Kernel file systems, never storage (/dev/shm, a tmpfs, is allowed).
_VIRTUAL_ROOTS = frozenset({"proc", "sys", "dev"})


def check_storage_dir(name: str, value: str) -> None:
    """ConfigError unless value can be a directory kvtier keeps state in: not empty, not on
    /proc, /sys or /dev (but /dev/shm), not an existing file."""
    if not value.strip():
        raise ConfigError(f"{name}: must not be empty")
    path = pathlib.Path(value).resolve()
    shm = path.parts[1:3] == ("dev", "shm")
    if len(path.parts) > 1 and path.parts[1] in _VIRTUAL_ROOTS and not shm:
        raise ConfigError(f"{name}: {path} is on /{path.parts[1]}, not a storage file system")
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{name}: {path} exists and is not a directory")


def _check_endpoint(name: str, value: str) -> None:
    host, sep, port = value.rpartition(":")
    bad_host = not host or any(c.isspace() or c in "/@?#" for c in host)
    if not sep or bad_host or not port.isdigit() or not 0 < int(port) <= 65535:
        raise ConfigError(f"{name}: {value!r} is not host:port")


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class ServiceConfig:
    """Settings every kvtier service shares."""

    node_id: str = setting(
        "", "stable node identity; empty: derived (and persisted where state exists)"
    )
    host: str = setting("127.0.0.1", "address the gRPC and metrics servers bind to")
    advertise_host: str = setting(
        "", "host others use to reach this node; empty: host (or hostname when host is a wildcard)"
    )
    advertise_client_host: str = setting(
        "",
        "host SDK users dial: announced in the client port's address and in the tcp data-plane "
        "endpoint given to users' sessions, where users reach the node another way than nodes "
        "do (docker-compose: 127.0.0.1 with published ports); empty: the advertised host",
    )
    grpc_port: int = setting(
        0, "gRPC port; 0 picks a free one (the real port is registered in etcd)"
    )
    metrics_port: int = setting(0, "Prometheus metrics port; 0 picks a free one, -1 disables")
    etcd_endpoints: tuple[str, ...] = setting(
        ("127.0.0.1:2379",), "comma-separated etcd host:port list"
    )
    etcd_prefix: str = setting("/kvtier", "etcd key prefix of this cluster")
    etcd_wait_s: float = setting(
        60.0, "how long to retry an unreachable etcd at start; 0 waits forever"
    )
    lease_ttl_s: int = setting(10, "membership lease TTL; a dead node leaves the map within it")
    shutdown_grace_s: float = setting(5.0, "time in-flight RPCs get to finish on shutdown")
    drain_linger_s: float = setting(
        1.0,
        "on shutdown, seconds a node with a data plane still answers every call after it left "
        "the map (a lame duck, within shutdown_grace_s; docs/upgrades.md); 0: none",
    )
    max_message_bytes: int = setting(4 * 1024 * 1024, "largest gRPC message (control plane only)")
    log_level: str = setting("info", "debug, info, warning or error")
    log_format: str = setting("text", "text or json")
    otlp_endpoint: str = setting(
        "",
        "OTLP/gRPC collector to send traces to (http://host:4317 plaintext, https://host:4317 "
        "TLS; docs/operations.md, Traces); empty: OTEL_EXPORTER_OTLP_ENDPOINT, else no tracing",
    )
    trace_sample_ratio: float = setting(
        0.01,
        "share of new traces recorded, 0..1 (a traced caller's decision is always followed)",
    )
    client_port: int = setting(
        0,
        "gRPC port for callers without a cluster certificate (TLS + session tokens: SDK users); "
        "0 picks a free one, -1: none (grpc_port requires mutual TLS)",
    )
    tls_ca_file: str = setting("", "the cluster CA certificate (PEM): the trust anchor")
    tls_cert_file: str = setting(
        "", "this node's certificate (PEM, from kvtier admin certs issue); re-read when replaced"
    )
    tls_key_file: str = setting("", "this node's private key (PEM, mode 0600)")
    insecure: bool = setting(
        False,
        "run without TLS and without authentication: every caller has every right (trusted "
        "test rigs and benchmarks only; never on a network)",
    )

    def __post_init__(self) -> None:
        _check_port("grpc_port", self.grpc_port)
        _check_port("client_port", self.client_port, allow_disabled=True)
        if not self.insecure:
            for name in ("tls_ca_file", "tls_cert_file", "tls_key_file"):
                if not getattr(self, name):
                    raise ConfigError(
                        f"{name}: required (kvtier admin certs issue makes one), unless "
                        "insecure=true"
                    )
        _check_port("metrics_port", self.metrics_port, allow_disabled=True)
        if not self.etcd_endpoints:
            raise ConfigError("etcd_endpoints: at least one host:port is needed")
        for endpoint in self.etcd_endpoints:
            _check_endpoint("etcd_endpoints", endpoint)
        if not self.etcd_prefix.startswith("/") or self.etcd_prefix.endswith("/"):
            raise ConfigError(f"etcd_prefix: {self.etcd_prefix!r} must start and not end with '/'")
        if self.lease_ttl_s < 2:
            raise ConfigError(f"lease_ttl_s: {self.lease_ttl_s} is below etcd's minimum of 2")
        for name in ("etcd_wait_s", "shutdown_grace_s", "drain_linger_s"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ConfigError(f"{name}: {value} must be a finite number >= 0")
        if self.max_message_bytes < 1024:
            raise ConfigError("max_message_bytes: must be at least 1024")
        if self.log_level not in {"debug", "info", "warning", "error"}:
            raise ConfigError(f"log_level: {self.log_level!r} is not debug/info/warning/error")
        if self.log_format not in {"text", "json"}:
            raise ConfigError(f"log_format: {self.log_format!r} is not text or json")
        if not (math.isfinite(self.trace_sample_ratio) and 0 <= self.trace_sample_ratio <= 1):
            raise ConfigError(f"trace_sample_ratio: {self.trace_sample_ratio} is not within 0..1")
        if any(c.isspace() or c in "/@:" for c in self.advertise_client_host):
            raise ConfigError(f"advertise_client_host: {self.advertise_client_host!r} is no host")
        if any(c.isspace() for c in self.otlp_endpoint):
            raise ConfigError(f"otlp_endpoint: {self.otlp_endpoint!r} holds whitespace")
        if self.node_id and not all(c.isalnum() or c in "-_." for c in self.node_id):
            raise ConfigError(
                f"node_id: {self.node_id!r} may hold only letters, digits, '-', '_', '.'"
            )

    def advertised_host(self) -> str:
        """The host other nodes dial to reach this one."""
        if self.advertise_host:
            return self.advertise_host
        if self.host in {"0.0.0.0", "::", ""}:
            return socket.gethostname()
        return self.host

    def advertised_client_host(self) -> str:
        """The host SDK users dial to reach this node (its client port, its data plane)."""
        return self.advertise_client_host or self.advertised_host()


def env_name(service: str, field_name: str) -> str:
    """The environment variable of a field, e.g. KVTIER_DATANODE_GRPC_PORT."""
    return f"KVTIER_{service.upper()}_{field_name.upper()}"


def flag_name(field_name: str) -> str:
    """The command-line flag of a field, e.g. --grpc-port."""
    return "--" + field_name.replace("_", "-")


class _Parser(argparse.ArgumentParser):
    def __init__(self, **kwargs: Any) -> None:
        # No prefix matching: `--grpc` must not silently mean `--grpc-port`.
        super().__init__(allow_abbrev=False, **kwargs)

    def error(self, message: str) -> NoReturn:
        raise ConfigError(_one_line(message))


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _convert(name: str, kind: Any, raw: str) -> Any:
    try:
        if kind is bool:
            lowered = raw.strip().lower()
            if lowered not in {"1", "0", "true", "false", "yes", "no", "on", "off"}:
                raise ValueError(raw)
            return lowered in {"1", "true", "yes", "on"}
        if kind is int:
            return int(raw.replace("_", ""))
        if kind is float:
            return float(raw)
        if typing.get_origin(kind) is tuple:
            return tuple(part.strip() for part in raw.split(",") if part.strip())
        return raw
    except ValueError:
        type_name = getattr(kind, "__name__", "list")
        raise ConfigError(f"{name}: {raw!r} is not a valid {type_name}") from None


def load(
    cls: type[T],
    *,
    service: str,
    argv: Sequence[str],
    environ: Mapping[str, str] | None = None,
    description: str = "",
) -> T:
    """Build a `cls` from defaults, then `KVTIER_<SERVICE>_*` env, then CLI flags.

    Raises ConfigError for unknown flags or env variables, unparsable values and failed checks.
    """
    environ = os.environ if environ is None else environ
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    values: dict[str, Any] = {}
    prefix = f"KVTIER_{service.upper()}_"
    known_env = {env_name(service, name): name for name in fields}
    for key, raw in environ.items():
        if key.startswith(prefix):
            if key not in known_env:
                raise ConfigError(f"unknown setting {key} (see --help for the valid ones)")
            name = known_env[key]
            values[name] = _convert(key, hints[name], raw)
    parser = _Parser(prog=f"python -m services.{service}", description=description)
    for name, field in fields.items():
        parser.add_argument(
            flag_name(name),
            dest=name,
            default=None,
            help=f"{field.metadata.get('help', '')} [env {env_name(service, name)}]",
        )
    parsed = parser.parse_args(list(argv))
    for name in fields:
        raw = getattr(parsed, name)
        if raw is not None:
            values[name] = _convert(flag_name(name), hints[name], raw)
    try:
        return cls(**values)
    except (ValueError, TypeError) as exc:
        raise ConfigError(_one_line(str(exc))) from None


def describe(cfg: object) -> dict[str, Any]:
    """The settings as a plain dict, for the one log line at start."""
    return dataclasses.asdict(cfg)  # type: ignore[call-overload, no-any-return]


_TRANSPORTS = ("rdma", "shm", "tcp")


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class DataPlaneServiceConfig(ServiceConfig):
    """Settings of a service that owns bulk bytes and serves them over the data plane."""

    dataplane_transports: tuple[str, ...] = setting(
        _TRANSPORTS, "data-plane transports to serve, in order of preference (rdma,shm,tcp)"
    )
    dataplane_port: int = setting(0, "tcp data-plane port; 0 picks a free one")
    dataplane_max_inflight_bytes: int = setting(
        256 * 1024 * 1024, "bytes in flight per data-plane peer before new requests wait"
    )
    dataplane_max_connections_per_principal: int = setting(
        64,
        "data-plane connections one identity (a user, or a service or operator per tenant it "
        "acts for) may hold open to this node over all transports; more are refused (Overloaded)",
    )
    dataplane_tls: bool = setting(
        False,
        "serve the tcp data plane over TLS with the node's certificate (tls_cert_file, "
        "tls_key_file); off sends KV blocks and shards in cleartext: only on networks the "
        "operator trusts (docs/transports.md, TLS)",
    )
    rdma_device: str = setting("", "RDMA device for the rdma transport; empty: the first found")

    def __post_init__(self) -> None:
        ServiceConfig.__post_init__(self)
        _check_port("dataplane_port", self.dataplane_port)
        if not self.dataplane_transports:
            raise ConfigError("dataplane_transports: at least one transport is needed")
        unknown = [t for t in self.dataplane_transports if t not in _TRANSPORTS]
        if unknown:
            raise ConfigError(f"dataplane_transports: unknown {unknown}; known: rdma, shm, tcp")
        if self.dataplane_max_inflight_bytes < 64 * 1024:
            raise ConfigError("dataplane_max_inflight_bytes: must be at least 65536")
        if self.dataplane_max_connections_per_principal < 1:
            raise ConfigError("dataplane_max_connections_per_principal: must be at least 1")
        if self.dataplane_tls and not (self.tls_cert_file and self.tls_key_file):
            raise ConfigError("dataplane_tls: needs tls_cert_file and tls_key_file")
