// --auth required: without a token every call is a 401 AspError; with one from
// `asp token create` it works (the change feed too, which EventSource could not do).

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { Client, AspError } from "../dist/index.js";
import { startNode, take, uniqueNs, withTimeout, WAIT_MS } from "./helpers.mjs";

const T = { timeout: 60_000 };
let node;
let token;

before(async () => {
  node = await startNode({ auth: true });
  token = await node.createToken({ ns: "*", ops: "read,write,admin" });
  assert.match(token, /^\S+$/, "asp token create printed a token");
});

after(async () => {
  await node?.stop();
});

const isUnauthorized = (err) => {
  assert.ok(err instanceof AspError, `an AspError, not ${err}`);
  assert.equal(err.status, 401);
  assert.equal(err.code, "unauthorized");
  assert.ok(err.message.length > 0);
  return true;
};

test("without a token: 401 AspError", T, async () => {
  const anon = new Client({ baseUrl: node.baseUrl });
  await assert.rejects(anon.status(), isUnauthorized);
  await assert.rejects(anon.put("app", "k", { a: 1 }), isUnauthorized);
  await assert.rejects(anon.get("app", "k"), isUnauthorized);
  const it = anon.changes("app")[Symbol.asyncIterator]();
  await assert.rejects(withTimeout(it.next(), WAIT_MS, "the feed's 401"), isUnauthorized);
});

test("a wrong token: 401 AspError", T, async () => {
  const bad = new Client({ baseUrl: node.baseUrl, token: "asp1.not-a-token" });
  await assert.rejects(bad.status(), isUnauthorized);
});

test("with a token: calls and the feed work", T, async () => {
  const c = new Client({ baseUrl: node.baseUrl, token });
  const ns = uniqueNs();
  const s = await c.status();
  assert.match(s.node_id, /^[0-9a-f]{16}$/);
  const w = await c.put(ns, "k", { a: 1 });
  assert.deepEqual((await c.get(ns, "k")).json(), { a: 1 });
  assert.deepEqual((await c.scan(ns)).map((i) => i.key), ["k"]);
  const ac = new AbortController();
  const it = c.changes(ns, { signal: ac.signal })[Symbol.asyncIterator]();
  const [change] = await take(it, 1);
  ac.abort();
  await withTimeout(it.return(), WAIT_MS, "the feed to end");
  assert.equal(change.key, "k");
  assert.equal(change.version, w.version);
});

test("a narrowed token is refused outside its scope: 403", T, async () => {
  const readOnly = await node.createToken({ ns: "ro*", ops: "read" });
  const c = new Client({ baseUrl: node.baseUrl, token: readOnly });
  await assert.rejects(c.put("ro-1", "k", 1), (err) => err instanceof AspError && err.status === 403 && err.code === "forbidden");
  await assert.rejects(c.get("ro-1", "k"), (err) => err.status === 404);
});
