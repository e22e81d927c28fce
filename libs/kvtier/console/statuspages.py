"""Console pages of cluster settings and status: the KV tier's settings (a section of the KV page)
and the Heal page. Server-rendered like `pages`: every value escaped, no script."""

from __future__ import annotations

from collections.abc import Sequence

from kvtier.cli import healqueue, kvadmin
from kvtier.console import heals, pages, sessions
from kvtier.proto.kvcache.v1 import kvcache_pb2

_DURABILITY_NAMES = {value: name for name, value in kvadmin.DURABILITY.items()}


def _bytes(n: int) -> str:
    return "none" if n == 0 else f"{pages._size(n)} ({n} bytes)"


def kv_settings_section(settings: kvcache_pb2.ListSettingsResponse | str) -> str:
    """The quota, TTL and durability settings the cluster keeps, as three tables (or why they
    could not be read)."""
    if isinstance(settings, str):
        return (
            f'<h2>Settings</h2><p class="msg err" id="kv-settings-error">{pages.esc(settings)}</p>'
        )
    if not settings.persisted:
        return "<h2>Settings</h2><p>The kvcache nodes keep no cluster-wide settings.</p>"
    quotas = pages._table(
        ["tenant", "quota per node"],
        [(pages.esc(q.tenant), pages.esc(_bytes(q.quota_bytes))) for q in settings.quotas],
        "kv-quotas",
    )
    ttls = pages._table(
        ["tenant", "namespace", "default TTL"],
        [
            (pages.esc(t.namespace.tenant), pages.esc(t.namespace.name),
             pages.esc(f"{t.ttl_s:g} s" if t.ttl_s else "none"))
            for t in settings.ttls
        ],
        "kv-ttls",
    )  # fmt: skip
    policies = pages._table(
        ["tenant", "namespace", "durability"],
        [
            (pages.esc(p.namespace.tenant), pages.esc(p.namespace.name),
             pages.esc(_DURABILITY_NAMES.get(p.durability, str(p.durability))))
            for p in settings.policies
        ],
        "kv-policies",
    )  # fmt: skip
    return (
        "<h2>Settings the cluster keeps</h2><p>Applied by every kvcache node, a restarted one "
        "too; a tenant or namespace not listed has the nodes' configured defaults.</p>"
        f"<h3>Tenant quotas</h3>{quotas}<h3>Namespace default TTLs</h3>{ttls}"
        f"<h3>Namespace durability</h3>{policies}"
    )


def _state(run: heals.HealRun) -> str:
    if not run.ended:
        return '<span class="bad">running</span>'
    good = run.ended == "done" and not (run.progress.unrecoverable or run.progress.skipped)
    return f'<span class="{"ok" if good else "bad"}">{pages.esc(run.ended)}</span>'


def heal_queue_section(queue: healqueue.Merged | str | None) -> str:
    """What the gateways' heal queues hold (oldest first, as `kvtier admin heal queue`), or
    why they could not be read; None: not asked."""
    head = (
        "<h2>The gateways' heal queues</h2><p>Each gateway also heals on its own: objects a read, "
        "a write or its scanner found degraded wait in its heal queue and are retried with "
        "backoff, or when the drives they need come back. Oldest first. The length is also the "
        "metric <code>kvtier_gateway_heal_queue_length</code> (Grafana: the "
        "&quot;Heal queue&quot; panel of deploy/grafana/kvtier.json), and objects healed by "
        "outcome <code>kvtier_gateway_heal_objects_total</code>.</p>"
    )
    if queue is None:
        return head
    if isinstance(queue, str):
        return head + f'<p class="msg err" id="heal-queue-error">{pages.esc(queue)}</p>'
    rows = [
        (
            pages.esc(r.gateway), pages.esc(healqueue.age_text(r.entry.age_s)),
            pages.esc(r.entry.state), pages.esc(r.entry.attempts), pages.esc(r.entry.bucket),
            pages.esc(r.entry.key), pages.esc(r.entry.version_id or "-"),
            pages.esc(healqueue.detail(r.entry)),
        )
        for r in queue.rows
    ]  # fmt: skip
    table = pages._table(
        ["gateway", "age", "state", "tries", "bucket", "key", "version", "reason"],
        rows,
        "heal-queue",
    )
    failed = "".join(
        f'<p class="msg err">{pages.esc(g)}: {pages.esc(why)}</p>'
        for g, why in sorted(queue.failed.items())
    )
    totals = f'<p id="heal-queue-totals">{pages.esc(healqueue.summary(queue))}</p>'
    return head + totals + failed + table


def heal_page(
    runs: Sequence[heals.HealRun],
    session: sessions.Session,
    result: str = "",
    queue: healqueue.Merged | str | None = None,
) -> str:
    """Admins: the heals run through this console (newest first, live while running), the
    form to start one, and what the gateways' own heal queues hold."""
    p = "progress"
    rows = [
        (
            pages.esc(pages._when(r.started_unix_ms)), pages.esc(r.target or "(every bucket)"),
            "dry run" if r.dry_run else "heal", pages.esc(r.by), _state(r),
            pages.esc(f"{r.seconds():.1f} s"), pages.esc(r.progress.scanned),
            pages.esc(r.progress.healthy), pages.esc(r.progress.healed),
            pages.esc(r.progress.unrecoverable), pages.esc(r.progress.skipped),
            pages.esc(r.progress.shards_healed), pages.esc(pages._size(r.progress.bytes_scanned)),
            pages.esc(pages._size(r.progress.bytes_healed)),
            pages.esc(r.progress.current_key if not r.ended else "-"),
        )
        for r in runs
    ]  # fmt: skip
    table = pages._table(
        ["started", "target", "kind", "by", "state", "time", "scanned", "healthy", "healed",
         "unrecoverable", "skipped", "shards rebuilt", "bytes scanned", "bytes healed", p],
        rows,
        "heal-runs",
    )  # fmt: skip
    none = "" if runs else '<p id="no-heals">No heal has been run through this console yet.</p>'
    body = (
        "<h2>Heals run here</h2>" + none + table + pages.heal_form(session, result)
        + heal_queue_section(queue)
    )  # fmt: skip
    return pages.layout("Heal status", body, session)
