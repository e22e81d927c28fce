"""bench/s3_conformance.py's pure parts: the suite's conf and the outcomes read from JUnit XML
(the run itself needs a checkout of ceph/s3-tests: not in CI)."""

from __future__ import annotations

import configparser
from pathlib import Path

from bench import s3_conformance

USER = {"display_name": "t", "user_id": "t", "email": "t@example.com", "access_key": "AK",
        "secret_key": "SK"}  # fmt: skip


def test_conf_has_what_the_suite_reads() -> None:
    users = {section: dict(USER) for section, _ in s3_conformance.USERS}
    users["s3 tenant"]["tenant"] = "testx"
    cfg = configparser.RawConfigParser()
    cfg.read_string(s3_conformance.render_conf("127.0.0.1", 9443, True, users))
    assert cfg.getint("DEFAULT", "port") == 9443
    assert cfg.getboolean("DEFAULT", "is_secure")
    assert not cfg.getboolean("DEFAULT", "ssl_verify")
    for section in ("s3 main", "s3 alt", "s3 tenant", "iam", "iam root", "iam alt root"):
        for key in ("access_key", "secret_key", "user_id", "email"):
            assert cfg.get(section, key)
    assert cfg.get("s3 tenant", "tenant") == "testx"
    assert "{random}" in cfg.get("fixtures", "bucket prefix")


def test_outcomes_from_junit(tmp_path: Path) -> None:
    xml = tmp_path / "junit.xml"
    xml.write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="s3tests.functional.test_s3" name="test_ok"/>'
        '<testcase classname="s3tests.functional.test_s3" name="test_bad">'
        '<failure message="assert 1 == 2"/></testcase>'
        '<testcase classname="s3tests.functional.test_s3" name="test_teardown">'
        '<failure message="x"/><error message="teardown"/></testcase>'
        '<testcase classname="s3tests.functional.test_s3" name="test_skip">'
        '<skipped message="no api_name"/></testcase>'
        "</testsuite></testsuites>"
    )
    result = s3_conformance.outcomes(xml)
    assert result == {"test_ok": "passed", "test_bad": "failed", "test_teardown": "error",
                      "test_skip": "skipped"}  # fmt: skip
    assert s3_conformance.counts(result) == {"passed": 1, "failed": 1, "error": 1, "skipped": 1,
                                             "total": 4}  # fmt: skip


def test_selection_excludes_the_areas() -> None:
    for marker in ("iam_user", "lifecycle", "sse_s3", "s3website", "fails_on_aws"):
        assert marker in s3_conformance.EXCLUDED
    assert s3_conformance.SELECTION.startswith("not (")
