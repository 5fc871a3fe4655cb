//! The PostgreSQL connector against a PostgreSQL 15 each test starts for itself
//! (`/usr/lib/postgresql/15/bin`, run as the `postgres` user, `wal_level = logical`, on
//! a free port of 127.0.0.1, trust authentication), stopped when the test ends: a
//! snapshot then the stream, asp down for a while, SIGKILLs in the middle of an ingest,
//! the out side's upserts, both ways without echo, a missing slot, a slot that lost
//! WAL, and no confirmation to the slot before asp wrote the change.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use bytes::Bytes;
use common::{Node, connector, json_values, start, wait_until};
use tokio_postgres::{Client, NoTls};

const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// A PostgreSQL server of its own, stopped (immediately) when dropped.
struct Pg {
    dir: tempfile::TempDir,
    port: u16,
}

fn as_postgres(args: &[&str]) -> std::process::Output {
    Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .args(args)
        .output()
        .expect("runuser")
}

impl Pg {
    fn start() -> Pg {
        Pg::start_with("")
    }

    /// With `extra` lines of postgresql.conf.
    fn start_with(extra: &str) -> Pg {
        let dir = tempfile::tempdir().unwrap();
        let chown = Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(dir.path())
            .status()
            .unwrap();
        assert!(chown.success());
        let data = dir.path().join("data");
        let data_s = data.display().to_string();
        let init = as_postgres(&[
            &format!("{PG_BIN}/initdb"),
            "-D",
            &data_s,
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-sync",
        ]);
        assert!(
            init.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&init.stderr)
        );
        let port = common::free_port();
        let conf = format!(
            "port = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\n\
             wal_level = logical\nmax_replication_slots = 16\nmax_wal_senders = 16\n\
             fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n{extra}\n",
            dir.path().display()
        );
        let mut all = std::fs::read_to_string(data.join("postgresql.conf")).unwrap();
        all.push_str(&conf);
        std::fs::write(data.join("postgresql.conf"), all).unwrap();
        let log = dir.path().join("pg.log").display().to_string();
        let started = as_postgres(&[
            &format!("{PG_BIN}/pg_ctl"),
            "-D",
            &data_s,
            "-l",
            &log,
            "-w",
            "start",
        ]);
        assert!(
            started.status.success(),
            "pg_ctl start: {} {}",
            String::from_utf8_lossy(&started.stderr),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        Pg { dir, port }
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    async fn client(&self) -> Client {
        let (client, connection) = tokio_postgres::connect(
            &format!(
                "host=127.0.0.1 port={} user=postgres dbname=postgres",
                self.port
            ),
            NoTls,
        )
        .await
        .unwrap();
        tokio::spawn(connection);
        client
    }
}

impl Drop for Pg {
    fn drop(&mut self) {
        let data = self.data().display().to_string();
        as_postgres(&[
            &format!("{PG_BIN}/pg_ctl"),
            "-D",
            &data,
            "-m",
            "immediate",
            "stop",
        ]);
    }
}

/// An in connector of `tables` into `ns`.
fn pg_in(name: &str, ns: &str, url: &str, tables: &[&str]) -> String {
    let tables = tables
        .iter()
        .map(|t| format!("\"{t}\""))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "[[connectors]]\nname = \"{name}\"\nkind = \"postgres\"\ndirection = \"in\"\nnamespace = \"{ns}\"\nurl = \"{url}\"\npublication = \"asp_{name}\"\nslot = \"asp_{name}\"\ntables = [{tables}]\n\n"
    )
}

/// Waits until `ns` holds `n` events; fails with the connector's status if not within
/// `secs` seconds.
async fn rows_in(node: &Node, name: &str, ns: &str, n: u64, secs: u64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    while events(node, ns).await < n {
        assert!(
            std::time::Instant::now() < deadline,
            "{n} events in {ns}: not within {secs}s: {}",
            connector(node, name).await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn events(node: &Node, ns: &str) -> u64 {
    common::events(&node.client(), ns).await
}

const ITEMS: &str = "CREATE TABLE items (id int PRIMARY KEY, body text, n bigint, flag bool, doc jsonb, price numeric, at timestamptz)";

/// Inserts rows `from..to` of `items`, in transactions of `per` rows.
async fn insert(pg: &Client, from: i64, to: i64, per: i64) {
    let mut at = from;
    while at < to {
        let end = (at + per).min(to);
        pg.execute(
            "INSERT INTO items SELECT i, 'row ' || i, i * 2, i % 2 = 0, jsonb_build_object('i', i), 1.5, '2024-01-01Z' \
             FROM generate_series($1::int8, $2::int8) AS i",
            &[&at, &(end - 1)],
        )
        .await
        .unwrap();
        at = end;
    }
}

fn item(v: &std::collections::HashMap<String, serde_json::Value>, i: i64) -> &serde_json::Value {
    v.get(&format!("public.items/{i}"))
        .unwrap_or_else(|| panic!("no key public.items/{i}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_then_the_stream_bring_every_row_once() {
    let pg = Pg::start();
    let sql = pg.client().await;
    sql.batch_execute(ITEMS).await.unwrap();
    insert(&sql, 0, 50_000, 10_000).await;
    // Written in small transactions while the connector starts, creates its slot and
    // reads the snapshot, and after: each row is in the snapshot or in the stream,
    // never both, never neither.
    let writer = {
        let sql = pg.client().await;
        tokio::spawn(async move {
            for at in (50_000..100_000).step_by(50) {
                insert(&sql, at, at + 50, 50).await;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };
    let dir = tempfile::tempdir().unwrap();
    let node = start(
        &dir.path().join("a"),
        &pg_in("cdc", "pg", &pg.url(), &["items"]),
    )
    .await;
    writer.await.unwrap();
    wait_until("100,000 rows in", Duration::from_secs(300), || async {
        events(&node, "pg").await >= 100_000
    })
    .await;
    sql.batch_execute(
        "UPDATE items SET body = 'changed', doc = '{\"a\": [1, null]}' WHERE id = 7; DELETE FROM items WHERE id = 8",
    )
    .await
    .unwrap();
    wait_until(
        "the update and the delete in",
        Duration::from_secs(60),
        || async { events(&node, "pg").await >= 100_002 },
    )
    .await;
    let status = connector(&node, "cdc").await;
    assert_eq!(events(&node, "pg").await, 100_002, "once each: {status}");
    let v = json_values(&node, "pg").await;
    assert_eq!(v.len(), 99_999, "100,000 keys, one deleted");
    assert_eq!(
        *item(&v, 5),
        serde_json::json!({"id": 5, "body": "row 5", "n": 10, "flag": false, "doc": {"i": 5},
            "price": 1.5, "at": "2024-01-01 00:00:00+00"})
    );
    assert_eq!(
        *item(&v, 7),
        serde_json::json!({"id": 7, "body": "changed", "n": 14, "flag": false, "doc": {"a": [1, null]},
            "price": 1.5, "at": "2024-01-01 00:00:00+00"})
    );
    assert!(!v.contains_key("public.items/8"));
    assert_eq!(item(&v, 99_998)["flag"], true);
    let detail = &status["in"]["detail"];
    assert_eq!(detail["slot"], "asp_cdc", "{status}");
    assert!(detail["retained_wal_bytes"].is_u64(), "{status}");
    assert_eq!(status["in"]["errors"], 0, "{status}");
    // The slot moves on with what asp applied, and with heartbeats while idle.
    wait_until("the slot confirmed near the head", Duration::from_secs(30), || async {
        sql.query_one(
            "SELECT (pg_current_wal_lsn() - confirmed_flush_lsn)::int8 FROM pg_replication_slots WHERE slot_name = 'asp_cdc'",
            &[],
        )
        .await
        .unwrap()
        .get::<_, i64>(0)
            < 64 * 1024
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asp_down_for_a_while_resumes_from_its_lsn() {
    let pg = Pg::start();
    let sql = pg.client().await;
    sql.batch_execute(ITEMS).await.unwrap();
    insert(&sql, 0, 1_000, 1_000).await;
    let dir = tempfile::tempdir().unwrap();
    let mut node = start(
        &dir.path().join("a"),
        &pg_in("down", "pg", &pg.url(), &["items"]),
    )
    .await;
    // Streaming: the snapshot is done.
    rows_in(&node, "down", "pg", 1_000, 120).await;
    wait_until("the snapshot done", Duration::from_secs(60), || async {
        connector(&node, "down").await["in"]["detail"]["snapshot"]
            .as_str()
            .is_some_and(|s| s.starts_with("done"))
    })
    .await;
    insert(&sql, 1_000, 2_000, 100).await;
    wait_until("2,000 rows in", Duration::from_secs(120), || async {
        events(&node, "pg").await >= 2_000
    })
    .await;
    node.signal(libc::SIGTERM);
    let before: i64 = sql
        .query_one("SELECT (pg_current_wal_lsn() - '0/0')::int8", &[])
        .await
        .unwrap()
        .get(0);
    insert(&sql, 2_000, 60_000, 2_000).await;
    sql.batch_execute(
        "UPDATE items SET body = 'while down' WHERE id < 10; DELETE FROM items WHERE id >= 59990",
    )
    .await
    .unwrap();
    let written: i64 = sql
        .query_one("SELECT (pg_current_wal_lsn() - '0/0')::int8", &[])
        .await
        .unwrap()
        .get::<_, i64>(0)
        - before;
    node.restart().await;
    // While it is behind, status shows the WAL the slot holds for it.
    let mut shown = None;
    for _ in 0..2000 {
        let status = connector(&node, "down").await;
        if let Some(bytes) = status["in"]["detail"]["retained_wal_bytes"].as_i64()
            && bytes >= written
        {
            shown = Some(status);
            break;
        }
        if events(&node, "pg").await >= 60_020 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let shown = shown.unwrap_or_else(|| panic!("retained WAL >= {written} bytes never shown"));
    assert!(
        ["reserved", "extended"].contains(&shown["in"]["detail"]["wal_status"].as_str().unwrap()),
        "{shown}"
    );
    rows_in(&node, "down", "pg", 60_020, 300).await;
    let status = connector(&node, "down").await;
    assert_eq!(
        events(&node, "pg").await,
        60_020,
        "nothing doubled: {status}"
    );
    let v = json_values(&node, "pg").await;
    assert_eq!(v.len(), 59_990, "nothing lost");
    assert_eq!(item(&v, 3)["body"], "while down");
    assert_eq!(item(&v, 59_000)["body"], "row 59000");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkill_in_the_middle_of_an_ingest_applies_every_change_once() {
    let total: i64 = std::env::var("ASP_CONNECTOR_INGEST")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60_000);
    let pg = Pg::start();
    let sql = pg.client().await;
    sql.batch_execute(ITEMS).await.unwrap();
    // Half before asp starts (the snapshot), half while it runs (the stream), with
    // updates of rows already there.
    let half = total / 2;
    insert(&sql, 0, half, 5_000).await;
    let dir = tempfile::tempdir().unwrap();
    let mut node = start(
        &dir.path().join("a"),
        &pg_in("kill", "pg", &pg.url(), &["items"]),
    )
    .await;
    // Killed in the middle of the snapshot: the exported snapshot is gone, so the slot
    // (never confirmed) is created again with a new snapshot, and the rows asp holds
    // already are not applied again.
    wait_until(
        "part of the snapshot in",
        Duration::from_secs(300),
        || async { events(&node, "pg").await > half as u64 / 6 },
    )
    .await;
    node.kill();
    node.restart().await;
    let status = common::eventually("the slot created again", async || {
        let s = connector(&node, "kill").await;
        s["in"]["detail"]["recreated"].is_string().then_some(s)
    })
    .await;
    assert!(
        events(&node, "pg").await < half as u64,
        "the kill came after the snapshot: {status}"
    );
    rows_in(&node, "kill", "pg", half as u64, 300).await;
    assert_eq!(events(&node, "pg").await, half as u64, "each row once");
    let writer = {
        let sql = pg.client().await;
        tokio::spawn(async move {
            let mut at = half;
            while at < total {
                let end = (at + 500).min(total);
                insert(&sql, at, end, 500).await;
                sql.execute(
                    "UPDATE items SET n = n + 1 WHERE id = $1",
                    &[&((at - half) as i32)],
                )
                .await
                .unwrap();
                at = end;
            }
        })
    };
    let updates = (half as u64).div_ceil(500);
    let expected = total as u64 + updates;
    // Killed four times in the middle of the stream.
    for kill in 1..=4u64 {
        let at = half as u64 + (expected - half as u64) * kill / 5;
        wait_until("more ingested", Duration::from_secs(300), || async {
            events(&node, "pg").await > at
        })
        .await;
        node.kill();
        node.restart().await;
        assert!(
            events(&node, "pg").await < expected,
            "kill {kill} came after the end of the ingest"
        );
    }
    writer.await.unwrap();
    rows_in(&node, "kill", "pg", expected, 600).await;
    let status = connector(&node, "kill").await;
    // Once each: a change applied twice would be two events of its key.
    assert_eq!(events(&node, "pg").await, expected, "{status}");
    let v = json_values(&node, "pg").await;
    assert_eq!(v.len() as i64, total);
    for i in (0..total).step_by(997) {
        let n = item(&v, i)["n"].as_i64().unwrap();
        let updated = i < (updates as i64);
        assert_eq!(n, i * 2 + updated as i64, "row {i}");
    }
    // Nothing left behind in PostgreSQL: one slot, asp's.
    let slots: i64 = sql
        .query_one("SELECT count(*) FROM pg_replication_slots", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(slots, 1);
}

/// The rows of an out table: key → (value, origin).
async fn out_rows(
    sql: &Client,
    table: &str,
) -> std::collections::HashMap<String, (serde_json::Value, String)> {
    sql.query(
        &format!("SELECT key, value, origin, version FROM {table}"),
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| {
        let version: String = r.get(3);
        assert!(!version.is_empty());
        (r.get(0), (r.get(1), r.get(2)))
    })
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_upserts_puts_and_deletes_into_the_table() {
    let pg = Pg::start();
    let sql = pg.client().await;
    let dir = tempfile::tempdir().unwrap();
    let toml = format!(
        "[[connectors]]\nname = \"sink\"\nkind = \"postgres\"\ndirection = \"out\"\nnamespace = \"orders\"\nurl = \"{}\"\ntable = \"asp_orders\"\n\n",
        pg.url()
    );
    let node = start(&dir.path().join("a"), &toml).await;
    let c = node.client();
    for i in 0..300 {
        c.put(
            "orders",
            &format!("o{i}"),
            "application/json",
            Bytes::from(format!("{{\"n\": {i}}}")),
            None,
        )
        .await
        .unwrap();
    }
    c.put(
        "orders",
        "o1",
        "application/json",
        Bytes::from_static(b"{\"n\": \"again\"}"),
        None,
    )
    .await
    .unwrap();
    c.put(
        "orders",
        "note",
        "text/plain",
        Bytes::from_static(b"plain text"),
        None,
    )
    .await
    .unwrap();
    c.put(
        "orders",
        "blob",
        "application/octet-stream",
        Bytes::from_static(&[0, 159, 146, 150]),
        None,
    )
    .await
    .unwrap();
    c.delete("orders", "o2", None).await.unwrap();
    c.delete("orders", "o3", None).await.unwrap();
    wait_until(
        "the table has every change",
        Duration::from_secs(60),
        || async {
            sql.query_opt("SELECT 1 FROM asp_orders WHERE key = 'blob'", &[])
                .await
                .is_ok_and(|r| r.is_some())
                && sql
                    .query_one("SELECT count(*) FROM asp_orders", &[])
                    .await
                    .is_ok_and(|r| r.get::<_, i64>(0) == 300)
        },
    )
    .await;
    let rows = out_rows(&sql, "asp_orders").await;
    let origin = rows["o0"].1.clone();
    assert_eq!(rows.len(), 300, "300 puts, 2 deletes, 2 more keys");
    assert_eq!(rows["o0"].0, serde_json::json!({"n": 0}));
    assert_eq!(rows["o1"].0, serde_json::json!({"n": "again"}));
    assert_eq!(rows["o299"].0, serde_json::json!({"n": 299}));
    assert!(!rows.contains_key("o2") && !rows.contains_key("o3"));
    assert_eq!(rows["note"].0, serde_json::json!("plain text"));
    assert_eq!(rows["blob"].0, serde_json::json!({"base64": "AJ+Slg=="}));
    assert!(
        rows.values().all(|(_, o)| *o == origin) && origin.len() == 16,
        "{origin}"
    );
    let status = connector(&node, "sink").await;
    assert_eq!(status["out"]["errors"], 0, "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_ways_without_echo() {
    let pg = Pg::start();
    let sql = pg.client().await;
    sql.batch_execute(ITEMS).await.unwrap();
    insert(&sql, 0, 100, 100).await;
    let dir = tempfile::tempdir().unwrap();
    let toml = format!(
        "[[connectors]]\nname = \"both\"\nkind = \"postgres\"\ndirection = \"both\"\nnamespace = \"pg\"\nurl = \"{}\"\npublication = \"asp_both\"\nslot = \"asp_both\"\ntables = [\"items\"]\ntable = \"asp_out\"\n\n",
        pg.url()
    );
    let node = start(&dir.path().join("a"), &toml).await;
    rows_in(&node, "both", "pg", 100, 60).await;
    let c = node.client();
    for i in 0..20 {
        c.put(
            "pg",
            &format!("local{i}"),
            "application/json",
            Bytes::from(format!("{{\"l\": {i}}}")),
            None,
        )
        .await
        .unwrap();
    }
    insert(&sql, 100, 150, 10).await;
    wait_until(
        "local writes out, new rows in",
        Duration::from_secs(60),
        || async {
            events(&node, "pg").await >= 170
                && sql
                    .query_one("SELECT count(*) FROM asp_out", &[])
                    .await
                    .is_ok_and(|r| r.get::<_, i64>(0) >= 20)
        },
    )
    .await;
    // A while for anything that would echo.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rows = out_rows(&sql, "asp_out").await;
    assert_eq!(
        rows.len(),
        20,
        "only asp's own writes go out: {:?}",
        rows.keys()
    );
    assert!(rows.keys().all(|k| k.starts_with("local")));
    assert_eq!(rows["local3"].0, serde_json::json!({"l": 3}));
    assert_eq!(events(&node, "pg").await, 170);
    let status = connector(&node, "both").await;
    assert_eq!(status["in"]["errors"], 0, "{status}");
    assert_eq!(status["out"]["errors"], 0, "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_slot_with_a_stored_position_is_a_loud_error() {
    let pg = Pg::start();
    let sql = pg.client().await;
    sql.batch_execute(ITEMS).await.unwrap();
    insert(&sql, 0, 10, 10).await;
    let dir = tempfile::tempdir().unwrap();
    let mut node = start(
        &dir.path().join("a"),
        &pg_in("gone", "pg", &pg.url(), &["items"]),
    )
    .await;
    insert(&sql, 10, 20, 10).await;
    rows_in(&node, "gone", "pg", 20, 60).await;
    node.signal(libc::SIGTERM);
    // The slot is dropped (by hand, or lost with a failover) while asp is down.
    wait_until("the slot free", Duration::from_secs(30), || async {
        sql.execute("SELECT pg_drop_replication_slot('asp_gone')", &[])
            .await
            .is_ok()
    })
    .await;
    insert(&sql, 20, 30, 10).await;
    node.restart().await;
    let status = common::eventually("the error in status", async || {
        let s = connector(&node, "gone").await;
        s["in"]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("missing"))
            .then_some(s)
    })
    .await;
    let error = status["in"]["last_error"].as_str().unwrap();
    assert!(
        error.contains("asp_gone") && error.contains("rename the connector"),
        "{error}"
    );
    assert_ne!(status["in"]["state"], "running", "{status}");
    // Retried (with backoff), and never a new slot.
    wait_until("retried", Duration::from_secs(30), || async {
        connector(&node, "gone").await["in"]["errors"].as_u64() >= Some(2)
    })
    .await;
    let slots: i64 = sql
        .query_one("SELECT count(*) FROM pg_replication_slots", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(slots, 0, "no new slot");
    assert_eq!(events(&node, "pg").await, 20, "nothing taken again");
    assert!(node.log().contains("is missing"), "logged");
}

/// The slot is told a change was applied only once asp wrote it: while asp refuses the
/// rows (the namespace takes counter operations, not values), attempt after attempt,
/// the slot's confirmed LSN stays before the first transaction's commit; once asp takes
/// them, every row arrives once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_is_confirmed_to_the_slot_only_after_asp_wrote_it() {
    let pg = Pg::start();
    let mut sql = pg.client().await;
    sql.batch_execute(ITEMS).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    // One fetch takes the whole transaction, its commit included, and the next one
    // waits a second for more: each attempt outlives the replication client's next
    // status update (one a second), which would carry a confirmation made too early.
    let toml = format!(
        "{}batch = 1000\n",
        pg_in("held", "pg", &pg.url(), &["items"])
    );
    let node = start(&dir.path().join("a"), &toml).await;
    wait_until(
        "the snapshot of the empty table done",
        Duration::from_secs(60),
        || async {
            connector(&node, "held").await["in"]["detail"]["snapshot"]
                .as_str()
                .is_some_and(|s| s.starts_with("done"))
        },
    )
    .await;
    node.client().policy("pg", Some("counter")).await.unwrap();
    let tx = sql.transaction().await.unwrap();
    tx.execute(
        "INSERT INTO items (id, body) SELECT i, 'row ' || i FROM generate_series(0, 499) AS i",
        &[],
    )
    .await
    .unwrap();
    // Before the commit record: the slot may be confirmed up to here (a keepalive while
    // nothing is pending), never past the commit while asp has not written it.
    let before_commit: i64 = tx
        .query_one("SELECT (pg_current_wal_insert_lsn() - '0/0')::int8", &[])
        .await
        .unwrap()
        .get(0);
    tx.commit().await.unwrap();
    // Attempt after attempt is refused; the slot must not move past the commit.
    let confirmed = || async {
        sql.query_one(
            "SELECT (confirmed_flush_lsn - '0/0')::int8 FROM pg_replication_slots WHERE slot_name = 'asp_held'",
            &[],
        )
        .await
        .unwrap()
        .get::<_, i64>(0)
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let status = connector(&node, "held").await;
        let at = confirmed().await;
        assert!(
            at <= before_commit,
            "the slot was confirmed to {at}, past the commit at {before_commit}, before asp wrote a row: {status}"
        );
        if status["in"]["errors"].as_u64().is_some_and(|e| e >= 3) {
            assert!(
                status["in"]["last_error"]
                    .as_str()
                    .is_some_and(|e| e.contains("counter")),
                "{status}"
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "three refused attempts: not within 120s: {status}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(events(&node, "pg").await, 0);
    node.client().policy("pg", Some("lww")).await.unwrap();
    rows_in(&node, "held", "pg", 500, 120).await;
    assert_eq!(events(&node, "pg").await, 500, "once each");
    assert_eq!(json_values(&node, "pg").await.len(), 500);
}

/// A slot that lost WAL it needed (`wal_status = lost`: PostgreSQL removed segments past
/// `max_slot_wal_keep_size` while asp was down) is an error in status that says what
/// was lost and the fix; asp neither drops nor recreates the slot, and takes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_that_lost_wal_is_a_loud_error_with_the_fix() {
    let pg = Pg::start_with("max_slot_wal_keep_size = 16MB");
    let sql = pg.client().await;
    sql.batch_execute(ITEMS).await.unwrap();
    insert(&sql, 0, 10, 10).await;
    let dir = tempfile::tempdir().unwrap();
    let mut node = start(
        &dir.path().join("a"),
        &pg_in("lost", "pg", &pg.url(), &["items"]),
    )
    .await;
    insert(&sql, 10, 20, 10).await;
    rows_in(&node, "lost", "pg", 20, 60).await;
    node.signal(libc::SIGTERM);
    wait_until("the slot free", Duration::from_secs(30), || async {
        sql.query_one(
            "SELECT active_pid IS NULL FROM pg_replication_slots WHERE slot_name = 'asp_lost'",
            &[],
        )
        .await
        .unwrap()
        .get::<_, bool>(0)
    })
    .await;
    // Segment after segment, past what the slot may keep, then a checkpoint removes them.
    wait_until("the slot lost", Duration::from_secs(60), || async {
        for i in 0..4 {
            sql.execute(
                "INSERT INTO items (id, body) VALUES ($1, 'filler') ON CONFLICT (id) DO NOTHING",
                &[&(1_000_000 + i)],
            )
            .await
            .unwrap();
            sql.batch_execute("SELECT pg_switch_wal()").await.unwrap();
        }
        sql.batch_execute("CHECKPOINT").await.unwrap();
        sql.query_one(
            "SELECT wal_status FROM pg_replication_slots WHERE slot_name = 'asp_lost'",
            &[],
        )
        .await
        .unwrap()
        .get::<_, Option<String>>(0)
            == Some("lost".to_owned())
    })
    .await;
    node.restart().await;
    let status = common::eventually("the error in status", async || {
        let s = connector(&node, "lost").await;
        s["in"]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("wal_status = lost"))
            .then_some(s)
    })
    .await;
    let error = status["in"]["last_error"].as_str().unwrap();
    assert!(
        error.contains("pg_drop_replication_slot('asp_lost')")
            && error.contains("rename the connector")
            && error.contains("max_slot_wal_keep_size"),
        "{error}"
    );
    assert_eq!(status["in"]["detail"]["wal_status"], "lost", "{status}");
    assert_ne!(status["in"]["state"], "running", "{status}");
    wait_until("retried", Duration::from_secs(30), || async {
        connector(&node, "lost").await["in"]["errors"].as_u64() >= Some(2)
    })
    .await;
    let slots: Vec<String> = sql
        .query("SELECT slot_name FROM pg_replication_slots", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(slots, ["asp_lost"], "neither dropped nor created");
    assert_eq!(events(&node, "pg").await, 20, "nothing taken");
    assert!(node.log().contains("wal_status = lost"), "logged");
}
