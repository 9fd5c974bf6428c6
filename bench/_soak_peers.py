"""The peers of ``bench/soak.py``: a modality, a HIS, an analyzer, the LIS and the PACS.

Each sender behaves like the device it stands for: it sends one item, waits for
the answer, and on any failure (refused connection, reset, timeout, a negative
answer) reconnects and sends the *same* item again until it is accepted. Only
then does the item count as accepted, and only then does the sender go on to the
next one. The receivers record every delivery, duplicates included.

Nothing here imports medgw. The MLLP framing and the ASTM E1381 link layer are a
few lines of our own (HL7 v2.5.1 Appendix C; CLSI LIS1-A 8.2-8.3), the modality is
pynetdicom (a library), the PACS is DCMTK's ``storescp`` (a real peer), so a bug
in the gateway cannot hide behind the same bug in its peers.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import signal
import socket
import subprocess
import threading
import time
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from pydicom import dcmread
from pydicom.data import get_testdata_file
from pynetdicom import AE, build_context
from pynetdicom.association import Association

VT, FS, CR = b"\x0b", b"\x1c", b"\x0d"
ENQ, ACK, NAK, EOT, STX, ETX, ETB = b"\x05", b"\x06", b"\x15", b"\x04", b"\x02", b"\x03", b"\x17"
RETRY_PAUSE_S = 0.2
ANSWER_TIMEOUT_S = 15.0  # E1381 8.5.2: the sender waits 15 s for a reply; MLLP senders alike


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Tally:
    """What one sender offered and what the gateway accepted (thread-safe)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.accepted: dict[str, str] = {}  # item id -> sha256 of what was sent
        self.accepted_at: dict[str, float] = {}  # item id -> time.time() of the acceptance
        self.attempts = 0
        self.failures: Counter[str] = Counter()  # why an attempt did not get accepted
        self._lock = threading.Lock()

    def attempt(self) -> None:
        with self._lock:
            self.attempts += 1

    def accept(self, item: str, digest: str) -> None:
        with self._lock:
            self.accepted[item] = digest
            self.accepted_at[item] = time.time()

    def fail(self, why: str) -> None:
        with self._lock:
            self.failures[why] += 1


class Sender(threading.Thread, ABC):
    """Offers items ``0, 1, 2 ...`` at ``rate_per_s`` until :meth:`stop`; each until accepted."""

    def __init__(self, tally: Tally, rate_per_s: float) -> None:
        super().__init__(name=f"soak-{tally.name}", daemon=True)
        self.tally = tally
        self.interval_s = 1.0 / rate_per_s
        self._halt = threading.Event()
        self.error: BaseException | None = None

    def stop(self) -> None:
        self._halt.set()

    def run(self) -> None:
        try:
            n = 0
            while not self._halt.is_set():
                started = time.monotonic()
                item_id, data = self.make(n)
                while not self._halt.is_set():
                    self.tally.attempt()
                    why = self.offer(item_id, data)
                    if why is None:
                        self.tally.accept(item_id, sha(data))
                        break
                    self.tally.fail(why)
                    self.disconnect()
                    self._halt.wait(RETRY_PAUSE_S)
                n += 1
                self._halt.wait(max(0.0, self.interval_s - (time.monotonic() - started)))
        except BaseException as err:  # a bug in the bench itself: the report shows it
            self.error = err
            raise
        finally:
            self.disconnect()

    @abstractmethod
    def make(self, n: int) -> tuple[str, bytes]:
        """Item ``n``: its id and the bytes whose sha256 the receiver's copy must have."""

    @abstractmethod
    def offer(self, item_id: str, data: bytes) -> str | None:
        """Send one item; None when accepted, otherwise why not."""

    @abstractmethod
    def disconnect(self) -> None:
        """Drop the connection (the next offer makes a new one)."""


# -- MLLP ------------------------------------------------------------------------------


def read_frame(sock: socket.socket, buf: bytearray) -> bytes:
    """The next MLLP block's content from ``sock`` (blocking, with the socket's timeout)."""
    while True:
        end = buf.find(FS)
        if end >= 0:
            start = buf.find(VT, 0, end)
            block = bytes(buf[start + 1 if start >= 0 else 0 : end])
            del buf[: end + 1]
            if buf[:1] == CR:
                del buf[:1]
            return block
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed")
        buf.extend(chunk)


def hl7_field(message: bytes, segment: bytes, n: int) -> str:
    """Field ``n`` of the first ``segment`` (MSH counted as MSH-1 = the separator)."""
    for seg in message.split(CR):
        if seg.startswith(segment + b"|"):
            fields = seg.split(b"|")
            index = n - 1 if segment == b"MSH" else n
            return fields[index].decode("latin-1") if index < len(fields) else ""
    return ""


class TcpSender(Sender):
    def __init__(self, tally: Tally, rate_per_s: float, port: int) -> None:
        super().__init__(tally, rate_per_s)
        self.port = port
        self.sock: socket.socket | None = None

    def connect(self) -> socket.socket:
        if self.sock is None:
            sock = socket.create_connection(("127.0.0.1", self.port), timeout=ANSWER_TIMEOUT_S)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.sock = sock
        return self.sock

    def disconnect(self) -> None:
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.close()
            self.sock = None


class HisSender(TcpSender):
    """ORU^R01 messages with MSH-10 ``SOAKH<n>`` over one MLLP connection."""

    def make(self, n: int) -> tuple[str, bytes]:
        cid = f"SOAKH{n:07d}"
        ts = time.strftime("%Y%m%d%H%M%S", time.gmtime())
        message = (
            f"MSH|^~\\&|HIS|SOAKHOSP|LIS|SOAKHOSP|{ts}||ORU^R01^ORU_R01|{cid}|P|2.5.1"
            f"|||NE|NE|VNM|UNICODE UTF-8\r"
            f"PID|1||{100000 + n}^^^SOAKHOSP^MR||NGUYỄN^VĂN AN||19800101|M\r"
            f"OBR|1|PL{n}|FI{n}|CBC^Complete blood count^L|||{ts}\r"
            f"OBX|1|NM|718-7^Hemoglobin^LN||{120 + n % 40}|g/L|120-160|N|||F\r"
        ).encode()
        return cid, message

    def offer(self, item_id: str, data: bytes) -> str | None:
        try:
            sock = self.connect()
            sock.sendall(VT + data + FS + CR)
            ack = read_frame(sock, bytearray())
        except OSError as err:
            return type(err).__name__
        if hl7_field(ack, b"MSA", 2) != item_id:
            return "ack for another message"
        code = hl7_field(ack, b"MSA", 1)
        return None if code in ("AA", "CA") else f"MSA-1 {code}"


# -- ASTM E1381 ------------------------------------------------------------------------


def astm_checksum(body: bytes) -> bytes:
    """E1381 8.3.3: the modulo-256 sum of the frame number through ETB/ETX, two hex digits."""
    return b"%02X" % (sum(body) % 256)


def astm_text(capture: bytes) -> bytes:
    """The message text of a captured E1381 transfer: every frame's text, joined."""
    texts = []
    for found in re.finditer(rb"\x02([0-7])(.*?)([\x03\x17])([0-9A-Fa-f]{2})", capture, re.S):
        number, text, end, check = found.groups()
        if astm_checksum(number + text + end) != check.upper():
            raise ValueError(f"capture frame at byte {found.start()}: bad checksum")
        texts.append(text)
    return b"".join(texts)


def astm_frames(text: bytes, room: int = 240) -> list[bytes]:
    """``text`` cut into E1381 frames of at most ``room`` characters (8.3.1: 247 in all)."""
    chunks = [text[i : i + room] for i in range(0, len(text), room)]
    frames = []
    for n, chunk in enumerate(chunks, 1):
        body = b"%d" % (n % 8) + chunk + (ETX if n == len(chunks) else ETB)
        frames.append(STX + body + astm_checksum(body) + CR + b"\n")
    return frames


class AnalyzerSender(TcpSender):
    """A hematology analyzer: the real XN-550 capture, one new sample id per message."""

    SAMPLE_FIELD = re.compile(rb"(\rO\|1\|\|\^\^)( *\d+)(\^)")

    def __init__(self, tally: Tally, rate_per_s: float, port: int, capture: bytes) -> None:
        super().__init__(tally, rate_per_s, port)
        self.template = astm_text(capture)
        if not self.SAMPLE_FIELD.search(self.template):
            raise ValueError("the capture has no O record with a sample number")

    def make(self, n: int) -> tuple[str, bytes]:
        sample = f"SOAKA{n:07d}"
        width = len(self.SAMPLE_FIELD.search(self.template).group(2))  # type: ignore[union-attr]
        text = self.SAMPLE_FIELD.sub(
            lambda m: m.group(1) + sample.rjust(width).encode() + m.group(3), self.template, 1
        )
        return sample, text

    def offer(self, item_id: str, data: bytes) -> str | None:
        try:
            sock = self.connect()
            if self._exchange(sock, ENQ) != ACK:
                return "ENQ not ACKed"
            for frame in astm_frames(data):
                for _ in range(6):  # 8.5.1.2: a NAKed frame is sent again, at most 6 times
                    reply = self._exchange(sock, frame)
                    if reply != NAK:
                        break
                if reply != ACK:
                    return f"frame answered {reply!r}"
            sock.sendall(EOT)  # accepted: the last frame was ACKed after the commit
        except OSError as err:
            return type(err).__name__
        return None

    @staticmethod
    def _exchange(sock: socket.socket, data: bytes) -> bytes:
        sock.sendall(data)
        reply = sock.recv(1)
        if not reply:
            raise ConnectionError("closed")
        return reply


# -- the LIS ---------------------------------------------------------------------------


class Lis:
    """An MLLP server that records then ACKs every message; :meth:`down` / :meth:`up`.

    A message is keyed by what identifies it end to end: MSH-10 for the HIS's own
    messages (forwarded byte-exact), the sample id in OBR-3 for the ORUs the
    gateway builds from the analyzer's results.
    """

    def __init__(self, port: int) -> None:
        self.port = port
        self.received: list[tuple[str, str, str]] = []  # (key, sha256, sha256 of OBX/NTE)
        self.received_at: dict[str, float] = {}  # key -> time.time() of its first delivery
        self._lock = threading.Lock()
        self._server: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self.outages = 0

    def up(self) -> None:
        with self._lock:
            if self._server is not None:
                return
            server = socket.socket()
            server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            server.bind(("127.0.0.1", self.port))
            server.listen(16)
            self._server = server
        threading.Thread(target=self._accept, args=(server,), daemon=True).start()

    def down(self) -> None:
        """Stop listening and reset every connection, as a LIS that crashed."""
        with self._lock:
            server, self._server = self._server, None
            conns, self._conns = self._conns, set()
            self.outages += server is not None
        for sock in [s for s in (server,) if s is not None] + list(conns):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()

    @property
    def is_up(self) -> bool:
        return self._server is not None

    def counts(self) -> Counter[str]:
        with self._lock:
            return Counter(key for key, _, _ in self.received)

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                sock, _ = server.accept()
            except OSError:
                return
            with self._lock:
                if self._server is not server:
                    sock.close()
                    return
                self._conns.add(sock)
            threading.Thread(target=self._serve, args=(sock,), daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        buf = bytearray()
        try:
            while True:
                message = read_frame(sock, buf)
                cid = hl7_field(message, b"MSH", 10)
                key = cid if cid.startswith("SOAKH") else hl7_field(message, b"OBR", 3)
                results = sha(b"\r".join(re.findall(rb"(?:OBX|NTE)\|[^\r]*", message)))
                with self._lock:
                    if sock not in self._conns:
                        return  # went down meanwhile: not recorded, not ACKed
                    key = key.split("^")[0].strip()
                    self.received.append((key, sha(message), results))
                    self.received_at.setdefault(key, time.time())
                ack = f"MSH|^~\\&|LIS|SOAKHOSP|MEDGW|SOAKHOSP|||ACK|A{cid}|P|2.5.1\rMSA|AA|{cid}\r"
                sock.sendall(VT + ack.encode() + FS + CR)
        except OSError:
            pass
        finally:
            with self._lock:
                self._conns.discard(sock)
            with contextlib.suppress(OSError):
                sock.close()


# -- the modality and the PACS ---------------------------------------------------------


class ModalitySender(Sender):
    """A CT scanner: pydicom's CT_small with a new SOP Instance UID each, 10 per study."""

    def __init__(self, tally: Tally, rate_per_s: float, port: int, folder: Path) -> None:
        super().__init__(tally, rate_per_s)
        self.port, self.folder = port, folder
        folder.mkdir(parents=True, exist_ok=True)
        self.template = dcmread(str(get_testdata_file("CT_small.dcm")))
        # DCMTK's storescp drops trailing padding (FFFC,FFFC) even with -B: leave it out,
        # so the PACS's copy can be compared byte for byte with what the modality sent
        del self.template[0xFFFCFFFC]
        self.ae = AE(ae_title="SOAK_CT")
        self.ae.requested_contexts = [build_context(self.template.SOPClassUID)]
        for timeout in ("acse_timeout", "dimse_timeout", "network_timeout"):
            setattr(self.ae, timeout, ANSWER_TIMEOUT_S)
        self.assoc: Association | None = None
        self.path = folder / "none.dcm"

    def make(self, n: int) -> tuple[str, bytes]:
        """Written to a file (sent from it as-is); the item's bytes are the data set part."""
        ds = self.template.copy()
        ds.StudyInstanceUID = f"1.2.826.0.1.3680043.10.1437.5.{n // 10}"
        ds.SeriesInstanceUID = f"1.2.826.0.1.3680043.10.1437.6.{n // 10}"
        ds.SOPInstanceUID = f"1.2.826.0.1.3680043.10.1437.7.{n}"
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = n % 10 + 1
        path = self.folder / f"{n}.dcm"
        ds.save_as(path, enforce_file_format=True)
        self.path = path
        return ds.SOPInstanceUID, dataset_part(path.read_bytes())

    def offer(self, item_id: str, data: bytes) -> str | None:
        if self.assoc is None or not self.assoc.is_established:
            self.assoc = self.ae.associate("127.0.0.1", self.port, ae_title="MEDGW")
            if not self.assoc.is_established:
                return "association refused or failed"
        try:
            status = self.assoc.send_c_store(self.path)
        except (OSError, RuntimeError, ValueError) as err:
            return type(err).__name__
        code = getattr(status, "Status", None)
        if code is None:
            return "no C-STORE response"
        return None if code == 0 or code in (0xB000, 0xB007, 0xB006) else f"status 0x{code:04X}"

    def disconnect(self) -> None:
        if self.assoc is not None:
            with contextlib.suppress(Exception):
                self.assoc.abort()
            self.assoc = None


def dataset_part(data: bytes) -> bytes:
    """A DICOM file's bytes after the preamble and the file meta group (PS3.10 7.1)."""
    if data[128:132] != b"DICM" or data[132:136] != b"\x02\x00\x00\x00":
        raise ValueError("not a DICOM file with a group length first")
    return data[144 + int.from_bytes(data[140:144], "little") :]


def sop_instance_uid(data: bytes) -> str:
    """(0002,0003) Media Storage SOP Instance UID, read from the file meta."""
    at = data.find(b"\x02\x00\x03\x00UI", 132)
    if at < 0:
        raise ValueError("no (0002,0003)")
    length = int.from_bytes(data[at + 6 : at + 8], "little")
    return data[at + 8 : at + 8 + length].rstrip(b"\0 ").decode("ascii")


class Pacs:
    """DCMTK ``storescp`` writing each instance as received (``-B``) to its own file (``+uf``).

    ``--fork``: one process per association, as a PACS serves several modalities at
    once (a single-process storescp leaves a second association request unanswered
    until the first association ends, so a gateway's second worker waits out its
    ACSE timeout).

    :meth:`down` kills it with SIGKILL, as a PACS that crashed or a link that
    dropped; a half-written file left by the kill is not a delivery (the gateway
    had no C-STORE response for it and sends it again).
    """

    def __init__(self, port: int, folder: Path, log: Path) -> None:
        self.port, self.folder, self.log = port, folder, log
        folder.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen[bytes] | None = None
        self.outages = 0
        self._seen: dict[str, tuple[str, str, Path] | None] = {}  # name -> (uid, sha, path)

    def up(self) -> None:
        if self.proc is not None:
            return
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [
                    "storescp",
                    "--fork",
                    "-B",
                    "+uf",
                    "-aet",
                    "PACS",
                    "-od",
                    str(self.folder),
                    str(self.port),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, "TCP_NODELAY": "1"},
                start_new_session=True,  # down() kills the association children too
            )
        wait_until(lambda: port_open(self.port), 10, "storescp listening")

    @property
    def is_up(self) -> bool:
        return self.proc is not None

    def down(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.proc = None
        self.outages += 1

    def received_at(self) -> dict[str, float]:
        """SOP Instance UID -> when its first copy was written (the file's mtime)."""
        out: dict[str, float] = {}
        for uid, _, path in self.received():
            out[uid] = min(out.get(uid, float("inf")), path.stat().st_mtime)
        return out

    def received(self) -> list[tuple[str, str, Path]]:
        """(SOP Instance UID, sha256 of the data set, file) of every stored file.

        A file too short to hold its file meta (torn by a kill) is left out.
        """
        for path in self.folder.iterdir():
            if self._seen.get(path.name) is None:
                data = path.read_bytes()
                try:
                    self._seen[path.name] = (sop_instance_uid(data), sha(dataset_part(data)), path)
                except (ValueError, UnicodeDecodeError):
                    self._seen[path.name] = None
        return [v for v in self._seen.values() if v is not None]


def port_open(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
        return True
    return False


def wait_until(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(0.05)


logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)  # its refusals are our test
