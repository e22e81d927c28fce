"""S3 lifecycle configurations: the XML (parse, validation as S3 answers it, render), what a
rule matches, and the expiry arithmetic (days rounded up to the next midnight UTC)."""

from __future__ import annotations

import datetime
from typing import Any

import pytest

from kvtier.proto.metadata.v1 import metadata_pb2
from services.gateway import lifecycle
from services.gateway.s3 import lifecycle_ops, s3errors

NS = 'xmlns="http://s3.amazonaws.com/doc/2006-03-01/"'


def _doc(*rules: str) -> bytes:
    return f"<LifecycleConfiguration {NS}>{''.join(rules)}</LifecycleConfiguration>".encode()


def _rule(body: str, *, status: str = "Enabled", rule_id: str = "r") -> str:
    ident = f"<ID>{rule_id}</ID>" if rule_id else ""
    return f"<Rule>{ident}<Status>{status}</Status>{body}</Rule>"


def _utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> float:
    return datetime.datetime(year, month, day, hour, minute, tzinfo=datetime.UTC).timestamp()


def _code(body: bytes) -> tuple[str, int]:
    with pytest.raises(s3errors.S3Error) as exc:
        lifecycle_ops.parse(body)
    return exc.value.code, exc.value.status


def test_parse_every_filter_form() -> None:
    config = lifecycle_ops.parse(
        _doc(
            _rule("<Filter><Prefix>logs/</Prefix></Filter><Expiration><Days>3</Days></Expiration>"),
            _rule(
                "<Filter><And><Prefix>tmp/</Prefix><Tag><Key>k</Key><Value>v</Value></Tag>"
                "<Tag><Key>e</Key><Value></Value></Tag>"
                "<ObjectSizeGreaterThan>10</ObjectSizeGreaterThan>"
                "<ObjectSizeLessThan>1000</ObjectSizeLessThan></And></Filter>"
                "<Expiration><Date>2030-01-02T00:00:00.000Z</Date></Expiration>",
                rule_id="two",
                status="Disabled",
            ),
            _rule(
                "<Prefix>legacy/</Prefix><AbortIncompleteMultipartUpload><DaysAfterInitiation>"
                "7</DaysAfterInitiation></AbortIncompleteMultipartUpload>",
                rule_id="",
            ),
            _rule("<Filter/><Expiration><Days>1</Days></Expiration>", rule_id="all"),
        )
    )
    first, second, third, fourth = config.rules
    assert (first.id, first.enabled, first.prefix, first.expiration_days) == ("r", True, "logs/", 3)
    assert not second.enabled
    assert (second.prefix, dict(second.tags)) == ("tmp/", {"k": "v", "e": ""})
    assert (second.object_size_greater_than, second.object_size_less_than) == (10, 1000)
    assert second.expiration_date_unix_s == int(_utc(2030, 1, 2))
    assert third.prefix == "legacy/"
    assert third.abort_incomplete_multipart_days == 7
    assert len(third.id) == 16  # generated when absent, as S3 does
    assert fourth.prefix == ""
    assert not fourth.tags


def test_render_round_trips() -> None:
    source = _doc(
        _rule("<Filter><Prefix>logs/</Prefix></Filter><Expiration><Days>3</Days></Expiration>"),
        _rule(
            "<Filter><And><Prefix>a/</Prefix><Tag><Key>k</Key><Value>v</Value></Tag></And>"
            "</Filter><Expiration><Date>2030-01-02T00:00:00Z</Date></Expiration>",
            rule_id="b",
            status="Disabled",
        ),
        _rule(
            "<Filter><ObjectSizeLessThan>5</ObjectSizeLessThan></Filter>"
            "<AbortIncompleteMultipartUpload><DaysAfterInitiation>4</DaysAfterInitiation>"
            "</AbortIncompleteMultipartUpload>",
            rule_id="c",
        ),
    )
    config = lifecycle_ops.parse(source)
    rendered = lifecycle_ops.render(config)
    assert b"<Date>2030-01-02T00:00:00.000Z</Date>" in rendered
    assert b"<And><Prefix>a/</Prefix><Tag><Key>k</Key><Value>v</Value></Tag></And>" in rendered
    assert b"<Filter><ObjectSizeLessThan>5</ObjectSizeLessThan></Filter>" in rendered
    assert lifecycle_ops.parse(rendered) == config


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"<Other/>", ("MalformedXML", 400)),
        (b"not xml", ("MalformedXML", 400)),
        (_doc(), ("MalformedXML", 400)),  # no Rule
        (_doc(_rule("<Expiration><Days>1</Days></Expiration>")), ("MalformedXML", 400)),
        (
            _doc(_rule("<Filter/><Prefix/><Expiration><Days>1</Days></Expiration>")),
            ("MalformedXML", 400),
        ),
        (
            _doc(_rule("<Filter/><Expiration><Days>1</Days></Expiration>", status="enabled")),
            ("MalformedXML", 400),
        ),
        (
            _doc(_rule("<Filter/><Expiration><Days>1</Days><Date>2030-01-01</Date></Expiration>")),
            ("MalformedXML", 400),
        ),
        (_doc(_rule("<Filter/><Expiration><Days>x</Days></Expiration>")), ("MalformedXML", 400)),
        (_doc(_rule("<Filter/><Expiration></Expiration>")), ("MalformedXML", 400)),
        (
            _doc(_rule("<Filter><Prefix/><Tag><Key>k</Key></Tag></Filter><Expiration><Days>1"
                       "</Days></Expiration>")),
            ("MalformedXML", 400),
        ),  # two conditions need an And
        (_doc(_rule("<Filter/><Bogus/><Expiration><Days>1</Days></Expiration>")), ("MalformedXML", 400)),  # noqa: E501
        (_doc(_rule("<Filter/><Expiration><Days>0</Days></Expiration>")), ("InvalidArgument", 400)),
        (_doc(_rule("<Filter/><Expiration><Days>-3</Days></Expiration>")), ("InvalidArgument", 400)),  # noqa: E501
        (
            _doc(_rule("<Filter/><Expiration><Date>2030-01-01T10:00:00Z</Date></Expiration>")),
            ("InvalidArgument", 400),
        ),
        (
            _doc(_rule("<Filter/><Expiration><Date>20200101</Date></Expiration>")),
            ("InvalidArgument", 400),
        ),
        (
            _doc(
                _rule("<Filter/><Expiration><Days>1</Days></Expiration>"),
                _rule("<Filter/><Expiration><Days>2</Days></Expiration>"),
            ),
            ("InvalidArgument", 400),
        ),  # the same ID twice
        (
            _doc(_rule("<Filter/><Expiration><Days>1</Days></Expiration>", rule_id="x" * 256)),
            ("InvalidArgument", 400),
        ),
        (
            _doc(
                _rule(
                    "<Filter><And><ObjectSizeGreaterThan>9</ObjectSizeGreaterThan>"
                    "<ObjectSizeLessThan>9</ObjectSizeLessThan></And></Filter>"
                    "<Expiration><Days>1</Days></Expiration>"
                )
            ),
            ("InvalidArgument", 400),
        ),
        (
            _doc(_rule("<Filter/><AbortIncompleteMultipartUpload><DaysAfterInitiation>0"
                       "</DaysAfterInitiation></AbortIncompleteMultipartUpload>")),
            ("InvalidArgument", 400),
        ),
        (_doc(_rule("<Filter/>")), ("InvalidRequest", 400)),  # no action
        (
            _doc(_rule("<Filter><Tag><Key>k</Key><Value>v</Value></Tag></Filter>"
                       "<AbortIncompleteMultipartUpload><DaysAfterInitiation>1"
                       "</DaysAfterInitiation></AbortIncompleteMultipartUpload>")),
            ("InvalidRequest", 400),
        ),
        (
            _doc(_rule("<Filter/><Transition><Days>30</Days><StorageClass>GLACIER</StorageClass>"
                       "</Transition>")),
            ("NotImplemented", 501),
        ),
        (
            _doc(_rule("<Filter/><NoncurrentVersionExpiration><NoncurrentDays>3</NoncurrentDays>"
                       "</NoncurrentVersionExpiration>")),
            ("NotImplemented", 501),
        ),
        (
            _doc(_rule("<Filter/><Expiration><ExpiredObjectDeleteMarker>true"
                       "</ExpiredObjectDeleteMarker></Expiration>")),
            ("NotImplemented", 501),
        ),
    ],
)  # fmt: skip
def test_refusals(body: bytes, expected: tuple[str, int]) -> None:
    assert _code(body) == expected


def test_at_most_1000_rules() -> None:
    rules = [
        _rule("<Filter/><Expiration><Days>1</Days></Expiration>", rule_id=f"r{i}")
        for i in range(1000)
    ]
    assert len(lifecycle_ops.parse(_doc(*rules)).rules) == 1000
    extra = _rule("<Filter/><Expiration><Days>1</Days></Expiration>", rule_id="one-more")
    assert _code(_doc(*rules, extra)) == ("InvalidArgument", 400)


def test_ten_tags_in_one_rule() -> None:
    tags = "".join(f"<Tag><Key>k{i}</Key><Value>v{i}</Value></Tag>" for i in range(10))
    body = _doc(
        _rule(
            f"<Filter><And><Prefix>p</Prefix>{tags}</And></Filter><Expiration><Days>1</Days></Expiration>"
        )
    )
    assert len(lifecycle_ops.parse(body).rules[0].tags) == 10


def test_dates() -> None:
    midnight = int(_utc(2031, 5, 6))
    for text in ("2031-05-06", "2031-05-06T00:00:00Z", "2031-05-06T00:00:00.000Z",
                 "2031-05-06T02:00:00+02:00"):  # fmt: skip
        assert lifecycle_ops.parse_date(text) == midnight, text


def _lc_rule(*, tags: dict[str, str] | None = None, **fields: Any) -> metadata_pb2.LifecycleRule:
    fields.setdefault("enabled", True)
    rule = metadata_pb2.LifecycleRule(**fields)
    rule.tags.update(tags or {})
    return rule


def test_matches() -> None:
    rule = _lc_rule(
        prefix="logs/", object_size_greater_than=10, object_size_less_than=100, tags={"t": "1"}
    )
    assert lifecycle.matches(rule, "logs/a", 50, {"t": "1", "other": "x"})
    assert not lifecycle.matches(rule, "log/a", 50, {"t": "1"})
    assert not lifecycle.matches(rule, "logs/a", 10, {"t": "1"})  # strictly greater
    assert not lifecycle.matches(rule, "logs/a", 100, {"t": "1"})  # strictly less
    assert not lifecycle.matches(rule, "logs/a", 50, {"t": "2"})
    assert not lifecycle.matches(rule, "logs/a", 50, {})
    assert lifecycle.matches(_lc_rule(), "anything", 0, {})


def test_days_round_up_to_midnight_utc() -> None:
    # S3's documented example: created 2014-01-15 10:30 UTC, Days=3 -> 2014-01-19 00:00 UTC.
    created = _utc(2014, 1, 15, 10, 30)
    assert lifecycle.after_days(created, 3) == _utc(2014, 1, 19)
    assert lifecycle.after_days(_utc(2014, 1, 15), 3) == _utc(2014, 1, 18)  # already midnight
    assert lifecycle.after_days(100.5, 1, day_s=2.0) == 104.0  # a test "day"
    rule = _lc_rule(expiration_days=3)
    assert lifecycle.expiry_s(rule, created) == _utc(2014, 1, 19)
    dated = _lc_rule(expiration_date_unix_s=int(_utc(2020, 1, 1)))
    assert lifecycle.expiry_s(dated, created) == _utc(2020, 1, 1)
    assert lifecycle.expiry_s(_lc_rule(abort_incomplete_multipart_days=1), created) is None


def test_earliest_matching_rule_wins() -> None:
    rules = [
        _lc_rule(prefix="a/", expiration_days=10),
        _lc_rule(prefix="a/b", expiration_days=2),
        _lc_rule(prefix="a/", expiration_days=1, enabled=False),
        _lc_rule(prefix="z/", expiration_days=1),
    ]
    created = _utc(2026, 3, 1, 12)
    assert lifecycle.object_expiry_s(rules, "a/b/c", 1, {}, created) == _utc(2026, 3, 4)
    assert lifecycle.object_expiry_s(rules, "a/x", 1, {}, created) == _utc(2026, 3, 12)
    assert lifecycle.object_expiry_s(rules, "q", 1, {}, created) is None


def test_kv_ttl() -> None:
    config = metadata_pb2.LifecycleConfiguration(
        rules=[
            _lc_rule(prefix="tmp/", expiration_days=1),
            _lc_rule(prefix="old/", expiration_date_unix_s=10),
        ]
    )
    now = _utc(2026, 3, 1, 18)
    assert lifecycle.kv_ttl_s(config, "tmp/x", 5, {}, now_s=now) == 30 * 3600  # to the 3rd, 00:00
    assert lifecycle.kv_ttl_s(config, "keep", 5, {}, now_s=now) is None
    assert lifecycle.kv_ttl_s(config, "old/x", 5, {}, now_s=now) == 1.0  # a past Date: at once
    assert lifecycle.kv_ttl_s(config, "tmp/x", 5, {}, now_s=101.0, day_s=4.0) == 7.0


def test_prefixes_cover_without_overlap() -> None:
    rules = [_lc_rule(prefix=p) for p in ("a/b", "a/", "c", "a/bc", "cd")]
    assert lifecycle._prefixes(rules) == ["a/", "c"]
    assert lifecycle._prefixes([_lc_rule(prefix=""), _lc_rule(prefix="x")]) == [""]
