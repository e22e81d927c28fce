"""HTTPS for S3: the context's TLS floor, the certificate it serves, its reload when the files are
replaced (new handshakes get the new certificate, a half-written pair is not loaded), and the
gateway's S3 TLS settings."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import pytest

from kvtier import config, errors, pki
from services.gateway import config as gateway_config
from services.gateway.s3 import tls as s3_tls

CLUSTER = "s3-tls-test"


@pytest.fixture
def authority(tmp_path: Path) -> pki.Authority:
    ca = pki.new_authority(CLUSTER)
    pki.write_authority(tmp_path, ca)
    return ca


def _issue(ca: pki.Authority, directory: Path, stem: str = "gateway") -> bytes:
    """A fresh gateway certificate in directory/<stem>.crt/.key; returns its PEM."""
    pair = ca.issue("gateway", "gw-1", hosts=["127.0.0.1", "localhost"])
    pki.write_pair(directory, stem, pair)
    return pair[0]


async def _served(tls: s3_tls.S3TLS, ca_file: Path, **client: object) -> bytes:
    """The certificate (DER) a new TLS connection to a server with tls's context sees."""

    async def noop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(noop, "127.0.0.1", 0, ssl=tls.context)
    port = server.sockets[0].getsockname()[1]
    context = ssl.create_default_context(cafile=str(ca_file))
    for name, value in client.items():
        setattr(context, name, value)
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        writer.close()
        return bytes(der)
    finally:
        server.close()
        await server.wait_closed()


def _der(pem: bytes) -> bytes:
    return ssl.PEM_cert_to_DER_cert(pem.decode())


async def test_a_replaced_certificate_is_served_on_new_connections(
    tmp_path: Path, authority: pki.Authority
) -> None:
    first = _issue(authority, tmp_path)
    tls = s3_tls.S3TLS(
        pki.CertificateFiles("", str(tmp_path / "gateway.crt"), str(tmp_path / "gateway.key"))
    )
    ca_file = tmp_path / pki.CA_CERT
    assert await _served(tls, ca_file) == _der(first)
    assert not tls.reload_if_changed()  # nothing changed

    second = _issue(authority, tmp_path)
    assert tls.reload_if_changed()
    assert await _served(tls, ca_file) == _der(second)

    # Another consumer of the same files (gRPC's credentials) may see the change first:
    # the generation, not refresh()'s answer, tells the S3 context to reload.
    third = _issue(authority, tmp_path)
    assert tls.files.refresh()
    assert tls.reload_if_changed()
    assert await _served(tls, ca_file) == _der(third)


async def test_a_half_written_pair_keeps_the_previous_certificate(
    tmp_path: Path, authority: pki.Authority
) -> None:
    first = _issue(authority, tmp_path)
    tls = s3_tls.S3TLS.from_files(str(tmp_path / "gateway.crt"), str(tmp_path / "gateway.key"))
    other = authority.issue("gateway", "gw-2", hosts=["127.0.0.1"])
    (tmp_path / "gateway.crt").write_bytes(other[0])  # its key is not written yet
    assert not tls.reload_if_changed()
    assert await _served(tls, tmp_path / pki.CA_CERT) == _der(first)
    (tmp_path / "gateway.key").write_bytes(other[1])
    assert tls.reload_if_changed()
    assert await _served(tls, tmp_path / pki.CA_CERT) == _der(other[0])


async def test_tls_1_2_is_the_floor(tmp_path: Path, authority: pki.Authority) -> None:
    pem = _issue(authority, tmp_path)
    tls = s3_tls.S3TLS.from_files(str(tmp_path / "gateway.crt"), str(tmp_path / "gateway.key"))
    assert tls.context.minimum_version == ssl.TLSVersion.TLSv1_2
    only_1_2 = ssl.TLSVersion.TLSv1_2
    assert await _served(tls, tmp_path / pki.CA_CERT, maximum_version=only_1_2) == _der(pem)


def test_unusable_files_are_refused(tmp_path: Path, authority: pki.Authority) -> None:
    with pytest.raises(errors.InvalidArgument):
        s3_tls.S3TLS.from_files(str(tmp_path / "none.crt"), str(tmp_path / "none.key"))
    _issue(authority, tmp_path)
    (tmp_path / "gateway.key").write_bytes(authority.issue("gateway", "x")[1])
    with pytest.raises(errors.InvalidArgument):
        s3_tls.S3TLS.from_files(str(tmp_path / "gateway.crt"), str(tmp_path / "gateway.key"))


def _gateway(**settings: object) -> gateway_config.GatewayConfig:
    return gateway_config.GatewayConfig(
        tls_ca_file="ca",
        tls_cert_file="c",
        tls_key_file="k",
        **settings,  # type: ignore[arg-type]
    )


def test_s3_tls_settings() -> None:
    cfg = _gateway()
    assert (cfg.s3_plain_http, cfg.s3_tls_cert_file, cfg.host) == (False, "", "127.0.0.1")
    _gateway(s3_tls_cert_file="s3.crt", s3_tls_key_file="s3.key")
    _gateway(s3_plain_http=True)
    with pytest.raises(config.ConfigError, match="both or neither"):
        _gateway(s3_tls_cert_file="s3.crt")
    with pytest.raises(config.ConfigError, match="plain HTTP"):
        _gateway(s3_tls_cert_file="s3.crt", s3_tls_key_file="s3.key", s3_plain_http=True)
    with pytest.raises(config.ConfigError, match="plain HTTP"):
        gateway_config.GatewayConfig(
            insecure=True, s3_tls_cert_file="s3.crt", s3_tls_key_file="s3.key"
        )
