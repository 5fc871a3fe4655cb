"""The Python follower (asp_client.follower), a second implementation of the peer
protocol, against a real node: the node's binary comes from ASP_BIN.

    ASP_BIN=/path/to/asp pytest -q tests/test_follower.py

ASP_FOLLOWER_EVENTS (default 100000) sets how many events the large test writes.
No timing assertions: every wait is bounded by a generous timeout.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

# Import the follower without depending on how the package is installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from asp_client.follower import (  # noqa: E402
    Follower,
    ItemKey,
    lz4_block_decompress,
    siphash13_128,
)

EVENTS = int(os.environ.get("ASP_FOLLOWER_EVENTS", "100000"))
WAIT = 60.0  # seconds, for small things
BIG_WAIT = 900.0  # seconds, for the large test


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Node:
    """One `asp serve` process with its own data directory and ports."""

    def __init__(self, binary: str, tmp: Path):
        self.api_port = _free_port()
        self.peer_port = _free_port()
        self.data_dir = tmp / "data"
        self.log_path = tmp / "node.log"
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [binary, "serve", "--data-dir", str(self.data_dir),
             "--api", f"127.0.0.1:{self.api_port}",
             "--listen", f"127.0.0.1:{self.peer_port}"],
            stdout=self.log, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.api_port}"
        deadline = time.monotonic() + WAIT
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"asp serve exited ({self.proc.returncode}):\n{self.tail()}")
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"asp serve not healthy within {WAIT} s:\n{self.tail()}")
            time.sleep(0.1)

    def tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def request(self, method: str, path: str, body: bytes | None = None,
                content_type: str | None = None) -> dict:
        req = urllib.request.Request(self.url + path, data=body, method=method)
        if content_type:
            req.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                text = r.read()
        except urllib.error.HTTPError as e:
            raise AssertionError(f"{method} {path}: {e.code} {e.read()[:500]!r}") from None
        return json.loads(text) if text else {}

    def put(self, ns: str, key: str, value: bytes) -> dict:
        return self.request("PUT", f"/v1/ns/{ns}/kv/{key}", value, "application/octet-stream")

    def delete(self, ns: str, key: str) -> dict:
        return self.request("DELETE", f"/v1/ns/{ns}/kv/{key}")

    def batch(self, ns: str, ops: list) -> dict:
        body = json.dumps({"ops": ops}).encode()
        return self.request("POST", f"/v1/ns/{ns}/batch", body, "application/json")

    def status(self) -> dict:
        return self.request("GET", "/v1/status")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()


@pytest.fixture
def follower_node():
    binary = os.environ.get("ASP_BIN")
    if not binary:
        pytest.fail("ASP_BIN is not set: point it at the asp binary "
                    "(e.g. ASP_BIN=target/release/asp) to run the follower tests")
    if not (os.path.isfile(binary) and os.access(binary, os.X_OK)):
        pytest.fail(f"ASP_BIN={binary} is not an executable file")
    tmp = Path(tempfile.mkdtemp(prefix="asp-follower-"))
    node = _Node(binary, tmp)
    try:
        yield node
    finally:
        node.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def _peer_entry(node: _Node, follower: Follower) -> dict | None:
    want = f"{follower.node_id:016x}"
    for peer in (node.status().get("replication") or {}).get("peers", []):
        if peer.get("node_id") == want:
            return peer
    return None


def _wait(cond, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(interval)


def _catch_up(f: Follower, events: int, timeout: float) -> None:
    """Runs the follower until it applied `events` events (every write the test made
    so far) and then received two more Summaries: those were made after the writes,
    so their digests cover them. Fails fast on a digest mismatch instead of waiting
    for digests that will never agree."""
    f.run_until(lambda f: f.events_applied >= events, timeout)
    seen = f.summaries_received
    f.run_until(lambda f: f.summaries_received >= seen + 2, WAIT)


# --- without a node: the hash and codec pinned by the reference's own tests ----------


def test_items_match_the_reference_pinned_vector():
    # crates/asp-core/src/reconcile/tests.rs, items_share_their_key_half_and_differ_by_version
    key = ItemKey((0x0123456789ABCDEF).to_bytes(8, "little")
                  + (0xFEDCBA9876543210).to_bytes(8, "little"))
    item = key.item(b"user/1", (1_700_000_000_000 << 16) | 0, 7, 1)
    assert item.hex() == "aa7aca884612a30d0fe1ba74e02fba845db5ac2336a4a5c67598100097d9d2aa"
    # SipHash-1-3-128 itself: the all-zero key on empty input is a fixed value.
    assert len(siphash13_128(0, 0, b"")) == 16


def test_lz4_block_decoder_handles_literals_and_overlapping_matches():
    # "abc" as literals, then a match of offset 3 and length 9 (overlapping), then
    # the final literals "xyz".
    block = bytes([0x35]) + b"abc" + bytes([3, 0]) + bytes([0x30]) + b"xyz"
    assert lz4_block_decompress(block, 15) == b"abcabcabcabcxyz"


# --- against a real node -------------------------------------------------------------


def test_follower_receives_puts_overwrites_and_deletes(follower_node):
    node = follower_node
    ns = "pyfollow"
    node.put(ns, "a", b"one")
    node.put(ns, "a", b"two")  # overwrite
    node.put(ns, "b", b"bee")
    node.put(ns, "c", b"sea")
    node.delete(ns, "c")  # a tombstone
    node.put(ns, "d", b"\x00\xffbinary")

    f = Follower("127.0.0.1", node.peer_port)
    try:
        _catch_up(f, 6, WAIT)
        with f.lock:
            assert f.values(ns) == {"a": b"two", "b": b"bee", "d": b"\x00\xffbinary"}
            assert f.state[ns]["c"].deleted
            assert f.digest(ns) == f.peer_digest(ns)
            first_digest = f.digest(ns)

        # Writes made while connected arrive too, and the digests agree again.
        node.put(ns, "b", b"bee2")
        node.delete(ns, "a")
        node.put(ns, "e", b"eee")
        node.put(ns, "c", b"back")  # a put after a delete
        _catch_up(f, 10, WAIT)
        with f.lock:
            assert f.digest(ns) == f.peer_digest(ns)
            assert f.values(ns) == {"b": b"bee2", "c": b"back", "d": b"\x00\xffbinary",
                                    "e": b"eee"}
            assert f.state[ns]["a"].deleted
            assert f.digest(ns) != first_digest
            assert f.refused_runs == []

        # The node lists the follower as a peer that acknowledged its whole feed.
        head = node.status()["feed"]["head_seq"]
        peer = _wait(lambda: (p := _peer_entry(node, f)) and p.get("acked_seq", 0) >= head
                     and p, WAIT, "the node shows the follower's ack at its head")
        assert peer["state"] != "down"
    finally:
        f.close()


def test_follower_receives_many_events_and_its_digest_equals_the_nodes(follower_node):
    node = follower_node
    ns = "pybulk"
    n = EVENTS
    # Mostly new keys, some overwrites, some deletes: every op is one event.
    distinct = max(1, n * 9 // 10)
    ops = []
    for i in range(n):
        key = f"k{i % distinct:07d}"
        if i % 97 == 96:
            ops.append({"op": "delete", "key": key})
        else:
            ops.append({"op": "put", "key": key, "value_text": f"value {i}"})
    started = time.monotonic()
    for lo in range(0, n, 10_000):
        node.batch(ns, ops[lo:lo + 10_000])
    wrote = time.monotonic() - started
    head = node.status()["feed"]["head_seq"]
    assert head >= n

    f = Follower("127.0.0.1", node.peer_port)
    try:
        started = time.monotonic()
        _catch_up(f, n, BIG_WAIT)
        took = time.monotonic() - started
        with f.lock:
            assert f.events_applied == n
            assert f.digest(ns) == f.peer_digest(ns)
            # Spot checks of the values themselves.
            last_put = max(i for i in range(n) if i % 97 != 96 and i % distinct == 0)
            assert f.state[ns]["k0000000"].value == f"value {last_put}".encode()
            live = len(f.values(ns))
        print(f"\n{n} events: written in {wrote:.1f} s, followed in {took:.1f} s;"
              f" {live} live keys; digest {f.digest(ns).hex()[:16]}…")

        # The node shows the follower as a peer whose acknowledged position reached
        # the feed head.
        peer = _wait(lambda: (p := _peer_entry(node, f)) and p.get("acked_seq", 0) >= head
                     and p, BIG_WAIT, "the node shows the follower's ack at its head")
        assert peer["acked_seq"] >= head
    finally:
        f.close()
