"""The console's logic without a cluster: sessions (expiry, logout, CSRF, the bound), its
config checks, `kvtier console`'s exit code for bad settings, the dev certificate (server
authentication only, no cluster identity), and that pages escape what they show."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from kvtier import errors, pki
from kvtier.cli import main as cli_main
from kvtier.console import cli as console_cli
from kvtier.console import config, pages, sessions


def _new(store: sessions.SessionStore, ttl_s: float = 60.0) -> sessions.Session:
    return store.create(access_key="AK", tenant="t", is_admin=False, token="tok", ttl_s=ttl_s)


def test_session_lookup_logout_and_expiry() -> None:
    store = sessions.SessionStore()
    live, short = _new(store), _new(store, ttl_s=0.05)
    assert store.get(live.session_id) is live
    assert store.get("not-a-session") is None
    time.sleep(0.1)
    assert store.get(short.session_id) is None  # expired: gone
    store.end(live.session_id)
    assert store.get(live.session_id) is None
    store.end(live.session_id)  # idempotent


def test_session_csrf_and_secrets_not_in_repr() -> None:
    session = _new(sessions.SessionStore())
    assert session.csrf_ok(session.csrf)
    assert not session.csrf_ok("")
    assert not session.csrf_ok(session.csrf[:-1] + "x")
    assert session.session_id != session.csrf
    text = repr(session)
    assert "tok" not in text
    assert session.csrf not in text
    assert session.session_id not in text


def test_session_store_is_bounded() -> None:
    store = sessions.SessionStore(max_sessions=3)
    first = _new(store)
    for _ in range(3):
        _new(store)
    assert len(store) == 3
    assert store.get(first.session_id) is None  # the oldest went


@pytest.mark.parametrize(
    "change",
    [
        {"tls_cert_file": ""},
        {"ca_file": ""},
        {"metadata_address": ""},
        {"session_ttl_s": 0.5},
        {"session_ttl_s": 50_000.0},
        {"port": 70_000},
        {"max_upload_bytes": 0},
    ],
)
def test_config_refuses_bad_settings(change: dict[str, object]) -> None:
    good: dict[str, object] = {
        "tls_cert_file": "c", "tls_key_file": "k", "ca_file": "ca", "metadata_address": "h:1",
    }  # fmt: skip
    config.ConsoleConfig(**good)  # type: ignore[arg-type]
    with pytest.raises(errors.InvalidArgument):
        config.ConsoleConfig(**{**good, **change})  # type: ignore[arg-type]


def test_cli_bad_settings_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    flags = ["--metadata", "127.0.0.1:1", "--ca-file", str(tmp_path / "ca.crt")]
    flags += ["--tls-cert-file", str(tmp_path / "c"), "--tls-key-file", str(tmp_path / "k")]
    code = cli_main.main(["console", "--state-dir", str(tmp_path), *flags, "--session-ttl-s", "0"])
    assert code == 2
    assert "session_ttl_s" in capsys.readouterr().err
    code = cli_main.main(["console", "--state-dir", str(tmp_path), *flags])  # no such files
    assert code == 2
    assert "console TLS files" in capsys.readouterr().err


def test_dev_certificate_is_server_only(tmp_path: Path) -> None:
    pki.write_authority(tmp_path / "pki", pki.new_authority("c1"))
    cert_path, key_path = console_cli.dev_certificate(tmp_path, ["127.0.0.1", "localhost"])
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert pki.identity_of(cert) is None  # no spiffe role: it is no cluster identity
    assert key_path.stat().st_mode & 0o077 == 0
    assert console_cli.dev_certificate(tmp_path, ["x"]) == (cert_path, key_path)  # made once


def test_pages_escape_values() -> None:
    session = _new(sessions.SessionStore())
    evil = '<script>alert("x")</script>'
    page = pages.buckets_page([], session, message=evil, error=evil)
    assert "<script>" not in page
    assert "&lt;script&gt;" in page
    assert pages.csrf_field('"><x') == '<input type="hidden" name="csrf" value="&quot;&gt;&lt;x">'
