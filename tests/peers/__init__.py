"""Real peers for end-to-end tests, written without the gateway's code.

The MLLP framing and MSH/MSA reading here are deliberately our own few lines
(HL7 v2.5.1 Appendix C: ``<VT> message <FS><CR>``), so a bug in
``drivers.hl7`` cannot hide behind the same bug in the test's peers.

The receiver and the sender are scripts (``python tests/peers/mllp_receiver.py``)
that the tests run as subprocesses; they find this module by putting ``tests/``
on ``sys.path``.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

VT, FS, CR = b"\x0b", b"\x1c", b"\x0d"


def frame(message: bytes) -> bytes:
    return VT + message + FS + CR


class FrameReader:
    """Bytes in, complete block contents out; bytes outside blocks are dropped."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        out = []
        while True:
            start = self._buf.find(VT)
            if start < 0:
                self._buf.clear()
                return out
            end = self._buf.find(FS, start + 1)
            if end < 0:
                del self._buf[:start]
                return out
            out.append(bytes(self._buf[start + 1 : end]))
            del self._buf[: end + 1]


def separator(message: bytes) -> str:
    """MSH-1, the field separator (``|`` when there is no readable MSH)."""
    start = message.find(b"MSH")
    return chr(message[start + 3]) if start >= 0 and len(message) > start + 3 else "|"


def segment_fields(message: bytes, name: str) -> list[str]:
    """The fields of the first segment called ``name``, padded with empty ones.

    For MSH, ``fields[n - 1]`` is MSH-n (MSH-1 is the separator itself).
    """
    sep = separator(message)
    for seg in message.replace(b"\r\n", b"\r").replace(b"\n", b"\r").split(b"\r"):
        text = seg.decode("latin-1")
        if text.startswith(name + sep):
            return text.split(sep) + [""] * 20
    return [""] * 21


def control_id_of(message: bytes) -> str:
    """MSH-10."""
    return segment_fields(message, "MSH")[9]


def digest(message: bytes) -> str:
    return hashlib.sha256(message).hexdigest()


class DurableLines:
    """An append-only text file; every line is flushed and fsynced before ``add`` returns."""

    def __init__(self, path: Path) -> None:
        self._f = open(path, "a", encoding="utf-8")

    def add(self, line: str) -> None:
        self._f.write(line + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()


def read_lines(path: Path) -> list[str]:
    """The complete lines of a record file (a torn last line, if any, is left out)."""
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    return [line for line in lines[:-1] if line]
