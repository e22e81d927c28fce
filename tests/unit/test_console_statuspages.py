"""The console's KV settings section and Heal page without a cluster: values escaped, a running
heal shown with its current key, the heal log bounded and newest first, the gateways' heal
queues escaped with their totals."""

from __future__ import annotations

from kvtier.cli import healqueue
from kvtier.console import heals, sessions, statuspages
from kvtier.proto.gateway.v1 import admin_pb2
from kvtier.proto.kvcache.v1 import kvcache_pb2 as pb


def _session() -> sessions.Session:
    return sessions.SessionStore().create(
        access_key="AK", tenant="t", is_admin=True, token="tok", ttl_s=60
    )


def test_settings_escaped_and_named() -> None:
    ns = pb.Namespace(tenant="t<1>", name="<script>")
    page = statuspages.kv_settings_section(
        pb.ListSettingsResponse(
            persisted=True,
            quotas=[pb.SetQuotaRequest(tenant="t<1>", quota_bytes=0)],
            ttls=[pb.SetNamespaceTTLRequest(namespace=ns, ttl_s=2.5)],
            policies=[
                pb.SetNamespacePolicyRequest(namespace=ns, durability=pb.DURABILITY_WRITE_BACK)
            ],
        )
    )
    assert "<script>" not in page
    assert "<td>t&lt;1&gt;</td><td>none</td>" in page  # quota 0: none
    assert "<td>&lt;script&gt;</td><td>2.5 s</td>" in page
    assert "<td>write-back</td>" in page
    failed = statuspages.kv_settings_section("etcd <away>")
    assert 'id="kv-settings-error">etcd &lt;away&gt;<' in failed


def test_heal_page_live_then_done_and_bounded() -> None:
    log = heals.HealLog(max_runs=3)
    run = log.start("b<x>/p", dry_run=False, by="AK")
    run.update(admin_pb2.HealProgress(scanned=4, bytes_scanned=2048, current_key="b/<k>"))
    page = statuspages.heal_page(log.runs(), _session())
    assert "b&lt;x&gt;/p" in page
    assert ">running<" in page
    assert "<td>b/&lt;k&gt;</td>" in page  # the key being healed, while running
    run.update(admin_pb2.HealProgress(scanned=5, healed=1, done=True))
    run.end("done")
    page = statuspages.heal_page(log.runs(), _session())
    assert ">done<" in page
    assert "b/&lt;k&gt;" not in page
    for i in range(5):
        log.start(f"t{i}", dry_run=True, by="AK")
    assert [r.target for r in log.runs()] == ["t4", "t3", "t2"]
    assert 'id="no-heals"' in statuspages.heal_page([], _session())


def test_heal_queue_section_escaped_with_totals_and_errors() -> None:
    entry = admin_pb2.HealQueueEntry(
        bucket="b<1>", key="<script>alert(1)</script>", version_id="null", age_s=75.0,
        attempts=2, state="waiting", waiting_on=["drive-<x>"], reason="write & <more>",
    )  # fmt: skip
    merged = healqueue.Merged(
        rows=[healqueue.Row("gw<1>", entry)],
        replies={"gw<1>": admin_pb2.ListHealQueueResponse(entries=[entry], total=3, waiting=1)},
        failed={"gw-2": "Unavailable: <down>"},
    )
    page = statuspages.heal_page([], _session(), queue=merged)
    assert "<script>" not in page
    assert "drive-<x>" not in page
    row = (
        "<td>gw&lt;1&gt;</td><td>1m15s</td><td>waiting</td><td>2</td><td>b&lt;1&gt;</td>"
        "<td>&lt;script&gt;alert(1)&lt;/script&gt;</td><td>null</td>"
        "<td>write &amp; &lt;more&gt;; waiting for drive-&lt;x&gt;</td>"
    )
    assert row in page
    assert (
        'id="heal-queue-totals">queued 3 on 1 gateway (waiting 1, retrying 0, healing 0); ' in page
    )
    assert "1 shown, 2 more" in page
    assert "gw-2: Unavailable: &lt;down&gt;" in page
    failed = statuspages.heal_page([], _session(), queue="etcd <away>")
    assert 'id="heal-queue-error">etcd &lt;away&gt;<' in failed
    assert 'id="heal-queue"' not in statuspages.heal_page([], _session())
