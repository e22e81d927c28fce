"""The console's aiohttp application: routes, login, sessions, CSRF, headers, and `serve()`.

Every request but the login form and the stylesheet needs a live session (the cookie): a GET
without one is redirected to /login (303), anything else is 401. Every POST must carry the
session's CSRF token (login: the double-submit cookie's) and, when the browser sends an Origin,
come from the console's own origin; otherwise 403 and nothing is done. Admin pages refuse
non-admins (403) before asking the cluster, which would refuse them too. Every page calls the
cluster as the session's user (`cluster.UserCluster`).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import secrets
import ssl
from collections.abc import Awaitable, Callable

from aiohttp import web

from kvtier import errors
from kvtier.cli import healqueue
from kvtier.console import cluster, config, heals, pages, sessions, statuspages, throttle

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
CFG = web.AppKey("cfg", config.ConsoleConfig)
STORE = web.AppKey("store", sessions.SessionStore)
THROTTLE = web.AppKey("throttle", throttle.LoginThrottle)
HEALS = web.AppKey("heals", heals.HealLog)
_PUBLIC = frozenset({"/login", "/static/console.css", "/favicon.ico"})
#: POST paths (prefixes) only admins may use; GET /users too.
_ADMIN_POSTS = ("/users", "/kv/quota", "/kv/durability", "/heal")
_SAFE = frozenset({"GET", "HEAD"})
#: How long the overview's heal form waits for the heal to finish.
HEAL_LIMIT_S = 60.0
#: Heal-queue entries the Heal page shows at most (`kvtier admin heal queue --limit` for more).
HEAL_QUEUE_LIMIT = 200
_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'self'; img-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",  # no-referrer would make Origin "null"
    "Cache-Control": "no-store",
    "Strict-Transport-Security": "max-age=31536000",
}


def _session(request: web.Request) -> sessions.Session:
    session = request.get("session")
    assert isinstance(session, sessions.Session)  # the auth middleware put it there
    return session


def _user(request: web.Request) -> cluster.UserCluster:
    return cluster.UserCluster(request.app[CFG], _session(request))


def html(text: str, status: int = 200) -> web.Response:
    """An HTML page."""
    return web.Response(text=text, status=status, content_type="text/html", charset="utf-8")


def _status_of(exc: errors.KVTierError) -> int:
    for kind, status in (
        (errors.PermissionDenied, 403),
        (errors.NotFound, 404),
        (errors.Unauthenticated, 401),
        (errors.Unavailable, 503),
        (errors.AlreadyExists, 409),
        (errors.PreconditionFailed, 409),
    ):
        if isinstance(exc, kind):
            return status
    return 400 if isinstance(exc, errors.InvalidArgument) else 502


@web.middleware
async def headers_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Security headers on every answer, errors included."""
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        response = exc
    response.headers.update({k: v for k, v in _HEADERS.items() if k not in response.headers})
    if isinstance(response, web.HTTPException):
        raise response
    return response


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A live session for every non-public path; CSRF and origin for every POST; admins only
    on admin paths; the cluster's errors as pages."""
    if request.path in _PUBLIC:
        return await handler(request)
    store = request.app[STORE]
    session = store.get(request.cookies.get(sessions.COOKIE, ""))
    if session is None:
        if request.method in _SAFE:
            raise web.HTTPSeeOther("/login")
        return html(pages.error_page(401, "log in first", None), 401)
    request["session"] = session
    if request.method not in _SAFE:
        form = await request.post()
        token = form.get("csrf")
        if not _same_origin(request) or not session.csrf_ok(
            token if isinstance(token, str) else ""
        ):
            log.warning("console: CSRF check failed for %s %s", request.method, request.path)
            return html(pages.error_page(403, "CSRF check failed: reload the page", session), 403)
    if not session.is_admin and _admin_only(request):
        return html(pages.error_page(403, "admins only", session), 403)
    try:
        return await handler(request)
    except errors.KVTierError as exc:
        if isinstance(exc, errors.Unauthenticated):  # the cluster no longer takes the token
            store.end(session.session_id)
        return html(pages.error_page(_status_of(exc), str(exc), session), _status_of(exc))


def _admin_only(request: web.Request) -> bool:
    if request.path in ("/users", "/heal") or request.path.startswith("/users/"):
        return True
    return request.method not in _SAFE and request.path.startswith(_ADMIN_POSTS)


def _same_origin(request: web.Request) -> bool:
    """No Origin (old browsers, non-browser clients: the CSRF token decides) or our own."""
    origin = request.headers.get("Origin")
    return origin is None or origin == f"https://{request.host}"


def _cookie(response: web.StreamResponse, name: str, value: str, max_age: int) -> None:
    response.set_cookie(
        name, value, max_age=max_age, path="/", secure=True, httponly=True, samesite="Strict"
    )


# Login and logout.


async def login_form(request: web.Request) -> web.StreamResponse:
    """The login page, with a fresh double-submit token (cookie + hidden field)."""
    if request.app[STORE].get(request.cookies.get(sessions.COOKIE, "")) is not None:
        raise web.HTTPSeeOther("/")
    # Keep a login cookie already set: a second load (another tab, a favicon fetch redirected
    # here) must not invalidate the form the first one shows.
    token = request.cookies.get(sessions.LOGIN_COOKIE, "")
    if not (32 <= len(token) <= 64 and token.replace("-", "").replace("_", "").isalnum()):
        token = secrets.token_urlsafe(32)
    response = html(pages.login_page(token))
    _cookie(response, sessions.LOGIN_COOKIE, token, 600)
    return response


async def login(request: web.Request) -> web.StreamResponse:
    """Check the credentials with the cluster; on success a session cookie."""
    form = await request.post()
    cookie = request.cookies.get(sessions.LOGIN_COOKIE, "")
    presented = form.get("csrf")
    if not (
        cookie
        and isinstance(presented, str)
        and hmac.compare_digest(cookie, presented)
        and _same_origin(request)
    ):
        return html(pages.error_page(403, "CSRF check failed: reload the login page", None), 403)
    access_key, secret = form.get("access_key"), form.get("secret_key")
    if not (isinstance(access_key, str) and isinstance(secret, str) and access_key and secret):
        return html(pages.login_page(cookie, "give an access key and its secret"), 400)
    cfg, limiter, address = request.app[CFG], request.app[THROTTLE], request.remote or ""
    access_key = access_key.strip()
    wait_s = limiter.retry_after_s(address, access_key)
    if wait_s > 0:  # refused before the cluster is asked: guessing gets no answer
        log.warning("console: login throttled for %s (%r)", address, access_key[:32])
        return _throttled(cookie, wait_s)
    try:
        reply = await cluster.login(cfg, access_key, secret)
    except (errors.Unauthenticated, errors.InvalidArgument):
        log.info("console: login refused for %r from %s", access_key[:32], address)
        limiter.failed(address, access_key)
        return html(pages.login_page(cookie, "wrong access key or secret"), 401)
    except errors.KVTierError as exc:
        return html(pages.login_page(cookie, f"the cluster did not answer: {exc}"), 503)
    limiter.succeeded(address, access_key)
    session = request.app[STORE].create(
        access_key=access_key,
        tenant=reply.tenant,
        is_admin=reply.is_admin,
        token=reply.token,
        ttl_s=cfg.session_ttl_s,
    )
    log.info("console: %s (tenant %s) logged in", session.access_key, session.tenant)
    response = web.HTTPSeeOther("/")
    _cookie(response, sessions.COOKIE, session.session_id, int(cfg.session_ttl_s))
    response.del_cookie(sessions.LOGIN_COOKIE, path="/")
    return response


def _throttled(login_csrf: str, wait_s: float) -> web.Response:
    """429 with Retry-After (whole seconds) and the login form."""
    seconds = max(1, math.ceil(wait_s))
    text = f"too many failed logins: try again in {seconds} s"
    response = html(pages.login_page(login_csrf, text), 429)
    response.headers["Retry-After"] = str(seconds)
    return response


async def logout(request: web.Request) -> web.StreamResponse:
    """End the session (the cluster's token expires on its own)."""
    request.app[STORE].end(_session(request).session_id)
    response = web.HTTPSeeOther("/login")
    response.del_cookie(sessions.COOKIE, path="/")
    return response


async def favicon(request: web.Request) -> web.StreamResponse:
    """None (browsers ask; without this route the answer would be a redirect to /login)."""
    raise web.HTTPNotFound()


async def stylesheet(request: web.Request) -> web.StreamResponse:
    """The one stylesheet (no external asset)."""
    return web.Response(text=pages.CSS, content_type="text/css")


# Pages.


async def overview(request: web.Request) -> web.StreamResponse:
    """Nodes by role, nodes, pools and sets, map epoch (`kvtier status`)."""
    session = _session(request)
    state = await _user(request).overview()
    heal = pages.heal_form(session) if session.is_admin else ""
    return html(pages.overview_page(state, session, heal))


async def heal(request: web.Request) -> web.StreamResponse:
    """Admins: a heal (or dry run) of a bucket/prefix or everything, followed for up to
    HEAL_LIMIT_S (the Heal page shows it meanwhile); then the Heal page with its result."""
    session, form = _session(request), await request.post()
    target = str(form.get("target") or "").strip()
    dry_run = bool(form.get("dry_run"))
    run = request.app[HEALS].start(target, dry_run=dry_run, by=session.access_key)
    try:
        result = await _user(request).heal(
            target, dry_run=dry_run, limit_s=HEAL_LIMIT_S, on_progress=run.update
        )
    except errors.KVTierError as exc:
        run.end(f"failed: {exc}")
        raise
    except BaseException:
        run.end("failed")
        raise
    run.end("done" if run.progress.done else "gave up waiting")
    queue = await _heal_queue(request)
    return html(statuspages.heal_page(request.app[HEALS].runs(), session, result, queue))


async def heal_status(request: web.Request) -> web.StreamResponse:
    """Admins: the heals run through this console, live while running, and what the
    gateways' heal queues hold."""
    queue = await _heal_queue(request)
    return html(statuspages.heal_page(request.app[HEALS].runs(), _session(request), "", queue))


async def _heal_queue(request: web.Request) -> healqueue.Merged | str:
    """The gateways' heal queues, or why they could not be read (the page shows the rest).
    A refusal is the page's (403, 401)."""
    try:
        return await _user(request).heal_queue(HEAL_QUEUE_LIMIT)
    except (errors.PermissionDenied, errors.Unauthenticated):
        raise
    except errors.KVTierError as exc:
        return f"the heal queues could not be read: {exc}"


async def buckets(request: web.Request, message: str = "", error: str = "") -> web.Response:
    """The buckets the user may see."""
    rows = await _user(request).buckets()
    status = 200 if not error else 400
    return html(pages.buckets_page(rows, _session(request), message, error), status)


async def create_bucket(request: web.Request) -> web.StreamResponse:
    """Create a bucket of the user's tenant."""
    name = str((await request.post()).get("bucket") or "").strip()
    try:
        await _user(request).create_bucket(name)
    except (errors.InvalidArgument, errors.AlreadyExists, errors.PermissionDenied) as exc:
        return await buckets(request, error=f"{name}: {exc}")
    return await buckets(request, message=f"created {name}")


async def delete_bucket(request: web.Request) -> web.StreamResponse:
    """Delete an empty bucket."""
    name = request.match_info["bucket"]
    try:
        await _user(request).delete_bucket(name)
    except (errors.PreconditionFailed, errors.NotFound, errors.PermissionDenied) as exc:
        return await buckets(request, error=f"{name}: {exc}")
    return await buckets(request, message=f"deleted {name}")


async def browse(request: web.Request, message: str = "", error: str = "") -> web.Response:
    """A bucket's folders and objects under ?prefix=."""
    bucket = request.match_info["bucket"]
    prefix = request.query.get("prefix", "")
    listing = await _user(request).list_objects(bucket, prefix)
    page = pages.objects_page(bucket, prefix, listing, _session(request), message, error)
    return html(page, 200 if not error else 400)


async def download(request: web.Request) -> web.StreamResponse:
    """An object's bytes as an attachment (never rendered in the console's origin)."""
    bucket, key = request.match_info["bucket"], request.query.get("key", "")
    info, data = await _user(request).get_object(bucket, key)
    name = key.rsplit("/", 1)[-1].replace('"', "").replace("\\", "") or "object"
    return web.Response(
        body=data,
        content_type="application/octet-stream",
        headers={"Content-Disposition": f'attachment; filename="{name}"', "ETag": info.etag},
    )


async def upload(request: web.Request) -> web.StreamResponse:
    """Store a file of the form as prefix + its name (or the given key)."""
    form = await request.post()
    field = form.get("file")
    if not isinstance(field, web.FileField):
        return await browse(request, error="choose a file")
    data = field.file.read()
    key = str(form.get("key") or "").strip() or str(form.get("prefix") or "") + field.filename
    bucket = request.match_info["bucket"]
    try:
        info = await _user(request).put_object(bucket, key, data, field.content_type or "")
    except (errors.InvalidArgument, errors.PermissionDenied, errors.NotFound) as exc:
        return await browse(request, error=f"{key}: {exc}")
    return await browse(request, message=f"uploaded {key} ({info.size} bytes, ETag {info.etag})")


async def delete_object(request: web.Request) -> web.StreamResponse:
    """Delete one object."""
    key = str((await request.post()).get("key") or "")
    await _user(request).delete_object(request.match_info["bucket"], key)
    return await browse(request, message=f"deleted {key}")


async def kv(
    request: web.Request, lines: tuple[str, ...] = (), error: str = ""
) -> web.StreamResponse:
    """Per kvcache node fill and hit rates; settings forms."""
    session = _session(request)
    stats = await _user(request).kv_stats()
    settings = ""
    if session.is_admin:  # ListSettings is admins' (users see the forms only)
        try:
            settings = statuspages.kv_settings_section(await _user(request).kv_settings())
        except errors.KVTierError as exc:
            settings = statuspages.kv_settings_section(f"the settings could not be read: {exc}")
    page = pages.kv_page(stats, session, lines, error, settings)
    return html(page, 200 if not error else 400)


async def kv_setting(request: web.Request) -> web.StreamResponse:
    """quota / ttl / durability on every kvcache node (the nodes check who may)."""
    kind = request.match_info["kind"]
    if kind not in ("quota", "ttl", "durability"):
        raise web.HTTPNotFound()
    form = await request.post()
    values = [str(form.get(k) or "").strip() for k in ("tenant", "namespace", "value")]
    try:
        lines = await _user(request).kv_setting(kind, *values)
    except (ValueError, errors.InvalidArgument) as exc:
        return await kv(request, error=f"{kind}: {exc}")
    return await kv(request, lines=tuple(lines))


async def users(request: web.Request, created: object = None, error: str = "") -> web.Response:
    """Admins: the users."""
    found = await _user(request).users()
    page = pages.users_page(found, _session(request), created, "", error)
    return html(page, 200 if not error else 400)


async def create_user(request: web.Request) -> web.StreamResponse:
    """Admins: a new user; its secret is on this page only."""
    form = await request.post()
    tenant = str(form.get("tenant") or "").strip()
    name = str(form.get("display_name") or "").strip()
    try:
        user = await _user(request).create_user(tenant, name, bool(form.get("is_admin")))
    except (errors.InvalidArgument, errors.AlreadyExists, errors.PreconditionFailed) as exc:
        return await users(request, error=str(exc))
    return await users(request, created=user)


async def delete_user(request: web.Request) -> web.StreamResponse:
    """Admins: remove a user, and end its console sessions at once (its session tokens stay
    valid at the cluster until they expire: docs/security.md, "Client identity")."""
    access_key = request.match_info["access_key"]
    await _user(request).delete_user(access_key)
    ended = request.app[STORE].end_user(access_key)
    log.info("console: user %s deleted, %d console sessions ended", access_key[:32], ended)
    return await users(request)


def build_app(cfg: config.ConsoleConfig) -> web.Application:
    """The application (no socket: `serve()` binds it)."""
    app = web.Application(
        middlewares=[headers_middleware, auth_middleware],
        client_max_size=cfg.max_upload_bytes + (64 << 10),
    )
    app[CFG] = cfg
    app[STORE] = sessions.SessionStore()
    app[THROTTLE] = throttle.LoginThrottle(cfg.login_limits)
    app[HEALS] = heals.HealLog()
    app.router.add_get("/login", login_form)
    app.router.add_post("/login", login)
    app.router.add_post("/logout", logout)
    app.router.add_get("/static/console.css", stylesheet)
    app.router.add_get("/favicon.ico", favicon)
    app.router.add_get("/", overview)
    app.router.add_get("/heal", heal_status)
    app.router.add_post("/heal", heal)
    app.router.add_get("/buckets", buckets)
    app.router.add_post("/buckets", create_bucket)
    app.router.add_post("/buckets/{bucket}/delete", delete_bucket)
    app.router.add_get("/buckets/{bucket}", browse)
    app.router.add_get("/buckets/{bucket}/download", download)
    app.router.add_post("/buckets/{bucket}/upload", upload)
    app.router.add_post("/buckets/{bucket}/delete-object", delete_object)
    app.router.add_get("/kv", kv)
    app.router.add_post("/kv/{kind}", kv_setting)
    app.router.add_get("/users", users)
    app.router.add_post("/users", create_user)
    app.router.add_post("/users/{access_key}/delete", delete_user)
    return app


def tls_context(cfg: config.ConsoleConfig) -> ssl.SSLContext:
    """The console's HTTPS: TLS 1.2+, its certificate."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cfg.tls_cert_file, cfg.tls_key_file)
    except (OSError, ssl.SSLError) as exc:
        raise errors.InvalidArgument(f"console TLS files: {exc}") from None
    return context


async def serve(
    cfg: config.ConsoleConfig, stop: asyncio.Event, on_ready: Callable[[str], None]
) -> None:
    """Serve until stop is set; on_ready gets the console's URL (the real port)."""
    runner = web.AppRunner(build_app(cfg), access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, cfg.host, cfg.port, ssl_context=tls_context(cfg))
        await site.start()
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        port = sockets[0].getsockname()[1] if sockets else cfg.port
        host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
        on_ready(f"https://{host}:{port}")
        await stop.wait()
    finally:
        await runner.cleanup()
