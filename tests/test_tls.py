"""TLS on the DICOM and MLLP listeners and destinations, and the calling-AE allow-list.

Certificates are made per test session with the ``openssl`` command line (a CA, a
server certificate for 127.0.0.1/localhost, a client certificate). The DICOM
peers are DCMTK's ``storescu`` / ``storescp`` with ``+tls``; the MLLP peer is a
Python ``ssl`` socket and medgw's own hl7-mllp destination. Components are built
through the plugin registry, so relative file names resolve against the config
folder (``PluginContext.config_dir``) as in a real deployment.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from dicom_peers import (
    eventually,
    free_port,
    need_dcmtk,
    run_tool,
    running_gateway,
    sample_file,
    spawn_tool,
    stop,
    wait_port,
)

from drivers.hl7.ack import parse_ack
from drivers.hl7.mllp import FrameReceived, MllpFramer, frame
from gateway.envelope import Envelope, StoredEnvelope
from gateway.errors import ConfigError, TransientError
from gateway.interfaces import Accepted
from gateway.metrics import Metrics
from gateway.registry import PluginContext, default_registry
from gateway.tls import TlsSettings

CERTS = ("ca.crt", "server.crt", "server.key", "client.crt", "client.key")
SERVER_EXT = (
    "basicConstraints=critical,CA:FALSE\n"
    "keyUsage=critical,digitalSignature,keyEncipherment\n"
    "extendedKeyUsage=serverAuth\n"
    "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
)
CLIENT_EXT = (
    "basicConstraints=critical,CA:FALSE\n"
    "keyUsage=critical,digitalSignature,keyEncipherment\n"
    "extendedKeyUsage=clientAuth\n"
)
HL7 = (
    b"MSH|^~\\&|LAB|HOSP|MEDGW|SITE|20260101120000||ORU^R01|TLS0001|P|2.5.1\r"
    b"OBR|1|||GLU\rOBX|1|NM|GLU||5.4|mmol/L\r"
)


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def _leaf(name: str, subject: str, ext: str, serial: str, folder: Path) -> None:
    (folder / f"{name}.ext").write_text(ext, encoding="ascii")
    _openssl("req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key",
             "-out", f"{name}.csr", "-subj", subject, cwd=folder)  # fmt: skip
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
             "-set_serial", serial, "-days", "2", "-sha256", "-extfile", f"{name}.ext",
             "-out", f"{name}.crt", cwd=folder)  # fmt: skip


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A test CA, a server certificate for 127.0.0.1/localhost and a client certificate."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command line is not installed")
    folder = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key",
             "-out", "ca.crt", "-days", "2", "-sha256", "-subj", "/CN=medgw test CA",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=folder)  # fmt: skip
    _leaf("server", "/CN=localhost", SERVER_EXT, "2", folder)
    _leaf("client", "/CN=modality", CLIENT_EXT, "3", folder)
    return folder


def install(pki: Path, folder: Path) -> Path:
    """Copy the certificates beside a config file (relative names resolve there)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in CERTS:
        shutil.copyfile(pki / name, folder / name)
    return folder


def context(config_dir: Path) -> PluginContext:
    return PluginContext(
        "test-site", str(config_dir / "state"), Metrics(), config_dir=str(config_dir)
    )


# -- settings ---------------------------------------------------------------------------------


def test_settings_need_key_with_cert_and_ca_for_client_certs() -> None:
    with pytest.raises(ValueError, match="cert_file and key_file go together"):
        TlsSettings.model_validate({"cert_file": "a.crt"})
    with pytest.raises(ValueError, match="require_client_cert needs ca_file"):
        TlsSettings.model_validate(
            {"cert_file": "a.crt", "key_file": "a.key", "require_client_cert": True}
        )


def test_contexts_name_the_missing_or_bad_file(pki: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="needs cert_file and key_file"):
        TlsSettings().server_context(str(tmp_path), where="listener x: tls")
    missing = TlsSettings(cert_file=Path("nope.crt"), key_file=Path("nope.key"))
    with pytest.raises(ConfigError, match=r"listener x: tls: cannot read the TLS certificate"):
        missing.server_context(str(tmp_path), where="listener x: tls")
    install(pki, tmp_path)
    mismatched = TlsSettings(cert_file=Path("server.crt"), key_file=Path("client.key"))
    with pytest.raises(ConfigError, match="does not match"):
        mismatched.server_context(str(tmp_path))
    not_ca = TlsSettings(ca_file=Path("server.key"))
    with pytest.raises(ConfigError, match="holds no PEM CA certificate"):
        not_ca.client_context(str(tmp_path))


def test_relative_names_are_found_in_the_credentials_folder(
    pki: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    creds = install(pki, tmp_path / "creds")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    settings = TlsSettings(
        cert_file=Path("server.crt"),
        key_file=Path("server.key"),
        ca_file=Path("ca.crt"),
        require_client_cert=True,
        min_version="1.3",
    )
    ctx = settings.server_context(str(tmp_path / "elsewhere"))
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_3


# -- DICOM listener ---------------------------------------------------------------------------

SCP_TLS = (
    ", tls: {cert_file: server.crt, key_file: server.key, ca_file: ca.crt, "
    "require_client_cert: true}"
)


def storescu_cert(folder: Path) -> tuple[str, ...]:
    """storescu's TLS options: the client key and certificate, the CA to trust."""
    key, cert, ca = (str(folder / n) for n in ("client.key", "client.crt", "ca.crt"))
    return ("+tls", key, cert, "+cf", ca)


def storescu_tls(port: int, calling: str, *tls: str) -> subprocess.CompletedProcess[str]:
    ct = str(sample_file("CT_small.dcm"))
    argv = ["storescu", *tls, "-aet", calling, "-aec", "MEDGW", "127.0.0.1", str(port), ct]
    return run_tool(argv, timeout_s=30)


async def test_storescu_over_tls_is_stored_and_plain_or_certless_peers_are_refused(
    pki: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    need_dcmtk("storescu")
    install(pki, tmp_path)
    with_cert = storescu_cert(tmp_path)
    no_cert = ("+tla", "+cf", str(tmp_path / "ca.crt"))
    caplog.set_level(logging.WARNING, logger="dicom.scp")
    async with running_gateway(tmp_path, SCP_TLS) as gw:
        plain = await asyncio.to_thread(storescu_tls, gw.port, "CT1")
        assert plain.returncode != 0, plain.stdout
        certless = await asyncio.to_thread(storescu_tls, gw.port, "CT1", *no_cert)
        assert certless.returncode != 0, certless.stdout
        # the service keeps serving after failed handshakes
        good = await asyncio.to_thread(storescu_tls, gw.port, "CT1", *with_cert)
        assert good.returncode == 0, good.stdout
        await eventually(gw.outbox_files, what="the instance in the outbox")
        sessions = await eventually(
            lambda: len(gw.sessions()) >= 3 and gw.sessions(), what="three session records"
        )
    refused = [s for s in sessions if "TLS handshake failed" in s.get("rejected", "")]
    assert len(refused) == 2, sessions
    assert any(s.get("calling_ae") == "CT1" and s.get("files") == 1 for s in sessions)
    logged = [r for r in caplog.records if "TLS handshake failed" in r.getMessage()]
    assert len(logged) == 2  # once per refused connection, no traceback
    assert all(r.exc_info is None for r in logged)


async def test_calling_ae_outside_the_allow_list_gets_associate_rj(
    pki: Path, tmp_path: Path
) -> None:
    need_dcmtk("storescu")
    install(pki, tmp_path)
    tls = storescu_cert(tmp_path)
    async with running_gateway(tmp_path, SCP_TLS + ", allowed_calling_aes: [CT1, XR2]") as gw:
        stranger = await asyncio.to_thread(storescu_tls, gw.port, "STRANGER", *tls)
        allowed = await asyncio.to_thread(storescu_tls, gw.port, "XR2", *tls)
        await eventually(gw.outbox_files, what="the allowed instance in the outbox")
        sessions = await eventually(
            lambda: len(gw.sessions()) >= 2 and gw.sessions(), what="two session records"
        )
    assert stranger.returncode != 0
    assert "Rejected Permanent" in stranger.stdout, stranger.stdout
    assert "Calling AE Title Not Recognized" in stranger.stdout, stranger.stdout
    assert allowed.returncode == 0, allowed.stdout
    assert len(gw.outbox_files()) == 1
    assert {s.get("rejected") for s in sessions if s["calling_ae"] == "STRANGER"} == {
        "calling AE not allowed"
    }


# -- DICOM destination ------------------------------------------------------------------------


@pytest.fixture
def storescp_tls(pki: Path, tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """DCMTK ``storescp`` speaking TLS only and requiring a client certificate."""
    need_dcmtk("storescp")
    folder = tmp_path / "pacs"
    folder.mkdir()
    port = free_port()
    argv = ["storescp", "-aet", "PACS", "+xa", "+B", "-od", str(folder),
            "+tls", str(pki / "server.key"), str(pki / "server.crt"),
            "+cf", str(pki / "ca.crt"), "-rc", str(port)]  # fmt: skip
    proc = spawn_tool(argv, tmp_path / "storescp.log")
    try:
        wait_port(port)  # a plain connect: storescp logs a failed handshake and goes on
        yield port, folder
    finally:
        stop(proc)


def store_destination(port: int, config_dir: Path, tls: dict[str, Any]) -> Any:
    kind = default_registry().destinations["dicom-store"]
    cfg = kind.model.model_validate(
        {
            "id": "pacs",
            "type": "dicom-store",
            "ae_title": "PACS",
            "connect": f"127.0.0.1:{port}",
            "connect_timeout_s": 5,
            "acse_timeout_s": 5,
            "tls": tls,
        }
    )
    return kind.factory(cfg, context(config_dir))


def dicom_envelope(path: Path) -> StoredEnvelope:
    return StoredEnvelope(
        id="1" * 32,
        seq=1,
        kind="dicom",
        source="modalities",
        headers={},
        idem_key=None,
        parent_id=None,
        received_at=datetime.now(UTC),
        body=b"",
        blob_path=path,
    )


async def test_dicom_store_delivers_over_tls_to_storescp(
    pki: Path, tmp_path: Path, storescp_tls: tuple[int, Path]
) -> None:
    port, folder = storescp_tls
    config_dir = install(pki, tmp_path / "config")
    tls = {"cert_file": "client.crt", "key_file": "client.key", "ca_file": "ca.crt"}
    sender = store_destination(port, config_dir, tls).sender()
    try:
        assert await sender.send(dicom_envelope(sample_file("CT_small.dcm"))) == "0x0000"
    finally:
        await sender.aclose()
    assert len(list(folder.iterdir())) == 1


async def test_dicom_store_without_client_cert_or_trust_is_transient(
    pki: Path, tmp_path: Path, storescp_tls: tuple[int, Path]
) -> None:
    port, _ = storescp_tls
    config_dir = install(pki, tmp_path / "config")
    for tls, why in (
        # storescp -rc: no client certificate, no association
        ({"ca_file": "ca.crt"}, "client certificate refused"),
        # the server's CA is not trusted (the system's CAs do not hold the test CA)
        ({"cert_file": "client.crt", "key_file": "client.key"}, "TLS handshake failed"),
    ):
        sender = store_destination(port, config_dir, tls).sender()
        try:
            with pytest.raises(TransientError, match=why):
                await sender.send(dicom_envelope(sample_file("CT_small.dcm")))
        finally:
            await sender.aclose()


# -- MLLP listener and destination ------------------------------------------------------------


class Intake:
    """Accepts everything at once (the journal is tested elsewhere)."""

    def __init__(self) -> None:
        self.accepted: list[Envelope] = []
        self.sessions: list[dict[str, Any]] = []

    async def accept(self, envelope: Envelope, destinations: list[str] | None = None) -> Accepted:
        self.accepted.append(envelope)
        return Accepted(envelope.id)

    def stage(self, envelope: Envelope) -> Envelope:
        return envelope

    async def quarantine(
        self, source: str, raw: bytes, reason: str, peer: str = "", size: int | None = None
    ) -> int:
        return 1

    async def record_session(
        self, source: str, peer: str, started_at: float, ended_at: float, details: dict[str, Any]
    ) -> None:
        self.sessions.append(details)


@pytest.fixture
async def mllp_tls(pki: Path, tmp_path: Path) -> AsyncIterator[tuple[int, Intake, Path]]:
    """An hl7-mllp listener with TLS requiring client certificates; yields its port."""
    config_dir = install(pki, tmp_path / "config")
    kind = default_registry().listeners["hl7-mllp"]
    cfg = kind.model.model_validate(
        {
            "id": "his",
            "type": "hl7-mllp",
            "listen": f"127.0.0.1:{free_port()}",
            "handshake_timeout_s": 3,
            "tls": {
                "cert_file": "server.crt",
                "key_file": "server.key",
                "ca_file": "ca.crt",
                "require_client_cert": True,
            },
        }
    )
    intake = Intake()
    async with kind.factory(cfg, intake, context(config_dir)) as listener:
        yield listener.port, intake, config_dir


def mllp_exchange(port: int, message: bytes, ctx: ssl.SSLContext | None) -> bytes:
    """One framed message and the reply frame's content (b"" when the peer closed)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        sock = raw if ctx is None else ctx.wrap_socket(raw, server_hostname="localhost")
        sock.sendall(frame(message))
        framer = MllpFramer()
        while data := sock.recv(65536):
            for event in framer.feed(data):
                if isinstance(event, FrameReceived):
                    return event.data
        return b""


def refused(port: int, ctx: ssl.SSLContext | None) -> bool:
    """True when the listener closes or resets the connection without a reply."""
    try:
        return mllp_exchange(port, HL7, ctx) == b""
    except OSError:  # ssl.SSLError among them
        return True


def client_ctx(config_dir: Path, *, cert: bool = True) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(config_dir / "ca.crt"))
    if cert:
        ctx.load_cert_chain(config_dir / "client.crt", config_dir / "client.key")
    return ctx


async def test_mllp_tls_client_gets_aa_and_plain_or_certless_clients_are_refused(
    mllp_tls: tuple[int, Intake, Path], caplog: pytest.LogCaptureFixture
) -> None:
    port, intake, config_dir = mllp_tls
    caplog.set_level(logging.WARNING, logger="drivers.hl7.listener")
    # plain MLLP: the frame is no ClientHello; the listener drops the connection
    assert await asyncio.to_thread(refused, port, None)
    # TLS without a client certificate (TLS 1.3: refused after the client's handshake)
    assert await asyncio.to_thread(refused, port, client_ctx(config_dir, cert=False))
    ack = parse_ack(await asyncio.to_thread(mllp_exchange, port, HL7, client_ctx(config_dir)))
    assert (ack.code, ack.control_id) == ("AA", "TLS0001")
    assert len(intake.accepted) == 1
    logged = [r for r in caplog.records if "TLS handshake failed" in r.getMessage()]
    assert len(logged) == 2, [r.getMessage() for r in caplog.records]
    for _ in range(100):  # the served connection's record follows its close
        if len(intake.sessions) == 3:
            break
        await asyncio.sleep(0.05)
    assert sorted(str(s.get("rejected") or s.get("messages")) for s in intake.sessions) == [
        "1",
        "TLS handshake failed",
        "TLS handshake failed",
    ], intake.sessions


async def test_mllp_destination_sends_over_tls(mllp_tls: tuple[int, Intake, Path]) -> None:
    port, intake, config_dir = mllp_tls
    kind = default_registry().destinations["hl7-mllp"]

    def sender(tls: dict[str, Any]) -> Any:
        cfg = kind.model.model_validate(
            {
                "id": "lis",
                "type": "hl7-mllp",
                "connect": f"127.0.0.1:{port}",
                "connect_timeout_s": 5,
                "ack_timeout_s": 5,
                "tls": tls,
            }
        )
        return kind.factory(cfg, context(config_dir)).sender()

    envelope = StoredEnvelope(
        id="2" * 32, seq=1, kind="hl7", source="x", headers={}, idem_key=None,
        parent_id=None, received_at=datetime.now(UTC), body=HL7,
    )  # fmt: skip
    good = sender({"cert_file": "client.crt", "key_file": "client.key", "ca_file": "ca.crt"})
    try:
        assert await good.send(envelope) == "AA"
    finally:
        await good.aclose()
    wrong_name = sender({"ca_file": "ca.crt", "server_hostname": "pacs.example"})
    try:
        with pytest.raises(TransientError, match="cannot connect"):
            await wrong_name.send(envelope)
    finally:
        await wrong_name.aclose()
    assert len(intake.accepted) == 1


async def test_mllp_listener_closes_promptly_with_a_handshake_pending(
    pki: Path, tmp_path: Path
) -> None:
    config_dir = install(pki, tmp_path / "config")
    kind = default_registry().listeners["hl7-mllp"]
    cfg = kind.model.model_validate(
        {
            "id": "his",
            "type": "hl7-mllp",
            "listen": f"127.0.0.1:{free_port()}",
            "handshake_timeout_s": 60,
            "tls": {"cert_file": "server.crt", "key_file": "server.key"},
        }
    )
    silent = socket.socket()
    try:
        async with kind.factory(cfg, Intake(), context(config_dir)) as listener:
            await asyncio.to_thread(silent.connect, ("127.0.0.1", listener.port))
            await eventually(lambda: listener._conns, what="the connection counted")
            started = asyncio.get_running_loop().time()
        assert asyncio.get_running_loop().time() - started < 5
        assert not listener._conns
    finally:
        silent.close()
