#!/usr/bin/env bash
# A line A–B–C of release `asp serve` processes; B's clock 3 minutes ahead, by
# libfaketime (Debian package `faketime`), the default max_clock_skew_ms (60 s).
# A and C write right after B did; B's write must reach them once their clocks allow
# (about 120 s), theirs each other at once. Ports 7710-7712 and 7810-7812.
# Usage: cargo build --release -p asp && BIN=target/release/asp bench/skew_trial.sh
set -u
BIN=$(realpath "${BIN:-target/release/asp}")
W=$(mktemp -d /tmp/skew.XXXX); cd "$W"
$BIN serve --data-dir a --api 127.0.0.1:7710 --listen 127.0.0.1:7810 > a.log 2>&1 & PA=$!
# libfaketime preloaded directly (the `faketime` wrapper forks: its pid is not asp's).
LD_PRELOAD=/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1 FAKETIME=+180s FAKETIME_DONT_FAKE_MONOTONIC=1 \
  $BIN serve --data-dir b --api 127.0.0.1:7711 --listen 127.0.0.1:7811 --peer 127.0.0.1:7810 > b.log 2>&1 & PB=$!
$BIN serve --data-dir c --api 127.0.0.1:7712 --listen 127.0.0.1:7812 --peer 127.0.0.1:7811 > c.log 2>&1 & PC=$!
trap 'kill $PA $PB $PC 2>/dev/null' EXIT
for p in 7710 7711 7712; do
  for i in $(seq 1 50); do curl -s -o /dev/null "http://127.0.0.1:$p/healthz" && break; sleep 0.1; done
  curl -s -o /dev/null "http://127.0.0.1:$p/healthz" || { echo "node on $p did not start:"; cat ./*.log; exit 1; }
done
sleep 1
t0=$(date +%s.%N)
put() { curl -s -o /dev/null -w '%{http_code}' -X PUT -H 'Content-Type: text/plain' -d "$3" "http://127.0.0.1:$1/v1/ns/line/kv/$2"; }
has() { [ "$(curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:$1/v1/ns/line/kv/$2)" = 200 ]; }
echo "put b1 at B: $(put 7711 b1 fromB)"; sleep 0.5
echo "put a1 at A: $(put 7710 a1 fromA)  put c1 at C: $(put 7712 c1 fromC)"
for i in $(seq 1 100); do has 7712 a1 && has 7710 c1 && break; sleep 0.1; done
echo "a1 at C and c1 at A after $(python3 -c "print(round($(date +%s.%N)-$t0,2))") s: A has c1: $(has 7710 c1 && echo yes || echo no), C has a1: $(has 7712 a1 && echo yes || echo no)"
echo "A held.parked: $(curl -s http://127.0.0.1:7710/v1/status | python3 -c 'import json,sys; print(json.dumps(json.load(sys.stdin)["held"]["parked"]))')"
echo "A has b1 now: $(has 7710 b1 && echo yes || echo no)"
for i in $(seq 1 300); do has 7710 b1 && has 7712 b1 && break; sleep 1; done
echo "b1 at A and C after $(python3 -c "print(round($(date +%s.%N)-$t0,1))") s: A $(has 7710 b1 && echo yes || echo no), C $(has 7712 b1 && echo yes || echo no)"
for p in 7710 7711 7712; do echo "$p: $(curl -s "http://127.0.0.1:$p/v1/ns/line/kv?limit=10" | python3 -c 'import json,sys; d=json.load(sys.stdin); print(sorted(k["key"] for k in d.get("items", d.get("keys", []))))')"; done
echo "log lines about the clock: A $(grep -c -i clock a.log), C $(grep -c -i clock c.log)"
grep -h -i clock a.log | head -n 1
