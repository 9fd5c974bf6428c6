"""HL7 message files for technicians (``medgw hl7 send FILE...``): framed captures or plain text.

HL7 v2 separates segments with CR (HL7 v2.5.1 §2.5.2), but text editors write LF
or CR LF. A file is read as follows:

* If it contains a VT (0x0B) it is MLLP-framed, like a capture: each block's
  content is one message (HL7 v2.5.1 Appendix C). CR/LF between blocks is
  ignored; anything else outside a block, a truncated block or a last block
  without its FS raises ``ValueError``.
* Otherwise it is text: a UTF-8 byte order mark is dropped, CR LF and LF become
  CR, blank lines are dropped, and each line starting with ``MSH`` begins a new
  message (several messages per file). Each message ends with CR. Non-blank
  text before the first MSH raises ``ValueError``.
"""

from drivers.hl7.mllp import FrameReceived, MllpFramer

_BOM = b"\xef\xbb\xbf"


def read_messages(data: bytes) -> list[bytes]:
    """The messages in a file's bytes (see the module docstring)."""
    if b"\x0b" in data:
        return _framed(data)
    if data.startswith(_BOM):
        data = data[len(_BOM) :]
    messages: list[list[bytes]] = []
    for line in data.replace(b"\r\n", b"\r").replace(b"\n", b"\r").split(b"\r"):
        if not line.strip():
            continue
        if line.startswith(b"MSH"):
            messages.append([line])
        elif messages:
            messages[-1].append(line)
        else:
            raise ValueError(f"text before the first MSH segment: {line[:40]!r}")
    return [b"\r".join(lines) + b"\r" for lines in messages]


def _framed(data: bytes) -> list[bytes]:
    # One extra VT at the end turns a last block left open (no FS) into FrameTruncated.
    events = MllpFramer(max_size=len(data)).feed(data + b"\x0b")
    problems = [event for event in events if not isinstance(event, FrameReceived)]
    if problems:
        raise ValueError(f"not a clean MLLP capture: {problems[0]!r:.120}")
    return [event.data for event in events if isinstance(event, FrameReceived)]
