"""Fixtures that run real `asp serve` processes (binary from $ASP_BIN)."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0


def asp_bin_path() -> str:
    """The asp binary named by $ASP_BIN; fails the test with a clear message if unusable."""
    path = os.environ.get("ASP_BIN")
    if not path:
        pytest.fail(
            "ASP_BIN is not set: point it at an asp binary, e.g. "
            "ASP_BIN=/path/to/target/release/asp pytest tests/",
            pytrace=False,
        )
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        pytest.fail(f"ASP_BIN={path!r} is not an executable file", pytrace=False)
    return path


def free_port() -> int:
    """A port that was free a moment ago (bind to port 0, read it, release it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class AspNode:
    """One `asp serve` process with its own data directory and API port."""

    def __init__(self, binary: str, data_dir: Path, extra_args: list[str]) -> None:
        self.binary = binary
        self.data_dir = data_dir
        self.extra_args = extra_args
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = data_dir.parent / (data_dir.name + ".log")

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        last_error = ""
        for _attempt in range(3):  # the port may be taken between probe and bind
            self.port = free_port()
            cmd = [
                self.binary,
                "serve",
                "--data-dir",
                str(self.data_dir),
                "--api",
                f"127.0.0.1:{self.port}",
                "--listen",
                "off",
                *self.extra_args,
            ]
            log = open(self.log_path, "ab")
            try:
                self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
            finally:
                log.close()
            ok, last_error = self._wait_healthy()
            if ok:
                return
            self.stop()
        pytest.fail(f"asp serve did not become healthy: {last_error}\n{self.log_tail()}")

    def _wait_healthy(self) -> tuple[bool, str]:
        assert self.proc is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        err = "no answer yet"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False, f"exited with {self.proc.returncode}"
            # http.client rather than urllib: no proxy from the environment.
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
            try:
                conn.request("GET", "/healthz")
                r = conn.getresponse()
                if r.status == 200 and json.loads(r.read()).get("status") == "ok":
                    return True, ""
                err = f"/healthz answered {r.status}"
            except (OSError, http.client.HTTPException, ValueError) as e:
                err = repr(e)
            finally:
                conn.close()
            time.sleep(0.05)
        return False, f"timed out after {START_TIMEOUT_S}s ({err})"

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(STOP_TIMEOUT_S)

    def token(self, ns: str = "*", ops: str = "read,write,admin", *extra: str) -> str:
        """`asp token create` against this node's data directory (needs --auth required)."""
        out = subprocess.run(
            [
                self.binary,
                "token",
                "create",
                "--data-dir",
                str(self.data_dir),
                "--ns",
                ns,
                "--ops",
                ops,
                *extra,
            ],
            capture_output=True,
            timeout=30,
            check=False,
        )
        if out.returncode != 0:
            pytest.fail(f"asp token create failed: {out.stderr.decode(errors='replace')}")
        return out.stdout.decode().strip()

    def log_tail(self, n: int = 40) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])


@pytest.fixture
def asp_node_factory() -> Iterator[object]:
    """Start nodes with `start(*extra_args)`; every one is stopped at the end."""
    binary = asp_bin_path()
    tmp = Path(tempfile.mkdtemp(prefix="asp-pyclient-"))
    nodes: list[AspNode] = []

    def start(*extra_args: str) -> AspNode:
        node = AspNode(binary, tmp / f"node{len(nodes)}", list(extra_args))
        nodes.append(node)
        node.start()
        return node

    try:
        yield start
    finally:
        for node in nodes:
            node.stop()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture
def asp_node(asp_node_factory) -> AspNode:  # type: ignore[no-untyped-def]
    """A running node without authentication."""
    return asp_node_factory()


@pytest.fixture
def asp_auth_node(asp_node_factory) -> AspNode:  # type: ignore[no-untyped-def]
    """A running node started with --auth required."""
    return asp_node_factory("--auth", "required")
