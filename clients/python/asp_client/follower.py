"""A read-only follower of an asp cluster, speaking the peer protocol (docs/PROTOCOL.md).

The follower dials one node over plain TCP, does the Hello handshake, grants credit,
receives Summaries and Events, applies the events of ``lww`` namespaces to an
in-memory map (last writer wins by ``(hlc, origin, counter)``; a delete leaves a
tombstone), acknowledges them, and keeps each namespace's digest (symbol 0 of its
reconciliation symbols) up to date, so that it can be compared with the digest of the
node's last Summary.

It never sends events of its own. Reconciliation runs the node starts are declined
with ``ReconcileEnd(refused)``, except *transfer* runs (the node sends its whole state
of a namespace as ``Repair`` frames when a handover finds the follower holding nothing
of it), which only bring state in: those are applied and answered with a
``RepairEnd`` without ``covered``.

Stdlib only: SipHash-1-3-128 and the LZ4 block decoder are implemented here.

    f = Follower("127.0.0.1", 7800)
    f.run_until(lambda f: f.digest("ns") == f.peer_digest("ns"), timeout=30)
    f.state["ns"]["key"].value     # bytes, or None for a deleted key
    f.close()

The link runs on a background thread started by :meth:`Follower.start` (or the
first :meth:`Follower.run_until`); read ``state`` and the digests while holding
``follower.lock`` if the link is still running, or from a ``run_until`` predicate
(which is called with the lock held).
"""

from __future__ import annotations

import os
import select
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

__all__ = [
    "Follower",
    "Entry",
    "ItemKey",
    "ProtocolError",
    "LinkClosed",
    "lz4_block_decompress",
    "siphash13_128",
]

# ---------------------------------------------------------------------------
# Constants of the protocol

MAGIC = b"ASPR"
VERSION_MIN = 1
VERSION_MAX = 4
FRAME_BYTES_MAX = 16 << 20
EVENTS_RAW_BYTES_MAX = 64 << 20

T_HELLO = 1
T_ERROR = 2
T_SUMMARY = 3
T_EVENTS = 4
T_ACK = 5
T_CREDIT = 6
T_HEARTBEAT = 7
T_RECONCILE_START = 8
T_RECONCILE_SYMBOLS = 9
T_RECONCILE_CREDIT = 10
T_RECONCILE_END = 11
T_REPAIR = 12
T_REPAIR_END = 13
T_SUMMARY_PART = 14
T_REPAIR_END_COUNTED = 15
T_MEMBERS = 16

FRAME_NAMES = {
    1: "Hello", 2: "Error", 3: "Summary", 4: "Events", 5: "Ack", 6: "Credit",
    7: "Heartbeat", 8: "ReconcileStart", 9: "ReconcileSymbols", 10: "ReconcileCredit",
    11: "ReconcileEnd", 12: "Repair", 13: "RepairEnd", 14: "SummaryPart",
    15: "RepairEnd(counted)", 16: "Members",
}

ERROR_CODES = {
    1: "protocol", 2: "version_mismatch", 3: "cluster_mismatch", 4: "self_connection",
    5: "duplicate_link", 6: "idle_timeout", 7: "handshake_timeout", 8: "clock_skew",
    9: "flow_control", 10: "shutdown", 11: "internal", 12: "invalid_event",
    13: "node_conflict",
}
E_PROTOCOL = 1
E_VERSION_MISMATCH = 2
E_CLUSTER_MISMATCH = 3
E_SELF_CONNECTION = 4
E_IDLE_TIMEOUT = 6
E_HANDSHAKE_TIMEOUT = 7
E_FLOW_CONTROL = 9
E_SHUTDOWN = 10

MODE_WINDOW, MODE_FULL, MODE_TRANSFER = 0, 1, 2
OUTCOME_REFUSED = 3

OP_PUT, OP_DELETE = 0, 1
OP_EPOCH = 0x80
OP_EXPIRES = 0x40

M64 = 0xFFFFFFFFFFFFFFFF


class ProtocolError(Exception):
    """The peer broke the protocol (or sent what this follower cannot take)."""

    def __init__(self, message: str, code: int = E_PROTOCOL):
        super().__init__(message)
        self.code = code


class LinkClosed(Exception):
    """The link ended; ``code`` is the error code (None: the connection just ended)."""

    def __init__(self, message: str, code: Optional[int] = None, by_peer: bool = True):
        super().__init__(message)
        self.code = code
        self.by_peer = by_peer


# ---------------------------------------------------------------------------
# SipHash-1-3 with 128-bit output (the reference algorithm's 128-bit variant)


def _rotl(x: int, b: int) -> int:
    return ((x << b) | (x >> (64 - b))) & M64


def siphash13_128(k0: int, k1: int, data: bytes) -> bytes:
    """SipHash-1-3-128 of ``data`` under the key ``(k0, k1)`` (two u64, i.e. the 16
    key bytes read as two little-endian u64). Returns 16 bytes: h1 then h2, each
    little-endian."""
    v0 = k0 ^ 0x736F6D6570736575
    v1 = k1 ^ 0x646F72616E646F6D ^ 0xEE
    v2 = k0 ^ 0x6C7967656E657261
    v3 = k1 ^ 0x7465646279746573
    n = len(data)
    end = n - (n & 7)

    def rnd(v0, v1, v2, v3):
        v0 = (v0 + v1) & M64
        v1 = ((v1 << 13) | (v1 >> 51)) & M64
        v1 ^= v0
        v0 = ((v0 << 32) | (v0 >> 32)) & M64
        v2 = (v2 + v3) & M64
        v3 = ((v3 << 16) | (v3 >> 48)) & M64
        v3 ^= v2
        v0 = (v0 + v3) & M64
        v3 = ((v3 << 21) | (v3 >> 43)) & M64
        v3 ^= v0
        v2 = (v2 + v1) & M64
        v1 = ((v1 << 17) | (v1 >> 47)) & M64
        v1 ^= v2
        v2 = ((v2 << 32) | (v2 >> 32)) & M64
        return v0, v1, v2, v3

    from_bytes = int.from_bytes
    for off in range(0, end, 8):
        m = from_bytes(data[off:off + 8], "little")
        v3 ^= m
        v0, v1, v2, v3 = rnd(v0, v1, v2, v3)
        v0 ^= m
    b = ((n & 0xFF) << 56) | from_bytes(data[end:], "little")
    v3 ^= b
    v0, v1, v2, v3 = rnd(v0, v1, v2, v3)
    v0 ^= b
    v2 ^= 0xEE
    for _ in range(3):
        v0, v1, v2, v3 = rnd(v0, v1, v2, v3)
    h1 = v0 ^ v1 ^ v2 ^ v3
    v1 ^= 0xDD
    for _ in range(3):
        v0, v1, v2, v3 = rnd(v0, v1, v2, v3)
    h2 = v0 ^ v1 ^ v2 ^ v3
    return h1.to_bytes(8, "little") + h2.to_bytes(8, "little")


def _fmix(z: int) -> int:
    """The splitmix64 finaliser."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


class ItemKey:
    """The cluster's 128-bit reconciliation key (PROTOCOL.md, *Reconciliation*)."""

    def __init__(self, key: bytes):
        if len(key) != 16:
            raise ValueError("an item key is 16 bytes")
        self.k0 = int.from_bytes(key[:8], "little")
        self.k1 = int.from_bytes(key[8:], "little")

    @classmethod
    def from_hex(cls, hex_key: str) -> "ItemKey":
        """The ``reconcile_key`` setting: 32 hex digits."""
        return cls(bytes.fromhex(hex_key.strip()))

    @classmethod
    def derive(cls, context: bytes) -> "ItemKey":
        """The key a cluster without ``reconcile_key`` uses: derived from its id."""
        data = len(context).to_bytes(8, "little") + context
        return cls(siphash13_128(0x617370206974656D, 0x206B657920763121, data))

    def key_hash(self, key: bytes) -> bytes:
        return siphash13_128(self.k0, self.k1, b"k" + len(key).to_bytes(8, "little") + key)

    def item(self, key: bytes, hlc: int, origin: int, counter: int,
             key_hash: Optional[bytes] = None) -> bytes:
        kh = key_hash if key_hash is not None else self.key_hash(key)
        data = (b"v" + len(key).to_bytes(8, "little") + key
                + struct.pack("<QQQ", hlc, origin, counter))
        return kh + siphash13_128(self.k0, self.k1, data)

    def check(self, item: bytes) -> int:
        """The item's 64-bit checksum (a symbol carries its low 30 bits)."""
        w0, w1, w2, w3 = struct.unpack("<QQQQ", item)
        h = _fmix(w0 ^ self.k0)
        h = _fmix(h ^ w1)
        h = _fmix(h ^ w2)
        return _fmix(h ^ w3 ^ self.k1)


class Symbol0:
    """Symbol 0 of a namespace: XOR of every item, XOR of their checksums, count."""

    __slots__ = ("sum", "check", "count")

    def __init__(self):
        self.sum = 0
        self.check = 0
        self.count = 0

    def toggle(self, item: bytes, check: int, sign: int) -> None:
        self.sum ^= int.from_bytes(item, "little")
        self.check ^= check
        self.count += sign

    def encode(self) -> bytes:
        word = ((self.check & ((1 << 30) - 1)) << 2) | (self.count & 3)
        return self.sum.to_bytes(32, "little") + struct.pack("<I", word)


# ---------------------------------------------------------------------------
# LZ4 block format (no frame, no size prefix): the decoder only


def lz4_block_decompress(src: bytes, raw_len: int) -> bytes:
    dst = bytearray()
    i = 0
    n = len(src)
    while True:
        if i >= n:
            raise ProtocolError("bad lz4 data: truncated")
        token = src[i]
        i += 1
        lit = token >> 4
        if lit == 15:
            while True:
                if i >= n:
                    raise ProtocolError("bad lz4 data: truncated literal length")
                b = src[i]
                i += 1
                lit += b
                if b != 255:
                    break
        if i + lit > n:
            raise ProtocolError("bad lz4 data: literals past the end")
        dst += src[i:i + lit]
        i += lit
        if i == n:
            break  # the last sequence has literals only
        if i + 2 > n:
            raise ProtocolError("bad lz4 data: truncated offset")
        off = src[i] | (src[i + 1] << 8)
        i += 2
        ml = token & 15
        if ml == 15:
            while True:
                if i >= n:
                    raise ProtocolError("bad lz4 data: truncated match length")
                b = src[i]
                i += 1
                ml += b
                if b != 255:
                    break
        ml += 4
        if off == 0 or off > len(dst):
            raise ProtocolError("bad lz4 data: offset out of range")
        if len(dst) + ml > raw_len:
            raise ProtocolError("bad lz4 data: longer than the raw length")
        start = len(dst) - off
        if off >= ml:
            dst += dst[start:start + ml]
        else:
            pattern = bytes(dst[start:])
            dst += (pattern * (ml // off + 1))[:ml]
    if len(dst) != raw_len:
        raise ProtocolError(f"lz4 data holds {len(dst)} bytes, the header says {raw_len}")
    return bytes(dst)


# ---------------------------------------------------------------------------
# Version vectors with gaps: {origin: [[low, high], ...]} sorted, disjoint, non-adjacent


def vv_contains(vv: Dict[int, List[List[int]]], origin: int, counter: int) -> bool:
    ranges = vv.get(origin)
    if not ranges:
        return False
    last = ranges[-1]
    if counter > last[1]:
        return False
    if counter >= last[0]:
        return True
    lo, hi = 0, len(ranges) - 1
    while lo <= hi:
        mid = (lo + hi) // 2
        r = ranges[mid]
        if counter < r[0]:
            hi = mid - 1
        elif counter > r[1]:
            lo = mid + 1
        else:
            return True
    return False


def vv_add_range(vv: Dict[int, List[List[int]]], origin: int, low: int, high: int) -> None:
    ranges = vv.setdefault(origin, [])
    if not ranges or low > ranges[-1][1] + 1:
        ranges.append([low, high])
        return
    if low >= ranges[-1][0] and low <= ranges[-1][1] + 1:
        ranges[-1][1] = max(ranges[-1][1], high)
        return
    # General case: merge into place.
    out: List[List[int]] = []
    placed = False
    for r in ranges:
        if r[1] + 1 < low:
            out.append(r)
        elif high + 1 < r[0]:
            if not placed:
                out.append([low, high])
                placed = True
            out.append(r)
        else:
            low = min(low, r[0])
            high = max(high, r[1])
    if not placed:
        out.append([low, high])
    out.sort()
    vv[origin] = out


def vv_add(vv: Dict[int, List[List[int]]], origin: int, counter: int) -> None:
    vv_add_range(vv, origin, counter, counter)


def vv_join(into: Dict[int, List[List[int]]], other: Dict[int, List[List[int]]]) -> None:
    for origin, ranges in other.items():
        for lo, hi in ranges:
            vv_add_range(into, origin, lo, hi)


# ---------------------------------------------------------------------------
# Byte reading


class Reader:
    __slots__ = ("buf", "pos", "what")

    def __init__(self, buf: bytes, what: str):
        self.buf = buf
        self.pos = 0
        self.what = what

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.buf):
            raise ProtocolError(f"malformed {self.what} frame: truncated")
        b = self.buf[self.pos:self.pos + n]
        self.pos += n
        return b

    def u8(self) -> int:
        if self.pos >= len(self.buf):
            raise ProtocolError(f"malformed {self.what} frame: truncated")
        v = self.buf[self.pos]
        self.pos += 1
        return v

    def u16(self) -> int:
        return struct.unpack_from("<H", self.take(2))[0]

    def u32(self) -> int:
        return struct.unpack_from("<I", self.take(4))[0]

    def u64(self) -> int:
        return struct.unpack_from("<Q", self.take(8))[0]

    def node(self) -> int:
        v = self.u64()
        if v == 0:
            raise ProtocolError(f"malformed {self.what} frame: node id 0")
        return v

    def str8(self) -> str:
        return self.take(self.u8()).decode("utf-8")

    def str16(self) -> str:
        return self.take(self.u16()).decode("utf-8")

    def bytes32(self) -> bytes:
        return self.take(self.u32())

    def vector(self) -> Dict[int, List[List[int]]]:
        vv: Dict[int, List[List[int]]] = {}
        for _ in range(self.u32()):
            origin = self.node()
            for _ in range(self.u32()):
                lo, hi = self.u64(), self.u64()
                if not 1 <= lo <= hi:
                    raise ProtocolError(f"malformed {self.what} frame: range {lo}..={hi}")
                vv_add_range(vv, origin, lo, hi)
        return vv

    def remaining(self) -> int:
        return len(self.buf) - self.pos

    def end(self) -> None:
        if self.pos != len(self.buf):
            raise ProtocolError(
                f"malformed {self.what} frame: {len(self.buf) - self.pos} trailing bytes")


def put_str8(out: bytearray, s: str) -> None:
    b = s.encode("utf-8")
    out += bytes([len(b)]) + b


def put_str16(out: bytearray, s: str) -> None:
    b = s.encode("utf-8")
    out += struct.pack("<H", len(b)) + b


def put_vector(out: bytearray, vv: Dict[int, List[List[int]]]) -> None:
    origins = sorted(o for o, r in vv.items() if r)
    out += struct.pack("<I", len(origins))
    for origin in origins:
        ranges = vv[origin]
        out += struct.pack("<QI", origin, len(ranges))
        for lo, hi in ranges:
            out += struct.pack("<QQ", lo, hi)


def credit_size(key: bytes, value: bytes, context: bytes) -> int:
    return 64 + len(key) + len(value) + len(context)


# ---------------------------------------------------------------------------
# State


@dataclass
class Entry:
    """One key's current state in an ``lww`` namespace."""

    value: Optional[bytes]  # None: deleted (a tombstone)
    hlc: int
    origin: int
    counter: int
    content_type: int = 0
    expires_ms: int = 0
    epoch: int = 0
    item: bytes = b""  # the reconciliation item of this key at this version

    @property
    def deleted(self) -> bool:
        return self.value is None

    @property
    def version(self) -> Tuple[int, int, int]:
        return (self.hlc, self.origin, self.counter)


@dataclass
class Event:
    namespace: str
    key: str
    op: int
    content_type: int
    origin: int
    counter: int
    hlc: int
    context: bytes
    value: bytes
    epoch: int = 0
    expires_ms: int = 0

    @property
    def cost(self) -> int:
        return credit_size(self.key.encode("utf-8"), self.value, self.context)


@dataclass
class NamespaceSummary:
    max_hlc: int
    vector: Dict[int, List[List[int]]]
    digest: Optional[bytes]
    reports: List[Tuple[int, int, Dict[int, List[List[int]]]]] = field(default_factory=list)


def decode_events(body: bytes, count: int, version: int, what: str) -> List[Event]:
    r = Reader(body, what)
    events = []
    for _ in range(count):
        ns = r.str8()
        key = r.str16()
        op = r.u8()
        ct = r.u8()
        origin = r.node()
        counter = r.u64()
        hlc = r.u64()
        context = r.bytes32()
        value = r.bytes32()
        flags = op & (OP_EPOCH | OP_EXPIRES)
        base = op & ~(OP_EPOCH | OP_EXPIRES)
        if flags and version < 4:
            raise ProtocolError(f"unknown op {op} on a version-{version} link")
        if base not in (OP_PUT, OP_DELETE) or (base == OP_DELETE and op & OP_EXPIRES):
            raise ProtocolError(f"unknown op {op}")
        epoch = r.u64() if op & OP_EPOCH else 0
        expires = r.u64() if op & OP_EXPIRES else 0
        if counter == 0:
            raise ProtocolError("an event with counter 0", code=12)
        events.append(Event(ns, key, base, ct, origin, counter, hlc, context, value,
                            epoch, expires))
    r.end()
    return events


def read_event_batch(r: Reader, version: int) -> List[Event]:
    compression = r.u8()
    count = r.u32()
    if compression == 0:
        body = r.take(r.remaining())
    elif compression == 1:
        raw_len = r.u32()
        body = r.take(r.remaining())
        if raw_len > EVENTS_RAW_BYTES_MAX or raw_len > 255 * len(body) + 64:
            raise ProtocolError(f"lz4 body of {len(body)} bytes claims {raw_len} raw bytes")
        body = lz4_block_decompress(body, raw_len)
    else:
        raise ProtocolError(f"unknown compression {compression}")
    return decode_events(body, count, version, r.what)


# ---------------------------------------------------------------------------
# The follower


class Follower:
    """A read-only follower of the node at ``host:port`` (its peer address).

    ``state[ns][key]`` is an :class:`Entry`; ``digest(ns)`` and ``peer_digest(ns)``
    are 36-byte encoded symbols (compare them with ``==``).
    """

    def __init__(self, host: str, port: int, cluster_id: str = "default",
                 node_id: Optional[int] = None, *, item_key: Optional[ItemKey] = None,
                 namespaces: Tuple[str, ...] = ("*",), heartbeat_ms: int = 1000,
                 idle_timeout_ms: int = 10000, credit_window: int = 16 << 20,
                 summary_interval: float = 1.0, version_max: int = VERSION_MAX,
                 connect_timeout: float = 10.0):
        self.host = host
        self.port = port
        self.cluster_id = cluster_id
        self.node_id = node_id if node_id else (int.from_bytes(os.urandom(8), "little") or 1)
        self.incarnation = int.from_bytes(os.urandom(8), "little") or 1
        self.item_key = item_key or ItemKey.derive(cluster_id.encode("utf-8"))
        self.namespaces = tuple(namespaces)
        self.heartbeat_ms = heartbeat_ms
        self.idle_timeout_ms = idle_timeout_ms
        self.credit_window = credit_window
        self.summary_interval = summary_interval
        self.version_max = version_max
        self.connect_timeout = connect_timeout

        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)

        # What the follower holds.
        self.state: Dict[str, Dict[str, Entry]] = {}
        self.vectors: Dict[str, Dict[int, List[List[int]]]] = {}
        self.max_hlc: Dict[str, int] = {}
        self._symbol0: Dict[str, Symbol0] = {}
        self.policies: Dict[str, int] = {}  # namespace -> context policy byte (0: lww)
        self._key_hashes: Dict[Tuple[str, str], bytes] = {}

        # What the node says.
        self.peer_summaries: Dict[str, NamespaceSummary] = {}
        self._summary_parts: Dict[str, NamespaceSummary] = {}
        self.peer_node_id: Optional[int] = None
        self.peer_incarnation: int = 0
        self.peer_labels: List[Tuple[str, str]] = []
        self.peer_namespaces: List[str] = []
        self.peer_head_seq: int = 0
        self.members: list = []
        self.version: Optional[int] = None
        self.summaries_received = 0

        # Link bookkeeping (per link).
        self.first_seq: Optional[int] = None  # first_seq of the first batch on this link
        self.acked_seq: int = 0  # last position acknowledged
        self.events_received = 0  # events in Events frames, duplicates included
        self.events_applied = 0  # events that were new dots
        self.repairs_received = 0
        self.refused_runs: List[Tuple[int, str, int]] = []  # (id, namespace, mode)
        self.transfers: List[str] = []  # namespaces received by transfer
        self._transfer: Optional[Tuple[int, str, int]] = None  # (id, ns, repairs counted)

        self.sock: Optional[socket.socket] = None
        self.thread: Optional[threading.Thread] = None
        self.error: Optional[BaseException] = None
        self.established = False
        self.closed = False
        self._stop = False
        self._out = bytearray()
        self._last_sent = 0.0
        self._last_received = 0.0
        self._next_summary = 0.0

    # -- public API ---------------------------------------------------------

    def start(self) -> "Follower":
        """Connects and starts the link's thread (once)."""
        with self.lock:
            if self.thread is not None:
                return self
            self.sock = socket.create_connection((self.host, self.port),
                                                 timeout=self.connect_timeout)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.sock.setblocking(False)
            self.thread = threading.Thread(target=self._run, name="asp-follower",
                                           daemon=True)
            self.thread.start()
        return self

    def run_until(self, predicate: Callable[["Follower"], bool], timeout: float) -> "Follower":
        """Runs the link until ``predicate(self)`` is true (called with the lock held);
        raises ``TimeoutError`` after ``timeout`` seconds, ``LinkClosed`` if the link
        ends first."""
        self.start()
        deadline = time.monotonic() + timeout
        with self.changed:
            while True:
                if predicate(self):
                    return self
                if self.closed:
                    err = self.error or LinkClosed("the link is closed")
                    raise err
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"predicate not true within {timeout} s")
                self.changed.wait(min(left, 0.25))

    def close(self) -> None:
        """Ends the link: sends Error(shutdown) and closes the connection."""
        self._stop = True
        t = self.thread
        if t is not None and t is not threading.current_thread():
            t.join(5)

    def digest(self, namespace: str) -> bytes:
        """This follower's digest of ``namespace``: symbol 0, encoded (36 bytes)."""
        with self.lock:
            policy = self.policies.get(namespace, 0)
            if policy != 0:
                raise NotImplementedError(
                    f"namespace {namespace} is of CRDT policy {policy}: only lww is kept")
            s = self._symbol0.get(namespace)
            return s.encode() if s else Symbol0().encode()

    def peer_digest(self, namespace: str) -> Optional[bytes]:
        """The digest of ``namespace`` in the node's last Summary (None: none given,
        or the namespace absent from it)."""
        with self.lock:
            s = self.peer_summaries.get(namespace)
            return s.digest if s else None

    def values(self, namespace: str) -> Dict[str, bytes]:
        """The live keys of ``namespace`` and their values (tombstones left out)."""
        with self.lock:
            return {k: e.value for k, e in self.state.get(namespace, {}).items()
                    if e.value is not None}

    def holds(self, namespace: str, origin: int, counter: int) -> bool:
        with self.lock:
            return vv_contains(self.vectors.get(namespace, {}), origin, counter)

    def in_sync(self, namespace: str) -> bool:
        """Whether this follower's digest equals the node's last Summary's."""
        d = self.peer_digest(namespace)
        return d is not None and d == self.digest(namespace)

    def __enter__(self) -> "Follower":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the link ------------------------------------------------------------

    def _run(self) -> None:
        sock = self.sock
        assert sock is not None
        buf = bytearray()
        now = time.monotonic()
        self._last_received = now
        self._last_sent = now
        started = now
        try:
            self._send_hello()
            while not self._stop:
                now = time.monotonic()
                self._timers(now, started)
                self._flush(sock)
                want_write = bool(self._out)
                r, w, _ = select.select([sock], [sock] if want_write else [], [], 0.05)
                if r:
                    chunk = sock.recv(1 << 20)
                    if not chunk:
                        raise LinkClosed("connection lost: the node closed the connection")
                    buf += chunk
                    self._last_received = time.monotonic()
                    self._parse(buf)
            # Asked to stop: say so (Error(shutdown)), then close.
            if self.established:
                self._queue(T_ERROR, struct.pack("<H", E_SHUTDOWN) + _str16("the follower is stopping"))
                sock.setblocking(True)
                sock.settimeout(2)
                sock.sendall(bytes(self._out))
                self._out.clear()
            self._finish(LinkClosed("closed by the follower", by_peer=False))
        except ProtocolError as e:
            # Tell the node why, then close.
            try:
                self._queue(T_ERROR, struct.pack("<H", e.code) + _str16(str(e)[:4096]))
                sock.setblocking(True)
                sock.settimeout(2)
                sock.sendall(bytes(self._out))
            except OSError:
                pass
            self._finish(e)
        except LinkClosed as e:
            self._finish(e)
        except OSError as e:
            self._finish(LinkClosed(f"connection lost: {e}"))
        except BaseException as e:  # a bug here: never hang a caller
            self._finish(e)

    def _finish(self, err: BaseException) -> None:
        try:
            if self.sock is not None:
                self.sock.close()
        except OSError:
            pass
        with self.changed:
            if self.error is None and not (isinstance(err, LinkClosed) and not err.by_peer):
                self.error = err
            self.closed = True
            self.changed.notify_all()

    def _timers(self, now: float, started: float) -> None:
        if not self.established:
            if now - started > 10.0:
                raise ProtocolError("no Hello from the node within 10 s", E_HANDSHAKE_TIMEOUT)
            return
        if now - self._last_received > self.idle_timeout_ms / 1000:
            raise ProtocolError(
                f"nothing heard from the peer for {self.idle_timeout_ms} ms", E_IDLE_TIMEOUT)
        if now >= self._next_summary:
            self._send_summary()
            self._next_summary = now + self.summary_interval
        if now - self._last_sent >= self.heartbeat_ms / 1000:
            self._queue(T_HEARTBEAT, struct.pack("<QQ", 0, int(time.time() * 1000)))

    def _flush(self, sock: socket.socket) -> None:
        while self._out:
            try:
                n = sock.send(self._out)
            except BlockingIOError:
                return
            del self._out[:n]

    def _queue(self, ftype: int, payload: bytes) -> None:
        self._out += struct.pack("<IB", len(payload) + 1, ftype) + payload
        self._last_sent = time.monotonic()

    def _parse(self, buf: bytearray) -> None:
        pos = 0
        limit = FRAME_BYTES_MAX if self.established else (1 << 21)
        while len(buf) - pos >= 4:
            length = struct.unpack_from("<I", buf, pos)[0]
            if length == 0 or length > limit:
                raise ProtocolError(f"frame length {length} out of bounds")
            if len(buf) - pos - 4 < length:
                break
            ftype = buf[pos + 4]
            payload = bytes(buf[pos + 5:pos + 4 + length])
            pos += 4 + length
            with self.changed:
                self._handle(ftype, payload)
                self.changed.notify_all()
        del buf[:pos]

    # -- frames --------------------------------------------------------------

    def _send_hello(self) -> None:
        out = bytearray(MAGIC)
        out += struct.pack("<HH", VERSION_MIN, self.version_max)
        put_str16(out, self.cluster_id)
        out += struct.pack("<QII", self.node_id, self.heartbeat_ms, self.idle_timeout_ms)
        out += struct.pack("<H", 0)  # no labels
        out += struct.pack("<H", len(self.namespaces))
        for ns in self.namespaces:
            put_str8(out, ns)
        out += struct.pack("<Q", self.incarnation)
        self._queue(T_HELLO, bytes(out))

    def _send_summary(self) -> None:
        names = sorted(ns for ns, vv in self.vectors.items() if vv)[:4096]
        out = bytearray(struct.pack("<H", len(names)))
        now_ms = int(time.time() * 1000)
        for ns in names:
            put_str8(out, ns)
            out += struct.pack("<Q", self.max_hlc.get(ns, 0))
            put_vector(out, self.vectors[ns])
            if self.policies.get(ns, 0) == 0:
                out += b"\x01" + (self._symbol0.get(ns) or Symbol0()).encode()
            else:
                out += b"\x00"
            # One report: this follower's own vector, at its clock now.
            out += b"\x01" + struct.pack("<QQ", self.node_id, now_ms)
            put_vector(out, self.vectors[ns])
        self._queue(T_SUMMARY, bytes(out))

    def _handle(self, ftype: int, payload: bytes) -> None:
        name = FRAME_NAMES.get(ftype)
        if name is None:
            raise ProtocolError(f"unknown frame type {ftype}")
        r = Reader(payload, name)
        if ftype == T_ERROR:
            code = r.u16()
            message = r.str16()
            raise LinkClosed(f"the node closed the link: {ERROR_CODES.get(code, f'unknown({code})')}:"
                             f" {message}", code=code)
        if not self.established:
            if ftype != T_HELLO:
                raise ProtocolError(f"expected Hello first, got {name}")
            return self._on_hello(r)
        if ftype == T_HELLO:
            raise ProtocolError("a second Hello")
        if ftype in (T_SUMMARY, T_SUMMARY_PART):
            return self._on_summary(r, last=ftype == T_SUMMARY)
        if ftype == T_EVENTS:
            return self._on_events(r)
        if ftype == T_CREDIT:
            r.u32()
            r.end()
            return  # this follower sends no events: credit is not needed
        if ftype == T_HEARTBEAT:
            self.peer_head_seq = r.u64()
            r.u64()
            r.end()
            return
        if ftype == T_MEMBERS:
            if self.version < 4:
                raise ProtocolError("a Members frame on a link of protocol version 3 or less")
            return self._on_members(r)
        if ftype == T_ACK:
            raise ProtocolError("an Ack, but this follower sent no events")
        if ftype == T_RECONCILE_START:
            return self._on_reconcile_start(r)
        if ftype == T_REPAIR:
            return self._on_repair(r)
        if ftype in (T_REPAIR_END, T_REPAIR_END_COUNTED):
            return self._on_repair_end(r, counted=ftype == T_REPAIR_END_COUNTED)
        if ftype in (T_RECONCILE_SYMBOLS, T_RECONCILE_CREDIT, T_RECONCILE_END):
            # Symbols of a run this follower refused (in flight when it answered), or
            # frames of runs it never starts: nothing to do.
            return
        raise ProtocolError(f"unexpected {name}")

    def _on_hello(self, r: Reader) -> None:
        if r.take(4) != MAGIC:
            raise ProtocolError("not an asp peer: bad Hello magic")
        vmin, vmax = r.u16(), r.u16()
        cluster = r.str16()
        node = r.node()
        r.u32()  # heartbeat_ms
        idle_ms = r.u32()
        labels = [(r.str16(), r.str16()) for _ in range(r.u16())]
        namespaces = [r.str8() for _ in range(r.u16())]
        incarnation = r.u64() if r.remaining() >= 8 else 0
        # Later versions may append fields: ignore the rest.
        version = min(self.version_max, vmax)
        if version < max(VERSION_MIN, vmin):
            raise ProtocolError(
                f"no common protocol version: this follower speaks {VERSION_MIN}..={self.version_max},"
                f" the node {vmin}..={vmax}", E_VERSION_MISMATCH)
        if cluster != self.cluster_id:
            raise ProtocolError(f"cluster id {cluster!r} is not this follower's cluster",
                                E_CLUSTER_MISMATCH)
        if node == self.node_id:
            raise ProtocolError(f"node {node} connected to itself", E_SELF_CONNECTION)
        if idle_ms and idle_ms <= self.heartbeat_ms:
            raise ProtocolError("the node's idle timeout is not above this heartbeat interval")
        self.version = version
        self.peer_node_id = node
        self.peer_incarnation = incarnation
        self.peer_labels = labels
        self.peer_namespaces = namespaces
        self.established = True
        self.first_seq = None
        self._queue(T_CREDIT, struct.pack("<I", self.credit_window))
        self._send_summary()
        self._next_summary = time.monotonic() + self.summary_interval

    def _read_summary_entries(self, r: Reader) -> Dict[str, NamespaceSummary]:
        out = {}
        for _ in range(r.u16()):
            ns = r.str8()
            max_hlc = r.u64()
            vector = r.vector()
            flag = r.u8()
            if flag == 1:
                digest = r.take(36)
            elif flag == 0:
                digest = None
            else:
                raise ProtocolError(f"malformed Summary frame: digest flag {flag}")
            reports = []
            for _ in range(r.u8()):
                node = r.u64()
                at_ms = r.u64()
                reports.append((node, at_ms, r.vector()))
            out[ns] = NamespaceSummary(max_hlc, vector, digest, reports)
        r.end()
        return out

    def _on_summary(self, r: Reader, last: bool) -> None:
        entries = self._read_summary_entries(r)
        if not last:
            if self.version < 2:
                raise ProtocolError("a SummaryPart on a protocol version 1 link")
            self._summary_parts.update(entries)
            if len(self._summary_parts) > 1_048_576:
                raise ProtocolError("a summary of more than 1048576 namespaces")
            return
        whole = self._summary_parts
        whole.update(entries)
        self._summary_parts = {}
        # The latest whole summary replaces the view (a namespace absent from it is one
        # the node holds nothing of).
        self.peer_summaries = whole
        self.summaries_received += 1

    def _on_members(self, r: Reader) -> None:
        members = []
        for _ in range(r.u16()):
            node = r.node()
            incarnation, heartbeat = r.u64(), r.u64()
            members.append({"node": node, "incarnation": incarnation, "heartbeat": heartbeat,
                            "name": r.str16(), "api": r.str16(), "peer": r.str16()})
        r.end()
        self.members = members

    def _on_events(self, r: Reader) -> None:
        first_seq, last_seq = r.u64(), r.u64()
        if first_seq == 0 or first_seq > last_seq:
            raise ProtocolError(f"bad feed range {first_seq}..={last_seq}")
        if self.first_seq is not None and first_seq != self.acked_seq + 1:
            raise ProtocolError(
                f"batch starts at feed position {first_seq}, expected {self.acked_seq + 1}")
        events = read_event_batch(r, self.version)
        cost = self._apply(events)
        self.events_received += len(events)
        if self.first_seq is None:
            self.first_seq = first_seq
        self.acked_seq = last_seq
        # Applied (in memory: as durable as this follower gets): acknowledge, and
        # give the credit back.
        self._queue(T_ACK, struct.pack("<QQ", self.first_seq, last_seq))
        if cost:
            self._queue(T_CREDIT, struct.pack("<I", min(cost, 0xFFFFFFFF)))

    def _apply(self, events: List[Event], repair: bool = False) -> int:
        cost = 0
        for e in events:
            if self.namespaces != ("*",) and e.namespace not in self.namespaces:
                raise ProtocolError(f"an event of namespace {e.namespace}, which this"
                                    " follower does not replicate")
            cost += e.cost
            vv = self.vectors.setdefault(e.namespace, {})
            held = vv_contains(vv, e.origin, e.counter)
            if held and not repair:
                continue  # a duplicate
            if not held:
                vv_add(vv, e.origin, e.counter)
                self.events_applied += 1
            if e.hlc > self.max_hlc.get(e.namespace, 0):
                self.max_hlc[e.namespace] = e.hlc
            if e.context:
                if len(e.context) != 2 or e.context[0] != 0xC7:
                    raise ProtocolError(f"event {e.origin}:{e.counter}: unknown context",
                                        code=12)
                # A CRDT namespace: not kept by this follower (its digest is refused).
                self.policies[e.namespace] = e.context[1]
                continue
            self._merge_lww(e)
        return cost

    def _merge_lww(self, e: Event) -> None:
        keys = self.state.setdefault(e.namespace, {})
        cur = keys.get(e.key)
        version = (e.hlc, e.origin, e.counter)
        if cur is not None and not version > cur.version:
            return  # last writer wins: the current version is as new or newer
        kb = e.key.encode("utf-8")
        kh = self._key_hashes.get((e.namespace, e.key))
        if kh is None:
            kh = self.item_key.key_hash(kb)
            self._key_hashes[(e.namespace, e.key)] = kh
        item = self.item_key.item(kb, e.hlc, e.origin, e.counter, key_hash=kh)
        sym = self._symbol0.get(e.namespace)
        if sym is None:
            sym = self._symbol0[e.namespace] = Symbol0()
        if cur is not None:
            sym.toggle(cur.item, self.item_key.check(cur.item), -1)
        sym.toggle(item, self.item_key.check(item), 1)
        keys[e.key] = Entry(
            value=e.value if e.op == OP_PUT else None, hlc=e.hlc, origin=e.origin,
            counter=e.counter, content_type=e.content_type, expires_ms=e.expires_ms,
            epoch=e.epoch, item=item)

    # -- reconciliation: declined, except transfers -------------------------

    def _on_reconcile_start(self, r: Reader) -> None:
        run_id = r.u32()
        ns = r.str8()
        mode = r.u8()
        r.u64()  # items
        r.u64()  # symbols_max
        r.end()
        if self._transfer is not None:
            raise ProtocolError(
                f"a ReconcileStart of run {run_id} while run {self._transfer[0]} is under way")
        if mode == MODE_TRANSFER:
            # The node sends its whole state of the namespace: take it.
            self._transfer = (run_id, ns, 0)
            return
        if mode not in (MODE_WINDOW, MODE_FULL):
            raise ProtocolError(f"unknown reconciliation mode {mode}")
        # A follower does not decode symbols: decline the run.
        self.refused_runs.append((run_id, ns, mode))
        self._queue(T_RECONCILE_END, struct.pack("<IBI", run_id, OUTCOME_REFUSED, 0))

    def _on_repair(self, r: Reader) -> None:
        run_id = r.u32()
        events = read_event_batch(r, self.version)
        if self._transfer is None or self._transfer[0] != run_id:
            raise ProtocolError(f"Repair of run {run_id}, which is not under way")
        cost = self._apply(events, repair=True)
        self.repairs_received += len(events)
        rid, ns, n = self._transfer
        self._transfer = (rid, ns, n + len(events))
        if cost:
            self._queue(T_CREDIT, struct.pack("<I", min(cost, 0xFFFFFFFF)))

    def _on_repair_end(self, r: Reader, counted: bool) -> None:
        run_id = r.u32()
        if counted and self.version < 3:
            raise ProtocolError("a RepairEnd with a repair count on a protocol version 1 or 2 link")
        repairs = r.u64() if counted else None
        flag = r.u8()
        covered = r.vector() if flag == 1 else None
        if flag not in (0, 1):
            raise ProtocolError(f"malformed RepairEnd frame: covered flag {flag}")
        r.end()
        if self._transfer is None or self._transfer[0] != run_id:
            return  # not a run under way here
        rid, ns, n = self._transfer
        if repairs is not None and repairs != n:
            raise ProtocolError(
                f"reconciliation run {rid}: RepairEnd counts {repairs} repair events,"
                f" {n} arrived before it")
        if covered:
            vv_join(self.vectors.setdefault(ns, {}), covered)
        self._transfer = None
        self.transfers.append(ns)
        # This side sent nothing in a transfer: its RepairEnd covers nothing.
        if self.version >= 3:
            self._queue(T_REPAIR_END_COUNTED, struct.pack("<IQB", rid, 0, 0))
        else:
            self._queue(T_REPAIR_END, struct.pack("<IB", rid, 0))


def _str16(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<H", len(b)) + b
