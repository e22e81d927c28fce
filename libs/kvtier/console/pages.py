"""The console's HTML: server-rendered, every value escaped, no JavaScript, no external asset.

Each function returns a whole page (str). Forms that change anything POST with the session's
CSRF token in a hidden field (`csrf_field`); the app refuses a POST without it.
"""

from __future__ import annotations

import collections
import datetime
import html
import urllib.parse
from collections.abc import Iterable, Sequence
from typing import Any

from kvtier.console import cluster, sessions

CSS = """
body{font-family:system-ui,sans-serif;margin:0;color:#1b1f24;background:#f6f7f9}
header{background:#1f2a37;color:#fff;padding:.6em 1.2em;display:flex;gap:1.2em;align-items:center}
header a{color:#cfe3ff;text-decoration:none}header .who{margin-left:auto;font-size:.9em}
header form{display:inline}main{padding:1em 1.5em}
table{border-collapse:collapse;margin:.5em 0 1.2em;background:#fff}
th,td{border:1px solid #d8dce2;padding:.3em .6em;text-align:left;font-size:.92em}
th{background:#eef1f5}.ok{color:#176f2c;font-weight:600}.bad{color:#b3261e;font-weight:600}
.msg{padding:.5em .8em;background:#fff6d6;border:1px solid #e7cf76;margin:.5em 0}
.err{background:#fde8e6;border-color:#e29a94}form.inline{display:inline}
input,select,button{font-size:.92em;margin:.15em}fieldset{background:#fff;margin:.6em 0}
code{background:#eef1f5;padding:0 .25em}
"""


def esc(value: object) -> str:
    """HTML-escaped text (quotes too: safe in attributes)."""
    return html.escape(str(value), quote=True)


def q(value: str) -> str:
    """URL-encoded for a query string or a path segment."""
    return urllib.parse.quote(value, safe="")


def csrf_field(token: str) -> str:
    """The hidden field every state-changing form carries."""
    return f'<input type="hidden" name="csrf" value="{esc(token)}">'


def _when(unix_ms: int) -> str:
    if not unix_ms:
        return "-"
    moment = datetime.datetime.fromtimestamp(unix_ms / 1000, tz=datetime.UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB"):
        value /= 1024
        if value < 1024:
            return f"{value:.1f} {unit}"
    return f"{value / 1024:.1f} TiB"


def _table(headers: Sequence[str], rows: Iterable[Sequence[str]], table_id: str = "") -> str:
    """A table; cells are HTML already (escape values before)."""
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    ident = f' id="{esc(table_id)}"' if table_id else ""
    return f"<table{ident}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _messages(message: str, error: str) -> str:
    out = f'<p class="msg" id="message">{esc(message)}</p>' if message else ""
    return out + (f'<p class="msg err" id="error">{esc(error)}</p>' if error else "")


def layout(title: str, body: str, session: sessions.Session | None) -> str:
    """A whole page: the header (navigation, who is logged in, logout) and body."""
    nav = ""
    if session is not None:
        links = [("/", "Overview"), ("/buckets", "Buckets"), ("/kv", "KV cache")]
        if session.is_admin:
            links += [("/heal", "Heal"), ("/users", "Users")]
        nav = "".join(f'<a href="{href}">{esc(text)}</a>' for href, text in links)
        role = "admin" if session.is_admin else "user"
        nav += (
            f'<span class="who" id="who">{esc(session.access_key)} · tenant '
            f"{esc(session.tenant)} · {role}</span>"
            f'<form method="post" action="/logout">{csrf_field(session.csrf)}'
            '<button type="submit" id="logout">Log out</button></form>'
        )
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{esc(title)} · kvtier console</title>"
        '<link rel="stylesheet" href="/static/console.css"></head><body>'
        f"<header><strong>kvtier</strong>{nav}</header><main><h1>{esc(title)}</h1>"
        f"{body}</main></body></html>"
    )


def login_page(login_csrf: str, error: str = "") -> str:
    """The login form (access key + secret)."""
    body = (
        _messages("", error) + '<form method="post" action="/login" id="login-form"><fieldset>'
        f"{csrf_field(login_csrf)}"
        '<label>Access key <input name="access_key" id="access_key" autocomplete="username" '
        'required maxlength="128"></label><br>'
        '<label>Secret key <input name="secret_key" id="secret_key" type="password" '
        'autocomplete="current-password" required maxlength="256"></label><br>'
        '<button type="submit" id="login">Log in</button></fieldset></form>'
        "<p>Your S3 / SDK credentials (<code>kvtier admin user add</code>). The console keeps "
        "only the session token the cluster issues for them.</p>"
    )
    return layout("Log in", body, None)


def _health_cell(health: str) -> str:
    good = health in ("SERVING", "LEASED")
    return f'<span class="{"ok" if good else "bad"}">{esc(health)}</span>'


def overview_page(state: dict[str, Any], session: sessions.Session, heal: str = "") -> str:
    """`kvtier status` as a page: verdict, nodes by role, nodes, pools and sets."""
    verdict = (
        '<p class="bad" id="verdict">cluster DEGRADED: '
        + esc("; ".join(state["problems"]))
        + "</p>"
        if state["problems"]
        else '<p class="ok" id="verdict">cluster healthy</p>'
    )
    roles = collections.Counter(n["role"] for n in state["nodes"])
    by_role = _table(
        ["role", "nodes in the map"],
        [(esc(r), f'<span id="count-{esc(r)}">{c}</span>') for r, c in sorted(roles.items())],
        "roles",
    )
    nodes = _table(
        ["node", "role", "address", "health", "epoch", "drives", "KV fill / hits"],
        [
            (
                esc(n["node_id"]), esc(n["role"]), esc(n["address"]), _health_cell(n["health"]),
                esc(n["epoch"] or "-"), esc(len(n["drives"])), esc(_kv(n.get("kvcache"))),
            )
            for n in state["nodes"]
        ]
        + [(esc(d), "datanode", "-", _health_cell("DOWN"), "-", "-", "-") for d in state["down"]],
        "nodes",
    )  # fmt: skip
    sets = _table(
        ["pool", "set", "layout", "drives online"],
        [
            (esc(p["index"]), esc(s["index"]), esc(s["layout"]),
             f'<span class="{"ok" if s["online"] == s["drives"] else "bad"}">'
             f"{s['online']}/{s['drives']}</span>")
            for p in state["pools"]
            for s in p["sets"]
        ],
        "sets",
    )  # fmt: skip
    pending = f"<p>{state['pending_drives']} drives pending (not yet in a pool)</p>"
    body = (
        verdict + f'<p>map epoch <strong id="epoch">{esc(state["epoch"])}</strong> · deployment '
        f"<code>{esc(state['deployment_id'])}</code></p>"
        + "<h2>Nodes by role</h2>"
        + by_role
        + "<h2>Nodes</h2>"
        + nodes
        + "<h2>Pools and erasure sets</h2>"
        + sets
        + (pending if state["pending_drives"] else "")
        + heal
    )
    return layout("Cluster overview", body, session)


def heal_form(session: sessions.Session, result: str = "") -> str:
    """Admins: check every object (a dry-run heal) or heal; the last result."""
    out = f'<p class="msg" id="heal-result">{esc(result)}</p>' if result else ""
    return (
        "<h2>Healing</h2>" + out + f'<form method="post" action="/heal">{csrf_field(session.csrf)}'
        '<label>Bucket[/prefix] (empty: every bucket) <input name="target"></label>'
        '<label><input type="checkbox" name="dry_run" value="1" checked> dry run</label>'
        '<button type="submit" id="heal">Check / heal</button></form>'
    )


def _kv(kv: dict[str, Any] | None) -> str:
    if not kv:
        return "-"
    reads = kv["hits"] + kv.get("durable_hits", 0) + kv["misses"]
    hits = f"{kv['hit_rate']:.1%} of {reads}" if reads else "no reads"
    return f"{kv['fill']:.1%} of {kv['arena_bytes'] >> 20} MiB, {kv['blocks']} blocks / {hits}"


def buckets_page(
    rows: Sequence[cluster.BucketRow], session: sessions.Session, message: str = "", error: str = ""
) -> str:
    """Buckets (admins: every tenant's), create and delete."""
    table = _table(
        ["bucket", "tenant", "kind", "created", ""],
        [
            (
                f'<a href="/buckets/{q(b.name)}">{esc(b.name)}</a>', esc(b.tenant),
                esc(b.kind or "-"), esc(_when(b.created_at_unix_ms)),
                f'<form class="inline" method="post" action="/buckets/{q(b.name)}/delete">'
                f'{csrf_field(session.csrf)}<button type="submit">Delete</button></form>',
            )
            for b in rows
        ],
        "buckets",
    )  # fmt: skip
    create = (
        f'<form method="post" action="/buckets"><fieldset>{csrf_field(session.csrf)}'
        '<label>New bucket <input name="bucket" id="new-bucket" required maxlength="63"></label>'
        f" (tenant {esc(session.tenant)})"
        '<button type="submit" id="create-bucket">Create</button></fieldset></form>'
    )
    return layout("Buckets", _messages(message, error) + table + create, session)


def objects_page(
    bucket: str,
    prefix: str,
    listing: Any,
    session: sessions.Session,
    message: str = "",
    error: str = "",
) -> str:
    """One bucket's folders and objects under prefix, with upload, download and delete."""
    base = f"/buckets/{q(bucket)}"
    crumbs = f'<a href="{base}">{esc(bucket)}</a>/'
    parts = [p for p in prefix.split("/") if p]
    for i, part in enumerate(parts):
        crumbs += f'<a href="{base}?prefix={q("/".join(parts[: i + 1]) + "/")}">{esc(part)}</a>/'
    rows: list[Sequence[str]] = []
    if listing is not None:
        rows += [
            (f'<a href="{base}?prefix={q(p)}">{esc(p[len(prefix) :])}</a>', "folder", "-", "-", "")
            for p in listing.common_prefixes
        ]
        rows += [
            (
                f'<a href="{base}/download?key={q(o.key)}">{esc(o.key[len(prefix):])}</a>',
                esc(_size(o.size)), esc(o.etag), esc(_when(o.mtime_unix_ms)),
                f'<form class="inline" method="post" action="{base}/delete-object">'
                f'{csrf_field(session.csrf)}<input type="hidden" name="key" value="{esc(o.key)}">'
                '<button type="submit">Delete</button></form>',
            )
            for o in listing.objects
        ]  # fmt: skip
    more = (
        "<p>(more keys: use an S3 client to list them all)</p>"
        if listing and listing.is_truncated
        else ""
    )
    upload = (
        f'<form method="post" action="{base}/upload" enctype="multipart/form-data"><fieldset>'
        f'{csrf_field(session.csrf)}<input type="hidden" name="prefix" value="{esc(prefix)}">'
        '<label>Upload a small object <input type="file" name="file" required></label>'
        '<label>key (default: prefix + file name) <input name="key"></label>'
        '<button type="submit" id="upload">Upload</button></fieldset></form>'
    )
    body = (
        _messages(message, error)
        + f"<p>{crumbs}</p>"
        + _table(["name", "size", "ETag", "modified", ""], rows, "objects")
        + more
        + upload
    )
    return layout(f"Bucket {bucket}", body, session)


def kv_page(
    stats: Sequence[tuple[str, Any]],
    session: sessions.Session,
    lines: Sequence[str] = (),
    error: str = "",
    settings: str = "",
) -> str:
    """Per kvcache node: fill, blocks, hit rates by tier (the user's tenant, or the whole node
    for admins); forms for quota (admins), namespace TTL and durability; then settings (HTML:
    the cluster's settings, for admins)."""
    rows = []
    for node_id, st in stats:
        if isinstance(st, str):
            rows.append((esc(node_id), f'<span class="bad">{esc(st)}</span>', *["-"] * 6))
            continue
        reads = st.hits + st.durable_hits + st.misses
        rows.append(
            (
                esc(node_id), esc(f"{st.fill:.1%} of {st.arena_bytes >> 20} MiB"),
                esc(st.blocks), esc(_size(st.requested_bytes)),
                esc(f"{st.dram_hit_rate:.1%}" if reads else "-"),
                esc(f"{st.durable_hits / reads:.1%}" if reads else "-"),
                esc(reads), esc(st.spilled),
            )
        )  # fmt: skip
    table = _table(
        ["node", "arena fill", "blocks", "bytes", "DRAM hits", "durable hits", "reads", "spilled"],
        rows,
        "kv-nodes",
    )
    scope = "whole nodes" if session.is_admin else f"tenant {session.tenant}"
    forms = _kv_form(session, "ttl", "Namespace default TTL", "seconds (0: none)")
    if session.is_admin:
        forms = (
            _kv_form(session, "quota", "Tenant quota per node", "bytes, e.g. 8GiB (0: none)")
            + forms
            + _kv_form(
                session, "durability", "Namespace durability", "none|write-back|write-through"
            )
        )
    result = "".join(f"<li>{esc(line)}</li>" for line in lines)
    body = (
        _messages("", error)
        + (f'<ul id="kv-result">{result}</ul>' if lines else "")
        + f"<p>Scope: {esc(scope)}.</p>"
        + table
        + forms
        + settings
    )
    return layout("KV cache", body, session)


def _kv_form(session: sessions.Session, kind: str, legend: str, hint: str) -> str:
    namespace = (
        "" if kind == "quota" else '<label>namespace <input name="namespace" required></label>'
    )
    tenant = esc(session.tenant)
    return (
        f'<form method="post" action="/kv/{kind}"><fieldset><legend>{esc(legend)}</legend>'
        f'{csrf_field(session.csrf)}<label>tenant <input name="tenant" value="{tenant}" '
        f'required></label>{namespace}<label>{esc(hint)} <input name="value" required></label>'
        f'<button type="submit" id="set-{kind}">Set on every node</button></fieldset></form>'
    )


def users_page(
    found: Sequence[Any],
    session: sessions.Session,
    created: Any = None,
    message: str = "",
    error: str = "",
) -> str:
    """Admins: users (no secrets), create (the secret shown once) and delete."""
    shown = ""
    if created is not None:
        shown = (
            '<p class="msg" id="created">Created <code id="created-key">'
            f'{esc(created.access_key)}</code>, secret <code id="created-secret">'
            f"{esc(created.secret.reveal())}</code>: shown this once.</p>"
        )
    table = _table(
        ["access key", "tenant", "name", "rights", "created", ""],
        [
            (
                esc(u.access_key), esc(u.tenant), esc(u.display_name),
                "admin" if u.is_admin else "user", esc(_when(u.created_at_unix_ms)),
                f'<form class="inline" method="post" action="/users/{q(u.access_key)}/delete">'
                f'{csrf_field(session.csrf)}<button type="submit">Delete</button></form>',
            )
            for u in found
        ],
        "users",
    )  # fmt: skip
    create = (
        f'<form method="post" action="/users"><fieldset>{csrf_field(session.csrf)}'
        '<label>tenant <input name="tenant" required maxlength="64"></label>'
        '<label>name <input name="display_name" maxlength="128"></label>'
        '<label><input type="checkbox" name="is_admin" value="1"> admin</label>'
        '<button type="submit" id="create-user">Create</button></fieldset></form>'
    )
    return layout("Users", _messages(message, error) + shown + table + create, session)


def error_page(status: int, text: str, session: sessions.Session | None) -> str:
    """A refusal or failure, with the reason."""
    return layout(f"{status}", f'<p class="msg err" id="error">{esc(text)}</p>', session)
