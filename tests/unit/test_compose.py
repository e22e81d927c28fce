"""docker-compose.yml and the Dockerfile checked against the code, without Docker.

Every kvtier container's settings are parsed by the service's own config class, so a renamed
field, a bad port or a pool size that no longer matches the datanodes fails here, not at
`docker compose up`.
"""

from __future__ import annotations

import collections
import dataclasses
import fnmatch
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from kvtier import config
from services.datanode import config as datanode_config
from services.gateway import config as gateway_config
from services.kvcache import config as kvcache_config
from services.metadata import config as metadata_config
from tests.compose import docker_env

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_PATH = ROOT / "docker-compose.yml"
DOCKERFILE_PATH = ROOT / "Dockerfile"
DOCKERIGNORE_PATH = ROOT / ".dockerignore"

CONFIG_CLASSES: dict[str, type[config.ServiceConfig]] = {
    "metadata": metadata_config.MetadataConfig,
    "datanode": datanode_config.DatanodeConfig,
    "kvcache": kvcache_config.KVCacheConfig,
    "gateway": gateway_config.GatewayConfig,
}
EXPECTED_COUNTS = {"metadata": 1, "datanode": 6, "kvcache": 2, "gateway": 1}
STATEFUL_KINDS = {"datanode", "kvcache"}
ETCD_SERVICE = "etcd"
PKI_SERVICE = "pki"


@dataclasses.dataclass(frozen=True)
class Node:
    """One kvtier container of the compose file."""

    name: str
    kind: str
    spec: dict[str, Any]
    env: dict[str, str]

    def load(self) -> config.ServiceConfig:
        """The service's config as the container would build it (raises ConfigError)."""
        return config.load(CONFIG_CLASSES[self.kind], service=self.kind, argv=[], environ=self.env)


def _command(spec: dict[str, Any]) -> list[str]:
    command = spec.get("command", [])
    return shlex.split(command) if isinstance(command, str) else [str(c) for c in command]


#: `${NAME:-default}`: the only form of variable the compose file uses.
_VARIABLE = re.compile(r"\$\{([A-Z0-9_]+):-([^}]*)\}")


def _interpolate(value: str) -> str:
    """value as compose resolves it with no variable set (every variable needs a default)."""
    assert "$" not in _VARIABLE.sub("", value), f"{value!r}: a variable without a default"
    return _VARIABLE.sub(lambda m: m.group(2), value)


def _environment(spec: dict[str, Any]) -> dict[str, str]:
    raw = spec.get("environment") or {}
    if isinstance(raw, list):
        assert all("=" in str(item) for item in raw), "pass-through env is not allowed"
        raw = dict(str(item).partition("=")[::2] for item in raw)
    assert all(value is not None for value in raw.values()), "pass-through env is not allowed"
    return {str(key): _interpolate(str(value)) for key, value in raw.items()}


def _kind(spec: dict[str, Any]) -> str | None:
    match _command(spec):
        case ["python", "-m", module] if module.startswith("services."):
            return module.removeprefix("services.")
    return None


def _seconds(duration: str) -> float:
    """A compose duration ("20s", "1m30s", "500ms") in seconds."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", duration)
    assert parts, f"{duration!r} is not a duration"
    assert "".join(n + u for n, u in parts) == duration, f"{duration!r} is not a duration"
    return sum(float(number) * units[unit] for number, unit in parts)


def _volume_mounts(spec: dict[str, Any]) -> dict[str, str]:
    """Container path → named volume, for the service's named-volume mounts."""
    mounts: dict[str, str] = {}
    for volume in spec.get("volumes", []):
        if isinstance(volume, str):
            source, _, rest = volume.partition(":")
            target = rest.split(":")[0]
            if source and not source.startswith((".", "/", "~")):
                mounts[target] = source
        elif volume.get("type", "volume") == "volume" and volume.get("source"):
            mounts[volume["target"]] = volume["source"]
    return mounts


def _published(spec: dict[str, Any]) -> list[tuple[str, int]]:
    """(host side, container port) for each published port."""
    published = []
    for port in spec.get("ports", []):
        if isinstance(port, dict):
            published.append((str(port.get("published", "")), int(port["target"])))
        else:
            host, _, container = _interpolate(str(port)).rpartition(":")
            published.append((host, int(container.split("/")[0])))
    return published


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE_PATH.read_text().replace("\\\n", " ")
    instructions = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            keyword, _, args = stripped.partition(" ")
            instructions.append((keyword.upper(), args.strip()))
    return instructions


def _copied_sources() -> list[str]:
    """The build-context paths the Dockerfile's COPY instructions take (not --from stages)."""
    return [
        source
        for keyword, args in _dockerfile_instructions()
        if keyword == "COPY" and not args.startswith("--")
        for source in args.split()[:-1]
    ]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    document = yaml.safe_load(COMPOSE_PATH.read_text())
    assert isinstance(document, dict)
    assert isinstance(document.get("services"), dict)
    return document


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return dict(compose["services"])


@pytest.fixture(scope="module")
def nodes(services: dict[str, dict[str, Any]]) -> list[Node]:
    found = []
    for name, spec in services.items():
        kind = _kind(spec)
        if kind in CONFIG_CLASSES:
            found.append(Node(name=name, kind=kind, spec=spec, env=_environment(spec)))
    return found


@pytest.fixture(scope="module")
def configs(nodes: list[Node]) -> dict[str, config.ServiceConfig]:
    return {node.name: node.load() for node in nodes}


def test_every_service_but_etcd_runs_a_kvtier_module(services: dict[str, dict[str, Any]]) -> None:
    for name, spec in services.items():
        if name in (ETCD_SERVICE, PKI_SERVICE):
            continue
        kind = _kind(spec)
        assert kind is not None, f"{name}: command {_command(spec)} is not python -m services.X"
        assert (ROOT / "services" / kind / "__main__.py").is_file(), f"{name}: no services.{kind}"
        assert kind in CONFIG_CLASSES, f"{name}: services.{kind} has no known config class"


def test_service_counts(nodes: list[Node]) -> None:
    assert collections.Counter(node.kind for node in nodes) == EXPECTED_COUNTS


def test_env_names_are_fields_of_the_service_config(nodes: list[Node]) -> None:
    for node in nodes:
        cls = CONFIG_CLASSES[node.kind]
        known = {config.env_name(node.kind, f.name) for f in dataclasses.fields(cls)}
        assert node.env, f"{node.name}: no environment"
        assert set(node.env) <= known, f"{node.name}: unknown {sorted(set(node.env) - known)}"


def test_every_config_loads(nodes: list[Node]) -> None:
    for node in nodes:
        try:
            node.load()
        except config.ConfigError as exc:
            pytest.fail(f"{node.name}: {exc}")


def test_nodes_bind_all_interfaces_and_advertise_their_service_name(
    nodes: list[Node], configs: dict[str, config.ServiceConfig]
) -> None:
    for node in nodes:
        cfg = configs[node.name]
        assert cfg.host == "0.0.0.0", node.name
        assert cfg.advertise_host == node.name, node.name
        assert cfg.advertised_host() == node.name, node.name
        assert cfg.grpc_port > 0, f"{node.name}: grpc_port must be fixed"
        assert cfg.metrics_port > 0, f"{node.name}: metrics_port must be fixed"
        assert cfg.log_format == "json", node.name


def test_node_ids_are_set_and_unique(configs: dict[str, config.ServiceConfig]) -> None:
    ids = [cfg.node_id for cfg in configs.values()]
    assert all(ids), "every node needs a stable node_id"
    assert len(set(ids)) == len(ids), collections.Counter(ids).most_common(3)


def test_etcd_endpoints_name_the_etcd_service_and_client_port(
    services: dict[str, dict[str, Any]], configs: dict[str, config.ServiceConfig]
) -> None:
    etcd = services[ETCD_SERVICE]
    # Debian's etcd-server inside the kvtier image: no registry needed, the dev cluster's etcd.
    assert etcd["image"] == services[PKI_SERVICE]["image"]
    assert etcd["build"] == services[PKI_SERVICE]["build"]
    assert _command(etcd)[0] == "etcd"
    flags = dict(arg.split("=", 1) for arg in _command(etcd) if arg.startswith("--") and "=" in arg)
    assert all(url.startswith("https://") for url in flags["--advertise-client-urls"].split(",")), (
        "etcd speaks TLS only"
    )
    assert "--client-cert-auth" in _command(etcd), "etcd requires client certificates"
    advertised = {
        url.removeprefix("https://") for url in flags["--advertise-client-urls"].split(",")
    }
    listen_ports = {url.rpartition(":")[2] for url in flags["--listen-client-urls"].split(",")}
    assert {a.rpartition(":")[0] for a in advertised} == {ETCD_SERVICE}
    for name, cfg in configs.items():
        assert cfg.etcd_endpoints, name
        for endpoint in cfg.etcd_endpoints:
            assert endpoint in advertised, f"{name}: {endpoint} is not etcd's client address"
            assert endpoint.rpartition(":")[2] in listen_ports, f"{name}: etcd is not on {endpoint}"


def test_depends_on_waits_for_healthy_services(
    services: dict[str, dict[str, Any]], nodes: list[Node]
) -> None:
    for name, spec in services.items():
        depends_on = spec.get("depends_on", {})
        assert isinstance(depends_on, dict), f"{name}: depends_on needs conditions"
        for target, condition in depends_on.items():
            assert target in services, f"{name}: depends on unknown {target}"
            if target == PKI_SERVICE:  # a one-shot step: it must have finished, not be healthy
                assert condition.get("condition") == "service_completed_successfully", name
                continue
            assert condition.get("condition") == "service_healthy", f"{name} → {target}"
            assert "healthcheck" in services[target], f"{name} → {target}: no healthcheck"
    for node in nodes:
        expected = ETCD_SERVICE if node.kind == "metadata" else "metadata"
        assert expected in node.spec.get("depends_on", {}), f"{node.name}: not after {expected}"


def test_healthchecks_query_the_grpc_health_service_on_the_own_port(
    services: dict[str, dict[str, Any]],
    nodes: list[Node],
    configs: dict[str, config.ServiceConfig],
) -> None:
    for node in nodes:
        port = configs[node.name].grpc_port
        test = ["CMD", "python", "-m", "kvtier.healthprobe", f"127.0.0.1:{port}"]
        assert node.spec["healthcheck"]["test"] == test
    etcd_test = services[ETCD_SERVICE]["healthcheck"]["test"]
    assert etcd_test[0] == "CMD"
    assert etcd_test[1] == "etcdctl"
    assert etcd_test[-2:] == ["endpoint", "health"]
    assert (ROOT / "libs" / "kvtier" / "healthprobe.py").is_file()


def test_pool_drives_match_the_datanodes(
    nodes: list[Node], configs: dict[str, config.ServiceConfig]
) -> None:
    drives = 0
    pool_drives: list[int] = []
    for node in nodes:
        cfg = configs[node.name]
        if isinstance(cfg, datanode_config.DatanodeConfig):
            drives += len(cfg.drive_paths())
        elif isinstance(cfg, metadata_config.MetadataConfig):
            pool_drives.append(cfg.pool_drives)
    assert drives > 0
    assert pool_drives == [drives]


def test_stateful_nodes_keep_their_data_dir_in_their_own_volume(
    compose: dict[str, Any], nodes: list[Node], configs: dict[str, config.ServiceConfig]
) -> None:
    declared = set(compose.get("volumes") or {})
    owners: dict[str, str] = {}
    for node in nodes:
        if node.kind not in STATEFUL_KINDS:
            continue
        cfg = configs[node.name]
        assert isinstance(cfg, datanode_config.DatanodeConfig | kvcache_config.KVCacheConfig)
        data_dir = cfg.data_dir
        assert Path(data_dir).is_absolute(), f"{node.name}: data_dir {data_dir} is relative"
        mounts = _volume_mounts(node.spec)
        paths = [Path(data_dir)]
        if isinstance(cfg, datanode_config.DatanodeConfig):
            paths += cfg.drive_paths()
        for path in paths:
            assert any(path.is_relative_to(t) for t in mounts), f"{node.name}: {path} unmounted"
        volume = mounts.get(data_dir)
        assert volume is not None, f"{node.name}: no named volume at {data_dir}"
        assert volume in declared, f"{node.name}: volume {volume} is not declared"
        assert owners.setdefault(volume, node.name) == node.name, f"{volume} is shared"


def test_grpc_of_gateway_and_metadata_is_published(
    nodes: list[Node], configs: dict[str, config.ServiceConfig]
) -> None:
    host_sides: list[str] = []
    for node in nodes:
        published = _published(node.spec)
        host_sides += [host for host, _ in published]
        if node.kind in {"gateway", "metadata"}:
            assert configs[node.name].grpc_port in {c for _, c in published}, node.name
    assert len(set(host_sides)) == len(host_sides), f"a host port is published twice: {host_sides}"


def test_restart_and_stop_grace_outlast_the_drain(
    nodes: list[Node], configs: dict[str, config.ServiceConfig]
) -> None:
    for node in nodes:
        assert node.spec.get("restart") == "unless-stopped", node.name
        grace = _seconds(str(node.spec.get("stop_grace_period", "10s")))
        assert grace > configs[node.name].shutdown_grace_s, f"{node.name}: killed mid-drain"


def test_every_kvtier_service_uses_the_one_image(
    compose: dict[str, Any], nodes: list[Node]
) -> None:
    template = compose["x-kvtier-service"]
    assert template["build"]["context"] == "."
    assert (ROOT / template["build"].get("dockerfile", "Dockerfile")) == DOCKERFILE_PATH
    for node in nodes:
        assert node.spec.get("build") == template["build"], node.name
        assert node.spec.get("image") == template.get("image"), node.name


def test_dockerfile_installs_the_project(compose: dict[str, Any]) -> None:
    instructions = _dockerfile_instructions()
    # The base is a build argument: the official Python image by default, the registry-free
    # Debian one of scripts/compose_base_image.sh where no registry is reachable.
    assert instructions[0] == ("ARG", "BASE_IMAGE=python:3.11-slim-bookworm")
    stages = [args for keyword, args in instructions if keyword == "FROM"]
    assert stages[-1] == "${BASE_IMAGE}", stages
    assert all(stage.startswith("${BASE_IMAGE}") for stage in stages), stages
    build_arg = compose["x-kvtier-build"]["args"]["BASE_IMAGE"]
    assert build_arg == "${BASE_IMAGE:-python:3.11-slim-bookworm}"
    runs = " && ".join(args for keyword, args in instructions if keyword == "RUN")
    assert re.search(r"pip install --no-cache-dir \.(\s|$)", runs), runs
    for package in ("libisal2", "etcd-server", "etcd-client"):
        assert package in runs, f"the image needs {package}"
    users = [args for keyword, args in instructions if keyword == "USER"]
    assert users, "the image must not run as root"
    assert users[-1].split(":")[0] not in {"root", "0"}
    copied = _copied_sources()
    for needed in ("pyproject.toml", "libs/", "services/"):
        assert needed in copied, f"Dockerfile does not copy {needed}"
    readme = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"].get("readme")
    if readme:
        assert readme in copied, f"pip install . needs {readme}"
    for source in copied:
        assert (ROOT / source).exists(), f"Dockerfile copies missing {source}"


def test_dockerignore_keeps_state_out_and_sources_in() -> None:
    patterns = [
        line.strip()
        for line in DOCKERIGNORE_PATH.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]

    def ignored(path: str) -> bool:
        """Docker's rule: the last pattern that matches decides; `!` lets a path back in."""
        verdict = False
        for pattern in patterns:
            bare = pattern.removeprefix("!")
            if fnmatch.fnmatch(path, bare) or path.startswith(bare + "/"):
                verdict = not pattern.startswith("!")
        return verdict

    for path in (".git", ".venv", "tests", ".kvtier", ".engines", ".bench-venvs",
                 "services/__pycache__", "libs/kvtier/__pycache__"):  # fmt: skip
        assert ignored(path), f".dockerignore lets {path} in"
    for source in (s.rstrip("/") for s in _copied_sources()):
        assert not ignored(source), f".dockerignore drops {source}, which the Dockerfile copies"


def test_every_node_is_secure_with_its_own_certificate(
    services: dict[str, dict[str, Any]], nodes: list[Node], configs: dict[str, config.ServiceConfig]
) -> None:
    """Secure by default: no node runs insecure; each has the certificate the pki step issues
    for its name, mounted read-only, and waits for that step."""
    command = _command(services[PKI_SERVICE])
    issued = {arg.split(":")[1] for arg in command if arg.startswith("--node=")}
    roles = {
        arg.split("=")[1].split(":")[1]: arg.split("=")[1].split(":")[0]
        for arg in command
        if arg.startswith("--node=")
    }
    assert {"etcd", "operator"} <= issued
    for node in nodes:
        cfg = configs[node.name]
        assert not cfg.insecure, node.name
        assert cfg.tls_cert_file == f"/pki/{node.name}.crt", node.name
        assert cfg.tls_key_file == f"/pki/{node.name}.key", node.name
        assert cfg.tls_ca_file == "/pki/ca.crt", node.name
        assert node.name in issued, f"{node.name}: the pki step issues it no certificate"
        assert roles[node.name] == node.kind, node.name
        assert "pki:/pki:ro" in node.spec.get("volumes", []), node.name
        assert PKI_SERVICE in node.spec.get("depends_on", {}), node.name


def test_published_ports_listen_on_loopback_only(nodes: list[Node]) -> None:
    for node in nodes:
        for host, _ in _published(node.spec):
            assert host.startswith("127.0.0.1:"), f"{node.name}: {host} is not loopback"


def test_kvcache_nodes_publish_the_users_door_they_announce(
    nodes: list[Node], configs: dict[str, config.ServiceConfig]
) -> None:
    """The KV tier from the host (issue 17): each kvcache node publishes its client port and
    its tcp data plane on 127.0.0.1 under the numbers it listens on, and announces 127.0.0.1 to
    SDK users (its client address, its users' data-plane endpoint); nodes still dial its name."""
    kvcache = [node for node in nodes if node.kind == "kvcache"]
    assert kvcache
    for node in kvcache:
        cfg = configs[node.name]
        assert isinstance(cfg, kvcache_config.KVCacheConfig)
        assert cfg.advertised_client_host() == "127.0.0.1", node.name
        assert cfg.advertised_host() == node.name, node.name
        assert "tcp" in cfg.dataplane_transports, node.name
        for port in (cfg.client_port, cfg.dataplane_port):
            assert port > 0, f"{node.name}: a published port must be fixed"
            assert (f"127.0.0.1:{port}", port) in _published(node.spec), f"{node.name}: {port}"
        # One variable moves both sides of each mapping, and the setting the node listens on.
        for raw in node.spec["ports"]:
            mapping = str(raw).removeprefix("127.0.0.1:")
            half = len(mapping) // 2
            host_port, colon, container_port = mapping[:half], mapping[half], mapping[half + 1 :]
            assert (colon, host_port) == (":", container_port), f"{node.name}: {raw}"
            raw_env = {str(v) for v in node.spec["environment"].values()}
            assert host_port in raw_env, f"{node.name}: {raw} is no port the node listens on"


def test_the_compose_test_moves_every_published_port(services: dict[str, dict[str, Any]]) -> None:
    """Every variable of a published port is one the compose test sets to a free port."""
    used = {
        name
        for spec in services.values()
        for port in spec.get("ports", [])
        for name, _ in _VARIABLE.findall(str(port))
    }
    assert used == set(docker_env.PORT_VARIABLES)
