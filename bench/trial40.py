# Usage (root): mount -t tmpfs -o size=40m tmpfs MOUNT; python3 bench/trial40.py ./target/release/asp MOUNT MIN_FREE_BYTES
# The 40 MB trial: write 1 KB values until the node refuses for space, check
# /healthz, give the filesystem room again, write more, restart, count.
import http.client, json, os, subprocess, sys, time
BIN, MNT, GUARD = sys.argv[1], sys.argv[2], int(sys.argv[3])
port = 7791 if GUARD else 7792
data = os.path.join(MNT, "data")
cfg = os.path.join("/tmp", f"trial{GUARD}.toml")
open(cfg, "w").write(f'data_dir = "{data}"\napi = "127.0.0.1:{port}"\n[replication]\nlisten = "off"\n[store]\nsegment_bytes_max = 8388608\nmin_free_bytes = {GUARD}\nscrub_interval_ms = 0\n[compaction]\ninterval_ms = 0\n')
def start():
    p = subprocess.Popen([BIN, "serve", "--config", cfg], stdout=subprocess.DEVNULL, stderr=open(f"/tmp/trial{GUARD}.log", "a"))
    for _ in range(300):
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=5); c.request("GET", "/healthz"); c.getresponse().read(); return p
        except OSError: time.sleep(0.05)
    raise SystemExit("did not start")
def req(m, path, body=None):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    c.request(m, path, body=body, headers={"content-type": "text/plain"} if body else {})
    r = c.getresponse(); b = r.read(); return r.status, b
p = start()
acked, first_refusal, value = [], None, b"x" * 1024
i = 0
while True:
    s, b = req("PUT", f"/v1/ns/t/kv/k{i}", value)
    if s in (200, 201, 204): acked.append(i); i += 1; continue
    first_refusal = (s, json.loads(b)["error"]["code"]); break
hs, hb = req("GET", "/healthz")
print("acknowledged", len(acked), "then", first_refusal, "healthz", hs, hb.decode()[:160])
more = 0
s2 = None
if first_refusal[1] == "no_space":
    subprocess.run(["mount", "-o", "remount,size=80m", MNT], check=True)
    hs2, _ = req("GET", "/healthz")
    for j in range(2000):
        s2, _ = req("PUT", f"/v1/ns/t/kv/k{i}", value)
        if s2 not in (200, 201, 204): break
        acked.append(i); i += 1; more += 1
    print("after remount to 80 MB: healthz", hs2, "then", more, "more acknowledged, last status", s2)
p.terminate(); p.wait(30)
p = start()
missing = [k for k in acked if req("GET", f"/v1/ns/t/kv/k{k}")[0] != 200]
print("after restart:", len(acked), "acknowledged,", len(missing), "missing")
p.terminate(); p.wait(30)
