"""Session tokens and certificates: the signed exchange, minting, verification, rotation."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from kvtier import errors, pki, tokens
from kvtier.proto.auth.v1 import auth_pb2

SECRET = "s3cr3t-s3cr3t-s3cr3t"


@pytest.fixture(scope="module")
def authority() -> pki.Authority:
    return pki.new_authority("unit")


def _material(authority: pki.Authority, role: str = "metadata") -> pki.Material:
    cert, key = authority.issue(role, f"{role}-1", hosts=["127.0.0.1"])
    return pki.Material(authority.cert_pem, cert, key)


def test_certificates_name_cluster_role_and_name(authority: pki.Authority) -> None:
    material = _material(authority, "kvcache")
    assert material.identity == pki.CertIdentity("unit", "kvcache", "kvcache-1")
    pki.check_pair(material.cert_pem, material.key_pem)
    other_key = authority.issue("kvcache", "x")[1]
    with pytest.raises(errors.InvalidArgument):
        pki.check_pair(material.cert_pem, other_key)
    with pytest.raises(errors.InvalidArgument):
        authority.issue("root", "x")
    with pytest.raises(errors.InvalidArgument):
        authority.issue("kvcache", "a/b")
    assert pki.parse_uri("spiffe://unit/kvcache") is None
    assert pki.parse_uri("https://unit/kvcache/x") is None


def test_signed_request_is_checked(authority: pki.Authority) -> None:
    checker = tokens.RequestChecker()
    request = tokens.sign_request("AK", SECRET, duration_s=120)
    assert checker.check(request, SECRET) == 120
    with pytest.raises(errors.Unauthenticated, match="replayed"):
        checker.check(request, SECRET)
    with pytest.raises(errors.Unauthenticated, match="signature"):
        checker.check(tokens.sign_request("AK", SECRET), "another-secret")
    stale = tokens.sign_request("AK", SECRET, now=tokens.now_ms() - 600_000)
    with pytest.raises(errors.Unauthenticated, match="clock"):
        checker.check(stale, SECRET)
    tampered = tokens.sign_request("AK", SECRET)
    tampered.duration_s = 43_200  # signed with 0
    with pytest.raises(errors.Unauthenticated):
        checker.check(tampered, SECRET)
    with pytest.raises(errors.InvalidArgument):
        checker.check(tokens.sign_request("AK", SECRET, duration_s=10**6), SECRET)
    short_nonce = tokens.sign_request("AK", SECRET)
    short_nonce.nonce = "x"
    with pytest.raises(errors.Unauthenticated, match="nonce"):
        checker.check(short_nonce, SECRET)


def test_token_round_trip_and_refusals(authority: pki.Authority) -> None:
    issuer = tokens.TokenIssuer(_material(authority))
    verifier = tokens.TokenVerifier(lambda: authority.cert_pem)
    text, expires = issuer.mint(
        access_key="AK", tenant="team-a", is_admin=False, shm_trusted=True, duration_s=60
    )
    who = verifier.verify(text)
    assert (who.name, who.tenant, who.is_admin, who.shm_trusted) == ("AK", "team-a", False, True)
    assert verifier.verify(text) is who  # cached
    assert expires > tokens.now_ms()
    # Expired.
    old, _ = issuer.mint(
        access_key="AK", tenant="t", is_admin=False, shm_trusted=False, duration_s=60,
        now=tokens.now_ms() - 120_000,
    )  # fmt: skip
    with pytest.raises(errors.Unauthenticated, match="expired"):
        verifier.verify(old)
    # Claims altered after signing (tenant swapped): the signature no longer verifies.
    signed = tokens.decode(text)
    claims = auth_pb2.TokenClaims.FromString(signed.claims)
    claims.tenant, claims.is_admin = "victim", True
    signed.claims = claims.SerializeToString()
    with pytest.raises(errors.Unauthenticated, match="signature"):
        verifier.verify(tokens.encode(signed))
    # Garbage.
    for bad in ("", "kvt1.", "kvt1.!!!", "Bearer x", "kvt1." + "A" * 10_000):
        with pytest.raises(errors.Unauthenticated):
            verifier.verify(bad)


def test_only_metadata_and_gateway_certificates_of_this_cluster_issue(
    authority: pki.Authority,
) -> None:
    with pytest.raises(errors.InvalidArgument):
        tokens.TokenIssuer(_material(authority, "kvcache"))
    verifier = tokens.TokenVerifier(lambda: authority.cert_pem)
    # A token signed by another cluster's gateway.
    foreign = pki.new_authority("other")
    text, _ = tokens.TokenIssuer(_material(foreign, "gateway")).mint(
        access_key="AK", tenant="t", is_admin=True, shm_trusted=True, duration_s=60
    )
    with pytest.raises(errors.Unauthenticated, match="not certified"):
        verifier.verify(text)
    # A kvcache node's key signing claims, dressed up with its own certificate.
    kv = _material(authority, "kvcache")
    forged = tokens.decode(
        tokens.TokenIssuer(_material(authority, "gateway")).mint(
            access_key="AK", tenant="t", is_admin=False, shm_trusted=False, duration_s=60
        )[0]
    )
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = serialization.load_pem_private_key(kv.key_pem, None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    forged.signature = key.sign(forged.claims, ec.ECDSA(hashes.SHA256()))
    forged.issuer_certificate = x509.load_pem_x509_certificate(kv.cert_pem).public_bytes(
        serialization.Encoding.DER
    )
    with pytest.raises(errors.Unauthenticated, match="may not issue"):
        verifier.verify(tokens.encode(forged))


def test_certificate_files_reload_when_replaced(tmp_path: Path, authority: pki.Authority) -> None:
    pki.write_authority(tmp_path, authority)
    cert, key = pki.write_pair(tmp_path, "gw", authority.issue("gateway", "gw"))
    files = pki.CertificateFiles(str(tmp_path / pki.CA_CERT), str(cert), str(key))
    first = files.material.cert_pem
    assert not files.refresh()
    # A half-written rotation (new certificate, old key) is ignored until the pair matches.
    new_cert, new_key = authority.issue("gateway", "gw")
    cert.write_bytes(new_cert)
    os.utime(cert, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
    assert not files.refresh()
    assert files.material.cert_pem == first
    key.write_bytes(new_key)
    os.utime(key, ns=(time.time_ns() + 2 * 10**9, time.time_ns() + 2 * 10**9))
    assert files.refresh()
    assert files.material.cert_pem == new_cert
    assert files.generation == 2
    assert pki.is_current(tmp_path, "gw", authority, days_left=30)
    assert not pki.is_current(tmp_path, "gw", authority, days_left=400)
    assert (os.stat(key).st_mode & 0o777) == 0o600
