// The SSE change feed against a real `asp serve`: named events, resuming after
// an abort, reconnecting by itself after a dropped connection or a restarted node.

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { Client, AspError } from "../dist/index.js";
import { startNode, take, uniqueNs, withTimeout, WAIT_MS } from "./helpers.mjs";

const T = { timeout: 120_000 };
let node;
let client;

before(async () => {
  node = await startNode();
  client = new Client({ baseUrl: node.baseUrl });
});

after(async () => {
  await node?.stop();
});

async function writeKeys(c, ns, from, to) {
  const keys = [];
  for (let i = from; i < to; i++) {
    const key = `k${String(i).padStart(4, "0")}`;
    await c.put(ns, key, { i });
    keys.push(key);
  }
  return keys;
}

/** Ends an iteration: abort its signal, then let the generator finish. */
async function close(ac, it) {
  ac.abort();
  await withTimeout(it.return?.() ?? Promise.resolve(), WAIT_MS, "the change feed to end after abort");
}

function assertIncreasing(changes) {
  for (let i = 1; i < changes.length; i++) {
    assert.ok(changes[i].seq > changes[i - 1].seq, `seq ${changes[i].seq} after ${changes[i - 1].seq}`);
  }
}

test("changes yields the named `change` events with values", T, async () => {
  const ns = uniqueNs();
  await client.put(ns, "j", { a: 1 });
  await client.put(ns, "t", "text");
  await client.put(ns, "b", new Uint8Array([0, 255]));
  await client.delete(ns, "j");
  const ac = new AbortController();
  const it = client.changes(ns, { signal: ac.signal })[Symbol.asyncIterator]();
  const got = await take(it, 4);
  await close(ac, it);
  assert.deepEqual(
    got.map((c) => [c.key, c.op]),
    [["j", "put"], ["t", "put"], ["b", "put"], ["j", "delete"]],
  );
  assert.deepEqual(got[0].value, { a: 1 });
  assert.equal(got[1].value_text, "text");
  assert.equal(got[2].value_base64, "AP8=");
  assert.ok(got.every((c) => c.namespace === ns));
  assertIncreasing(got);
});

test("read N, abort, resume from the last position: later writes arrive once, no gaps", T, async () => {
  const ns = uniqueNs();
  const written = await writeKeys(client, ns, 0, 10);

  // First connection: read 6 of the 10, then drop it.
  const ac1 = new AbortController();
  const it1 = client.changes(ns, { signal: ac1.signal })[Symbol.asyncIterator]();
  const first = await take(it1, 6);
  await close(ac1, it1);
  assert.deepEqual(first.map((c) => c.key), written.slice(0, 6));
  const last = first[first.length - 1].seq;

  // Written while nobody listens.
  written.push(...(await writeKeys(client, ns, 10, 15)));

  // Resume after the last position seen, then keep reading live writes.
  const ac2 = new AbortController();
  const it2 = client.changes(ns, { since: last, signal: ac2.signal })[Symbol.asyncIterator]();
  const caughtUp = await take(it2, 9);
  const live = writeKeys(client, ns, 15, 25);
  const more = await take(it2, 10);
  written.push(...(await live));
  await close(ac2, it2);

  const all = [...first, ...caughtUp, ...more];
  assert.deepEqual(all.map((c) => c.key), written);
  assertIncreasing(all);
  assert.equal(new Set(all.map((c) => c.seq)).size, all.length);
});

/**
 * A fetch that cuts the first feed connection in the middle of an event, after
 * `after` complete change events, and records the headers of every feed request.
 */
function droppingFetch(after) {
  const feedRequests = [];
  const f = async (input, init = {}) => {
    const headers = new Headers(init.headers);
    const isFeed = headers.get("accept") === "text/event-stream";
    if (isFeed) feedRequests.push({ url: String(input), lastEventId: headers.get("last-event-id") });
    const res = await fetch(input, init);
    if (!isFeed || feedRequests.length !== 1 || !res.body) return res;

    const reader = res.body.getReader();
    const dec = new TextDecoder();
    const enc = new TextEncoder();
    let seen = "";
    let sent = 0;
    const body = new ReadableStream({
      async pull(controller) {
        const { done, value } = await reader.read();
        if (done) return controller.close();
        seen += dec.decode(value, { stream: true });
        // Where the `after`-th complete event ends.
        let end = -1;
        let count = 0;
        let from = 0;
        while (count < after) {
          const i = seen.indexOf("\n\n", from);
          if (i === -1) break;
          if (seen.slice(from, i).includes("event: change")) count++;
          from = i + 2;
          end = from;
        }
        if (count < after) {
          controller.enqueue(enc.encode(seen.slice(sent)));
          sent = seen.length;
          return;
        }
        // Pass the events through, and half an event more, then break the stream.
        const cut = Math.min(seen.length, end + 20);
        if (cut > sent) controller.enqueue(enc.encode(seen.slice(sent, cut)));
        sent = cut;
        await reader.cancel();
        controller.error(new TypeError("terminated: the test cut the connection"));
      },
      cancel(reason) {
        return reader.cancel(reason);
      },
    });
    return new Response(body, { status: res.status, statusText: res.statusText, headers: res.headers });
  };
  return { fetch: f, feedRequests };
}

test("a dropped connection mid-event is resumed with Last-Event-ID, exactly once", T, async () => {
  const ns = uniqueNs();
  const written = await writeKeys(client, ns, 0, 8);
  const { fetch: f, feedRequests } = droppingFetch(5);
  const c = new Client({ baseUrl: node.baseUrl, fetch: f });
  const reconnects = [];
  const ac = new AbortController();
  const it = c
    .changes(ns, { signal: ac.signal, retryMs: 50, onReconnect: (info) => reconnects.push(info) })
    [Symbol.asyncIterator]();
  const got = await take(it, 8);
  const live = writeKeys(client, ns, 8, 12);
  got.push(...(await take(it, 4)));
  written.push(...(await live));
  await close(ac, it);

  assert.deepEqual(got.map((x) => x.key), written);
  assertIncreasing(got);
  assert.equal(reconnects.length, 1, "one reconnection");
  assert.equal(feedRequests.length, 2);
  assert.equal(feedRequests[0].lastEventId, null);
  assert.equal(feedRequests[1].lastEventId, String(got[4].seq), "resumed after the 5th change");
});

test("the feed reconnects by itself after the node restarts", T, async () => {
  const ns = uniqueNs();
  const written = await writeKeys(client, ns, 0, 3);
  const ac = new AbortController();
  let reconnects = 0;
  const it = client
    .changes(ns, { signal: ac.signal, retryMs: 100, maxRetryMs: 1000, onReconnect: () => reconnects++ })
    [Symbol.asyncIterator]();
  const got = await take(it, 3);
  const pending = it.next(); // waiting for a change when the node goes away

  await node.restart();
  written.push(...(await writeKeys(client, ns, 3, 6)));
  const r = await withTimeout(pending, WAIT_MS, "the first change after the restart");
  got.push(r.value);
  got.push(...(await take(it, 2)));
  await close(ac, it);

  assert.deepEqual(got.map((x) => x.key), written);
  assertIncreasing(got);
  assert.ok(reconnects >= 1);
});

test("only `change` events are changes: other named and unnamed events are skipped", T, async () => {
  const sse =
    ": keep-alive\n\n" +
    "data: {\"seq\":99,\"key\":\"unnamed\"}\n\n" +
    "event: other\r\ndata: {\"seq\":98}\r\n\r\n" +
    "id: 7\nevent: change\ndata: {\"seq\":7,\n" +
    "data: \"key\":\"x\",\"op\":\"put\"}\n\n";
  const fakeFetch = async () =>
    new Response(sse, { status: 200, headers: { "content-type": "text/event-stream" } });
  const c = new Client({ baseUrl: "http://127.0.0.1:1", fetch: fakeFetch });
  const ac = new AbortController();
  const it = c.changes("ns", { signal: ac.signal, retryMs: 10_000 })[Symbol.asyncIterator]();
  const [first] = await take(it, 1);
  await close(ac, it);
  assert.deepEqual(first, { seq: 7, key: "x", op: "put" });
});

test("a refused feed (bad namespace) throws instead of retrying", T, async () => {
  const it = client.changes("bad ns!")[Symbol.asyncIterator]();
  await assert.rejects(withTimeout(it.next(), WAIT_MS, "the feed's error"), (err) => {
    assert.ok(err instanceof AspError);
    assert.equal(err.status, 400);
    assert.equal(err.code, "invalid_namespace");
    return true;
  });
});

test("an `error` event in the stream (the node's store failed) is thrown as AspError", T, async () => {
  const sse =
    'id: 1\nevent: change\ndata: {"seq":1,"key":"a","op":"put"}\n\n' +
    'event: error\ndata: {"code":"store_failed","message":"disk on fire"}\n\n';
  let calls = 0;
  const fakeFetch = async () => {
    calls++;
    return new Response(sse, { status: 200, headers: { "content-type": "text/event-stream" } });
  };
  const c = new Client({ baseUrl: "http://127.0.0.1:1", fetch: fakeFetch });
  const it = c.changes("ns", { retryMs: 10 })[Symbol.asyncIterator]();
  const [first] = await take(it, 1);
  assert.equal(first.key, "a");
  await assert.rejects(withTimeout(it.next(), WAIT_MS, "the error event"), (err) => {
    assert.ok(err instanceof AspError);
    assert.equal(err.code, "store_failed");
    assert.equal(err.message, "disk on fire");
    return true;
  });
  assert.equal(calls, 1, "no reconnection after the node said its store failed");
});
