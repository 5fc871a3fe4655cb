#!/usr/bin/env node
// Generates src/openapi-types.ts from the node's OpenAPI document
// (crates/asp-http/src/openapi.json): one TypeScript type per entry of
// components.schemas. Plain Node, no dependencies.
//
//   node scripts/gen-types.mjs           write src/openapi-types.ts
//   node scripts/gen-types.mjs --stdout  print what it would write
//   node scripts/gen-types.mjs --check   exit 1 if src/openapi-types.ts differs
//
// What it understands: object (properties, required, additionalProperties),
// array, enum, nullable (3.0) and type lists with "null" (3.1), $ref (to a
// schema or into one: .../properties/x, .../items), allOf (intersection),
// oneOf/anyOf (union). Anything else becomes `unknown`.

import { readFileSync, writeFileSync } from "node:fs";
import { fileURLToPath } from "node:url";
import { dirname, resolve } from "node:path";

const here = dirname(fileURLToPath(import.meta.url));
export const DEFAULT_INPUT = resolve(here, "../../../crates/asp-http/src/openapi.json");
export const DEFAULT_OUTPUT = resolve(here, "../src/openapi-types.ts");

// Schema names that would shadow a global of JavaScript/TypeScript get a prefix.
const GLOBALS = new Set([
  "Error", "Object", "Array", "String", "Number", "Boolean", "Symbol", "Date",
  "Map", "Set", "Promise", "Record", "Function", "RegExp", "JSON", "Partial",
  "Required", "Readonly", "Pick", "Omit", "Response", "Request", "Headers",
]);

export function typeName(schemaName) {
  const cleaned = schemaName.replace(/[^A-Za-z0-9_$]/g, "_");
  const safe = /^[0-9]/.test(cleaned) ? `_${cleaned}` : cleaned;
  return GLOBALS.has(safe) ? `Api${safe}` : safe;
}

function propKey(name) {
  return /^[A-Za-z_$][A-Za-z0-9_$]*$/.test(name) ? name : JSON.stringify(name);
}

function comment(text, indent) {
  if (!text) return "";
  const lines = String(text).replace(/\*\//g, "*\\/").split(/\r?\n/);
  if (lines.length === 1) return `${indent}/** ${lines[0]} */\n`;
  return `${indent}/**\n${lines.map((l) => `${indent} * ${l}`.trimEnd()).join("\n")}\n${indent} */\n`;
}

function refType(ref) {
  const m = /^#\/components\/schemas\/([^/]+)((?:\/.*)?)$/.exec(ref);
  if (!m) return "unknown";
  let t = typeName(decodeURIComponent(m[1]));
  const rest = m[2].split("/").filter(Boolean).map((s) => s.replace(/~1/g, "/").replace(/~0/g, "~"));
  for (let i = 0; i < rest.length; i++) {
    if (rest[i] === "properties" && i + 1 < rest.length) {
      t = `NonNullable<${t}[${JSON.stringify(rest[i + 1])}]>`;
      i++;
    } else if (rest[i] === "items") {
      t = `NonNullable<${t}>[number]`;
    } else {
      return "unknown";
    }
  }
  return t;
}

function paren(t) {
  return /^[A-Za-z0-9_$.<>\[\]"]+$/.test(t) || /^\{[\s\S]*\}$/.test(t) ? t : `(${t})`;
}

function union(types) {
  const uniq = [...new Set(types)];
  if (uniq.includes("unknown")) return "unknown";
  return uniq.join(" | ");
}

function literal(v) {
  return v === null ? "null" : JSON.stringify(v);
}

function baseType(type, schema, indent) {
  switch (type) {
    case "string":
      return "string";
    case "integer":
    case "number":
      return "number";
    case "boolean":
      return "boolean";
    case "null":
      return "null";
    case "array": {
      const item = schema.items ? tsType(schema.items, indent) : "unknown";
      return `${paren(item)}[]`;
    }
    case "object":
      return objectType(schema, indent);
    default:
      return "unknown";
  }
}

function objectType(schema, indent) {
  const props = schema.properties ?? {};
  const required = new Set(schema.required ?? []);
  const inner = indent + "  ";
  let body = "";
  for (const [name, sub] of Object.entries(props)) {
    body += comment(sub && sub.description, inner);
    const opt = required.has(name) ? "" : "?";
    body += `${inner}${propKey(name)}${opt}: ${tsType(sub, inner)};\n`;
  }
  const ap = schema.additionalProperties;
  if (ap && typeof ap === "object") {
    const values = [tsType(ap, inner), ...Object.values(props).map((p) => tsType(p, inner))];
    let v = union(values);
    if (Object.keys(props).some((p) => !required.has(p)) && v !== "unknown") v += " | undefined";
    body += `${inner}[key: string]: ${v};\n`;
  } else if (ap === true || (Object.keys(props).length === 0 && ap !== false)) {
    body += `${inner}[key: string]: unknown;\n`;
  }
  if (!body) return "Record<string, never>";
  return `{\n${body}${indent}}`;
}

/** The TypeScript type of one schema (written at `indent`). */
export function tsType(schema, indent = "") {
  if (schema === true || schema === undefined || schema === null) return "unknown";
  if (schema === false) return "never";
  if (typeof schema !== "object") return "unknown";
  if (schema.$ref) return refType(schema.$ref);

  let t;
  if (Array.isArray(schema.enum)) {
    t = schema.enum.map(literal).join(" | ") || "never";
  } else if (Array.isArray(schema.type)) {
    t = union(schema.type.map((ty) => baseType(ty, schema, indent)));
  } else if (typeof schema.type === "string") {
    t = baseType(schema.type, schema, indent);
  } else if (schema.properties || schema.additionalProperties !== undefined) {
    t = objectType(schema, indent);
  }

  const parts = [];
  if (Array.isArray(schema.allOf)) {
    const members = schema.allOf.map((s) => tsType(s, indent)).filter((m) => m !== "unknown");
    if (members.length) parts.push(members.map(paren).join(" & "));
  }
  for (const key of ["oneOf", "anyOf"]) {
    if (Array.isArray(schema[key])) {
      // Members that only constrain (patterns without a type) say nothing for TypeScript.
      const u = union(schema[key].map((s) => tsType(s, indent)));
      if (u !== "unknown") parts.push(u);
    }
  }
  if (parts.length) {
    const combined = parts.length === 1 ? parts[0] : parts.map(paren).join(" & ");
    t = t === undefined || t === "unknown" ? combined : `${paren(t)} & ${combined}`;
  }
  if (t === undefined) t = "unknown";
  if (schema.nullable === true && t !== "unknown" && !/(^|\| )null($| \|)/.test(t)) t = `${t} | null`;
  return t;
}

export function generate(doc, source = "crates/asp-http/src/openapi.json") {
  const schemas = (doc.components && doc.components.schemas) || {};
  let out = "";
  out += "// Generated by scripts/gen-types.mjs from " + source + ".\n";
  out += "// Do not edit: run `npm run gen-types` after the OpenAPI document changes.\n";
  out += `// OpenAPI ${doc.openapi ?? "?"}, ${JSON.stringify(doc.info?.title ?? "")} version ${JSON.stringify(doc.info?.version ?? "")}.\n`;
  out += "/* eslint-disable */\n";
  const renamed = [];
  for (const [name, schema] of Object.entries(schemas)) {
    const tn = typeName(name);
    if (tn !== name) renamed.push([name, tn]);
    out += "\n";
    out += comment(schema.description ?? `The \`${name}\` schema.`, "");
    const t = tsType(schema, "");
    const isPlainObject =
      (schema.type === "object" || (schema.type === undefined && schema.properties !== undefined)) &&
      !schema.$ref && !schema.allOf && !schema.oneOf && !schema.anyOf && !schema.enum && schema.nullable !== true &&
      t.startsWith("{\n");
    out += isPlainObject ? `export interface ${tn} ${t}\n` : `export type ${tn} = ${t};\n`;
  }
  out += "\n/** Every schema of components.schemas, by its name in the document. */\n";
  out += "export interface Schemas {\n";
  for (const name of Object.keys(schemas)) out += `  ${propKey(name)}: ${typeName(name)};\n`;
  out += "}\n";
  if (renamed.length) {
    out += "\n// Renamed so as not to shadow a global: " + renamed.map(([a, b]) => `${a} -> ${b}`).join(", ") + "\n";
  }
  return out;
}

export function generateFromFile(input = DEFAULT_INPUT) {
  return generate(JSON.parse(readFileSync(input, "utf8")));
}

const isMain = process.argv[1] && resolve(process.argv[1]) === fileURLToPath(import.meta.url);
if (isMain) {
  const args = process.argv.slice(2);
  const text = generateFromFile(DEFAULT_INPUT);
  if (args.includes("--stdout")) {
    process.stdout.write(text);
  } else if (args.includes("--check")) {
    let current = "";
    try {
      current = readFileSync(DEFAULT_OUTPUT, "utf8");
    } catch {}
    if (current !== text) {
      console.error(`${DEFAULT_OUTPUT} is out of date with ${DEFAULT_INPUT}; run npm run gen-types`);
      process.exit(1);
    }
  } else {
    writeFileSync(DEFAULT_OUTPUT, text);
    console.error(`wrote ${DEFAULT_OUTPUT}`);
  }
}
