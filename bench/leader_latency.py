"""Leader-mode write latency (bench/RESULTS.md, "Leader mode: write latency"): one
process each, side by side, interleaved in rounds on one machine:

  asp  multi-master PUT, replicas=1          (the write durable on one node)
  asp  multi-master PUT, replicas=2          (and on one more, acknowledged)
  asp  leader-mode PUT, replicas=majority    (leader A, voters A B C: two of three)
  redis SET                                   (primary, appendfsync always)
  redis SET + WAIT 1 0                        (and one replica acknowledged)

Three asp nodes in a triangle and a Redis primary with one replica, all with fsync on
every write; sequential requests over one kept-alive connection each; 100-byte values.
Needs the release build (cargo build --release -p asp) and redis-server. Ports
17801-17809, data under /tmp/ll-*. Prints per-kind medians and p99 in microseconds."""
import http.client, json, os, pathlib, shutil, socket, statistics, subprocess, sys, time

ASP = str(pathlib.Path(__file__).resolve().parent.parent / "target/release/asp")
ROUNDS = int(os.environ.get("ROUNDS", "5"))
PER_ROUND = int(os.environ.get("PER_ROUND", "300"))
VALUE = json.dumps("x" * 98).encode()  # 100 bytes of JSON
procs = []


def start(args, log):
    p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=open(log, "w"))
    procs.append(p)
    return p


def connect(port):
    for _ in range(200):
        try:
            c = http.client.HTTPConnection("127.0.0.1", port)
            c.request("GET", "/healthz")
            c.getresponse().read()
            return c
        except OSError:
            time.sleep(0.05)
    sys.exit(f"no node on {port}")


def call(c, method, path, body=None):
    c.request(method, path, body=body, headers={"content-type": "application/json"})
    r = c.getresponse()
    data = r.read()
    return r.status, (json.loads(data) if data else None)


class Resp:
    def __init__(self, port):
        for _ in range(200):
            try:
                self.s = socket.create_connection(("127.0.0.1", port))
                break
            except OSError:
                time.sleep(0.05)
        self.s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def cmd(self, *args):
        out = b"*%d\r\n" % len(args)
        for a in args:
            a = a if isinstance(a, bytes) else str(a).encode()
            out += b"$%d\r\n%s\r\n" % (len(a), a)
        self.s.sendall(out)
        while b"\r\n" not in self.buf:
            self.buf += self.s.recv(65536)
        line, self.buf = self.buf.split(b"\r\n", 1)
        if line[:1] == b"-":
            raise RuntimeError(line)
        return line


def main():
    for d in ["a", "b", "c", "r1", "r2"]:
        shutil.rmtree(f"/tmp/ll-{d}", ignore_errors=True)
        os.makedirs(f"/tmp/ll-{d}")
    api = {"a": 17801, "b": 17802, "c": 17803}
    peer = {"a": 17804, "b": 17805, "c": 17806}
    peers = {"a": [], "b": ["a"], "c": ["a", "b"]}
    for n in "abc":
        args = [ASP, "serve", "--data-dir", f"/tmp/ll-{n}/data", "--api", f"127.0.0.1:{api[n]}",
                "--listen", f"127.0.0.1:{peer[n]}"]
        for p in peers[n]:
            args += ["--peer", f"127.0.0.1:{peer[p]}"]
        start(args, f"/tmp/ll-{n}/log")
    rp, rr = 17807, 17808
    for port, d, extra in [(rp, "r1", []), (rr, "r2", ["--replicaof", "127.0.0.1", str(rp)])]:
        start(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", f"/tmp/ll-{d}",
               "--save", "", "--appendonly", "yes", "--appendfsync", "always"] + extra, f"/tmp/ll-{d}/log")
    a, b, c = connect(api["a"]), connect(api["b"]), connect(api["c"])
    ids = {n: call(x, "GET", "/v1/status")[1]["node_id"] for n, x in zip("abc", (a, b, c))}
    st, body = call(a, "PUT", "/v1/ns/lm/mode",
                    json.dumps({"mode": "leader", "leader": ids["a"], "voters": list(ids.values())}))
    assert st == 200, body
    for x in (b, c):
        while call(x, "GET", "/v1/ns/lm/mode")[1]["leader"] != ids["a"]:
            time.sleep(0.05)
    while len(call(a, "GET", "/v1/status")[1]["replication"]["peers"]) < 2:
        time.sleep(0.05)
    primary = Resp(rp)
    while b"connected_slaves:1" not in subprocess.check_output(
            ["redis-cli", "-p", str(rp), "info", "replication"]):
        time.sleep(0.05)

    def asp_put(ns, query):
        def op(i):
            st, body = call(a, "PUT", f"/v1/ns/{ns}/kv/k{i % 1000}{query}", VALUE)
            assert st == 200, body
        return op

    def redis_set(wait):
        def op(i):
            primary.cmd("SET", f"k{i % 1000}", VALUE)
            if wait:
                assert int(primary.cmd("WAIT", 1, 0)[1:]) >= 1
        return op

    kinds = [
        ("asp multi-master, replicas=1", asp_put("mm", "")),
        ("asp multi-master, replicas=2", asp_put("mm", "?replicas=2")),
        ("asp leader mode, replicas=majority", asp_put("lm", "?replicas=majority")),
        ("redis SET (appendfsync always)", redis_set(False)),
        ("redis SET + WAIT 1 0", redis_set(True)),
    ]
    lat = {k: [] for k, _ in kinds}
    for k, op in kinds:  # warm-up
        for i in range(50):
            op(i)
    for r in range(ROUNDS):
        for k, op in kinds:
            for i in range(PER_ROUND):
                t = time.perf_counter()
                op(i)
                lat[k].append((time.perf_counter() - t) * 1e6)
    base = statistics.median(lat[kinds[0][0]])
    print(f"{ROUNDS} rounds x {PER_ROUND} sequential writes per kind, interleaved by round")
    print(f"{'kind':40} {'median µs':>10} {'p99 µs':>10} {'× asp mm r=1':>13}")
    for k, _ in kinds:
        xs = sorted(lat[k])
        med = statistics.median(xs)
        p99 = xs[int(len(xs) * 0.99) - 1]
        print(f"{k:40} {med:10.0f} {p99:10.0f} {med / base:13.2f}")


try:
    main()
finally:
    for p in procs:
        p.terminate()
    for p in procs:
        p.wait()
