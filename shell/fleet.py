"""Starting and stopping the fleet's processes (workers, telemetry) as real subprocesses.

Used by ``turnfleet demo`` and by the tests, so both exercise the same processes a
deployment runs.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path


class FleetProcess:
    """One ``turnfleet VERB`` child process, its output going to a log file."""

    def __init__(self, name: str, args: list[str], env: Mapping[str, str], log_path: Path,
                 pass_fds: tuple[int, ...] = ()) -> None:
        self.name = name
        self.args = args
        self.pass_fds = pass_fds  # descriptors the child inherits (``serve --fd``)
        self.env = dict(env)
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> FleetProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "turnfleet.shell.cli", *self.args],
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C in the terminal reaches the parent only
            pass_fds=self.pass_fds,
        )
        log.close()
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout_s: float = 15.0) -> int | None:
        """SIGTERM, then SIGKILL if it does not exit within ``timeout_s``."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def wait(self, timeout_s: float) -> int:
        assert self.process is not None
        return self.process.wait(timeout_s)

    def output(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


def fleet_env(redis_url: str, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["REDIS_URL"] = redis_url
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def listening_socket(host: str = "127.0.0.1") -> socket.socket:
    """A TCP socket bound to a free port and already listening, to hand to ``serve --fd``.

    Connections queue on it from now on, so a client may connect at once and is answered as
    soon as the server is up: no readiness polling. The socket is inheritable; close it in
    the parent once the child has started.
    """
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY on accepted connections only when the
    # socket says TCP (otherwise answers wait ~40 ms on Nagle against delayed ACKs).
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    sock.listen(1024)
    sock.set_inheritable(True)
    return sock
