"""The HTTP client for an asp node (stdlib only)."""

from __future__ import annotations

import base64
import http.client
import json
import ssl
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

from .errors import AspError, error_from_response
from .sse import ChangeFeed

JSON = "application/json"


@dataclass(frozen=True)
class Value:
    """A value read from the node: its bytes, content type and version (from ETag)."""

    body: bytes
    content_type: str
    version: str | None

    def json(self) -> Any:
        """The body decoded as JSON."""
        return json.loads(self.body)

    def text(self) -> str:
        """The body decoded as UTF-8."""
        return self.body.decode("utf-8")


@dataclass(frozen=True)
class _Reply:
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def _etag_list(tag: str | Sequence[str]) -> str:
    """A version ("17@9f3c..."), a list of them, "*" or a ready header -> header value."""
    if isinstance(tag, str):
        t = tag.strip()
        if t == "*" or '"' in t:
            return t
        return f'"{t}"'
    return ", ".join(_etag_list(t) for t in tag)


def _version_of(etag: str | None) -> str | None:
    if not etag:
        return None
    t = etag.strip()
    if t.startswith("W/"):
        t = t[2:]
    return t.strip('"') or None


def _obj(x: Any) -> dict[str, Any]:
    if not isinstance(x, dict):
        raise AspError(200, "unexpected_answer", f"expected a JSON object, got {x!r:.200}")
    return x


def _encode(value: Any) -> bytes:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        return value.encode("utf-8")
    return json.dumps(value, separators=(",", ":")).encode("utf-8")


#: Redirects (307/308 to a member that holds a placed namespace) followed per request.
MAX_REDIRECTS = 5


class Client:
    """A client of one asp node's HTTP API v1.

    Every method raises :class:`AspError` (or a subclass) for an error answer, and
    ``OSError`` (e.g. ``ConnectionRefusedError``, ``TimeoutError``) when the node
    cannot be reached.
    """

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:7700",
        token: str | None = None,
        timeout: float = 10.0,
        *,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"base_url must be http(s)://host[:port]; got {base_url!r}")
        self.base_url = base_url
        self.token = token
        self.timeout = timeout
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port or (443 if self._https else 80)
        self._prefix = parts.path.rstrip("/")
        self._ssl_context = ssl_context

    # -- plumbing -------------------------------------------------------------

    def _connection(self, timeout: float | None = None) -> http.client.HTTPConnection:
        return self._connection_to((self._https, self._host, self._port), timeout)

    def _connection_to(
        self, target: tuple[bool, str, int], timeout: float | None = None
    ) -> http.client.HTTPConnection:
        https, host, port = target
        t = self.timeout if timeout is None else timeout
        if https:
            return http.client.HTTPSConnection(host, port, timeout=t, context=self._ssl_context)
        return http.client.HTTPConnection(host, port, timeout=t)

    @staticmethod
    def _redirect(
        location: str, target: tuple[bool, str, int]
    ) -> tuple[tuple[bool, str, int], str]:
        """Where a 307/308's Location points: (https, host, port) and the path to ask."""
        parts = urlsplit(location)
        if parts.scheme or parts.netloc:
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise AspError(
                    307, "bad_redirect", f"the node redirected to {location!r}, not http(s)"
                )
            https = parts.scheme == "https"
            target = (https, parts.hostname, parts.port or (443 if https else 80))
        url = parts.path or "/"
        if parts.query:
            url += "?" + parts.query
        return target, url

    @staticmethod
    def _seg(s: str) -> str:
        """Percent-encode one path segment (a namespace or key; '/' becomes %2F)."""
        return quote(s, safe="")

    def _url(self, path: str, query: Mapping[str, Any] | None = None) -> str:
        url = self._prefix + path
        if query:
            q = {k: v for k, v in query.items() if v is not None}
            if q:
                url += "?" + urlencode(q)
        return url

    def _headers(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        h: dict[str, str] = {"User-Agent": "asp-client-python"}
        if self.token:
            h["Authorization"] = f"Bearer {self.token}"
        if extra:
            h.update(extra)
        return h

    def _request(
        self,
        method: str,
        path: str,
        *,
        query: Mapping[str, Any] | None = None,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> _Reply:
        # A node answers a request for a namespace placed on other members with a 307
        # to one that holds it: followed (the same method, body and token: the
        # Location names a member of the node's own cluster), at most MAX_REDIRECTS
        # times.
        target = (self._https, self._host, self._port)
        url = self._url(path, query)
        for _hop in range(MAX_REDIRECTS + 1):
            conn = self._connection_to(target)
            try:
                conn.request(method, url, body=body, headers=self._headers(headers))
                resp = conn.getresponse()
                data = resp.read()
            finally:
                conn.close()
            location = resp.getheader("Location")
            if resp.status in (307, 308) and location:
                target, url = self._redirect(location, target)
                continue
            if resp.status >= 400:
                raise error_from_response(resp.status, data, resp.headers, resp.reason)
            return _Reply(resp.status, resp.headers, data)
        raise AspError(
            resp.status,
            "too_many_redirects",
            f"{method} {path}: more than {MAX_REDIRECTS} redirects (last to {location!r}); "
            "the cluster's members may disagree on who holds the namespace",
        )

    def _json(self, method: str, path: str, payload: Any = None, **kw: Any) -> Any:
        if payload is not None:
            kw["body"] = json.dumps(payload).encode("utf-8")
            kw["headers"] = {"Content-Type": JSON, **kw.get("headers", {})}
        return self._request(method, path, **kw).json()

    def _kv(self, ns: str, key: str) -> str:
        return f"/v1/ns/{self._seg(ns)}/kv/{self._seg(key)}"

    # -- keys -----------------------------------------------------------------

    def put(
        self,
        ns: str,
        key: str,
        value: Any,
        content_type: str = JSON,
        if_match: str | Sequence[str] | None = None,
        *,
        if_none_match: str | Sequence[str] | None = None,
        ttl_ms: int | None = None,
        replicas: int | str | None = None,
        timeout_ms: int | None = None,
    ) -> dict[str, Any]:
        """Write a value; return the node's answer (namespace, key, version, dot, hlc, seq).

        bytes and str are sent as they are (a str as UTF-8); anything else is
        JSON-encoded. ``if_match`` takes a version ("17@9f3c2a0b11d4e5f6"), a list of
        them, or "*"; a failed condition raises :class:`PreconditionFailed`.
        """
        headers = {"Content-Type": content_type}
        if if_match is not None:
            headers["If-Match"] = _etag_list(if_match)
        if if_none_match is not None:
            headers["If-None-Match"] = _etag_list(if_none_match)
        query = {"ttl_ms": ttl_ms, "replicas": replicas, "timeout_ms": timeout_ms}
        return _obj(
            self._request(
                "PUT", self._kv(ns, key), query=query, body=_encode(value), headers=headers
            ).json()
        )

    def get(self, ns: str, key: str, accept: str | None = None) -> Value:
        """Read a value; raises :class:`NotFound` if the key does not exist."""
        headers = {"Accept": accept} if accept else None
        r = self._request("GET", self._kv(ns, key), headers=headers)
        return Value(
            body=r.body,
            content_type=r.headers.get("Content-Type", "application/octet-stream"),
            version=_version_of(r.headers.get("ETag")),
        )

    def delete(
        self,
        ns: str,
        key: str,
        if_match: str | Sequence[str] | None = None,
        *,
        replicas: int | str | None = None,
        timeout_ms: int | None = None,
    ) -> dict[str, Any]:
        """Delete a key (a tombstone; deleting a missing key succeeds too)."""
        headers = {"If-Match": _etag_list(if_match)} if if_match is not None else None
        query = {"replicas": replicas, "timeout_ms": timeout_ms}
        reply = self._request("DELETE", self._kv(ns, key), query=query, headers=headers)
        return _obj(reply.json())

    def scan(
        self,
        ns: str,
        prefix: str | None = None,
        limit: int | None = None,
        *,
        values: bool = False,
        after: str | None = None,
        page_size: int = 100,
    ) -> Iterator[dict[str, Any]]:
        """Iterate over live keys in byte order, fetching pages as needed.

        Yields the node's items (key, version, seq, content_type, size, and with
        ``values=True`` value / value_text / value_base64); at most ``limit`` of them.
        """
        if page_size < 1:
            raise ValueError("page_size must be at least 1")
        seen = 0
        cursor = after
        while limit is None or seen < limit:
            n = page_size if limit is None else min(page_size, limit - seen)
            query = {
                "prefix": prefix,
                "after": cursor,
                "limit": min(n, 1000),
                "values": "true" if values else None,
            }
            page = self._json("GET", f"/v1/ns/{self._seg(ns)}/kv", query=query)
            for item in page.get("items", []):
                yield item
                seen += 1
                if limit is not None and seen >= limit:
                    return
            cursor = page.get("next_after")
            if not cursor:
                return

    def batch(
        self,
        ns: str,
        ops: Iterable[Mapping[str, Any]],
        *,
        replicas: int | str | None = None,
        timeout_ms: int | None = None,
    ) -> dict[str, Any]:
        """Apply puts and deletes atomically, e.g. ``[{"op": "put", "key": "a", "value": 1},
        {"op": "delete", "key": "b"}]``; a bytes ``value`` is sent as ``value_base64``."""
        out: list[dict[str, Any]] = []
        for op in ops:
            o = dict(op)
            v = o.get("value")
            if isinstance(v, (bytes, bytearray, memoryview)):
                del o["value"]
                o["value_base64"] = base64.b64encode(bytes(v)).decode("ascii")
            out.append(o)
        query = {"replicas": replicas, "timeout_ms": timeout_ms}
        return _obj(
            self._json("POST", f"/v1/ns/{self._seg(ns)}/batch", {"ops": out}, query=query)
        )

    def incr(self, ns: str, key: str, n: int = 1) -> dict[str, Any]:
        """Add ``n`` to a key of a counter namespace (see :meth:`set_policy`)."""
        return _obj(self._json("POST", self._kv(ns, key), {"incr": int(n)}))

    # -- namespaces and node --------------------------------------------------

    def policy(self, ns: str) -> str:
        """A namespace's conflict policy: lww, siblings, counter, set or json-map."""
        return str(self._json("GET", f"/v1/ns/{self._seg(ns)}/policy")["policy"])

    def set_policy(self, ns: str, policy: str) -> str:
        """Set a namespace's conflict policy (409 policy_fixed once it holds data)."""
        path = f"/v1/ns/{self._seg(ns)}/policy"
        return str(self._json("PUT", path, {"policy": policy})["policy"])

    def status(self) -> dict[str, Any]:
        """The node's status document (node_id, feed, namespaces, ...)."""
        return _obj(self._json("GET", "/v1/status"))

    def health(self) -> dict[str, Any]:
        """``/healthz``: {"status": "ok"}; an unhealthy node raises AspError (503)."""
        return _obj(self._json("GET", "/healthz"))

    # -- change feed ------------------------------------------------------------

    def changes_page(
        self, ns: str, since: int = 0, limit: int | None = None, *, values: bool = True
    ) -> dict[str, Any]:
        """One JSON page of the change feed: {namespace, changes, next, head}."""
        query = {"since": since, "limit": limit, "values": "true" if values else "false"}
        return _obj(self._json("GET", f"/v1/ns/{self._seg(ns)}/changes", query=query))

    def changes(
        self,
        ns: str,
        since: int | str | None = None,
        *,
        values: bool = True,
        reconnect: bool = True,
        max_retries: int | None = None,
        retry_delay: float = 0.5,
        max_retry_delay: float = 10.0,
        read_timeout: float = 60.0,
    ) -> ChangeFeed:
        """Follow the namespace's change feed live (SSE), yielding change dicts.

        ``since`` is a feed position (changes after it come); None starts at the
        beginning, "now" at the current head. A dropped connection is resumed from
        the last change yielded (``Last-Event-ID``), so each change comes exactly once.
        """
        start: int | None
        if since == "now":
            start = int(self.changes_page(ns, 0, 1, values=False)["head"])
        elif since is None:
            start = None
        elif isinstance(since, int):
            start = since
        else:
            raise ValueError(f"since must be a feed position, None or 'now'; got {since!r}")
        return ChangeFeed(
            self,
            ns,
            start,
            values=values,
            reconnect=reconnect,
            max_retries=max_retries,
            retry_delay=retry_delay,
            max_retry_delay=max_retry_delay,
            read_timeout=read_timeout,
        )


__all__ = ["AspError", "Client", "Value"]
