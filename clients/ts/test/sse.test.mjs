// The SSE parser by itself: line endings split across chunks, multi-line data,
// comments, ids that persist, events without data.

import { test } from "node:test";
import assert from "node:assert/strict";
import { SseParser } from "../dist/index.js";

function feed(chunks) {
  const p = new SseParser();
  const out = [];
  for (const c of chunks) out.push(...p.push(c));
  return { p, out };
}

test("named events with ids, LF line endings", () => {
  const { out, p } = feed(["id: 1\nevent: change\ndata: {\"a\":1}\n\nid: 2\nevent: change\ndata: 2\n\n"]);
  assert.deepEqual(out, [
    { event: "change", data: '{"a":1}', id: "1" },
    { event: "change", data: "2", id: "2" },
  ]);
  assert.equal(p.lastEventId, "2");
});

test("any split of the stream gives the same events (CRLF, CR, LF)", () => {
  const text = ": hi\r\nid: 5\revent: change\r\ndata: a\ndata:b\r\ndata:  c\r\n\r\nevent: x\ndata\n\n";
  const want = [
    { event: "change", data: "a\nb\n c", id: "5" },
    { event: "x", data: "", id: "5" },
  ];
  for (let i = 0; i <= text.length; i++) {
    for (let j = i; j <= text.length; j += 3) {
      const { out } = feed([text.slice(0, i), text.slice(i, j), text.slice(j)]);
      assert.deepEqual(out, want, `split at ${i}, ${j}`);
    }
  }
  // One character at a time.
  assert.deepEqual(feed([...text]).out, want);
});

test("events without data are not dispatched; unnamed ones are `message`; retry is kept", () => {
  const { out, p } = feed(["id: 3\n\nretry: 1500\n\ndata: x\n\n", "event: change\nid: 4\ndata: y\n"]);
  assert.deepEqual(out, [{ event: "message", data: "x", id: "3" }]);
  assert.equal(p.reconnectMs, 1500);
  assert.equal(p.lastEventId, "4", "the id of an event still open is known");
  p.reset();
  assert.deepEqual(p.push("data: z\n\n"), [{ event: "message", data: "z", id: "4" }]);
});
