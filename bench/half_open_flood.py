#!/usr/bin/env python3
# Opens N half-open HTTP requests ("GET /v1/status HT") at an asp node, tries one normal
# request during the flood, then watches how long the node takes to close them.
#   python3 bench/half_open_flood.py PORT N
import socket, time, sys, urllib.request, json
host, port, n = "127.0.0.1", int(sys.argv[1]), int(sys.argv[2])
socks=[]
t0=time.time()
for i in range(n):
    s=socket.create_connection((host,port)); s.sendall(b"GET /v1/status HT"); socks.append(s)
print(f"opened {n} half-open requests in {time.time()-t0:.2f}s")
def normal():
    try:
        r=urllib.request.urlopen(f"http://{host}:{port}/healthz", timeout=5); return r.status
    except urllib.error.HTTPError as e: return f"{e.code} {json.loads(e.read())['error']['code']}"
    except Exception as e: return type(e).__name__
print("normal request during the flood:", normal())
closed=[None]*n
for s in socks: s.setblocking(False)
deadline=time.time()+40
while time.time()<deadline and None in closed:
    for i,s in enumerate(socks):
        if closed[i] is None:
            try:
                d=s.recv(4096)
                if d==b"": closed[i]=time.time()-t0
                elif d.startswith(b"HTTP/1.1 503"): closed[i]=time.time()-t0
            except BlockingIOError: pass
            except OSError: closed[i]=time.time()-t0
    time.sleep(0.1)
done=sorted(c for c in closed if c is not None)
print(f"closed by the server: {len(done)}/{n}; still open after 40 s: {n-len(done)}")
if done: print(f"first closed at {done[0]:.1f}s, last at {done[-1]:.1f}s")
print("normal request after:", normal())
