// A member that does not hold a placed namespace answers 307 with the holder's address
// (another origin). fetch's own following drops the Authorization header across
// origins, so the client follows redirects itself: same method, body and token, at
// most 5 times, then AspError `too_many_redirects`.

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { createServer } from "node:http";
import { Client, AspError } from "../dist/index.js";
import { startNode, uniqueNs } from "./helpers.mjs";

const T = { timeout: 60_000 };
let node;
let token;

before(async () => {
  node = await startNode({ auth: true });
  token = await node.createToken({ ns: "*", ops: "read,write,admin" });
});

after(async () => {
  await node?.stop();
});

/** A server on its own port that answers every request with a 307 to `target` (the
 * same path and query), or to itself when `target` is null; it notes what it was asked. */
async function redirector(target) {
  const asked = [];
  const server = createServer((req, res) => {
    asked.push([req.method, req.url, req.headers.authorization ?? null]);
    req.resume();
    req.on("end", () => {
      const to = (target ?? `http://127.0.0.1:${server.address().port}`) + req.url;
      res.writeHead(307, { Location: to, "Content-Type": "application/json" });
      res.end(JSON.stringify({ error: { code: "not_held", message: "placed elsewhere" } }));
    });
  });
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  return {
    url: `http://127.0.0.1:${server.address().port}`,
    asked,
    close: () => new Promise((resolve) => server.close(resolve)),
  };
}

test("redirects to the holder are followed with the method, body and token", T, async () => {
  const r = await redirector(node.baseUrl);
  try {
    const c = new Client({ baseUrl: r.url, token });
    const ns = uniqueNs();
    await c.put(ns, "k", { a: 1 });
    assert.deepEqual((await c.get(ns, "k")).json(), { a: 1 });
    assert.deepEqual(
      r.asked.map(([method, , auth]) => [method, auth]),
      [
        ["PUT", `Bearer ${token}`],
        ["GET", `Bearer ${token}`],
      ],
    );
  } finally {
    await r.close();
  }
});

test("a redirect loop is a clear error", T, async () => {
  const loop = await redirector(null);
  try {
    const c = new Client({ baseUrl: loop.url });
    await assert.rejects(c.get("app", "k"), (err) => {
      assert.ok(err instanceof AspError, `an AspError, not ${err}`);
      assert.equal(err.code, "too_many_redirects");
      assert.match(err.message, /more than 5 redirects/);
      return true;
    });
    assert.equal(loop.asked.length, 6, "the first request and 5 redirects");
  } finally {
    await loop.close();
  }
});
