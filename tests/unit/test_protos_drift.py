"""The checked-in generated code must equal what `make protos` produces from protos/."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CHECKED_IN = ROOT / "libs" / "kvtier" / "proto"


def _files(base: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(base)): p.read_bytes()
        for p in sorted(base.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }


def test_generated_code_matches_the_protos(tmp_path: Path) -> None:
    out = tmp_path / "proto"
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_protos.py"), str(out)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    fresh, kept = _files(out), _files(CHECKED_IN)
    assert sorted(fresh) == sorted(kept), "generated file set differs: run `make protos`"
    stale = [name for name in fresh if fresh[name] != kept[name]]
    assert not stale, f"generated code is stale, run `make protos`: {stale}"


def test_every_proto_package_is_versioned_and_generated() -> None:
    protos = sorted((ROOT / "protos").rglob("*.proto"))
    assert {p.parent.parent.name for p in protos} >= {
        "common",
        "metadata",
        "datanode",
        "kvcache",
        "gateway",
    }
    for proto in protos:
        rel = proto.relative_to(ROOT / "protos")
        package = ".".join(rel.parent.parts)
        assert rel.parent.name == "v1"
        assert f"package {package};" in proto.read_text()
        module = "kvtier.proto." + ".".join(rel.parent.parts[1:]) + f".{proto.stem}_pb2"
        assert importlib.util.find_spec(module) is not None, module
