"""Tests of asp_client against a real `asp serve` (see conftest.py; needs $ASP_BIN)."""

from __future__ import annotations

import socket
import threading
import uuid
from typing import Any

import pytest

from asp_client import (
    AspError,
    ChangeFeed,
    Client,
    Conflict,
    Forbidden,
    NotFound,
    PreconditionFailed,
    SSEParser,
    Unauthorized,
)

WAIT_S = 30.0  # bound on every wait for the change feed; generous, never asserted on


def new_ns() -> str:
    return "t" + uuid.uuid4().hex[:12]


def take(feed: ChangeFeed, n: int, timeout: float = WAIT_S) -> list[dict[str, Any]]:
    """The next n changes of the feed, or a failure once timeout passes."""
    timer = threading.Timer(timeout, feed.close)
    timer.daemon = True
    timer.start()
    got: list[dict[str, Any]] = []
    try:
        while len(got) < n:
            try:
                got.append(next(feed))
            except StopIteration:
                pytest.fail(f"change feed: {len(got)} of {n} changes within {timeout}s: {got}")
    finally:
        timer.cancel()
    return got


@pytest.fixture
def client(asp_node) -> Client:  # type: ignore[no-untyped-def]
    return Client(asp_node.base_url)


# -- keys ---------------------------------------------------------------------


def test_put_get_json(client: Client) -> None:
    ns = new_ns()
    w = client.put(ns, "user/1", {"name": "ada", "langs": ["en", "fr"]})
    assert w["namespace"] == ns and w["key"] == "user/1"
    assert {"version", "dot", "hlc", "seq"} <= w.keys()
    v = client.get(ns, "user/1")
    assert v.json() == {"name": "ada", "langs": ["en", "fr"]}
    assert v.content_type.startswith("application/json")
    assert v.version == w["version"]
    client.put(ns, "list", [1, 2, 3])
    assert client.get(ns, "list").json() == [1, 2, 3]
    client.put(ns, "num", 42)
    assert client.get(ns, "num").json() == 42


def test_put_get_bytes_and_text(client: Client) -> None:
    ns = new_ns()
    raw = bytes(range(256))
    client.put(ns, "blob", raw, content_type="application/octet-stream")
    v = client.get(ns, "blob")
    assert v.body == raw
    assert v.content_type == "application/octet-stream"
    client.put(ns, "greeting", "héllo", content_type="text/plain")
    t = client.get(ns, "greeting")
    assert t.text() == "héllo" and t.content_type.startswith("text/plain")


def test_keys_with_awkward_characters(client: Client) -> None:
    ns = new_ns()
    keys = ["a/b/c", "with space", "q?x=1#frag", "100%", "..", "ünï"]
    for i, k in enumerate(keys):
        client.put(ns, k, i)
    for i, k in enumerate(keys):
        assert client.get(ns, k).json() == i
    assert sorted(item["key"] for item in client.scan(ns)) == sorted(
        keys, key=lambda k: k.encode()
    )


def test_get_missing_raises_not_found(client: Client) -> None:
    with pytest.raises(NotFound) as e:
        client.get(new_ns(), "nope")
    assert isinstance(e.value, AspError)
    assert e.value.status == 404 and e.value.code == "not_found"
    assert "nope" in e.value.message


def test_error_body_is_parsed(client: Client) -> None:
    with pytest.raises(AspError) as e:
        client.get("bad!ns", "k")
    assert (e.value.status, e.value.code) == (400, "invalid_namespace")
    with pytest.raises(AspError) as e:
        client.put(new_ns(), "k", "{not json")
    assert (e.value.status, e.value.code) == (400, "invalid_value")


def test_delete(client: Client) -> None:
    ns = new_ns()
    client.put(ns, "k", {"x": 1})
    d = client.delete(ns, "k")
    assert d["deleted"] is True
    with pytest.raises(NotFound):
        client.get(ns, "k")
    assert list(client.scan(ns)) == []


def test_scan_follows_pages(client: Client) -> None:
    ns = new_ns()
    client.batch(ns, [{"op": "put", "key": f"p/{i:03d}", "value": i} for i in range(25)])
    client.put(ns, "other", 1)
    items = list(client.scan(ns, prefix="p/", page_size=7))
    assert [it["key"] for it in items] == [f"p/{i:03d}" for i in range(25)]
    limited = list(client.scan(ns, prefix="p/", limit=10, page_size=3))
    assert [it["key"] for it in limited] == [f"p/{i:03d}" for i in range(10)]
    after = list(client.scan(ns, prefix="p/", after="p/020"))
    assert [it["key"] for it in after] == [f"p/{i:03d}" for i in range(21, 25)]
    with_values = list(client.scan(ns, prefix="p/00", values=True))
    assert [it["value"] for it in with_values] == list(range(10))
    assert len(list(client.scan(ns))) == 26


def test_batch(client: Client) -> None:
    ns = new_ns()
    client.put(ns, "gone", 1)
    r = client.batch(
        ns,
        [
            {"op": "put", "key": "a", "value": {"n": 1}},
            {"op": "put", "key": "b", "value_text": "hi"},
            {"op": "put", "key": "c", "value": b"\x00\x01"},
            {"op": "delete", "key": "gone"},
        ],
    )
    assert [x["key"] for x in r["results"]] == ["a", "b", "c", "gone"]
    assert client.get(ns, "a").json() == {"n": 1}
    assert client.get(ns, "b").text() == "hi"
    assert client.get(ns, "c").body == b"\x00\x01"
    with pytest.raises(NotFound):
        client.get(ns, "gone")


def test_batch_is_all_or_nothing(client: Client) -> None:
    ns = new_ns()
    w = client.put(ns, "a", 1)
    client.put(ns, "a", 2)
    with pytest.raises(PreconditionFailed):
        client.batch(
            ns,
            [
                {"op": "put", "key": "x", "value": 1},
                {"op": "put", "key": "a", "value": 3, "if_match": w["version"]},
            ],
        )
    with pytest.raises(NotFound):
        client.get(ns, "x")
    assert client.get(ns, "a").json() == 2


def test_conditional_put_and_delete(client: Client) -> None:
    ns = new_ns()
    v1 = client.put(ns, "k", {"v": 1})["version"]
    v2 = client.put(ns, "k", {"v": 2}, if_match=v1)["version"]
    assert v2 != v1
    with pytest.raises(PreconditionFailed) as e:
        client.put(ns, "k", {"v": 3}, if_match=v1)  # stale
    assert isinstance(e.value, AspError)
    assert (e.value.status, e.value.code) == (412, "precondition_failed")
    assert client.get(ns, "k").json() == {"v": 2}
    with pytest.raises(PreconditionFailed):
        client.delete(ns, "k", if_match=v1)
    with pytest.raises(PreconditionFailed):
        client.put(ns, "k", 0, if_none_match="*")
    client.put(ns, "new", 0, if_none_match="*")
    client.delete(ns, "k", if_match=[v1, v2])
    with pytest.raises(NotFound):
        client.get(ns, "k")


def test_status_and_health(client: Client) -> None:
    ns = new_ns()
    w = client.put(ns, "k", 1)
    st = client.status()
    assert isinstance(st["node_id"], str) and w["version"].endswith("@" + st["node_id"])
    assert st["feed"]["head_seq"] >= w["seq"]
    assert ns in [n.get("name", n.get("namespace")) for n in st["namespaces"]]
    assert client.health()["status"] == "ok"


def test_policy_and_incr(client: Client) -> None:
    ns = new_ns()
    assert client.policy(ns) == "lww"
    assert client.set_policy(ns, "counter") == "counter"
    assert client.policy(ns) == "counter"
    client.incr(ns, "hits", 5)
    client.incr(ns, "hits", -2)
    client.incr(ns, "hits")
    assert client.get(ns, "hits").json() == 4
    with pytest.raises(Conflict) as e:
        client.set_policy(ns, "lww")  # holds data now
    assert e.value.code == "policy_fixed"
    lww = new_ns()
    client.put(lww, "k", 1)
    with pytest.raises(Conflict) as e2:
        client.incr(lww, "k", 1)
    assert e2.value.code == "wrong_policy"


# -- change feed ----------------------------------------------------------------


def test_changes_page(client: Client) -> None:
    ns = new_ns()
    seqs = [client.put(ns, f"k{i}", i)["seq"] for i in range(5)]
    page = client.changes_page(ns, since=0, limit=3)
    assert [c["seq"] for c in page["changes"]] == seqs[:3]
    rest = client.changes_page(ns, since=page["next"])
    assert [c["seq"] for c in rest["changes"]] == seqs[3:]


def test_changes_feed_named_events(client: Client) -> None:
    ns = new_ns()
    writes = [client.put(ns, f"k{i}", {"i": i}) for i in range(4)]
    writes.append(client.delete(ns, "k0"))
    with client.changes(ns) as feed:
        got = take(feed, 5)
    assert [c["seq"] for c in got] == [w["seq"] for w in writes]
    assert [c["op"] for c in got] == ["put"] * 4 + ["delete"]
    assert [c.get("value") for c in got[:4]] == [{"i": i} for i in range(4)]
    assert feed.last_id == writes[-1]["seq"]


def test_changes_since_now_skips_history(client: Client) -> None:
    ns = new_ns()
    client.put(ns, "old", 1)
    with client.changes(ns, since="now") as feed:
        w = client.put(ns, "new", 2)
        (c,) = take(feed, 1)
    assert c["key"] == "new" and c["seq"] == w["seq"]


def test_changes_live_and_resume_after_dropped_connection(client: Client) -> None:
    ns = new_ns()
    with client.changes(ns, since=0, retry_delay=0.05) as feed:
        first = [client.put(ns, f"a{i}", i)["seq"] for i in range(3)]
        assert [c["seq"] for c in take(feed, 3)] == first
        feed.drop_connection()  # as if the network failed
        later = [client.put(ns, f"b{i}", i)["seq"] for i in range(4)]
        assert [c["seq"] for c in take(feed, 4)] == later
        # Nothing is delivered twice: the next change is the next write.
        marker = client.put(ns, "marker", 0)["seq"]
        assert [c["seq"] for c in take(feed, 1)] == [marker]
        assert feed.connections >= 2


def test_changes_restart_from_last_position(client: Client) -> None:
    ns = new_ns()
    seqs = [client.put(ns, f"k{i}", i)["seq"] for i in range(6)]
    with client.changes(ns) as feed:
        assert [c["seq"] for c in take(feed, 2)] == seqs[:2]
    assert feed.last_id == seqs[1]
    seqs += [client.put(ns, f"m{i}", i)["seq"] for i in range(2)]
    with client.changes(ns, since=feed.last_id) as again:
        assert [c["seq"] for c in take(again, 6)] == seqs[2:]


class CuttingProxy:
    """A TCP proxy to the node that can cut its connections, like a failing network.

    With ``truncate_after_events=n`` the first connection forwards the answer up to
    n complete SSE events plus part of the next one, then is cut.
    """

    def __init__(self, upstream_port: int, truncate_after_events: int | None = None) -> None:
        self.upstream_port = upstream_port
        self.truncate = truncate_after_events
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.connections = 0
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                down, _ = self.listener.accept()
            except OSError:
                return
            up = socket.create_connection(("127.0.0.1", self.upstream_port))
            with self._lock:
                self.connections += 1
                first = self.connections == 1
                self._socks += [down, up]
            truncate = self.truncate if first else None
            threading.Thread(target=self._pump, args=(down, up, None), daemon=True).start()
            threading.Thread(target=self._pump, args=(up, down, truncate), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, truncate: int | None) -> None:
        seen = b""
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if truncate is not None:
                    start = len(seen)
                    seen += data
                    body_at = seen.find(b"\r\n\r\n")
                    pos, count = body_at, 0
                    while body_at >= 0 and count < truncate:
                        pos = seen.find(b"\n\n", pos + 1)
                        if pos < 0:
                            break
                        count += 1
                    if body_at >= 0 and count == truncate and pos >= 0:
                        end = pos + 2 + 25  # and 25 bytes of the next event
                        if len(seen) > end:
                            dst.sendall(seen[start:end])
                            self.cut()
                            return
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut(self) -> None:
        with self._lock:
            socks, self._socks = self._socks, []
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self) -> None:
        self.listener.close()
        self.cut()


def test_changes_resume_after_network_cut(asp_node) -> None:  # type: ignore[no-untyped-def]
    direct = Client(asp_node.base_url)
    proxy = CuttingProxy(asp_node.port)
    try:
        via = Client(f"http://127.0.0.1:{proxy.port}")
        ns = new_ns()
        seqs = [direct.put(ns, f"a{i}", i)["seq"] for i in range(5)]
        with via.changes(ns, retry_delay=0.05) as feed:
            assert [c["seq"] for c in take(feed, 3)] == seqs[:3]
            proxy.cut()
            seqs += [direct.put(ns, f"b{i}", i)["seq"] for i in range(5)]
            assert [c["seq"] for c in take(feed, 7)] == seqs[3:]
            marker = direct.put(ns, "marker", 0)["seq"]
            assert [c["seq"] for c in take(feed, 1)] == [marker]
        assert proxy.connections >= 2
    finally:
        proxy.close()


def test_changes_resume_after_cut_inside_an_event(asp_node) -> None:  # type: ignore[no-untyped-def]
    direct = Client(asp_node.base_url)
    ns = new_ns()
    seqs = [direct.put(ns, f"k{i}", {"pad": "x" * 200, "i": i})["seq"] for i in range(6)]
    proxy = CuttingProxy(asp_node.port, truncate_after_events=2)
    try:
        via = Client(f"http://127.0.0.1:{proxy.port}")
        with via.changes(ns, retry_delay=0.05) as feed:
            got = take(feed, 6)
            assert [c["seq"] for c in got] == seqs
            assert [c["value"]["i"] for c in got] == list(range(6))
        assert proxy.connections >= 2
    finally:
        proxy.close()


def test_changes_feed_close_from_another_thread(client: Client) -> None:
    feed = client.changes(new_ns())
    threading.Timer(0.2, feed.close).start()
    assert list(feed) == []  # returns once closed, although no change came
    assert feed.closed


def test_changes_cursor_ahead_is_an_error(client: Client) -> None:
    head = client.status()["feed"]["head_seq"]
    feed = client.changes(new_ns(), since=head + 1000)
    with pytest.raises(AspError) as e:
        next(feed)
    assert (e.value.status, e.value.code) == (400, "cursor_ahead")


# -- tokens ---------------------------------------------------------------------


def test_bearer_token(asp_auth_node) -> None:  # type: ignore[no-untyped-def]
    ns = new_ns()
    anon = Client(asp_auth_node.base_url)
    for call in (lambda: anon.put(ns, "k", 1), lambda: anon.status(), lambda: anon.get(ns, "k")):
        with pytest.raises(Unauthorized) as e:
            call()
        assert isinstance(e.value, AspError)
        assert (e.value.status, e.value.code) == (401, "unauthorized")
    with pytest.raises(Unauthorized):
        next(anon.changes(ns))
    with pytest.raises(Unauthorized):
        Client(asp_auth_node.base_url, token="asp1.not-a-token").status()
    assert anon.health()["status"] == "ok"  # /healthz needs no token

    admin = Client(asp_auth_node.base_url, token=asp_auth_node.token())
    w = admin.put(ns, "k", {"ok": True})
    assert admin.get(ns, "k").json() == {"ok": True}
    assert admin.status()["node_id"]
    with admin.changes(ns) as feed:
        assert [c["seq"] for c in take(feed, 1)] == [w["seq"]]

    reader = Client(asp_auth_node.base_url, token=asp_auth_node.token(ns=ns, ops="read"))
    assert reader.get(ns, "k").json() == {"ok": True}
    with pytest.raises(Forbidden) as f:
        reader.put(ns, "k", 2)
    assert (f.value.status, f.value.code) == (403, "forbidden")


# -- SSE parsing (no node) ---------------------------------------------------------


def test_sse_parser_line_endings_and_fields() -> None:
    p = SSEParser()
    stream = (
        b": comment\r\nid: 5\r\nevent: change\r\ndata: {\"a\":\r\ndata: 1}\r\n\r\n"
        b"data: plain\n\n"
        b"id: 7\revent: change\rdata:{}\r\r"
        b"retry: 1500\nevent: other\ndata: x\n\n"
    )
    events = []
    for i in range(len(stream)):  # one byte at a time: every split point
        events += p.feed(stream[i : i + 1])
    assert [(e.event, e.data, e.id) for e in events] == [
        ("change", '{"a":\n1}', "5"),
        ("message", "plain", None),
        ("change", "{}", "7"),
        ("other", "x", None),
    ]
    assert p.retry_ms == 1500
    assert SSEParser().feed(b"event: change\ndata: partial") == []


# -- redirects (a namespace placed on other members) ------------------------------


class _Redirector:
    """A local HTTP server that answers every request with a 307 to `target` (the same
    path and query), counting what it was asked."""

    def __init__(self, target: str | None) -> None:
        import http.server

        outer = self
        self.asked: list[tuple[str, str, str | None]] = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def _any(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                outer.asked.append((self.command, self.path, self.headers.get("Authorization")))
                base = outer.target or outer.url
                body = b'{"error":{"code":"not_held","message":"placed elsewhere"}}'
                self.send_response(307)
                self.send_header("Location", base + self.path)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_PUT = do_POST = do_DELETE = _any

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.target = target
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_redirects_to_the_holder_are_followed_with_the_body_and_token(asp_auth_node) -> None:  # type: ignore[no-untyped-def]
    token = asp_auth_node.token()
    redirector = _Redirector(asp_auth_node.base_url)
    try:
        c = Client(redirector.url, token=token)
        ns = new_ns()
        written = c.put(ns, "k", {"a": 1})
        assert written["key"] == "k"
        assert c.get(ns, "k").json() == {"a": 1}
        assert [(m, a) for m, _, a in redirector.asked] == [
            ("PUT", f"Bearer {token}"),
            ("GET", f"Bearer {token}"),
        ]
    finally:
        redirector.close()


def test_a_redirect_loop_is_a_clear_error() -> None:
    loop = _Redirector(None)  # redirects to itself
    try:
        with pytest.raises(AspError) as e:
            Client(loop.url).get(new_ns(), "k")
        assert e.value.code == "too_many_redirects"
        assert len(loop.asked) == 6  # the request and 5 redirects
    finally:
        loop.close()
