// Test helpers: start a real `asp serve` (ASP_BIN) on a free port with its own
// data directory, wait for it, stop it; bound every wait with a timeout.

import { spawn, execFile } from "node:child_process";
import { mkdtemp, rm, access } from "node:fs/promises";
import { constants } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";

export const WAIT_MS = 30_000;

export function aspBin() {
  const bin = process.env.ASP_BIN;
  if (!bin) {
    throw new Error(
      "ASP_BIN is not set: these tests start a real node. Point ASP_BIN at an asp binary, " +
        "e.g. `ASP_BIN=/path/to/target/release/asp npm test`",
    );
  }
  return bin;
}

export async function withTimeout(promise, ms, what) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms: ${what}`)), ms);
  });
  try {
    return await Promise.race([promise, timeout]);
  } finally {
    clearTimeout(timer);
  }
}

export function freePort() {
  return new Promise((resolve, reject) => {
    const srv = createServer();
    srv.unref();
    srv.on("error", reject);
    srv.listen(0, "127.0.0.1", () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
  });
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** A running asp node. */
export class AspNode {
  constructor({ dir, port, auth }) {
    this.dir = dir;
    this.port = port;
    this.auth = auth;
    this.proc = undefined;
    this.output = "";
  }

  get baseUrl() {
    return `http://127.0.0.1:${this.port}`;
  }

  /** Starts `asp serve` on this.port; rejects with its output if it exits or does not come up. */
  async spawn() {
    const args = ["serve", "--data-dir", this.dir, "--api", `127.0.0.1:${this.port}`, "--listen", "off"];
    if (this.auth) args.push("--auth", "required");
    const proc = spawn(aspBin(), args, { stdio: ["ignore", "pipe", "pipe"] });
    this.proc = proc;
    this.output = "";
    const exited = new Promise((resolve) => proc.once("exit", (code, signal) => resolve({ code, signal })));
    this.exited = exited;
    let serving = false;
    const onData = (buf) => {
      this.output += buf.toString();
      // Our own process says it bound the port: another process answering /healthz
      // on a port we lost to it does not count.
      if (!serving && this.output.includes("asp node serving")) serving = true;
    };
    proc.stdout.on("data", onData);
    proc.stderr.on("data", onData);
    proc.once("error", (err) => {
      this.output += `\nspawn error: ${err.message}`;
    });

    const deadline = Date.now() + WAIT_MS;
    let exitInfo;
    exited.then((e) => (exitInfo = e));
    while (Date.now() < deadline) {
      if (exitInfo) {
        const err = new Error(`asp serve exited (${JSON.stringify(exitInfo)}) before serving:\n${this.output}`);
        err.addressInUse = /already in use|cannot listen/i.test(this.output);
        throw err;
      }
      if (serving) {
        try {
          const res = await fetch(`${this.baseUrl}/healthz`, { signal: AbortSignal.timeout(2000) });
          const body = await res.json();
          if (res.ok && body.status === "ok") return this;
        } catch {
          // not up yet
        }
      }
      await sleep(50);
    }
    await this.kill();
    throw new Error(`asp serve did not become healthy within ${WAIT_MS} ms:\n${this.output}`);
  }

  /** Stops the process (SIGTERM, then SIGKILL); keeps the data directory. */
  async kill() {
    const proc = this.proc;
    if (!proc || proc.exitCode !== null || proc.signalCode !== null) return;
    proc.kill("SIGTERM");
    try {
      await withTimeout(this.exited, 10_000, "asp serve to stop after SIGTERM");
    } catch {
      proc.kill("SIGKILL");
      await withTimeout(this.exited, 10_000, "asp serve to stop after SIGKILL");
    }
  }

  /** Stops and starts again: same data directory, same port. */
  async restart() {
    await this.kill();
    // The port was ours a moment ago; retry a little if the OS is slow to free it.
    for (let i = 0; ; i++) {
      try {
        return await this.spawn();
      } catch (err) {
        if (!err.addressInUse || i >= 20) throw err;
        await sleep(250);
      }
    }
  }

  async stop() {
    await this.kill();
    await rm(this.dir, { recursive: true, force: true });
  }

  /** `asp token create --data-dir DIR ...`: prints the token on stdout. */
  createToken({ ns = "*", ops = "read,write,admin", prefix } = {}) {
    const args = ["token", "create", "--data-dir", this.dir, "--ns", ns, "--ops", ops];
    if (prefix !== undefined) args.push("--prefix", prefix);
    return withTimeout(
      new Promise((resolve, reject) => {
        execFile(aspBin(), args, (err, stdout, stderr) => {
          if (err) reject(new Error(`asp token create failed: ${err.message}\n${stderr}`));
          else resolve(stdout.trim());
        });
      }),
      WAIT_MS,
      "asp token create",
    );
  }
}

/** Starts a node in a new temporary directory on a free port (retrying if the port is taken meanwhile). */
export async function startNode({ auth = false } = {}) {
  const bin = aspBin();
  try {
    await access(bin, constants.X_OK);
  } catch {
    throw new Error(`ASP_BIN=${bin} is not an executable file`);
  }
  const dir = await mkdtemp(join(tmpdir(), "asp-ts-client-"));
  for (let attempt = 0; ; attempt++) {
    const node = new AspNode({ dir, port: await freePort(), auth });
    try {
      return await node.spawn();
    } catch (err) {
      if (!err.addressInUse || attempt >= 5) {
        await rm(dir, { recursive: true, force: true });
        throw err;
      }
    }
  }
}

/** Takes n items from an async iterator, each within ms. */
export async function take(iterator, n, ms = WAIT_MS) {
  const out = [];
  while (out.length < n) {
    const r = await withTimeout(iterator.next(), ms, `item ${out.length + 1} of ${n} from the change feed`);
    if (r.done) break;
    out.push(r.value);
  }
  return out;
}

/** A namespace name unique to this run. */
export function uniqueNs(prefix = "t") {
  return `${prefix}-${process.pid}-${Math.random().toString(36).slice(2, 8)}`;
}
