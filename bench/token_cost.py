"""What a bearer token costs per request (bench/RESULTS.md, "What a token costs per
request"): one node per run, without and with --auth required, alternating, three runs
each; 3,000 sequential PUTs then GETs over one keep-alive connection. Needs the release
build: cargo build --release -p asp. Uses ports 17731-17736 and /tmp/ab-*."""
import http.client, subprocess, time, os, sys, json, statistics, shutil
import pathlib
A=str(pathlib.Path(__file__).resolve().parent.parent / "target/release/asp")
def run(auth, port, n=3000):
    d=f"/tmp/ab-{port}"; shutil.rmtree(d, ignore_errors=True)
    args=[A,"serve","--data-dir",d,"--api",f"127.0.0.1:{port}","--listen","off","--fsync","never"]
    if auth: args+=["--auth","required"]
    p=subprocess.Popen(args, stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            c=http.client.HTTPConnection("127.0.0.1",port); c.request("GET","/healthz"); c.getresponse().read(); break
        except Exception: time.sleep(0.05)
    hdr={"content-type":"application/json"}
    if auth:
        tok=subprocess.check_output([A,"token","create","--data-dir",d,"--ns","*","--ops","read,write"],stderr=subprocess.DEVNULL).decode().strip()
        hdr["authorization"]="Bearer "+tok
    c=http.client.HTTPConnection("127.0.0.1",port)
    t=time.perf_counter()
    for i in range(n):
        c.request("PUT",f"/v1/ns/b/kv/k{i}",body=b"1",headers=hdr); r=c.getresponse(); r.read()
        assert r.status==200, r.status
    w=(time.perf_counter()-t)/n*1e6
    t=time.perf_counter()
    for i in range(n):
        c.request("GET",f"/v1/ns/b/kv/k{i}",headers=hdr); r=c.getresponse(); r.read()
        assert r.status==200, r.status
    g=(time.perf_counter()-t)/n*1e6
    p.terminate(); p.wait(); shutil.rmtree(d, ignore_errors=True)
    return w,g
res={False:[],True:[]}
for rep in range(3):
    for auth in (False,True):
        res[auth].append(run(auth, 17731+rep*2+auth))
for auth in (False,True):
    ws=[x[0] for x in res[auth]]; gs=[x[1] for x in res[auth]]
    print("auth" if auth else "open", "PUT µs/req runs", [round(x) for x in ws], "median", round(statistics.median(ws)), "| GET", [round(x) for x in gs], "median", round(statistics.median(gs)))
