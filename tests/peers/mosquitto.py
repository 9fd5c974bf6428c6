"""A real Mosquitto broker (Debian's package) on a free loopback port, stopped by pid.

Anonymous by default; ``users={"name": "password"}`` turns on a password file
written with ``mosquitto_passwd``. No persistence: a restart forgets retained
messages, which is what a broker that lost its disk looks like.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from peers.gateway_proc import Proc, pick_free_port, port_open, wait_for

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


def available() -> bool:
    return Path(MOSQUITTO).exists()


class Mosquitto(Proc):
    def __init__(
        self,
        workdir: Path,
        *,
        port: int | None = None,
        users: dict[str, str] | None = None,
        tls: tuple[Path, Path, Path] | None = None,  # (CA, server cert, server key), PEM
    ) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or pick_free_port()
        conf = [f"listener {self.port} 127.0.0.1", "persistence false", "log_dest stdout"]
        if tls is not None:
            ca, cert, key = tls
            conf += [f"cafile {ca}", f"certfile {cert}", f"keyfile {key}", "tls_version tlsv1.2"]
        if os.geteuid() == 0:  # otherwise it drops to user mosquitto, who cannot read tmp_path
            conf.append("user root")
        if users:
            pwfile = workdir / "passwd"
            pwfile.write_text("", encoding="utf-8")
            for name, password in users.items():
                subprocess.run(
                    ["mosquitto_passwd", "-b", str(pwfile), name, password],
                    check=True,
                    capture_output=True,
                )
            pwfile.chmod(0o600)
            conf += ["allow_anonymous false", f"password_file {pwfile}"]
        else:
            conf.append("allow_anonymous true")
        self.conf = workdir / "mosquitto.conf"
        self.conf.write_text("\n".join(conf) + "\n", encoding="utf-8")
        super().__init__("mosquitto", [MOSQUITTO, "-c", str(self.conf)], workdir / "mosquitto.log")

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 10.0) -> Mosquitto:
        self.spawn()

        def ready() -> bool:
            if not self.running():
                raise AssertionError(f"mosquitto exited at start:\n{self.log_tail()}")
            return port_open(self.port)

        wait_for(ready, timeout_s, f"mosquitto on port {self.port}")
        return self

    def stop(self) -> None:
        if self.running():
            self.terminate(10)
