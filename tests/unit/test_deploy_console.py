"""The operator console in the Kubernetes manifests (deploy/kustomize/base/console.yaml), offline:
its command line loads through `kvtier console`'s own parser and config, the metadata address is
the metadata Service's users' port under a name its certificate covers, the probes ask a public
page over HTTPS on the served port, the NetworkPolicies let it reach exactly the users' ports it
calls, and its certificate comes from the documented Secret. The Kubernetes schema validation,
security context, probes and one-policy-per-component checks are test_deploy_manifests.py's,
which cover the console's objects like the others'."""

from __future__ import annotations

from typing import Any

import pytest

from kvtier.cli import main as cli_main
from kvtier.console import app as console_app
from kvtier.console import cli as console_cli
from kvtier.console import config as console_config
from tests.unit import test_deploy_manifests as manifests

OVERLAYS = manifests.OVERLAYS


def _console(overlay: str) -> dict[str, Any]:
    return manifests._workload(overlay, "console")


def _args(container: dict[str, Any]) -> list[str]:
    command = list(container["command"])
    assert command[:3] == ["python", "-m", "kvtier.cli.main"], command
    return command[3:]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_console_command_loads_through_its_own_config(overlay: str) -> None:
    container = manifests._main_container(_console(overlay))
    args = cli_main._parser().parse_args(_args(container))
    assert args.command == "console"
    cfg = console_cli.load_config(args)  # no state dir: everything comes from the flags
    assert cfg.host == "0.0.0.0"
    served = {p["containerPort"] for p in container["ports"]}
    assert served == {cfg.port} == {console_config.DEFAULT_PORT}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in _console(overlay)["spec"]["template"]["spec"]["volumes"]}
    for path in (cfg.ca_file, cfg.tls_cert_file, cfg.tls_key_file):
        mount = next(m for m in mounts if path.startswith(m + "/"))
        assert volumes[mounts[mount]]["secret"]["secretName"] == "kvtier-console-tls"
    # The metadata Service's users' port, by the name its certificate covers (operations.md).
    host, port = cfg.metadata_address.rsplit(":", 1)
    assert host == "kvtier-metadata.kvtier.svc"
    (service,) = [
        s
        for s in manifests._objects(overlay, "Service")
        if s["metadata"]["name"] == "kvtier-metadata"
    ]
    assert int(port) in {p["port"] for p in service["spec"]["ports"] if p["name"] == "client"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_console_probes_ask_a_public_page_over_https(overlay: str) -> None:
    container = manifests._main_container(_console(overlay))
    names = {p["name"]: p["containerPort"] for p in container["ports"]}
    for probe in ("readinessProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        assert get["scheme"] == "HTTPS"
        assert names[get["port"]] == console_config.DEFAULT_PORT
        assert get["path"] in console_app._PUBLIC  # no session needed, the cluster not asked
    (service,) = [
        s
        for s in manifests._objects(overlay, "Service")
        if s["metadata"]["name"] == "kvtier-console"
    ]
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["https"]


def _admits(policy: dict[str, Any], labels: dict[str, str], port: int) -> bool:
    for rule in policy["spec"].get("ingress", []):
        ports = {p["port"] for p in rule.get("ports", [])}
        peers = rule.get("from", [])
        if port in ports and any(
            "namespaceSelector" not in peer and manifests._selects(peer["podSelector"], labels)
            for peer in peers
        ):
            return True
    return False


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies_let_the_console_reach_the_users_ports_only(overlay: str) -> None:
    labels = _console(overlay)["spec"]["template"]["metadata"]["labels"]
    policies = {p["metadata"]["name"]: p for p in manifests._objects(overlay, "NetworkPolicy")}
    own = policies["kvtier-console"]
    egress = {
        (peer["podSelector"]["matchLabels"]["app.kubernetes.io/component"], p["port"])
        for rule in own["spec"]["egress"]
        for peer in rule["to"]
        for p in rule["ports"]
    }
    assert egress == {
        ("metadata", 7443), ("gateway", 7443), ("gateway", 7100), ("kvcache", 7443)
    }  # fmt: skip
    for component, port in egress:  # each of them lets the console in on that port
        assert _admits(policies[f"kvtier-{component}"], labels, port), (component, port)
    for component in ("metadata", "gateway", "kvcache", "datanode"):
        # never the mutual-TLS port (the console has no cluster certificate anyway)
        assert not _admits(policies[f"kvtier-{component}"], labels, 7000), component
    assert "kvtier-etcd" not in policies or not _admits(policies["kvtier-etcd"], labels, 2379)
    (ingress,) = own["spec"]["ingress"]
    assert ingress["from"], "the console is not open to any source"
