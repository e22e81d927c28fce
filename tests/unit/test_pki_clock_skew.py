"""Certificates a peer with a lagging clock accepts at once (issue 16, clock skew on datanodes).

A node's TLS stack checks a peer's certificate against its own wall clock (OpenSSL, real
`time()`): a node 10 min behind refused every certificate issued less than 5 min ago (its
notBefore was backdated 5 min), so for 5 min after a cluster was set up, a node joined or a
certificate was rotated, a lagging datanode refused the gateways' connections. Checked with
`openssl verify -attime`, the check a TLS handshake makes, at the peer's (skewed) time.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest

from kvtier import pki

#: The skew the fault suite runs datanodes and gateways at, and the datanodes' bound on stamps.
SKEWS_S = (600, 1790)


def _verify_at(tmp_path: Path, ca_pem: bytes, cert_pem: bytes, at_s: int) -> str:
    (tmp_path / "ca.pem").write_bytes(ca_pem)
    (tmp_path / "cert.pem").write_bytes(cert_pem)
    done = subprocess.run(
        ["openssl", "verify", "-attime", str(at_s), "-CAfile", str(tmp_path / "ca.pem"),
         str(tmp_path / "cert.pem")],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    return done.stdout + done.stderr


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
@pytest.mark.parametrize("skew_s", SKEWS_S)
def test_a_peer_behind_accepts_a_certificate_issued_now(tmp_path: Path, skew_s: int) -> None:
    authority = pki.new_authority("skew")
    cert_pem, _ = authority.issue("gateway", "gw-1", hosts=["127.0.0.1"])
    behind = int(time.time()) - skew_s
    assert ": OK" in _verify_at(tmp_path, authority.cert_pem, cert_pem, behind)
    # The check is real: long before the CA existed, nothing verifies.
    assert ": OK" not in _verify_at(tmp_path, authority.cert_pem, cert_pem, behind - 86400)
