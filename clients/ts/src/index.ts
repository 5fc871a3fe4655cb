// A client for the HTTP API v1 of an asp node. No runtime dependencies: it
// uses the global fetch (Node >= 18, browsers) and parses the SSE change feed
// from the fetch body itself, so the feed can carry an Authorization header.

import type {
  ApiError,
  Batch,
  BatchOp,
  BatchResult,
  Change,
  KeyPage,
  Policy,
  PolicyIn,
  Status,
  WriteResult,
} from "./openapi-types.js";
import { SseParser } from "./sse.js";

export type * from "./openapi-types.js";
export { SseParser } from "./sse.js";
export type { SseEvent } from "./sse.js";

export type FetchLike = (input: string, init?: RequestInit) => Promise<Response>;

export interface ClientOptions {
  /** The node's API address; default http://127.0.0.1:7700 */
  baseUrl?: string;
  /** A bearer token (`asp token create`), sent as `Authorization: Bearer <token>` */
  token?: string;
  /** A fetch to use instead of the global one */
  fetch?: FetchLike;
}

/** An error answer of the node: its HTTP status and the `{"error": {code, message}}` body. */
export class AspError extends Error {
  readonly status: number;
  readonly code: string;
  /** The whole `error` object of the body (some codes carry more fields: leader, newest_token, ...) */
  readonly details: Record<string, unknown>;
  /** The parsed body, when it was JSON */
  readonly body: unknown;

  constructor(status: number, code: string, message: string, details: Record<string, unknown> = {}, body?: unknown) {
    super(message);
    this.name = "AspError";
    this.status = status;
    this.code = code;
    this.details = details;
    this.body = body;
  }
}

/** 404: the key does not exist (or was deleted). */
export class NotFoundError extends AspError {
  constructor(status: number, code: string, message: string, details: Record<string, unknown> = {}, body?: unknown) {
    super(status, code, message, details, body);
    this.name = "NotFoundError";
  }
}

export interface PutOptions {
  /** Content-Type to store with the value. Default: application/json for objects (and other
   *  non-string, non-byte values), text/plain for strings, application/octet-stream for bytes. */
  contentType?: string;
  /** Write only if the key is at this version (`17@9f3c...`, quoted or not), or `*` (the key exists). */
  ifMatch?: string;
  /** Write only if the key is not at this version; `*`: only if the key does not exist. */
  ifNoneMatch?: string;
  /** Time to live in milliseconds (lww namespaces). */
  ttlMs?: number;
  signal?: AbortSignal;
}

export interface DeleteOptions {
  ifMatch?: string;
  signal?: AbortSignal;
}

export interface GetOptions {
  /** Accept header: the node converts between JSON, CBOR and MessagePack. */
  accept?: string;
  signal?: AbortSignal;
}

export interface GetResult {
  /** The value's bytes as served. */
  body: Uint8Array;
  /** The Content-Type it was served with. */
  contentType: string;
  /** The key's version (the ETag without quotes), e.g. `17@9f3c2a0b11d4e5f6`. */
  version: string;
  /** The body parsed as JSON. */
  json<T = unknown>(): T;
  /** The body decoded as UTF-8. */
  text(): string;
}

export type KeyItem = NonNullable<KeyPage["items"]>[number];

export interface ScanOptions {
  /** Only keys starting with this. */
  prefix?: string;
  /** At most this many keys in all (default: every key). */
  limit?: number;
  /** Include the values (`value` / `value_text` / `value_base64`). */
  values?: boolean;
  /** Keys asked for per request (1 to 1000; default min(limit, 1000)). */
  pageSize?: number;
  signal?: AbortSignal;
}

export interface BatchOptions {
  signal?: AbortSignal;
}

export interface ChangesOptions {
  /** Feed position after which to start (0: from the beginning). */
  since?: number;
  /** Stops the feed: the iteration ends. */
  signal?: AbortSignal;
  /** Include values in the changes (default true). */
  values?: boolean;
  /** First wait before reconnecting after a dropped connection, in ms (default 250; doubles up to maxRetryMs). */
  retryMs?: number;
  /** Longest wait between reconnections, in ms (default 5000). */
  maxRetryMs?: number;
  /** Called when the connection dropped and the feed is about to reconnect. */
  onReconnect?: (info: { lastEventId: string; error: unknown; attempt: number }) => void;
}

const encoder = new TextEncoder();

function isBytes(v: unknown): v is Uint8Array {
  return v instanceof Uint8Array;
}

/** `17@abc` -> `"17@abc"`; `*`, quoted and weak tags and lists are left as they are. */
export function etag(version: string): string {
  const v = version.trim();
  if (v === "*" || v.startsWith('"') || v.startsWith("W/")) return v;
  return `"${v}"`;
}

function unquote(tag: string | null): string {
  if (!tag) return "";
  let t = tag.trim();
  if (t.startsWith("W/")) t = t.slice(2);
  if (t.length >= 2 && t.startsWith('"') && t.endsWith('"')) t = t.slice(1, -1);
  return t;
}

function isAbort(err: unknown): boolean {
  return typeof err === "object" && err !== null && (err as { name?: string }).name === "AbortError";
}

function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    if (signal?.aborted) return resolve();
    const t = setTimeout(done, ms);
    function done() {
      clearTimeout(t);
      signal?.removeEventListener("abort", done);
      resolve();
    }
    signal?.addEventListener("abort", done, { once: true });
  });
}

/** Redirects (307/308 to a member that holds a placed namespace) followed per request. */
export const MAX_REDIRECTS = 5;

export class Client {
  readonly baseUrl: string;
  private readonly token: string | undefined;
  private readonly fetchFn: FetchLike;

  constructor(options: ClientOptions = {}) {
    this.baseUrl = (options.baseUrl ?? "http://127.0.0.1:7700").replace(/\/+$/, "");
    this.token = options.token;
    const f = options.fetch ?? (globalThis.fetch as FetchLike | undefined);
    if (!f) throw new TypeError("no fetch: pass options.fetch, or run on Node >= 18 or in a browser");
    // Called unbound, the global fetch of some browsers throws "Illegal invocation".
    this.fetchFn = options.fetch ? f : (input, init) => (globalThis.fetch as FetchLike)(input, init);
  }

  // ---- keys --------------------------------------------------------------

  /** Writes a value. Objects (and numbers, booleans, null, arrays) are sent as JSON;
   *  a Uint8Array or a string is sent as is. */
  async put(ns: string, key: string, value: unknown, options: PutOptions = {}): Promise<WriteResult> {
    let body: Uint8Array | string;
    let contentType: string;
    if (isBytes(value)) {
      body = value;
      contentType = "application/octet-stream";
    } else if (value instanceof ArrayBuffer) {
      body = new Uint8Array(value);
      contentType = "application/octet-stream";
    } else if (typeof value === "string") {
      body = value;
      contentType = "text/plain";
    } else {
      if (value === undefined) throw new TypeError("put: value is undefined");
      body = JSON.stringify(value);
      contentType = "application/json";
    }
    const headers: Record<string, string> = { "Content-Type": options.contentType ?? contentType };
    if (options.ifMatch !== undefined) headers["If-Match"] = etag(options.ifMatch);
    if (options.ifNoneMatch !== undefined) headers["If-None-Match"] = etag(options.ifNoneMatch);
    const query = options.ttlMs !== undefined ? { ttl_ms: String(options.ttlMs) } : undefined;
    return this.json<WriteResult>("PUT", this.keyPath(ns, key), { headers, body, query, signal: options.signal });
  }

  /** Reads a value; throws NotFoundError when the key does not exist. */
  async get(ns: string, key: string, options: GetOptions = {}): Promise<GetResult> {
    const headers: Record<string, string> = {};
    if (options.accept !== undefined) headers["Accept"] = options.accept;
    const res = await this.request("GET", this.keyPath(ns, key), { headers, signal: options.signal });
    const body = new Uint8Array(await res.arrayBuffer());
    const contentType = res.headers.get("content-type") ?? "application/octet-stream";
    const version = unquote(res.headers.get("etag"));
    return {
      body,
      contentType,
      version,
      text: () => new TextDecoder().decode(body),
      json: <T = unknown>() => JSON.parse(new TextDecoder().decode(body)) as T,
    };
  }

  /** Deletes a key (a tombstone stays). */
  async delete(ns: string, key: string, options: DeleteOptions = {}): Promise<WriteResult> {
    const headers: Record<string, string> = {};
    if (options.ifMatch !== undefined) headers["If-Match"] = etag(options.ifMatch);
    return this.json<WriteResult>("DELETE", this.keyPath(ns, key), { headers, signal: options.signal });
  }

  /** Lists live keys in byte order, following the pages (next_after) to the end or to `limit`. */
  async scan(ns: string, options: ScanOptions = {}): Promise<KeyItem[]> {
    const items: KeyItem[] = [];
    for await (const item of this.scanIter(ns, options)) items.push(item);
    return items;
  }

  /** scan as an async iterator, one page in memory at a time. */
  async *scanIter(ns: string, options: ScanOptions = {}): AsyncGenerator<KeyItem, void, undefined> {
    const { prefix, limit, values, signal } = options;
    if (limit !== undefined && (!Number.isInteger(limit) || limit < 0)) throw new RangeError("scan: limit must be an integer >= 0");
    let remaining = limit ?? Infinity;
    let after: string | undefined;
    while (remaining > 0) {
      const pageSize = Math.max(1, Math.min(options.pageSize ?? 1000, remaining, 1000));
      const query: Record<string, string> = { limit: String(pageSize) };
      if (prefix !== undefined && prefix !== "") query.prefix = prefix;
      if (after !== undefined) query.after = after;
      if (values) query.values = "true";
      const page = await this.json<KeyPage>("GET", `/v1/ns/${encodeURIComponent(ns)}/kv`, { query, signal });
      const pageItems = page.items ?? [];
      for (const item of pageItems) {
        if (remaining <= 0) return;
        remaining--;
        yield item;
      }
      const next = page.next_after;
      if (next === null || next === undefined || next === "" || next === after) return;
      if (pageItems.length === 0) return;
      after = next;
    }
  }

  /** Applies the operations atomically, in order (all or none). */
  async batch(ns: string, ops: BatchOp[], options: BatchOptions = {}): Promise<BatchResult> {
    const body: Batch = { ops };
    return this.json<BatchResult>("POST", `/v1/ns/${encodeURIComponent(ns)}/batch`, {
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
      signal: options.signal,
    });
  }

  // ---- node and namespaces -------------------------------------------------

  async status(options: { signal?: AbortSignal } = {}): Promise<Status> {
    return this.json<Status>("GET", "/v1/status", { signal: options.signal });
  }

  async policy(ns: string, options: { signal?: AbortSignal } = {}): Promise<Policy> {
    return this.json<Policy>("GET", `/v1/ns/${encodeURIComponent(ns)}/policy`, { signal: options.signal });
  }

  /** Sets a namespace's conflict policy (only while it holds no data). */
  async setPolicy(ns: string, p: PolicyIn | PolicyIn["policy"], options: { signal?: AbortSignal } = {}): Promise<Policy> {
    const body: PolicyIn = typeof p === "string" ? { policy: p } : { policy: p.policy };
    return this.json<Policy>("PUT", `/v1/ns/${encodeURIComponent(ns)}/policy`, {
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
      signal: options.signal,
    });
  }

  // ---- the change feed -----------------------------------------------------

  /**
   * The namespace's change feed (Server-Sent Events, `event: change`), as an async iterable.
   * After a dropped connection it reconnects by itself and resumes after the last change it
   * yielded (Last-Event-ID), so every change arrives once and in feed order. It ends when
   * `signal` aborts (or the loop breaks); an error answer of the node that retrying cannot
   * cure (400, 401, 403, 404, ...) is thrown as AspError.
   */
  changes(ns: string, options: ChangesOptions = {}): AsyncIterable<Change> {
    const self = this;
    return {
      [Symbol.asyncIterator]: () => self.changesIter(ns, options),
    };
  }

  private async *changesIter(ns: string, options: ChangesOptions): AsyncGenerator<Change, void, undefined> {
    const userSignal = options.signal;
    const firstRetry = options.retryMs ?? 250;
    const maxRetry = options.maxRetryMs ?? 5000;
    const since = options.since ?? 0;
    let lastEventId = "";
    let lastSeq = since;
    let attempt = 0;
    let serverRetry: number | undefined;

    while (!userSignal?.aborted) {
      const controller = new AbortController();
      const onAbort = () => controller.abort();
      userSignal?.addEventListener("abort", onAbort, { once: true });
      let error: unknown;
      let retryAfterMs: number | undefined;
      try {
        // Both say where to resume: Last-Event-ID (which the node prefers for streams) and since
        // (in case something between drops the header).
        const query: Record<string, string> = { since: String(lastSeq) };
        if (options.values === false) query.values = "false";
        const headers: Record<string, string> = { Accept: "text/event-stream" };
        if (lastEventId !== "") headers["Last-Event-ID"] = lastEventId;
        const res = await this.fetchFn(this.url(`/v1/ns/${encodeURIComponent(ns)}/changes`, query), {
          method: "GET",
          headers: this.headers(headers),
          signal: controller.signal,
          cache: "no-store",
        });
        if (!res.ok) {
          const err = await this.errorFrom(res);
          // Worth retrying: the node is busy, stopping, or out of streams for now.
          // (store_failed is not: a storage failure stops the node's store until an operator acts.)
          const retriable = res.status === 503 || res.status === 502 || res.status === 504 || res.status === 429 || res.status === 408;
          if (retriable && err.code !== "store_failed") {
            const ra = Number(res.headers.get("retry-after"));
            if (Number.isFinite(ra) && ra > 0) retryAfterMs = ra * 1000;
            throw err;
          }
          throw Object.assign(err, { fatal: true });
        }
        const ct = res.headers.get("content-type") ?? "";
        if (!ct.startsWith("text/event-stream")) {
          throw Object.assign(new AspError(res.status, "unexpected_content_type", `the feed answered ${ct || "no content type"}, not text/event-stream`), { fatal: true });
        }
        if (!res.body) throw new Error("the feed's answer has no body stream");
        attempt = 0;
        const parser = new SseParser();
        parser.lastEventId = lastEventId;
        const decoder = new TextDecoder();
        const reader = res.body.getReader();
        try {
          for (;;) {
            const { done, value } = await reader.read();
            if (done) break;
            const events = parser.push(decoder.decode(value, { stream: true }));
            if (parser.reconnectMs !== undefined) serverRetry = parser.reconnectMs;
            for (const ev of events) {
              if (ev.event === "error") {
                // The node ends the stream with `event: error` and {code, message} when its store fails.
                let info: { code?: unknown; message?: unknown } = {};
                try {
                  info = JSON.parse(ev.data) as typeof info;
                } catch {
                  info = { message: ev.data };
                }
                const code = typeof info.code === "string" ? info.code : "stream_error";
                const message = typeof info.message === "string" ? info.message : ev.data;
                throw Object.assign(new AspError(503, code, message, info as Record<string, unknown>, info), { fatal: true });
              }
              if (ev.event !== "change") continue; // the feed names its events; others are not changes
              const change = JSON.parse(ev.data) as Change;
              const pos = ev.id !== "" && /^[0-9]+$/.test(ev.id) ? Number(ev.id) : change.seq;
              // Never hand out a position twice (a resumed stream starts after lastEventId anyway).
              if (pos !== undefined && pos <= lastSeq) continue;
              if (pos !== undefined) lastSeq = pos;
              lastEventId = ev.id !== "" ? ev.id : String(pos ?? lastEventId);
              yield change;
            }
          }
        } finally {
          controller.abort();
          try {
            reader.releaseLock();
          } catch {
            // a read may still be settling; the abort ends it
          }
        }
        error = new Error("the feed's connection ended");
      } catch (err) {
        if (userSignal?.aborted) return;
        if ((err as { fatal?: boolean }).fatal) {
          delete (err as { fatal?: boolean }).fatal;
          throw err;
        }
        error = err;
      } finally {
        userSignal?.removeEventListener("abort", onAbort);
        controller.abort();
      }
      if (userSignal?.aborted) return;
      attempt++;
      options.onReconnect?.({ lastEventId, error, attempt });
      const backoff = Math.min(maxRetry, (serverRetry ?? firstRetry) * 2 ** Math.min(attempt - 1, 10));
      await sleep(retryAfterMs ?? backoff, userSignal);
    }
  }

  // ---- plumbing --------------------------------------------------------------

  private keyPath(ns: string, key: string): string {
    return `/v1/ns/${encodeURIComponent(ns)}/kv/${encodeURIComponent(key)}`;
  }

  private url(path: string, query?: Record<string, string>): string {
    const qs = query && Object.keys(query).length ? "?" + new URLSearchParams(query).toString() : "";
    return this.baseUrl + path + qs;
  }

  private headers(extra: Record<string, string> = {}): Record<string, string> {
    const h: Record<string, string> = { ...extra };
    if (this.token !== undefined) h["Authorization"] = `Bearer ${this.token}`;
    return h;
  }

  private async request(
    method: string,
    path: string,
    init: { headers?: Record<string, string>; body?: Uint8Array | string; query?: Record<string, string>; signal?: AbortSignal | undefined } = {},
  ): Promise<Response> {
    // Redirects are followed here, not by fetch: a member that does not hold a placed
    // namespace answers 307 with the holder's address, another origin, and fetch drops
    // the Authorization header when it follows across origins.
    const reqInit: RequestInit = { method, headers: this.headers(init.headers), redirect: "manual" };
    if (init.body !== undefined) reqInit.body = init.body as BodyInit;
    if (init.signal !== undefined) reqInit.signal = init.signal;
    let url = this.url(path, init.query);
    for (let redirects = 0; ; redirects++) {
      let res = await this.fetchFn(url, reqInit);
      if (res.type === "opaqueredirect") {
        // A browser hides a manual redirect's Location: let it follow this one itself.
        res = await this.fetchFn(url, { ...reqInit, redirect: "follow" });
      }
      const location = res.headers.get("location");
      if ((res.status === 307 || res.status === 308) && location) {
        await res.body?.cancel().catch(() => undefined);
        if (redirects >= MAX_REDIRECTS) {
          throw new AspError(
            res.status,
            "too_many_redirects",
            `${method} ${path}: more than ${MAX_REDIRECTS} redirects (last to ${location}); ` +
              "the cluster's members may disagree on who holds the namespace",
          );
        }
        const next = new URL(location, url);
        if (next.protocol !== "http:" && next.protocol !== "https:") {
          throw new AspError(res.status, "bad_redirect", `the node redirected to ${location}, not http(s)`);
        }
        url = next.toString();
        continue;
      }
      if (!res.ok) throw await this.errorFrom(res);
      return res;
    }
  }

  private async json<T>(
    method: string,
    path: string,
    init: { headers?: Record<string, string>; body?: Uint8Array | string; query?: Record<string, string> | undefined; signal?: AbortSignal | undefined } = {},
  ): Promise<T> {
    const headers = { Accept: "application/json", ...init.headers };
    const res = await this.request(method, path, { ...init, query: init.query ?? {}, headers });
    const text = await res.text();
    return (text === "" ? {} : JSON.parse(text)) as T;
  }

  private async errorFrom(res: Response): Promise<AspError> {
    let text = "";
    try {
      text = await res.text();
    } catch {
      // the body could not be read; the status says enough
    }
    let parsed: unknown;
    try {
      parsed = text ? JSON.parse(text) : undefined;
    } catch {
      parsed = undefined;
    }
    const err = (parsed as Partial<ApiError> | undefined)?.error;
    const code = typeof err?.code === "string" ? err.code : `http_${res.status}`;
    const message = typeof err?.message === "string" ? err.message : text || res.statusText || `HTTP ${res.status}`;
    const details = (err ?? {}) as Record<string, unknown>;
    const Cls = res.status === 404 ? NotFoundError : AspError;
    return new Cls(res.status, code, message, details, parsed ?? (text || undefined));
  }
}

export default Client;
