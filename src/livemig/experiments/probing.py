"""Run client probes as processes inside the client's namespace and collect their JSON.

Each probe is ``livemig probe ...`` in its own process, so that its 1 ms timing is not
disturbed by whatever the caller is doing, and it can run for exactly as long as the
caller needs: until ``stop()``, which sends SIGINT; the probe then writes its JSON.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from livemig.errors import LivemigError
from livemig.net.testbed import Node


class ProbeFailed(LivemigError):
    def __init__(self, kind: str, returncode: int, stderr: str) -> None:
        super().__init__(f"the {kind} probe failed (status {returncode}): {stderr.strip()[-300:]}")
        self.kind = kind
        self.returncode = returncode
        self.stderr = stderr


async def wait_measuring(probes: list[ProbeRun], timeout: float = 30.0) -> None:
    """Wait until every probe has opened its socket (or exited, or ``timeout`` passed)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(p.has_socket() or p.exited() for p in probes):
            return
        await asyncio.sleep(0.05)


class ProbeRun:
    """One probe process. Use as a context manager: it never outlives the ``with``."""

    def __init__(self, node: Node, kind: str, *args: str) -> None:
        self.kind = kind
        fd, name = tempfile.mkstemp(prefix=f"livemig-probe-{kind}-", suffix=".json")
        os.close(fd)
        self.output = Path(name)
        argv = [sys.executable, "-m", "livemig.cli", "probe", kind, *args, "-o", name]
        self._process = subprocess.Popen(
            node.exec_argv(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )

    def has_socket(self) -> bool:
        """Whether the probe has opened a socket yet: it is past its start-up (an
        interpreter and its imports, seconds on a loaded machine) and measuring."""
        fd_dir = Path(f"/proc/{self._process.pid}/fd")
        try:
            for fd in fd_dir.iterdir():
                with contextlib.suppress(OSError):
                    if os.readlink(fd).startswith("socket:"):
                        return True
        except OSError:
            pass  # exited already: stop() reports why
        return False

    def exited(self) -> bool:
        return self._process.poll() is not None

    def stop(self, timeout: float = 30.0) -> dict[str, Any]:
        """End the probe (if it still runs) and return its JSON."""
        if self._process.poll() is None:
            self._process.send_signal(signal.SIGINT)
        try:
            _, stderr = self._process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._process.kill()
            _, stderr = self._process.communicate()
        try:
            if self._process.returncode != 0:
                raise ProbeFailed(self.kind, self._process.returncode, stderr)
            result: dict[str, Any] = json.loads(self.output.read_text())
            return result
        finally:
            self.output.unlink(missing_ok=True)

    def wait(self, timeout: float = 60.0) -> dict[str, Any]:
        """Let a probe with a ``--duration`` finish by itself."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._process.wait(timeout=timeout)  # past the timeout, stop() ends it
        return self.stop()

    def __enter__(self) -> ProbeRun:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._process.poll() is None:
            self._process.kill()
            self._process.communicate()
        self.output.unlink(missing_ok=True)
