// Keys, batches, listings, status and policies against a real `asp serve`.

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { Client, AspError, NotFoundError } from "../dist/index.js";
import { startNode, uniqueNs } from "./helpers.mjs";

const T = { timeout: 60_000 };
let node;
let client;

before(async () => {
  node = await startNode();
  client = new Client({ baseUrl: node.baseUrl });
});

after(async () => {
  await node?.stop();
});

test("put and get a JSON value", T, async () => {
  const ns = uniqueNs();
  const w = await client.put(ns, "user/1", { name: "ada", tags: ["x"], n: 1.5 });
  assert.equal(w.key, "user/1");
  assert.equal(w.namespace, ns);
  assert.match(w.version, /^[0-9]+@[0-9a-f]{16}$/);
  assert.equal(typeof w.seq, "number");

  const r = await client.get(ns, "user/1");
  assert.deepEqual(r.json(), { name: "ada", tags: ["x"], n: 1.5 });
  assert.match(r.contentType, /^application\/json/);
  assert.equal(r.version, w.version);
  assert.ok(r.body instanceof Uint8Array);
});

test("put and get bytes, and a string as text", T, async () => {
  const ns = uniqueNs();
  const bytes = new Uint8Array([0, 1, 2, 0xfe, 0xff, 0x80, 10, 13]);
  await client.put(ns, "bin", bytes);
  const r = await client.get(ns, "bin");
  assert.equal(r.contentType, "application/octet-stream");
  assert.deepEqual([...r.body], [...bytes]);

  await client.put(ns, "txt", "héllo wörld");
  const t = await client.get(ns, "txt");
  assert.match(t.contentType, /^text\/plain/);
  assert.equal(t.text(), "héllo wörld");

  // A string with an explicit JSON content type is sent as is.
  await client.put(ns, "raw", '{"a":[1,2]}', { contentType: "application/json" });
  assert.deepEqual((await client.get(ns, "raw")).json(), { a: [1, 2] });
});

test("keys with slashes, spaces and non-ASCII round-trip", T, async () => {
  const ns = uniqueNs();
  const key = "a/b c/ü?#%&=+";
  await client.put(ns, key, 42);
  assert.equal((await client.get(ns, key)).json(), 42);
  const items = await client.scan(ns);
  assert.deepEqual(items.map((i) => i.key), [key]);
});

test("get with accept converts (JSON to CBOR)", T, async () => {
  const ns = uniqueNs();
  await client.put(ns, "k", { a: 1 });
  const r = await client.get(ns, "k", { accept: "application/cbor" });
  assert.equal(r.contentType, "application/cbor");
  // {"a": 1} in CBOR: map(1), text(1) "a", unsigned 1
  assert.deepEqual([...r.body], [0xa1, 0x61, 0x61, 0x01]);
});

test("get of a missing key throws NotFoundError (an AspError)", T, async () => {
  const ns = uniqueNs();
  await assert.rejects(client.get(ns, "nope"), (err) => {
    assert.ok(err instanceof NotFoundError);
    assert.ok(err instanceof AspError);
    assert.equal(err.status, 404);
    assert.equal(err.code, "not_found");
    assert.match(err.message, /nope/);
    return true;
  });
});

test("delete, then get is 404", T, async () => {
  const ns = uniqueNs();
  const w = await client.put(ns, "gone", "x");
  const d = await client.delete(ns, "gone", { ifMatch: w.version });
  assert.equal(d.deleted, true);
  await assert.rejects(client.get(ns, "gone"), NotFoundError);
});

test("a stale ifMatch is refused with 412 and writes nothing", T, async () => {
  const ns = uniqueNs();
  const v1 = await client.put(ns, "k", { v: 1 });
  const v2 = await client.put(ns, "k", { v: 2 }, { ifMatch: v1.version });
  assert.notEqual(v2.version, v1.version);
  await assert.rejects(client.put(ns, "k", { v: 3 }, { ifMatch: v1.version }), (err) => {
    assert.ok(err instanceof AspError);
    assert.equal(err.status, 412);
    assert.equal(err.code, "precondition_failed");
    return true;
  });
  await assert.rejects(client.delete(ns, "k", { ifMatch: v1.version }), (err) => err.status === 412);
  // A quoted tag works as well as a bare version.
  await client.put(ns, "k", { v: 4 }, { ifMatch: `"${v2.version}"` });
  assert.deepEqual((await client.get(ns, "k")).json(), { v: 4 });
  // ifNoneMatch "*": only if the key does not exist.
  await assert.rejects(client.put(ns, "k", 5, { ifNoneMatch: "*" }), (err) => err.status === 412);
});

test("scan follows the pages, honours prefix and limit", T, async () => {
  const ns = uniqueNs();
  const keys = [];
  for (let i = 0; i < 23; i++) keys.push(`s/${String(i).padStart(3, "0")}`);
  const ops = keys.map((key, i) => ({ op: "put", key, value: { i } }));
  ops.push({ op: "put", key: "other", value: 0 });
  await client.batch(ns, ops);

  const all = await client.scan(ns, { prefix: "s/", pageSize: 5 });
  assert.deepEqual(all.map((i) => i.key), keys);

  const everything = await client.scan(ns);
  assert.equal(everything.length, 24);

  const first10 = await client.scan(ns, { prefix: "s/", limit: 10, pageSize: 3 });
  assert.deepEqual(first10.map((i) => i.key), keys.slice(0, 10));

  const withValues = await client.scan(ns, { prefix: "s/01", values: true });
  assert.deepEqual(withValues.map((i) => i.value), [{ i: 10 }, { i: 11 }, { i: 12 }, { i: 13 }, { i: 14 }, { i: 15 }, { i: 16 }, { i: 17 }, { i: 18 }, { i: 19 }]);

  assert.deepEqual(await client.scan(ns, { prefix: "zzz" }), []);
});

test("batch applies all operations, or none when a condition fails", T, async () => {
  const ns = uniqueNs();
  const w = await client.put(ns, "a", 1);
  const res = await client.batch(ns, [
    { op: "put", key: "a", value: { x: 1 }, if_match: w.version },
    { op: "put", key: "b", value_text: "text" },
    { op: "put", key: "c", value_base64: "AAH/" },
    { op: "delete", key: "a" },
  ]);
  assert.equal(res.namespace, ns);
  assert.deepEqual(res.results.map((r) => r.key), ["a", "b", "c", "a"]);
  await assert.rejects(client.get(ns, "a"), NotFoundError);
  assert.equal((await client.get(ns, "b")).text(), "text");
  assert.deepEqual([...(await client.get(ns, "c")).body], [0, 1, 255]);

  await assert.rejects(
    client.batch(ns, [
      { op: "put", key: "d", value: 1 },
      { op: "put", key: "b", value: 2, if_match: w.version },
    ]),
    (err) => err instanceof AspError && err.status === 412 && err.code === "precondition_failed",
  );
  await assert.rejects(client.get(ns, "d"), NotFoundError);
});

test("status", T, async () => {
  const s = await client.status();
  assert.match(s.node_id, /^[0-9a-f]{16}$/);
  assert.equal(typeof s.feed.head_seq, "number");
  assert.ok(Array.isArray(s.namespaces));
  assert.equal(s.data_dir, node.dir);
});

test("policy and setPolicy", T, async () => {
  const ns = uniqueNs();
  assert.equal((await client.policy(ns)).policy, "lww");
  const p = await client.setPolicy(ns, "counter");
  assert.deepEqual(p, { namespace: ns, policy: "counter" });
  await client.batch(ns, [{ op: "incr", key: "hits", by: 5 }, { op: "incr", key: "hits", by: -2 }]);
  assert.equal((await client.get(ns, "hits")).json(), 3);
  // A namespace holding data keeps its policy.
  await assert.rejects(client.setPolicy(ns, { policy: "set" }), (err) => err instanceof AspError && err.code === "policy_fixed");
});

test("errors carry the node's code and message", T, async () => {
  await assert.rejects(client.put("bad ns!", "k", 1), (err) => {
    assert.ok(err instanceof AspError);
    assert.equal(err.status, 400);
    assert.equal(err.code, "invalid_namespace");
    assert.ok(err.message.length > 0);
    return true;
  });
});
