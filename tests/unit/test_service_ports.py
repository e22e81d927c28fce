"""A service started on its own binds fixed, documented default ports (issue 17): those of the dev
cluster's first node of its role (docs/operations.md, Ports), overridable by flag or environment,
and 0 still means any free port."""

from __future__ import annotations

from typing import Any

import pytest

from kvtier import config, devports
from services.datanode import config as datanode_config
from services.gateway import config as gateway_config
from services.kvcache import config as kvcache_config
from services.metadata import config as metadata_config

TLS = {"tls_ca_file": "/pki/ca.crt", "tls_cert_file": "/n.crt", "tls_key_file": "/n.key"}

#: What docs/operations.md's port table says, written out (not computed from the plan).
DOCUMENTED: list[tuple[str, type[config.ServiceConfig], dict[str, int]]] = [
    (
        "gateway",
        gateway_config.GatewayConfig,
        {"grpc_port": 7000, "client_port": 7443, "metrics_port": 7050, "s3_port": 9000},
    ),
    (
        "metadata",
        metadata_config.MetadataConfig,
        {"grpc_port": 7001, "client_port": 7444, "metrics_port": 7051},
    ),
    ("datanode", datanode_config.DatanodeConfig, {"grpc_port": 7101, "metrics_port": 7151}),
    (
        "kvcache",
        kvcache_config.KVCacheConfig,
        {"grpc_port": 7201, "client_port": 7301, "metrics_port": 7251},
    ),
]


def _load(service: str, cls: type[Any], argv: list[str], **env: str) -> Any:
    environ = {config.env_name(service, k): v for k, v in {**TLS, **env}.items()}
    return config.load(cls, service=service, argv=argv, environ=environ)


@pytest.mark.parametrize(("service", "cls", "ports"), DOCUMENTED, ids=[d[0] for d in DOCUMENTED])
def test_defaults_are_the_documented_ports(
    service: str, cls: type[config.ServiceConfig], ports: dict[str, int]
) -> None:
    cfg = _load(service, cls, [])
    assert {name: getattr(cfg, name) for name in ports} == ports
    # The same plan `kvtier up` uses for the first node of the role.
    plan = devports.PortPlan().node_ports(service, 1)
    assert {name: plan[name] for name in ports} == ports


@pytest.mark.parametrize(("service", "cls", "ports"), DOCUMENTED, ids=[d[0] for d in DOCUMENTED])
def test_flags_and_environment_override_them(
    service: str, cls: type[config.ServiceConfig], ports: dict[str, int]
) -> None:
    flags = [f"--{name.replace('_', '-')}={index}" for index, name in enumerate(ports)]
    cfg = _load(service, cls, flags)
    assert [getattr(cfg, name) for name in ports] == list(range(len(ports)))  # 0: any free port
    env = {name: str(20000 + index) for index, name in enumerate(ports)}
    cfg = _load(service, cls, [], **env)
    assert {name: getattr(cfg, name) for name in ports} == {k: int(v) for k, v in env.items()}
