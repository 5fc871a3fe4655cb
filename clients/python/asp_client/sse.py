"""Server-Sent Events parsing and the resumable change feed iterator."""

from __future__ import annotations

import http.client
import json
import socket
import threading
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import AspError, error_from_response

if TYPE_CHECKING:
    from .client import Client


@dataclass(frozen=True)
class SSEEvent:
    """One dispatched Server-Sent Event."""

    event: str
    data: str
    id: str | None


class SSEParser:
    """Incremental SSE parser (WHATWG rules): feed bytes, get dispatched events.

    Lines may end in CRLF, LF or CR (also split across chunks); ``:`` lines are
    comments; an event without ``event:`` is named ``message``.
    """

    def __init__(self) -> None:
        self._buf = b""
        self._skip_lf = False
        self._event = ""
        self._data: list[str] = []
        self._id: str | None = None
        self._has_id = False
        self.retry_ms: int | None = None

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        """Parse a chunk; return the events it completed."""
        out: list[SSEEvent] = []
        if self._skip_lf and chunk.startswith(b"\n"):
            chunk = chunk[1:]
        self._skip_lf = False
        buf = self._buf + chunk
        start = 0
        n = len(buf)
        i = 0
        while i < n:
            c = buf[i]
            if c == 0x0A or c == 0x0D:
                line = buf[start:i]
                if c == 0x0D:
                    if i + 1 < n:
                        if buf[i + 1] == 0x0A:
                            i += 1
                    else:
                        self._skip_lf = True
                ev = self._line(line.decode("utf-8", "replace"))
                if ev is not None:
                    out.append(ev)
                start = i + 1
            i += 1
        self._buf = buf[start:]
        return out

    def _line(self, line: str) -> SSEEvent | None:
        if line == "":
            return self._dispatch()
        if line.startswith(":"):
            return None
        field, sep, value = line.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        if field == "event":
            self._event = value
        elif field == "data":
            self._data.append(value)
        elif field == "id":
            if "\x00" not in value:
                self._id = value
                self._has_id = True
        elif field == "retry":
            if value.isdigit():
                self.retry_ms = int(value)
        return None

    def _dispatch(self) -> SSEEvent | None:
        event, data = self._event, self._data
        self._event, self._data = "", []
        if not data:
            return None
        ev_id = self._id if self._has_id else None
        self._has_id = False
        return SSEEvent(event=event or "message", data="\n".join(data), id=ev_id)


_TRANSPORT_ERRORS = (OSError, http.client.HTTPException)


class ChangeFeed(Iterator[dict[str, Any]]):
    """Iterator over a namespace's live change feed (SSE), yielding change dicts.

    After a dropped connection it reconnects with ``Last-Event-ID`` set to the last
    change it yielded, so every change comes once, in feed order. ``last_id`` is that
    position (pass it as ``since`` to start again later). ``close()`` (from any
    thread) ends the iteration.
    """

    def __init__(
        self,
        client: Client,
        ns: str,
        since: int | None,
        *,
        values: bool = True,
        reconnect: bool = True,
        max_retries: int | None = None,
        retry_delay: float = 0.5,
        max_retry_delay: float = 10.0,
        read_timeout: float = 60.0,
    ) -> None:
        self._client = client
        self.ns = ns
        self.since = since
        self.values = values
        self.reconnect = reconnect
        self.max_retries = max_retries
        self.retry_delay = retry_delay
        self.max_retry_delay = max_retry_delay
        self.read_timeout = read_timeout
        self.last_id: int | None = None
        self.connections = 0
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._gen = self._run()

    def __iter__(self) -> ChangeFeed:
        return self

    def __next__(self) -> dict[str, Any]:
        return next(self._gen)

    def __enter__(self) -> ChangeFeed:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def close(self) -> None:
        """End the feed: a blocked ``next()`` in another thread returns StopIteration."""
        self._closed.set()
        self._shutdown_socket()
        try:
            self._gen.close()  # releases the connection now, unless another thread iterates
        except ValueError:
            pass  # "generator already executing": that thread sees the flag and stops

    def drop_connection(self) -> None:
        """Cut the current connection, as a network failure would; the feed resumes."""
        self._shutdown_socket()

    def _shutdown_socket(self) -> None:
        with self._lock:
            sock = self._sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _position(self) -> int | None:
        return self.last_id if self.last_id is not None else self.since

    def _connect(self) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        client = self._client
        query: dict[str, Any] = {"values": "true" if self.values else "false"}
        pos = self._position()
        headers = {"Accept": "text/event-stream", "Cache-Control": "no-cache"}
        if pos is not None:
            query["since"] = pos
            headers["Last-Event-ID"] = str(pos)
        conn = client._connection(timeout=self.read_timeout)
        try:
            conn.request(
                "GET",
                client._url(f"/v1/ns/{client._seg(self.ns)}/changes", query),
                headers=client._headers(headers),
            )
            with self._lock:
                self._sock = conn.sock
            if self._closed.is_set():
                self._shutdown_socket()
            resp = conn.getresponse()
        except BaseException:
            self._forget(conn)
            raise
        if resp.status != 200:
            body = resp.read()
            self._forget(conn)
            raise error_from_response(resp.status, body, resp.headers, resp.reason)
        self.connections += 1
        return conn, resp

    def _forget(self, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            self._sock = None
        conn.close()

    def _wait(self, failures: int, hint: float | None) -> None:
        delay = min(self.max_retry_delay, self.retry_delay * (2 ** max(0, failures - 1)))
        if hint is not None:
            delay = max(delay, min(hint, self.max_retry_delay))
        self._closed.wait(delay)

    def _run(self) -> Generator[dict[str, Any], None, None]:
        failures = 0
        while not self._closed.is_set():
            hint: float | None = None
            try:
                conn, resp = self._connect()
            except AspError as e:
                # Only "come back later" answers are retried; the rest are final.
                if not self.reconnect or e.status != 503:
                    raise
                hint = e.retry_after
            except _TRANSPORT_ERRORS:
                if self._closed.is_set():
                    return
                if not self.reconnect:
                    raise
            else:
                try:
                    parser = SSEParser()
                    while True:
                        chunk = resp.read1(65536)
                        if not chunk:
                            break  # the node ended the stream (e.g. shutting down)
                        for ev in parser.feed(chunk):
                            if ev.event == "change":
                                change = json.loads(ev.data)
                                seq = int(ev.id) if ev.id else change.get("seq")
                                if (
                                    seq is not None
                                    and self.last_id is not None
                                    and seq <= self.last_id
                                ):
                                    continue  # already delivered
                                if seq is not None:
                                    self.last_id = int(seq)
                                failures = 0
                                yield change
                            elif ev.event == "error":
                                err = json.loads(ev.data)
                                raise AspError(
                                    503,
                                    str(err.get("code", "stream_error")),
                                    str(err.get("message", ev.data)),
                                    body=err,
                                )
                            # other event names are not ours: skip them
                            if self._closed.is_set():
                                return
                except _TRANSPORT_ERRORS:
                    if self._closed.is_set():
                        return
                    if not self.reconnect:
                        raise
                finally:
                    self._forget(conn)
                if self._closed.is_set() or not self.reconnect:
                    return
            failures += 1
            if self.max_retries is not None and failures > self.max_retries:
                raise ConnectionError(
                    f"change feed of {self.ns!r}: gave up after {self.max_retries} retries"
                )
            self._wait(failures, hint)
