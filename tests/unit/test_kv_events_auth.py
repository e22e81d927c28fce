"""The KV-event subscriber registry (services/kvcache/eventsauth.py) and kv_events_auth:
registrations expire, are bounded, take only well-formed public keys; CURVE is the default of a
secure cluster, `none` an explicit opt-in, and an insecure cluster is always `none`."""

from __future__ import annotations

from typing import Any

import pytest
import zmq

from kvtier import authz, config, errors, principal
from services.kvcache import config as kvcache_config
from services.kvcache import eventsauth

TLS: dict[str, Any] = {
    "tls_ca_file": "/pki/ca.crt",
    "tls_cert_file": "/pki/node.crt",
    "tls_key_file": "/pki/node.key",
}


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _key() -> str:
    return zmq.curve_keypair()[0].decode()


def test_a_registration_admits_a_key_until_it_expires_and_renews() -> None:
    clock = Clock()
    keys = eventsauth.SubscriberKeys(ttl_s=10.0, clock=clock)
    assert len(keys.public_key) == eventsauth.Z85_KEY_CHARS
    key = _key()
    assert not keys.callback("", key.encode())  # never registered
    assert keys.authorize(key) == 10.0
    clock.now += 9.0
    assert keys.callback("", key.encode())
    keys.authorize(key)  # renewed from now
    clock.now += 9.0
    assert keys.admitted(key.encode())
    clock.now += 1.0
    assert not keys.admitted(key.encode())
    assert not keys.admitted(key.encode())  # and forgotten


def test_registrations_are_bounded_the_oldest_goes() -> None:
    keys = eventsauth.SubscriberKeys(ttl_s=10.0, max_keys=3)
    made = [_key() for _ in range(4)]
    for key in made:
        keys.authorize(key)
    assert [keys.admitted(k.encode()) for k in made] == [False, True, True, True]


@pytest.mark.parametrize(
    "bad",
    ["", "x" * 39, "x" * 41, "é" * 40, " " * 40, "#" * 40, "~" * 40],
)
def test_only_a_z85_public_key_is_taken(bad: str) -> None:
    keys = eventsauth.SubscriberKeys(ttl_s=10.0)
    with pytest.raises(errors.InvalidArgument, match="client_public_key"):
        keys.authorize(bad)


def test_each_node_start_makes_a_new_key_pair() -> None:
    first = eventsauth.SubscriberKeys(ttl_s=1.0)
    second = eventsauth.SubscriberKeys(ttl_s=1.0)
    assert first.public_key != second.public_key


def test_curve_by_default_on_a_secure_cluster_never_on_an_insecure_one() -> None:
    secure = kvcache_config.KVCacheConfig(**TLS)
    assert secure.kv_events_auth == "curve"
    assert secure.events_authenticated()
    assert not kvcache_config.KVCacheConfig(**TLS, kv_events_auth="none").events_authenticated()
    assert not kvcache_config.KVCacheConfig(insecure=True).events_authenticated()
    with pytest.raises(config.ConfigError, match="kv_events_auth"):
        kvcache_config.KVCacheConfig(**TLS, kv_events_auth="plain")
    with pytest.raises(config.ConfigError, match="kv_events_key_ttl_s"):
        kvcache_config.KVCacheConfig(**TLS, kv_events_key_ttl_s=0)


def test_only_operators_and_admins_may_authorize_subscribers() -> None:
    path = "/kvtier.kvcache.v1.KVCacheService/AuthorizeEventsSubscriber"
    with pytest.raises(errors.PermissionDenied):
        authz.check(path, principal.user("AK", "team-a", is_admin=False, shm_trusted=False))
    for service in principal.SERVICE_ROLES:  # not even the cluster's own nodes
        with pytest.raises(errors.PermissionDenied):
            authz.check(path, principal.service(service, "node"))
    authz.check(path, principal.user("ADM", "default", is_admin=True, shm_trusted=False))
    authz.check(path, principal.service("operator", "alice"))
