"""TLS settings shared by listeners and destinations, and the ``ssl`` contexts built from them.

One model for every place that speaks TLS (DICOM listener and destination, MLLP
listener and destination; DICOM TLS is PS3.15 annex B.1, the secure transport
connection profile). Files are read once, when the component starts; a
relative name is looked up like every secret (:func:`gateway.secrets.secret_path`:
``$CREDENTIALS_DIRECTORY`` first, so a key can stay root-only behind systemd's
``LoadCredential=``, then beside the config file).

Server side: ``cert_file`` + ``key_file`` are required; with ``ca_file`` a client
certificate is verified when one is presented, and ``require_client_cert`` makes
one mandatory (mutual TLS). Client side: the server's certificate is verified
against ``ca_file`` (else the system's CAs) and its name against
``server_hostname`` (else the host connected to) unless ``verify_peer`` is off;
``cert_file`` + ``key_file`` are the client certificate a server may ask for.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Literal

from pydantic import model_validator

from gateway.config import Frozen
from gateway.errors import ConfigError
from gateway.secrets import secret_path

MIN_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


class TlsSettings(Frozen):
    """``tls: {cert_file: gw.crt, key_file: gw.key, ca_file: ca.crt}`` (examples and
    certificate making: docs/security.md)."""

    cert_file: Path | None = None
    key_file: Path | None = None
    ca_file: Path | None = None
    require_client_cert: bool = False  # server side: refuse clients without a valid cert
    min_version: Literal["1.2", "1.3"] = "1.2"
    verify_peer: bool = True  # client side: check the server's certificate and name
    server_hostname: str | None = None  # client side: name to check (default: the host)

    @model_validator(mode="after")
    def _pairs(self) -> TlsSettings:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        if self.require_client_cert and self.ca_file is None:
            raise ValueError("require_client_cert needs ca_file (the CA that signs client certs)")
        return self

    def hostname_for(self, host: str) -> str:
        """The name the server's certificate must carry (``server_hostname`` or ``host``)."""
        return self.server_hostname or host

    def server_context(self, config_dir: str = "", *, where: str = "tls") -> ssl.SSLContext:
        """A server-side context; ConfigError names each file that is missing or bad."""
        if self.cert_file is None or self.key_file is None:
            raise ConfigError([f"{where}: a TLS listener needs cert_file and key_file"])
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = MIN_VERSIONS[self.min_version]
        self._load_chain(ctx, config_dir, where)
        if self.ca_file is not None:
            self._load_ca(ctx, config_dir, where)
            ctx.verify_mode = ssl.CERT_REQUIRED if self.require_client_cert else ssl.CERT_OPTIONAL
        return ctx

    def client_context(self, config_dir: str = "", *, where: str = "tls") -> ssl.SSLContext:
        """A client-side context; ConfigError names each file that is missing or bad."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = MIN_VERSIONS[self.min_version]
        if self.verify_peer:
            if self.ca_file is not None:
                self._load_ca(ctx, config_dir, where)
            else:
                ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
        else:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        if self.cert_file is not None:
            self._load_chain(ctx, config_dir, where)
        return ctx

    def _load_chain(self, ctx: ssl.SSLContext, config_dir: str, where: str) -> None:
        assert self.cert_file is not None and self.key_file is not None
        cert = secret_path(self.cert_file, config_dir)
        key = secret_path(self.key_file, config_dir)
        _readable(cert, "certificate", where)
        _readable(key, "private key", where)
        try:
            ctx.load_cert_chain(cert, key)
        except ssl.SSLError as err:
            raise ConfigError(
                [
                    f"{where}: cannot use certificate {cert} with key {key} "
                    f"(not PEM, encrypted, or the key does not match the certificate): {err}"
                ]
            ) from err

    def _load_ca(self, ctx: ssl.SSLContext, config_dir: str, where: str) -> None:
        assert self.ca_file is not None
        ca = secret_path(self.ca_file, config_dir)
        _readable(ca, "CA certificate", where)
        try:
            ctx.load_verify_locations(cafile=ca)
        except ssl.SSLError as err:
            raise ConfigError([f"{where}: {ca} holds no PEM CA certificate: {err}"]) from err


def _readable(path: Path, what: str, where: str) -> None:
    try:
        with path.open("rb"):
            pass
    except OSError as err:
        raise ConfigError(
            [f"{where}: cannot read the TLS {what} file {path}: {err.strerror}"]
        ) from err
