"""The engine plugins' credential settings (`kvtier.integrations.keys.TierSettings`): what the
config names, what falls back to KVTIER_* variables, and that a secret never shows."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from kvtier import security
from kvtier.integrations import keys
from tests import pki as test_pki

SECRET = "s3cr3t-value-never-shown"
CA = test_pki.session().ca_file


def _settings(**values: object) -> keys.TierSettings:
    return keys.TierSettings.from_mapping({"metadata": "10.0.0.5:7443", **values})


def _secret_file(tmp_path: Path, mode: int = 0o600, text: str = SECRET + "\n") -> str:
    path = tmp_path / "user.secret"
    path.write_text(text)
    os.chmod(path, mode)
    return str(path)


def test_no_credential_setting_leaves_the_sdk_its_environment_default() -> None:
    settings = _settings(tenant="team-a")
    assert settings.client_security({}) is None
    assert "security" not in settings.client_kwargs("m")
    assert settings.identity() == "the KVTIER_* environment"


def test_a_user_from_the_config_replaces_the_environments_certificate(tmp_path: Path) -> None:
    operator = test_pki.session()
    env = {security.ENV_CA_FILE: CA, security.ENV_CERT_FILE: operator.cert("operator"),
           security.ENV_KEY_FILE: operator.key("operator")}  # fmt: skip
    settings = _settings(access_key="AKUSER", secret_key_file=_secret_file(tmp_path))
    made = settings.client_security(env)
    assert made is not None
    assert (made.access_key, made.secret_key, made.ca_file) == ("AKUSER", SECRET, CA)
    assert not made.has_cert
    assert made.has_user
    assert settings.identity() == "user AKUSER"


def test_the_secret_may_come_from_the_environment_for_the_same_user() -> None:
    env = {security.ENV_SECRET_KEY: SECRET}
    made = _settings(ca_file=CA, access_key="AKUSER").client_security(env)
    assert made is not None
    assert made.secret_key == SECRET
    assert made.ca_file == CA
    other_user = {**env, security.ENV_ACCESS_KEY: "AKOTHER"}
    with pytest.raises(ValueError, match="needs secret_key_file") as raised:
        _settings(access_key="AKUSER").client_security(other_user)
    assert SECRET not in str(raised.value)


def test_trust_from_the_config_identity_from_the_environment() -> None:
    env = {security.ENV_ACCESS_KEY: "AKENV", security.ENV_SECRET_KEY: SECRET}
    made = _settings(ca_file=CA, token_address="10.0.0.5:7443").client_security(env)
    assert made is not None
    assert (made.ca_file, made.access_key, made.token_address) == (CA, "AKENV", "10.0.0.5:7443")


def test_a_cluster_file_gives_the_ca_the_admin_user_and_the_token_issuer(tmp_path: Path) -> None:
    cluster = tmp_path / "cluster.json"
    cluster.write_text(json.dumps({"ca_file": CA, "s3_access_key": "AKADMIN",
                                   "s3_secret_key": SECRET, "metadata_client": "h:1"}))  # fmt: skip
    made = _settings(cluster_file=str(cluster)).client_security({})
    assert made is not None
    assert (made.ca_file, made.access_key, made.secret_key) == (CA, "AKADMIN", SECRET)
    assert made.token_address == "h:1"
    cluster.write_text(json.dumps({"insecure": True}))
    insecure = _settings(cluster_file=str(cluster)).client_security({})
    assert insecure is not None
    assert insecure.insecure


def test_a_certificate_from_the_config_is_mutual_tls(tmp_path: Path) -> None:
    env = {security.ENV_ACCESS_KEY: "AKENV", security.ENV_SECRET_KEY: SECRET}
    made = _settings(insecure="true", cert_file="/c.crt", key_file="/c.key").client_security(env)
    assert made is not None
    assert (made.cert_file, made.access_key, made.insecure) == ("/c.crt", "", True)


@pytest.mark.parametrize(
    ("values", "match"),
    [
        ({"access_key": "AK", "secret_key": SECRET, "secret_key_file": "/f"}, "not both"),
        ({"secret_key": SECRET}, "needs its access_key"),
        ({"cert_file": "/c.crt"}, "together"),
        ({"access_key": "AK", "cert_file": "/c", "key_file": "/k"}, "not both"),
        ({"insecure": "maybe"}, "true or false"),
    ],
)
def test_settings_that_cannot_work_raise(values: dict[str, str], match: str) -> None:
    with pytest.raises(ValueError, match=match) as raised:
        _settings(**values)
    assert SECRET not in str(raised.value)


def test_a_secret_file_must_be_private_and_not_empty(tmp_path: Path) -> None:
    loose = _settings(access_key="AK", secret_key_file=_secret_file(tmp_path, mode=0o640))
    with pytest.raises(ValueError, match="mode 0640") as raised:
        loose.client_security({})
    assert SECRET not in str(raised.value)
    empty = _settings(access_key="AK", secret_key_file=_secret_file(tmp_path, text="\n"))
    with pytest.raises(ValueError, match="empty"):
        empty.client_security({})
    missing = _settings(access_key="AK", secret_key_file=str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="nope"):
        missing.client_security({})


def test_no_repr_shows_the_secret(tmp_path: Path) -> None:
    settings = _settings(access_key="AKUSER", secret_key=SECRET)
    assert SECRET not in repr(settings)
    kwargs = settings.client_kwargs("model")
    assert kwargs["security"].secret_key == SECRET
    assert SECRET not in repr(kwargs)


def test_checksum_verification_is_on_unless_the_config_turns_it_off() -> None:
    assert _settings().client_kwargs("m")["verify_checksums"] is True
    assert _settings(verify_checksums="false").client_kwargs("m")["verify_checksums"] is False
    assert _settings(verify_checksums=False).verify_checksums is False
    with pytest.raises(ValueError, match="verify_checksums"):
        _settings(verify_checksums="sometimes")
