#!/usr/bin/env bash
# Usage: bench/mixed_version_trial.sh OLD_ASP NEW_ASP  (two asp binaries; ports 17701-17802 on loopback)
# A runs OLD, B runs NEW: writes both ways, deletes, an anti-entropy run across the two
# protocol versions, then A's data directory opened by NEW.
# Mixed-version trial: A on the old build (protocol v2), B on the new (v3).
set -u
OLD=$1; NEW=$2; W=/tmp/mixed/run; rm -rf $W; mkdir -p $W
cat > $W/a.toml <<T
data_dir = "$W/a"
api = "127.0.0.1:17701"
[compaction]
interval_ms = 0
retention_ms = 0
dead_ratio = 0.01
[replication]
listen = "127.0.0.1:17801"
anti_entropy_interval_ms = 1000
T
cat > $W/b.toml <<T
data_dir = "$W/b"
api = "127.0.0.1:17702"
[compaction]
interval_ms = 0
retention_ms = 0
[replication]
listen = "127.0.0.1:17802"
peers = ["127.0.0.1:17801"]
anti_entropy_interval_ms = 1000
T
put() { curl -s -o /dev/null -w "%{http_code}" -X PUT "http://$1/v1/ns/m/kv/$2" -H 'content-type: text/plain' --data-binary "$3"; }
count() { curl -s "http://$1/v1/ns/m/kv?limit=1000" | python3 -c 'import sys,json; d=json.load(sys.stdin); print(len(d.get("items", [])))' 2>/dev/null; }
$OLD serve --config $W/a.toml --node-id 00000000000000a1 > $W/a.log 2>&1 & A=$!
sleep 1.5
# 300 keys, each written twice, 30 deleted: compaction leaves the feed with holes.
for i in $(seq 1 300); do put 127.0.0.1:17701 k$i v1 >/dev/null; done
for i in $(seq 1 300); do put 127.0.0.1:17701 k$i v2 >/dev/null; done
for i in $(seq 1 30); do curl -s -o /dev/null -X DELETE http://127.0.0.1:17701/v1/ns/m/kv/k$i; done
echo "compact on A: $(curl -s -X POST http://127.0.0.1:17701/v1/admin/compact | head -c 300)"
$NEW serve --config $W/b.toml --node-id 00000000000000b2 > $W/b.log 2>&1 & B=$!
sleep 1.5
for i in $(seq 1 50); do put 127.0.0.1:17702 b$i from-b >/dev/null; put 127.0.0.1:17701 a$i from-a >/dev/null; done
for t in $(seq 1 30); do ca=$(count 127.0.0.1:17701); cb=$(count 127.0.0.1:17702); [ "$ca" = "$cb" ] && [ "$ca" = "370" ] && break; sleep 1; done
echo "keys: A=$ca B=$cb (expect 370 each)"
curl -s http://127.0.0.1:17702/v1/status | python3 -c 'import sys,json; s=json.load(sys.stdin); p=s["replication"]["peers"][0]; print("B sees A:", p.get("state"), p.get("last_error"), "reconcile:", json.dumps(p.get("reconcile")))'
echo "B k5 (deleted on A): $(curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:17702/v1/ns/m/kv/k5)  k100: $(curl -s http://127.0.0.1:17702/v1/ns/m/kv/k100)"
# The old node's data directory opened by the new build.
kill $A; wait $A 2>/dev/null
$NEW serve --config $W/a.toml > $W/a2.log 2>&1 & A=$!
sleep 2
put 127.0.0.1:17701 after-upgrade yes >/dev/null; put 127.0.0.1:17702 after-upgrade-b yes >/dev/null
for t in $(seq 1 20); do ca=$(count 127.0.0.1:17701); cb=$(count 127.0.0.1:17702); [ "$ca" = "$cb" ] && [ "$ca" = "372" ] && break; sleep 1; done
echo "after A upgraded: A=$ca B=$cb (expect 372 each)"
grep -ihE "error|warn" $W/a.log $W/b.log $W/a2.log | head -10
kill $A $B; wait 2>/dev/null
