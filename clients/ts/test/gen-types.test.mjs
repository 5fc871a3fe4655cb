// src/openapi-types.ts is what scripts/gen-types.mjs makes of the OpenAPI
// document: a change to the document without regenerating goes red here.

import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { generateFromFile, DEFAULT_OUTPUT, tsType, generate } from "../scripts/gen-types.mjs";

test("src/openapi-types.ts is up to date with the OpenAPI document (run npm run gen-types)", () => {
  const fresh = generateFromFile();
  const committed = readFileSync(DEFAULT_OUTPUT, "utf8");
  assert.equal(committed, fresh);
});

test("schema to type: scalars, arrays, enums, nullable, refs, compositions", () => {
  assert.equal(tsType({ type: "string" }), "string");
  assert.equal(tsType({ type: "integer" }), "number");
  assert.equal(tsType({ type: "boolean", nullable: true }), "boolean | null");
  assert.equal(tsType({ type: ["integer", "null"] }), "number | null");
  assert.equal(tsType({ type: "array", items: { type: "string" } }), "string[]");
  assert.equal(tsType({ type: "array" }), "unknown[]");
  assert.equal(tsType({ type: "string", enum: ["a", "b"] }), '"a" | "b"');
  assert.equal(tsType({ nullable: true, enum: [null] }), "null");
  assert.equal(tsType({ $ref: "#/components/schemas/Dot" }), "Dot");
  assert.equal(tsType({ $ref: "#/components/schemas/Error" }), "ApiError");
  assert.equal(tsType({ $ref: "#/components/schemas/Error/properties/error" }), 'NonNullable<ApiError["error"]>');
  assert.equal(tsType({ $ref: "#/elsewhere" }), "unknown");
  assert.equal(tsType({}), "unknown");
  assert.equal(tsType({ not: { type: "null" } }), "unknown");
  assert.equal(tsType({ oneOf: [{ type: "integer" }, { type: "string", enum: ["all"] }] }), 'number | "all"');
  assert.equal(tsType({ type: "string", anyOf: [{ pattern: "^a" }, { pattern: "^b" }] }), "string");
  assert.equal(tsType({ type: "object" }), "{\n  [key: string]: unknown;\n}");
  assert.equal(
    tsType({ type: "object", additionalProperties: { type: "integer" } }),
    "{\n  [key: string]: number;\n}",
  );
  assert.equal(
    tsType({ type: "object", required: ["a"], properties: { a: { type: "string" }, "b-c": { type: "integer" } }, additionalProperties: false }),
    '{\n  a: string;\n  "b-c"?: number;\n}',
  );
  assert.equal(
    tsType({ allOf: [{ $ref: "#/components/schemas/A" }, { $ref: "#/components/schemas/B" }] }),
    "A & B",
  );
});

test("generate writes interfaces for objects and aliases for the rest", () => {
  const text = generate({
    openapi: "3.0.3",
    info: { title: "t", version: "1" },
    components: {
      schemas: {
        Obj: { type: "object", description: "An */ object", properties: { x: { type: "string" } } },
        Maybe: { type: "object", nullable: true, properties: { y: { type: "integer" } } },
        Kind: { type: "string", enum: ["p", "q"] },
      },
    },
  });
  assert.match(text, /\/\*\* An \*\\\/ object \*\/\nexport interface Obj \{\n  x\?: string;\n\}/);
  assert.match(text, /export type Maybe = \{\n  y\?: number;\n\} \| null;/);
  assert.match(text, /export type Kind = "p" \| "q";/);
  assert.match(text, /export interface Schemas \{\n  Obj: Obj;\n  Maybe: Maybe;\n  Kind: Kind;\n\}/);
});
