"""The operator console: a web UI to see and operate a kvtier cluster (`kvtier console`).

A process of its own with an HTTPS port of its own (default 9001, as MinIO's console). It holds
no credential of its own: a login exchanges the user's access key and secret for the cluster's
session token (`AuthService.GetSessionToken`, the secret is then forgotten), and every page
calls the cluster as that user, so the cluster's one authorization table decides what each user
may see and do (ARCHITECTURE.md, "The operator console"; docs/security.md).

- `config`: `ConsoleConfig`.
- `sessions`: the session store (cookie id → token, tenant, admin flag, CSRF token, expiry).
- `cluster`: the calls to the cluster as the logged-in user (`UserCluster`).
- `pages`: HTML rendering (server-side, escaped; no JavaScript, no external asset).
- `app`: the aiohttp application (routes, login, CSRF, security headers) and `serve()`.
- `cli`: `kvtier console`'s flags.
"""
