"""MLLP framing layer (sans-IO): HL7 v2.5.1 Appendix C, Minimal Lower Layer Protocol.

A block is ``<VT> message <FS><CR>`` (VT = 0x0B start block, FS = 0x1C end block,
CR = 0x0D). :class:`MllpFramer` turns received bytes, in reads of any size, into
typed events; :func:`frame` wraps a message for sending.

Leniency, on purpose: an FS not followed by CR still ends the block; CR/LF and
other whitespace between blocks is dropped silently; a VT inside an open block
reports the open block as truncated and starts a new one.
"""

from dataclasses import dataclass

START_BLOCK = b"\x0b"
END_BLOCK = b"\x1c"
CR = b"\x0d"

HEAD_SIZE = 4096
"""Bytes kept from junk runs and oversize blocks, for logs and diagnostics."""

_CR = 0x0D


def frame(message: bytes) -> bytes:
    """Wrap one message in an MLLP block: VT + message + FS CR."""
    return START_BLOCK + message + END_BLOCK + CR


@dataclass(frozen=True, slots=True)
class FrameReceived:
    """A complete message: the content between VT and FS."""

    data: bytes


@dataclass(frozen=True, slots=True)
class JunkReceived:
    """Bytes outside any block: ``data`` is the first 4096 bytes, ``size`` the total."""

    data: bytes
    size: int


@dataclass(frozen=True, slots=True)
class FrameTruncated:
    """A block interrupted by a new VT before its FS; ``data`` is what it held."""

    data: bytes


@dataclass(frozen=True, slots=True)
class FrameTooLarge:
    """A block longer than ``max_size``: its first 4096 bytes and its full size.

    Reported when its FS (or a new VT) arrives; the content past the head was
    discarded as it came in.
    """

    head: bytes
    size: int


FramerEvent = FrameReceived | JunkReceived | FrameTruncated | FrameTooLarge


class MllpFramer:
    """Bytes in, :data:`FramerEvent` list out; holds at most ``max_size`` bytes of a block.

    Each ``feed`` scans only the new bytes with ``bytes.find``; a block split over
    many reads accumulates in one ``bytearray``, so a large block costs linear time.
    """

    def __init__(self, max_size: int = 64 * 1024 * 1024) -> None:
        if max_size < 0:
            raise ValueError("max_size must be >= 0")
        self._max_size = max_size
        self._in_block = False
        self._buf = bytearray()  # content of the open block (only its head once too large)
        self._size = 0  # total content bytes of the open block
        self._too_large = False
        self._after_fs = False  # the last feed ended with an FS: a CR starting the next is its

    @property
    def buffered(self) -> int:
        """Bytes held for an incomplete block."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[FramerEvent]:
        """Process received bytes; return the events they complete, in order."""
        events: list[FramerEvent] = []
        n = len(data)
        pos = 0
        if self._after_fs and n:
            self._after_fs = False
            if data[0] == _CR:
                pos = 1
        fs = -1  # position of the next FS at or after pos (n: none), reused while valid
        while pos < n:
            if not self._in_block:
                vt = data.find(START_BLOCK, pos)
                end = n if vt < 0 else vt
                if end > pos:
                    self._junk(data[pos:end], events)
                if vt < 0:
                    break
                self._open()
                pos = vt + 1
                continue
            if fs < pos:
                fs = data.find(END_BLOCK, pos)
                if fs < 0:
                    fs = n
            vt = data.find(START_BLOCK, pos, fs)
            if vt >= 0:
                self._append(data, pos, vt)
                events.append(self._close(truncated=True))
                self._open()
                pos = vt + 1
                continue
            if fs == n:
                self._append(data, pos, n)
                break
            if not self._buf and not self._too_large and fs - pos <= self._max_size:
                events.append(FrameReceived(bytes(data[pos:fs])))  # the whole block in one read
                self._in_block = False
            else:
                self._append(data, pos, fs)
                events.append(self._close(truncated=False))
            pos = fs + 1
            if pos == n:
                self._after_fs = True
            elif data[pos] == _CR:
                pos += 1
        return events

    def _open(self) -> None:
        self._in_block = True
        self._buf.clear()
        self._size = 0
        self._too_large = False

    def _append(self, data: bytes, start: int, end: int) -> None:
        if end <= start:
            return
        self._size += end - start
        if self._too_large:
            return
        if self._size > self._max_size:
            self._too_large = True
            keep = HEAD_SIZE - len(self._buf)
            if keep > 0:
                self._buf += memoryview(data)[start : min(end, start + keep)]
            else:
                del self._buf[HEAD_SIZE:]
            return
        self._buf += memoryview(data)[start:end]

    def _close(self, *, truncated: bool) -> FramerEvent:
        content = bytes(self._buf)
        self._buf.clear()
        self._in_block = False
        event: FramerEvent
        if self._too_large:
            event = FrameTooLarge(content, self._size)
        elif truncated:
            event = FrameTruncated(content)
        else:
            event = FrameReceived(content)
        self._too_large = False
        self._size = 0
        return event

    @staticmethod
    def _junk(run: bytes, events: list[FramerEvent]) -> None:
        if run.isspace():
            return
        events.append(JunkReceived(bytes(run[:HEAD_SIZE]), len(run)))
