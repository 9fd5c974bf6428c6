"""Loading the real analyzer captures in /work/shared/samples/lab (see its README.md).

Frames are cut with :func:`drivers.astm.frames.iter_frames` and normalised to end in
CR LF before the strict :func:`drivers.astm.frames.parse_frame`: files 01-03 store a
bare LF after the checksum (senaite splits them by lines) and files 04-05 end with
the checksum and a CR at end of file (no LF). Nothing else is changed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from drivers.astm import frames

SAMPLES = Path("/work/shared/samples/lab")


@dataclass(frozen=True)
class Capture:
    """One ASTM capture: its bytes, frames as stored and as normalised, and the parsed frames."""

    data: bytes
    stored: list[bytes]  # as cut from the file (lengths as the manifest counts them)
    parsed: list[frames.Frame]

    @property
    def text(self) -> bytes:
        """The message text: the frames' texts joined (what the link layer delivers)."""
        return b"".join(f.text for f in self.parsed)

    @property
    def between(self) -> bytes:
        """Bytes outside the frames (ENQ, EOT)."""
        rest = self.data
        for frame in self.stored:
            rest = rest.replace(frame, b"", 1)
        return rest


@cache
def manifest() -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = json.loads((SAMPLES / "MANIFEST.json").read_text())
    return entries


def entry(prefix: str) -> dict[str, Any]:
    """The manifest entry whose file name starts with ``prefix`` (``"04"``)."""
    (found,) = [e for e in manifest() if e["file"].startswith(prefix)]
    return found


def read(prefix: str) -> bytes:
    name: str = entry(prefix)["file"]
    return (SAMPLES / name).read_bytes()


def normalise(frame: bytes) -> bytes:
    """End a cut frame in CR LF (the two storage quirks above); other frames unchanged."""
    if frame.endswith(b"\r\n"):
        return frame
    if frame.endswith(b"\n"):
        return frame[:-1] + b"\r\n"
    if frame.endswith(b"\r"):
        return frame + b"\n"
    return frame


def capture(prefix: str) -> Capture:
    data = read(prefix)
    stored = frames.iter_frames(data)
    return Capture(data, stored, [frames.parse_frame(normalise(f)) for f in stored])


def astm_prefixes() -> list[str]:
    return [e["file"][:2] for e in manifest() if e["protocol"].startswith("ASTM")]
