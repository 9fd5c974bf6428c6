"""systemd notification protocol (sd_notify(3)): one datagram to $NOTIFY_SOCKET."""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


class Notifier:
    """Sends READY=1, WATCHDOG=1, STOPPING=1, STATUS=...; a no-op without systemd."""

    def __init__(self, env: dict[str, str] | None = None) -> None:
        env = dict(os.environ) if env is None else env
        addr = env.get("NOTIFY_SOCKET", "")
        if addr.startswith("@"):
            addr = "\0" + addr[1:]  # abstract namespace
        self._addr = addr
        self._warned = False
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        mine = not pid or pid == str(os.getpid())
        self.watchdog_interval = int(usec) / 2e6 if usec.isdigit() and mine else None

    @property
    def enabled(self) -> bool:
        return bool(self._addr)

    def notify(self, *lines: str) -> None:
        if not self._addr:
            return
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
                s.connect(self._addr)
                s.sendall("\n".join(lines).encode())
        except OSError as err:  # systemd's absence must never stop clinical traffic
            if not self._warned:
                log.warning("sdnotify.failed socket=%s error=%s", self._addr, err)
                self._warned = True
