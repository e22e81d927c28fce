"""HTTPS for the S3 API: the certificate it presents, and its reload without a restart.

The S3 API serves HTTPS (TLS 1.2 or later) with the operator's certificate (`s3_tls_cert_file`
and `s3_tls_key_file`: a chain from a public or company CA, which S3 clients trust without
extra configuration) or, without one, the gateway's cluster certificate (`tls_cert_file`, from
the cluster CA: clients name the CA file, e.g. `AWS_CA_BUNDLE`). Plain HTTP only in an insecure
cluster or when `s3_plain_http` asks for it (docs/s3.md).

Rotation: `S3TLS.reload_if_changed()` re-reads the files when their mtimes moved and loads the
new pair into the same `ssl.SSLContext`; connections opened afterwards get the new certificate,
open ones keep theirs. The gateway calls it every `RELOAD_CHECK_S` seconds.
"""

from __future__ import annotations

import logging
import ssl

from kvtier import errors, pki

log = logging.getLogger(__name__)

#: How often the gateway looks at the certificate files (a stat of each).
RELOAD_CHECK_S = 1.0


class S3TLS:
    """The S3 listener's server-side TLS context, kept current with its certificate files.

    Raises errors.InvalidArgument at construction when the files are unreadable, not a
    certificate and its key, or refused by OpenSSL.
    """

    def __init__(self, files: pki.CertificateFiles) -> None:
        self.files = files
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2
        self.context.set_alpn_protocols(["http/1.1"])
        self._loaded = self._warned = files.generation
        self._load()

    @classmethod
    def from_files(cls, cert_file: str, key_file: str) -> S3TLS:
        """A context for an operator-provided certificate chain and key (PEM files)."""
        return cls(pki.CertificateFiles("", cert_file, key_file))

    @property
    def cert_file(self) -> str:
        """The certificate (chain) file served."""
        return self.files.cert_file

    def _load(self) -> None:
        try:
            self.context.load_cert_chain(self.files.cert_file, self.files.key_file)
        except (OSError, ssl.SSLError) as exc:
            raise errors.InvalidArgument(
                f"S3 TLS certificate {self.files.cert_file}: {exc}"
            ) from None

    def reload_if_changed(self) -> bool:
        """Load the certificate again when its files changed; True when it was reloaded.

        A half-written pair is not loaded (the files' own check, or OpenSSL's, refuses it):
        the previous certificate stays in use and the next call tries again.
        """
        self.files.refresh()
        if self.files.generation == self._loaded:
            return False
        try:
            self._load()
        except errors.InvalidArgument as exc:
            if self._warned != self.files.generation:  # once per change, not every check
                self._warned = self.files.generation
                log.warning("S3 TLS certificate not reloaded (kept the previous one): %s", exc)
            return False
        self._loaded = self.files.generation
        log.info("S3 TLS certificate reloaded from %s", self.files.cert_file)
        return True
