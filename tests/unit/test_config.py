"""Unit tests of kvtier.config.load() with the real service config classes."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from kvtier import config
from services.datanode import config as datanode_config
from services.gateway import config as gateway_config
from services.kvcache import config as kvcache_config
from services.metadata import config as metadata_config
from services.metadata import placement

#: The TLS settings every secure service needs (load() does not open the files).
TLS: dict[str, Any] = {
    "tls_ca_file": "/pki/ca.crt",
    "tls_cert_file": "/pki/node.crt",
    "tls_key_file": "/pki/node.key",
}


def _tls(service: str) -> dict[str, str]:
    """TLS settings as environment variables of service."""
    return {config.env_name(service, name): value for name, value in TLS.items()}


SERVICES: list[tuple[str, type[config.ServiceConfig]]] = [
    ("datanode", datanode_config.DatanodeConfig),
    ("gateway", gateway_config.GatewayConfig),
    ("kvcache", kvcache_config.KVCacheConfig),
    ("metadata", metadata_config.MetadataConfig),
]


def load_datanode(
    argv: Sequence[str] = (), environ: Mapping[str, str] | None = None
) -> datanode_config.DatanodeConfig:
    return config.load(
        datanode_config.DatanodeConfig,
        service="datanode",
        argv=argv,
        environ={**_tls("datanode"), **(environ or {})},
    )


def load_metadata(
    argv: Sequence[str] = (), environ: Mapping[str, str] | None = None
) -> metadata_config.MetadataConfig:
    return config.load(
        metadata_config.MetadataConfig,
        service="metadata",
        argv=argv,
        environ={**_tls("metadata"), **(environ or {})},
    )


def config_error(
    argv: Sequence[str] = (),
    environ: Mapping[str, str] | None = None,
    cls: type[config.ServiceConfig] = datanode_config.DatanodeConfig,
    service: str = "datanode",
) -> str:
    """The one-line message of the ConfigError that loading these settings raises."""
    with pytest.raises(config.ConfigError) as info:
        config.load(cls, service=service, argv=argv, environ={**_tls(service), **(environ or {})})
    message = str(info.value)
    assert message
    assert "\n" not in message
    assert "\r" not in message
    return message


# --- defaults, precedence ----------------------------------------------------------------------


@pytest.mark.parametrize(("service", "cls"), SERVICES)
def test_defaults_load_for_every_service(service: str, cls: type[config.ServiceConfig]) -> None:
    cfg = config.load(cls, service=service, argv=[], environ=_tls(service))
    assert cfg == cls(**TLS)
    assert cfg.grpc_port > 0  # fixed, documented defaults: tests/unit/test_service_ports.py
    assert cfg.metrics_port == cfg.grpc_port + 50
    assert cfg.etcd_endpoints == ("127.0.0.1:2379",)
    assert cfg.etcd_prefix == "/kvtier"
    assert cfg.lease_ttl_s == 10


@pytest.mark.parametrize(("service", "cls"), SERVICES)
def test_every_field_has_a_help_string(service: str, cls: type[config.ServiceConfig]) -> None:
    for field in dataclasses.fields(cls):
        assert field.metadata.get("help"), f"{service}.{field.name} has no help"


def test_datanode_defaults() -> None:
    cfg = load_datanode()
    assert cfg.drives == ()
    assert cfg.drive_count == 2
    assert cfg.drive_paths() == [
        Path("./kvtier-data/datanode/drive0"),
        Path("./kvtier-data/datanode/drive1"),
    ]


def test_metadata_defaults_describe_the_dev_cluster_policy() -> None:
    cfg = load_metadata()
    assert cfg.policy() == placement.PlacementPolicy(pool_drives=12, set_drives=0, parity_shards=-1)


def test_env_overrides_default() -> None:
    cfg = load_datanode(
        environ={
            "KVTIER_DATANODE_GRPC_PORT": "7001",
            "KVTIER_DATANODE_LEASE_TTL_S": "30",
            "KVTIER_DATANODE_ETCD_WAIT_S": "2.5",
            "KVTIER_DATANODE_LOG_LEVEL": "debug",
            "KVTIER_DATANODE_MAX_MESSAGE_BYTES": "8_388_608",
        }
    )
    assert cfg.grpc_port == 7001
    assert cfg.lease_ttl_s == 30
    assert cfg.etcd_wait_s == 2.5
    assert cfg.log_level == "debug"
    assert cfg.max_message_bytes == 8 * 1024 * 1024


def test_cli_overrides_env() -> None:
    environ = {"KVTIER_DATANODE_GRPC_PORT": "7001", "KVTIER_DATANODE_DRIVE_COUNT": "4"}
    cfg = load_datanode(["--grpc-port", "7002"], environ)
    assert cfg.grpc_port == 7002
    assert cfg.drive_count == 4  # env still applies to fields the CLI leaves alone
    assert load_datanode(["--grpc-port=7003"], environ).grpc_port == 7003


def test_load_reads_process_environment_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVTIER_DATANODE_GRPC_PORT", "7010")
    for name, value in _tls("datanode").items():
        monkeypatch.setenv(name, value)
    cfg = config.load(datanode_config.DatanodeConfig, service="datanode", argv=[])
    assert cfg.grpc_port == 7010


def test_env_and_flag_names() -> None:
    assert config.env_name("datanode", "grpc_port") == "KVTIER_DATANODE_GRPC_PORT"
    assert config.flag_name("lease_ttl_s") == "--lease-ttl-s"


# --- unknown settings ----------------------------------------------------------------------------


def test_unknown_flag_is_rejected() -> None:
    assert "--bogus" in config_error(["--bogus", "1"])


def test_positional_argument_is_rejected() -> None:
    assert "stray" in config_error(["stray"])


def test_flag_without_value_is_rejected() -> None:
    assert "--grpc-port" in config_error(["--grpc-port"])


def test_unknown_env_of_this_service_is_rejected_by_name() -> None:
    message = config_error(environ={"KVTIER_DATANODE_BOGUS": "1"})
    assert "KVTIER_DATANODE_BOGUS" in message


def test_env_of_other_services_is_ignored() -> None:
    cfg = load_datanode(
        environ={
            "KVTIER_GATEWAY_X": "1",
            "KVTIER_GATEWAY_GRPC_PORT": "99999",
            "KVTIER_METADATA_POOL_DRIVES": "17",
            "KVTIER_DATANODES_X": "1",
            "KVTIER_OTHER": "1",
            "PATH": "/usr/bin",
        }
    )
    assert cfg == datanode_config.DatanodeConfig(**TLS)


def test_setting_of_another_service_is_unknown_here() -> None:
    gateway = gateway_config.GatewayConfig
    from_env = config_error([], {"KVTIER_GATEWAY_DRIVE_COUNT": "3"}, gateway, "gateway")
    assert "KVTIER_GATEWAY_DRIVE_COUNT" in from_env
    assert "--drive-count" in config_error(["--drive-count", "3"], {}, gateway, "gateway")


def test_abbreviated_flag_is_rejected() -> None:
    config_error(["--grpc", "7001"])


# --- value checks --------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["70000", "65536", "-5", "abc", "1.5", ""])
def test_bad_grpc_port_names_the_setting(value: str) -> None:
    from_cli = config_error([f"--grpc-port={value}"])
    from_env = config_error(environ={"KVTIER_DATANODE_GRPC_PORT": value})
    for message in (from_cli, from_env):
        assert "grpc_port" in message.lower() or "grpc-port" in message.lower()


@pytest.mark.parametrize("value", ["-2", "70000", "x"])
def test_bad_metrics_port_names_the_setting(value: str) -> None:
    assert "metrics" in config_error([f"--metrics-port={value}"]).lower()


@pytest.mark.parametrize(("port", "expected"), [("-1", -1), ("0", 0), ("65535", 65535)])
def test_metrics_port_edges(port: str, expected: int) -> None:
    assert load_datanode([f"--metrics-port={port}"]).metrics_port == expected


@pytest.mark.parametrize(
    "endpoints",
    [
        "localhost",
        "localhost:",
        ":2379",
        "etcd:abc",
        "etcd:0",
        "etcd:70000",
        "etcd:-1",
        "etcd:1,broken",
        ",",
        "",
    ],
)
def test_bad_etcd_endpoints_are_rejected(endpoints: str) -> None:
    assert "etcd_endpoints" in config_error(["--etcd-endpoints", endpoints])


def test_etcd_endpoints_parse_as_a_comma_list() -> None:
    cfg = load_datanode(["--etcd-endpoints", " etcd-1:2379, etcd-2:2380,,[::1]:2379 "])
    assert cfg.etcd_endpoints == ("etcd-1:2379", "etcd-2:2380", "[::1]:2379")


def test_drives_parse_as_a_comma_list_from_env() -> None:
    cfg = load_datanode(environ={"KVTIER_DATANODE_DRIVES": "/mnt/a,/mnt/b"})
    assert cfg.drives == ("/mnt/a", "/mnt/b")
    assert cfg.drive_paths() == [Path("/mnt/a"), Path("/mnt/b")]


def test_a_data_dir_that_is_a_file_is_rejected(tmp_path: Path) -> None:
    file = tmp_path / "file"
    file.write_text("x")
    assert "exists and is not a directory" in config_error(["--data-dir", str(file)])
    assert load_datanode(["--data-dir", "/dev/shm/kvtier-test"]).data_dir  # a tmpfs is fine


def test_drive_listed_twice_is_rejected() -> None:
    assert "twice" in config_error(["--drives", "/mnt/a,/mnt/b,/mnt/a/"])


@pytest.mark.parametrize("count", ["0", "65"])
def test_drive_count_out_of_range_is_rejected(count: str) -> None:
    assert "drive_count" in config_error(["--drive-count", count])


def test_drive_count_is_not_checked_when_drives_are_listed() -> None:
    cfg = load_datanode(["--drive-count", "0", "--drives", "/mnt/a"])
    assert cfg.drive_paths() == [Path("/mnt/a")]


def test_lease_ttl_below_etcd_minimum_is_rejected() -> None:
    assert "lease_ttl_s" in config_error(["--lease-ttl-s", "1"])
    assert load_datanode(["--lease-ttl-s", "2"]).lease_ttl_s == 2


@pytest.mark.parametrize(
    ("argv", "setting"),
    [
        (["--etcd-prefix", "kvtier"], "etcd_prefix"),
        (["--etcd-prefix", "/kvtier/"], "etcd_prefix"),
        (["--node-id", "dn/1"], "node_id"),
        (["--log-level", "verbose"], "log_level"),
        (["--log-format", "xml"], "log_format"),
        (["--max-message-bytes", "100"], "max_message_bytes"),
        (["--etcd-wait-s", "-1"], "etcd_wait_s"),
        (["--shutdown-grace-s", "-0.5"], "shutdown_grace_s"),
        (["--data-dir", ""], "data_dir"),
        (["--data-dir", "/proc"], "data_dir: /proc is on /proc"),
        (["--data-dir", "/sys/kvtier"], "data_dir: /sys/kvtier is on /sys"),
        (["--data-dir", "/dev/kvtier"], "on /dev"),
        (["--drives", "/mnt/a,/proc/b"], "drives: /proc/b is on /proc"),
    ],
)
def test_bad_values_name_their_setting(argv: list[str], setting: str) -> None:
    assert setting in config_error(argv)


@pytest.mark.parametrize(
    ("argv", "setting"),
    [
        (["--pool-drives", "17"], "pool_drives"),
        (["--pool-drives", "12", "--set-drives", "5"], "set_drives"),
        (["--pool-drives", "12", "--parity-shards", "7"], "parity"),
        (["--pool-drives", "0"], "pool_drives"),
        (["--pool-drives", "32", "--set-drives", "32"], "set_drives"),
    ],
)
def test_metadata_rejects_impossible_pool_layouts(argv: list[str], setting: str) -> None:
    message = config_error(argv, cls=metadata_config.MetadataConfig, service="metadata")
    assert setting in message


def test_metadata_accepts_a_valid_layout() -> None:
    cfg = load_metadata(environ={"KVTIER_METADATA_POOL_DRIVES": "24"}, argv=["--set-drives", "6"])
    assert cfg.policy() == placement.PlacementPolicy(pool_drives=24, set_drives=6)
    assert placement.set_layout(cfg.policy()) == (6, 3)


@pytest.mark.parametrize(
    ("argv", "environ"),
    [
        (["--log-level", "info\nwarning"], {}),
        (["--node-id", "dn\n1"], {}),
        (["--etcd-prefix", "/a\n/b/"], {}),
        (["--etcd-endpoints", "etcd\n:port"], {}),
        (["--grpc-port", "1\n2"], {}),
        ([], {"KVTIER_DATANODE_LEASE_TTL_S": "ten\nseconds"}),
        ([], {"KVTIER_DATANODE_BOGUS": "x\ny"}),
    ],
)
def test_messages_stay_on_one_line(argv: list[str], environ: dict[str, str]) -> None:
    config_error(argv, environ)  # the helper asserts there is no line break


def test_unknown_argument_with_line_break_stays_on_one_line() -> None:
    config_error(["--bogus\nflag"])


def test_describe_lists_every_setting() -> None:
    described = config.describe(load_datanode(["--grpc-port", "7001"]))
    assert described["grpc_port"] == 7001
    assert set(described) == {f.name for f in dataclasses.fields(datanode_config.DatanodeConfig)}


# --- bool parsing ---------------------------------------------------------------------------------
# No service has a bool setting yet; this test-only subclass exercises load()'s bool branch.


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class _FlagConfig(config.ServiceConfig):
    verbose: bool = config.setting(False, "test-only bool setting")


def test_bool_settings_are_the_security_switches() -> None:
    bool_fields = {
        f.name
        for _service, cls in SERVICES
        for f in dataclasses.fields(cls)
        if f.type in (bool, "bool")
    }
    assert "insecure" in bool_fields
    # kv_events too: it opens an endpoint (CURVE-authenticated unless kv_events_auth=none).
    assert bool_fields <= {"insecure", "s3_plain_http", "dataplane_tls", "kv_events"}


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("1", True),
        ("true", True),
        ("YES", True),
        (" on ", True),
        ("0", False),
        ("false", False),
        ("no", False),
        ("Off", False),
    ],
)
def test_bool_parsing(raw: str, expected: bool) -> None:
    from_cli = config.load(
        _FlagConfig, service="flagged", argv=["--verbose", raw], environ=_tls("flagged")
    )
    assert from_cli.verbose is expected
    env = {"KVTIER_FLAGGED_VERBOSE": raw, **_tls("flagged")}
    assert config.load(_FlagConfig, service="flagged", argv=[], environ=env).verbose is expected


@pytest.mark.parametrize("raw", ["maybe", "2", ""])
def test_bad_bool_is_rejected(raw: str) -> None:
    message = config_error(["--verbose", raw], cls=_FlagConfig, service="flagged")
    assert "--verbose" in message


def test_data_plane_settings_are_validated() -> None:
    from services.kvcache import config as kvcache_config

    cfg = config.load(
        kvcache_config.KVCacheConfig,
        service="kvcache",
        argv=["--dataplane-transports", "tcp,shm"],
        environ=_tls("kvcache"),
    )
    assert cfg.dataplane_transports == ("tcp", "shm")
    for argv, needle in (
        (["--dataplane-transports", "tcp,carrier-pigeon"], "carrier-pigeon"),
        (["--dataplane-port", "70000"], "dataplane_port"),
        (["--dataplane-max-inflight-bytes", "10"], "dataplane_max_inflight_bytes"),
    ):
        with pytest.raises(config.ConfigError, match=needle):
            config.load(
                kvcache_config.KVCacheConfig, service="kvcache", argv=argv, environ=_tls("kvcache")
            )


# --- security settings ---------------------------------------------------------------------------


@pytest.mark.parametrize(("service", "cls"), SERVICES)
def test_a_service_needs_tls_files_unless_insecure(
    service: str, cls: type[config.ServiceConfig]
) -> None:
    with pytest.raises(config.ConfigError, match="tls_ca_file: required"):
        config.load(cls, service=service, argv=[], environ={})
    insecure = config.load(cls, service=service, argv=["--insecure", "true"], environ={})
    assert insecure.insecure
    assert not cls(**TLS).insecure  # secure unless asked


def test_client_port_is_validated() -> None:
    assert load_datanode(["--client-port", "-1"]).client_port == -1
    assert "client_port" in config_error(["--client-port", "70000"])


def test_small_write_max_bytes_is_bounded_by_what_datanodes_take() -> None:
    gateway = gateway_config.GatewayConfig

    def loaded(*argv: str) -> int:
        cfg = config.load(gateway, service="gateway", argv=argv, environ=_tls("gateway"))
        return cfg.small_write_max_bytes

    assert loaded() == 128 * 1024  # what an earlier release's datanodes read (rollback)
    assert loaded("--small-write-max-bytes", "524288") == 524288
    for value in ("131071", "524289"):
        message = config_error(["--small-write-max-bytes", value], {}, gateway, "gateway")
        assert "small_write_max_bytes" in message
