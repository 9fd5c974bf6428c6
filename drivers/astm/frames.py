"""ASTM E1381 / CLSI LIS01-A2 frames: checksum, building and reading one frame (sans-IO).

A frame is ``STX FN text ETB|ETX C1 C2 CR LF`` (E1381 section 6.3): FN is the frame
number digit ``0``..``7``; the checksum is the sum of the bytes from FN through
ETB/ETX, modulo 256, as two hexadecimal digits (uppercase when sent; lowercase is
accepted). A frame ending in ETB is an *intermediate* frame: its text continues in
the next frame; ETX ends the message text (section 6.3.1.2).
"""

from __future__ import annotations

from dataclasses import dataclass

STX = 0x02
ETX = 0x03
EOT = 0x04
ENQ = 0x05
ACK = 0x06
NAK = 0x15
ETB = 0x17
CR = 0x0D
LF = 0x0A

# E1381 (legacy): at most 247 characters per frame, so 240 characters of text
LEGACY_FRAME_SIZE = 247
# CLSI LIS01-A2 section 8.3.1: frames up to 64,000 bytes
LIS01_A2_FRAME_SIZE = 64_000
FRAME_OVERHEAD = 7  # STX FN ETX C1 C2 CR LF


class FrameError(ValueError):
    """A frame that cannot be read (its reason is the NAK's explanation in the log)."""


@dataclass(frozen=True, slots=True)
class Frame:
    number: int  # 0..7, or -1 when the frame had none (a relaxation)
    text: bytes
    final: bool  # ETX (end of the message text) rather than ETB


def checksum(data: bytes) -> bytes:
    """Two uppercase hex digits: sum of ``data`` modulo 256 (FN through ETX/ETB)."""
    return b"%02X" % (sum(data) & 0xFF)


def build_frame(number: int, text: bytes, *, final: bool) -> bytes:
    body = b"%d" % (number % 8) + text + bytes([ETX if final else ETB])
    return bytes([STX]) + body + checksum(body) + b"\r\n"


def split_message(
    text: bytes, *, frame_size: int = LEGACY_FRAME_SIZE, first_number: int = 1
) -> list[bytes]:
    """Frames carrying ``text`` (records, each ending in CR), numbered from ``first_number``.

    Text is cut at ``frame_size - 7`` bytes, wherever that falls (E1381 section
    6.3.1.2 allows a cut inside a record, even inside a field); the last frame ends
    in ETX, the others in ETB.
    """
    room = frame_size - FRAME_OVERHEAD
    if room < 1:
        raise ValueError(f"frame_size {frame_size} leaves no room for text")
    chunks = [text[i : i + room] for i in range(0, len(text), room)] or [b""]
    last = len(chunks) - 1
    return [build_frame(first_number + i, chunk, final=i == last) for i, chunk in enumerate(chunks)]


def parse_frame(
    frame: bytes, *, allow_bare_lf: bool = False, allow_missing_number: bool = False
) -> Frame:
    """Read one frame from STX through LF; raises FrameError with the reason.

    ``allow_bare_lf``: accept ``C1 C2 LF`` without the CR (fixtures and some
    instruments). ``allow_missing_number``: accept a frame whose text starts right
    after STX (the checksum then covers the text from its first byte).
    """
    if len(frame) < 6 or frame[0] != STX:
        raise FrameError("frame does not start with STX")
    if frame.endswith(b"\r\n"):
        core = frame[1:-2]
    elif allow_bare_lf and frame.endswith(b"\n"):
        core = frame[1:-1]
    else:
        raise FrameError("frame does not end with CR LF")
    if len(core) < 4:
        raise FrameError("frame too short")
    body, received = core[:-2], core[-2:]
    end = body[-1]
    if end not in (ETX, ETB):
        raise FrameError("no ETX or ETB before the checksum")
    if checksum(body) != received.upper():
        raise FrameError(
            f"checksum mismatch: received {received.decode('latin-1')!r}, "
            f"computed {checksum(body).decode()}"
        )
    first = body[0]
    if 0x30 <= first <= 0x37:
        number, text = first - 0x30, body[1:-1]
    elif allow_missing_number:
        number, text = -1, body[:-1]
    else:
        raise FrameError(f"frame number {chr(first)!r} is not 0..7")
    return Frame(number, text, end == ETX)


def iter_frames(data: bytes) -> list[bytes]:
    """Cut a capture into frames (STX .. LF), ignoring bytes between them (ENQ, EOT, ACKs).

    For reading fixture files and replaying captures; the live receiver is
    :class:`drivers.astm.link.AstmLink`.
    """
    frames = []
    i = data.find(bytes([STX]))
    while i >= 0:
        end = data.find(b"\n", i)
        if end < 0:
            frames.append(data[i:])
            break
        frames.append(data[i : end + 1])
        i = data.find(bytes([STX]), end + 1)
    return frames


# E1381 section 6.6 (LIS01-A2 8.6): characters a message's text may not contain
# (SOH STX ETX EOT ENQ ACK DLE NAK SYN ETB LF DC1..DC4); the record layer escapes them.
RESTRICTED = frozenset(
    {0x01, STX, ETX, EOT, ENQ, ACK, 0x10, NAK, 0x16, ETB, LF, 0x11, 0x12, 0x13, 0x14}
)


def split_records(
    text: bytes, *, frame_size: int = LEGACY_FRAME_SIZE, first_number: int = 1
) -> list[bytes]:
    """Frames carrying ``text`` one record per frame, numbered from ``first_number``.

    Records end at CR (a last record without one is sent as it is). A record longer
    than ``frame_size - 7`` bytes goes out as intermediate (ETB) frames ending in an
    ETX frame, cut by :func:`split_message` (E1381 section 6.3.1.2).
    """
    frames: list[bytes] = []
    start = 0
    while start < len(text):
        end = text.find(b"\r", start)
        end = len(text) if end < 0 else end + 1
        frames += split_message(
            text[start:end], frame_size=frame_size, first_number=first_number + len(frames)
        )
        start = end
    return frames
