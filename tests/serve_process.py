"""A real ``turnfleet serve`` subprocess for tests: started on an inherited listening socket
(``--fd``), so a client may connect at once, and stopped with SIGTERM on the way out."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping
from pathlib import Path

from turnfleet.shell.fleet import FleetProcess, listening_socket


@contextlib.contextmanager
def turnfleet_serve(env: Mapping[str, str], log_path: Path, api_keys: list[dict]) -> Iterator[tuple[str, FleetProcess]]:
    """Yields the base URL and the process (``proc.output()`` is its stdout and stderr)."""
    sock = listening_socket()
    port = sock.getsockname()[1]
    proc = FleetProcess("serve", ["serve", "--fd", str(sock.fileno())],
                        {**env, "TURNFLEET_API_KEYS": json.dumps(api_keys)}, log_path,
                        pass_fds=(sock.fileno(),)).start()
    sock.close()  # the child holds it now: if it dies, requests fail instead of waiting
    try:
        yield f"http://127.0.0.1:{port}", proc
    finally:
        proc.stop(15)
