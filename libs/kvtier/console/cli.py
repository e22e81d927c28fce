"""`kvtier console`: run the operator console until SIGINT/SIGTERM.

Production: `--metadata HOST:PORT` (a metadata node's users' port), `--ca-file` (the cluster
CA), `--tls-cert-file` / `--tls-key-file` (the console's own HTTPS certificate, e.g. from the
organisation's CA). Dev cluster: `--state-dir` fills them from its cluster.json and makes a
certificate for the console from the dev CA (server authentication only: it is no cluster
identity, so the console can do nothing with it but serve pages).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import ipaddress
import json
import signal
import sys
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from kvtier import errors, pki
from kvtier.console import app, config

CERT_STEM = "console"


def add_parser(sub: Any, state_dir_default: str) -> None:
    """Add `console` to the top-level subcommands."""
    parser = sub.add_parser(
        "console",
        help="the operator console: a web UI (HTTPS) to see and operate the cluster",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--state-dir", default=state_dir_default, help="a dev cluster's")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind")
    parser.add_argument("--port", type=int, default=config.DEFAULT_PORT, help="0: any free port")
    parser.add_argument(
        "--metadata", default="", help="a metadata node's users' port; default: the state dir's"
    )
    parser.add_argument("--ca-file", default="", help="the cluster CA; default: the state dir's")
    parser.add_argument("--tls-cert-file", default="", help="the console's HTTPS certificate")
    parser.add_argument("--tls-key-file", default="", help="its key")
    parser.add_argument("--session-ttl-s", type=float, default=3600.0, help="session lifetime")
    parser.add_argument("--max-upload-bytes", type=int, default=16 << 20, help="per object")


def dev_certificate(state: Path, hosts: list[str]) -> tuple[Path, Path]:
    """A server-only certificate for the console from the dev cluster's CA (made once)."""
    directory = state / "pki"
    cert_path, key_path = directory / f"{CERT_STEM}.crt", directory / f"{CERT_STEM}.key"
    if cert_path.exists() and key_path.exists():
        return cert_path, key_path
    authority = pki.load_authority(directory)
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = []
    for host in dict.fromkeys(hosts):
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kvtier console")]))
        .issuer_name(authority.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - pki.NOT_BEFORE_BACKDATE)
        .not_valid_after(now + datetime.timedelta(days=pki.DEFAULT_CERT_DAYS))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(authority.key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return pki.write_pair(
        directory, CERT_STEM, (cert.public_bytes(serialization.Encoding.PEM), key_pem)
    )


def load_config(args: argparse.Namespace) -> config.ConsoleConfig:
    """The console's config from flags, the rest from the state dir's cluster.json."""
    metadata, ca_file = args.metadata, args.ca_file
    cert, key = args.tls_cert_file, args.tls_key_file
    state = Path(args.state_dir)
    if not (metadata and ca_file and cert and key):
        try:
            info = json.loads((state / "cluster.json").read_text())
        except (OSError, ValueError) as exc:
            raise errors.InvalidArgument(
                f"no --metadata/--ca-file/--tls-cert-file and no cluster.json in {state}: {exc}"
            ) from None
        if info.get("insecure"):
            raise errors.InvalidArgument("an insecure cluster issues no session tokens")
        metadata = metadata or str(info.get("metadata_client", ""))
        ca_file = ca_file or str(info.get("ca_file", ""))
        if not (cert and key):
            hosts = [args.host, "127.0.0.1", "localhost", *pki.local_hosts()]
            cert_path, key_path = dev_certificate(state, hosts)
            cert, key = str(cert_path), str(key_path)
    return config.ConsoleConfig(
        host=args.host,
        port=args.port,
        tls_cert_file=cert,
        tls_key_file=key,
        ca_file=ca_file,
        metadata_address=metadata,
        session_ttl_s=args.session_ttl_s,
        max_upload_bytes=args.max_upload_bytes,
    )


async def _main(cfg: config.ConsoleConfig) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    def ready(url: str) -> None:
        sys.stdout.write(f"kvtier console at {url}/ (cluster {cfg.metadata_address})\n")
        sys.stdout.flush()

    await app.serve(cfg, stop, ready)


def run(args: argparse.Namespace) -> int:
    """`kvtier console`: 0 after a clean stop; InvalidArgument for bad settings (exit 2 in main)."""
    cfg = load_config(args)
    app.tls_context(cfg)  # unusable TLS files: one line before anything binds
    try:
        asyncio.run(_main(cfg))
    except OSError as exc:  # the port is taken
        sys.stderr.write(f"kvtier console: error: {exc}\n")
        return 1
    return 0
