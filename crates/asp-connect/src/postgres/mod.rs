//! PostgreSQL (`kind = "postgres"`): the in side here, the decoder in `pgoutput.rs`,
//! the out side in `sink.rs`.
//!
//! In: change data capture through a logical replication slot (`pgoutput`). When the
//! slot is missing and asp has no position, the slot is created with an exported
//! snapshot; the captured tables are read in a REPEATABLE READ transaction on that
//! snapshot, then the slot streams from its consistent point. Each row is one message:
//! key `<schema>.<table>/<primary key>` (a composite key's columns joined by `/`, each
//! with `%` and `/` percent-encoded), value the row as a JSON object. Positions are
//! (consistent point - 1, row number) for the snapshot and (commit LSN, index in the
//! transaction) for the stream, so they increase over everything the slot ever sends;
//! the snapshot's end is stored as (consistent point, 0) by a message of this cluster,
//! which the runtime takes as applied without writing it (one `echoes_dropped`). The
//! slot is told what was applied (its flush LSN) only in `ack`, after asp wrote it: a
//! commit's end once all its changes are applied, a keepalive's WAL end once everything
//! received before it is.
//!
//! A crash in the middle of the snapshot (the exported snapshot is gone with the
//! session): the slot this connector created (recorded as `<name>/slot` in
//! `_asp.connectors`) was never confirmed past its consistent point, so it is dropped
//! and created again, loudly, with a new snapshot that skips rows asp holds with the
//! same value and deletes keys of the table asp holds that the table no longer has.
//! Any other missing or foreign slot is an error in status with the fix, never a slot
//! created or dropped on asp's own.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use pgwire_replication::{Lsn, ReplicationClient, ReplicationConfig, ReplicationEvent};
use serde_json::{Map, Value, json};
use tokio_postgres::{Client, NoTls, SimpleQueryMessage};

use crate::config::redacted;
use crate::runtime::{Ctx, InMessage, Position, Progress, Source};
use crate::status::Side;

mod pgoutput;
mod sink;
mod slot;

use pgoutput::{Change, Datum, Relation, decode, to_json};
pub(crate) use sink::sink;
use slot::{SlotState, save_slot_record, slot_record, slot_state};

/// How long a fetch waits for changes when there are none.
const FETCH_WAIT: Duration = Duration::from_secs(1);
/// A row with a value this long (as text) is remembered, so that an update that leaves
/// that (TOASTed) value unchanged, which pgoutput does not send again, can be filled in.
const TOAST_TEXT_MIN: usize = 1000;
/// The most rows remembered for that.
const TOAST_ROWS_MAX: usize = 10_000;

/// The plain SQL connection (snapshot, status queries, the out side).
async fn connect_sql(ctx: &Ctx) -> Result<Client, String> {
    let url = &ctx.connector.url;
    let config: tokio_postgres::Config = url
        .parse()
        .map_err(|e| format!("url {}: {e}", redacted(url)))?;
    if !matches!(
        config.get_ssl_mode(),
        tokio_postgres::config::SslMode::Disable | tokio_postgres::config::SslMode::Prefer
    ) {
        return Err("url: TLS to PostgreSQL is not built yet; use sslmode=disable".into());
    }
    let connecting = config.connect(NoTls);
    let (client, connection) = tokio::time::timeout(Duration::from_secs(10), connecting)
        .await
        .map_err(|_| format!("connecting to {}: timed out", redacted(url)))?
        .map_err(|e| format!("connecting to {}: {e}", redacted(url)))?;
    let name = ctx.connector.name.clone();
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(connector = %name, error = %e, "PostgreSQL connection ended");
        }
    });
    Ok(client)
}

/// The replication session's settings, from the connector's URL.
fn replication_config(ctx: &Ctx) -> Result<ReplicationConfig, String> {
    let c = &ctx.connector;
    let config: tokio_postgres::Config = c
        .url
        .parse()
        .map_err(|e| format!("url {}: {e}", redacted(&c.url)))?;
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
        None => "localhost".to_owned(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let user = config.get_user().unwrap_or("postgres").to_owned();
    let password = config
        .get_password()
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .unwrap_or_default();
    let database = config.get_dbname().unwrap_or(&user).to_owned();
    Ok(ReplicationConfig::new(
        host,
        user,
        password,
        database,
        c.slot.clone(),
        c.publication.as_str(),
    )
    .with_port(port)
    .with_start_lsn(Lsn::ZERO)
    .with_status_interval(Duration::from_secs(1))
    .with_wakeup_interval(Duration::from_secs(5))
    .with_buffer_size(4096)
    .with_application_name(format!("asp-{}", c.name)))
}

fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

fn quote_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

fn lsn_of(text: &str) -> Result<u64, String> {
    Lsn::parse(text)
        .map(Lsn::as_u64)
        .map_err(|e| format!("LSN {text:?}: {e}"))
}

/// A captured table: its columns (name, type OID) in order and its primary key's
/// column names in key order.
#[derive(Clone, Debug)]
struct Table {
    name: String,
    columns: Vec<(String, u32)>,
    key: Vec<String>,
}

async fn table_info(sql: &Client, name: &str) -> Result<Table, String> {
    let (schema, table) = name.split_once('.').unwrap_or(("public", name));
    let rows = sql
        .query(
            "SELECT a.attname::text, a.atttypid, \
                 coalesce((SELECT k.n FROM unnest(i.indkey::int2[]) WITH ORDINALITY AS k(att, n) \
                     WHERE k.att = a.attnum), 0)::int4 \
             FROM pg_attribute a \
             JOIN pg_class c ON c.oid = a.attrelid \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             LEFT JOIN pg_index i ON i.indrelid = c.oid AND i.indisprimary \
             WHERE n.nspname = $1 AND c.relname = $2 AND a.attnum > 0 AND NOT a.attisdropped \
             ORDER BY a.attnum",
            &[&schema, &table],
        )
        .await
        .map_err(|e| format!("reading the columns of {name}: {e}"))?;
    if rows.is_empty() {
        return Err(format!("table {name} does not exist (tables = [...])"));
    }
    let mut key: Vec<(i32, String)> = Vec::new();
    let mut columns = Vec::with_capacity(rows.len());
    for r in &rows {
        let column: String = r.get(0);
        let oid: u32 = r.get(1);
        let in_key: i32 = r.get(2);
        if in_key > 0 {
            key.push((in_key, column.clone()));
        }
        columns.push((column, oid));
    }
    if key.is_empty() {
        return Err(format!(
            "table {name} has no primary key: asp keys each row by it (ALTER TABLE {name} ADD PRIMARY KEY (...))"
        ));
    }
    key.sort();
    Ok(Table {
        name: name.to_owned(),
        columns,
        key: key.into_iter().map(|(_, c)| c).collect(),
    })
}

/// One primary key value as part of a key: `%` and `/` percent-encoded.
fn key_part(text: &str) -> String {
    text.replace('%', "%25").replace('/', "%2F")
}

/// The asp key of a row of `table` whose primary key columns hold `parts` (as text).
fn row_key<'a>(table: &str, parts: impl IntoIterator<Item = &'a str>) -> String {
    let mut key = table.to_owned();
    for p in parts {
        key.push('/');
        key.push_str(&key_part(p));
    }
    key
}

/// The initial snapshot being read.
struct Snapshot {
    /// The slot's consistent point: snapshot rows are at (it - 1, row number).
    consistent_point: u64,
    tables: VecDeque<Table>,
    /// The table whose cursor is open.
    open: Option<Table>,
    rows: u64,
    /// A snapshot taken again after a crash in the middle of one: rows asp holds with
    /// the same value are skipped, and keys asp holds that the table no longer has
    /// are deleted.
    again: bool,
    seen: HashSet<String>,
}

pub(crate) struct PostgresSource {
    ctx: Arc<Ctx>,
    /// Where the slot's state is shown.
    side: Arc<Side>,
    /// The snapshot's transaction.
    sql: Client,
    /// Status queries.
    status: Client,
    stream: ReplicationClient,
    tables: HashMap<String, Table>,
    relations: HashMap<u32, Relation>,
    snapshot: Option<Snapshot>,
    /// The open transaction: its commit LSN and the index of its last change.
    txn: Option<(u64, u64)>,
    /// The last position given to a message.
    emitted: Option<Position>,
    /// The last position acknowledged (applied).
    acked: Option<Position>,
    /// LSNs to confirm to the slot once every message up to a position is applied:
    /// each commit's end, and each keepalive's WAL end outside a transaction.
    confirms: VecDeque<(Option<Position>, u64)>,
    pending: VecDeque<InMessage>,
    /// Rows with a long value, by key, to fill in unchanged TOASTed values.
    toast: HashMap<String, Map<String, Value>>,
    /// What status shows besides the slot (the snapshot's progress, a recreation).
    notes: Map<String, Value>,
}

pub(crate) async fn source(
    ctx: Arc<Ctx>,
    side: Arc<Side>,
    applied: Progress,
) -> Result<PostgresSource, String> {
    let c = &ctx.connector;
    let stored = applied.ordered();
    let sql = connect_sql(&ctx).await?;
    let status = connect_sql(&ctx).await?;
    let mut tables = HashMap::new();
    for t in &c.tables {
        tables.insert(t.clone(), table_info(&sql, t).await?);
    }
    ensure_publication(&sql, &c.publication, &c.tables).await?;
    let slot = slot_state(&status, &c.slot).await?;
    let mut notes = Map::new();
    side.set_detail(
        slot.as_ref()
            .map_or(json!({"slot": c.slot, "exists": false}), |s| {
                s.detail(&c.slot)
            }),
    );
    let fail = |what: String| -> Result<PostgresSource, String> {
        tracing::error!(connector = %c.name, slot = %c.slot, "{what}");
        Err(what)
    };
    // The slot this connector created, as recorded: its consistent point, or "" while
    // it was being created.
    let record = slot_record(&ctx).filter(|(name, _)| *name == c.slot);
    let creating = record.as_ref().is_some_and(|(_, cp)| cp.is_empty());
    // Whether (and why) to drop the slot and take a snapshot on a new one.
    let mut snapshot_again = None;
    match (&slot, stored) {
        (None, Some(_)) if creating => {
            snapshot_again = Some("asp stopped while it created the slot again");
        }
        (None, Some(p)) => {
            return fail(format!(
                "replication slot {slot} is missing, but asp has applied changes up to {p} from it: \
                 what happened in between cannot be read, and asp does not create a new slot on its own. \
                 To take a new snapshot, rename the connector (its position is kept under its name) \
                 and restart; or recreate the slot yourself if you know nothing was written since",
                slot = c.slot,
                p = p.render(false),
            ));
        }
        (None, None) => {}
        (Some(s), _) => {
            if s.plugin.as_deref() != Some("pgoutput") || !s.logical || !s.here {
                return fail(format!(
                    "replication slot {} is not a logical slot of plugin pgoutput on this database (plugin {:?}); name another slot",
                    c.slot, s.plugin
                ));
            }
            if s.wal_status.as_deref() == Some("lost") {
                return fail(format!(
                    "replication slot {} has lost WAL it needed (wal_status = lost): changes were lost. \
                     Drop it (SELECT pg_drop_replication_slot('{}')), rename the connector so that it \
                     takes a new snapshot, and restart; raise max_slot_wal_keep_size to keep it from happening",
                    c.slot, c.slot
                ));
            }
            if let Some(pid) = s.active_pid {
                return Err(format!(
                    "replication slot {} is in use by process {pid}; waiting for it to be free",
                    c.slot
                ));
            }
            // Created by this connector and never confirmed past its consistent point
            // (a snapshot's rows are confirmed only with the first changes after it).
            let ours_unconfirmed = creating
                || record
                    .as_ref()
                    .is_some_and(|(_, cp)| Some(cp) == s.confirmed_flush.as_ref());
            let cp = s.confirmed_flush.as_deref().map(lsn_of).transpose()?;
            match stored {
                _ if creating => {
                    snapshot_again = Some("asp stopped while it created the slot");
                }
                None if ours_unconfirmed => {
                    snapshot_again = Some("its snapshot stopped before anything was applied");
                }
                None => {
                    return fail(format!(
                        "replication slot {slot} exists, but asp holds no position of this connector: \
                         asp cannot take a snapshot consistent with a slot it did not create. If nothing \
                         else uses the slot, drop it (SELECT pg_drop_replication_slot('{slot}')); or name another slot",
                        slot = c.slot
                    ));
                }
                Some(p) if ours_unconfirmed && cp == Some(p.0 + 1) => {
                    snapshot_again =
                        Some("its snapshot stopped in the middle (the exported snapshot is gone)");
                }
                Some(_) => {}
            }
        }
    }
    let mut config = replication_config(&ctx)?;
    let mut snapshot = None;
    let stream = if slot.is_none() || snapshot_again.is_some() {
        save_slot_record(&ctx, "").await?;
        if let Some(why) = snapshot_again {
            let note = format!(
                "replication slot {} was dropped and created again, with a new snapshot: {why}; \
                 nothing had been confirmed past its consistent point",
                c.slot
            );
            tracing::warn!(connector = %c.name, "{note}");
            notes.insert("recreated".into(), json!(note));
            if slot.is_some() {
                sql.execute("SELECT pg_drop_replication_slot($1)", &[&c.slot])
                    .await
                    .map_err(|e| format!("dropping slot {}: {e}", c.slot))?;
            }
        }
        let mut stream = ReplicationClient::connect_gated(config)
            .await
            .map_err(|e| format!("replication connection: {e}"))?;
        let rows = stream
            .simple_query(&format!(
                "CREATE_REPLICATION_SLOT {} LOGICAL pgoutput (SNAPSHOT 'export')",
                quote_ident(&c.slot)
            ))
            .await
            .map_err(|e| format!("creating replication slot {}: {e}", c.slot))?;
        let field = |i: usize| -> Result<String, String> {
            rows.first()
                .and_then(|r| r.get(i).cloned().flatten())
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .ok_or_else(|| format!("CREATE_REPLICATION_SLOT answered no column {i}"))
        };
        let (cp_text, exported) = (field(1)?, field(2)?);
        let cp = lsn_of(&cp_text)?;
        tracing::info!(connector = %c.name, slot = %c.slot, consistent_point = %cp_text, "replication slot created; taking the snapshot");
        sql.batch_execute(&format!(
            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT {}",
            quote_literal(&exported)
        ))
        .await
        .map_err(|e| format!("opening the snapshot: {e}"))?;
        // Recorded before anything is read: a crash in the snapshot finds it, and knows
        // the slot is this connector's.
        save_slot_record(&ctx, &cp_text).await?;
        stream
            .start()
            .await
            .map_err(|e| format!("replication: {e}"))?;
        snapshot = Some(Snapshot {
            consistent_point: cp,
            tables: c.tables.iter().map(|t| tables[t].clone()).collect(),
            open: None,
            rows: 0,
            again: snapshot_again.is_some(),
            seen: HashSet::new(),
        });
        stream
    } else {
        config.start_lsn = Lsn::ZERO;
        ReplicationClient::connect(config)
            .await
            .map_err(|e| format!("replication connection: {e}"))?
    };
    let mut stream = stream;
    stream
        .wait_started()
        .await
        .map_err(|e| format!("START_REPLICATION on slot {}: {e}", c.slot))?;
    if snapshot.is_some() {
        notes.insert("snapshot".into(), json!("running"));
    }
    Ok(PostgresSource {
        ctx,
        side,
        sql,
        status,
        stream,
        tables,
        relations: HashMap::new(),
        snapshot,
        txn: None,
        emitted: stored,
        acked: stored,
        confirms: VecDeque::new(),
        pending: VecDeque::new(),
        toast: HashMap::new(),
        notes,
    })
}

/// Creates the publication for `tables` if it is missing; an existing one must publish
/// them all.
async fn ensure_publication(
    sql: &Client,
    publication: &str,
    tables: &[String],
) -> Result<(), String> {
    let exists = !sql
        .query(
            "SELECT 1 FROM pg_publication WHERE pubname = $1",
            &[&publication],
        )
        .await
        .map_err(|e| format!("reading pg_publication: {e}"))?
        .is_empty();
    if !exists {
        let list = tables.join(", ");
        match sql
            .batch_execute(&format!(
                "CREATE PUBLICATION {} FOR TABLE {list}",
                quote_ident(publication)
            ))
            .await
        {
            Ok(()) => {
                tracing::info!(publication, tables = %list, "publication created");
                return Ok(());
            }
            // Created by someone else meanwhile: checked below.
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::DUPLICATE_OBJECT) => {}
            Err(e) => return Err(format!("creating publication {publication}: {e}")),
        }
    }
    let rows = sql
        .query(
            "SELECT schemaname || '.' || tablename FROM pg_publication_tables WHERE pubname = $1",
            &[&publication],
        )
        .await
        .map_err(|e| format!("reading pg_publication_tables: {e}"))?;
    let published: HashSet<String> = rows.iter().map(|r| r.get(0)).collect();
    let missing: Vec<&String> = tables.iter().filter(|t| !published.contains(*t)).collect();
    if !missing.is_empty() {
        let list = missing
            .iter()
            .map(|t| t.as_str())
            .collect::<Vec<_>>()
            .join(", ");
        return Err(format!(
            "publication {publication} does not publish {list}: ALTER PUBLICATION {publication} ADD TABLE {list}"
        ));
    }
    Ok(())
}

impl PostgresSource {
    fn next_position(&mut self) -> Result<Position, String> {
        let (lsn, index) = self
            .txn
            .as_mut()
            .ok_or("pgoutput: a change outside a transaction")?;
        *index += 1;
        let p = Position(*lsn, *index);
        self.emitted = Some(p);
        Ok(p)
    }

    fn message(
        &self,
        position: Position,
        table: &str,
        key: String,
        row: Option<&Map<String, Value>>,
    ) -> InMessage {
        InMessage {
            position,
            key: Some(key),
            op: Some(if row.is_some() { "put" } else { "delete" }.to_owned()),
            value: row.map_or_else(Bytes::new, |r| {
                Bytes::from(serde_json::to_vec(r).expect("JSON"))
            }),
            fields: vec![
                ("table".to_owned(), table.to_owned()),
                ("position".to_owned(), position.render(false)),
            ],
            ..Default::default()
        }
    }

    /// The key of a tuple of relation `rel` (its primary key columns).
    fn key_of(
        &self,
        table: &str,
        columns: &[(String, u32)],
        tuple: &[Datum],
    ) -> Result<String, String> {
        let t = self
            .tables
            .get(table)
            .ok_or_else(|| format!("a change of {table}, which is not captured"))?;
        let mut parts = Vec::with_capacity(t.key.len());
        for k in &t.key {
            let i = columns
                .iter()
                .position(|(name, _)| name == k)
                .ok_or_else(|| format!("{table}: the change has no key column {k}"))?;
            match tuple.get(i) {
                Some(Datum::Text(v)) => parts.push(v.as_str()),
                _ => {
                    return Err(format!(
                        "{table}: the change has no value of key column {k}"
                    ));
                }
            }
        }
        Ok(row_key(table, parts))
    }

    /// A row as JSON; an unchanged TOASTed column taken from the row's value as last
    /// sent or as asp holds it.
    fn row_of(
        &mut self,
        key: &str,
        columns: &[(String, u32)],
        tuple: &[Datum],
    ) -> Map<String, Value> {
        let mut row = Map::new();
        let mut long = false;
        let mut before: Option<Map<String, Value>> = None;
        for ((name, oid), d) in columns.iter().zip(tuple) {
            match d {
                Datum::Null => {
                    row.insert(name.clone(), Value::Null);
                }
                Datum::Text(t) => {
                    long |= t.len() >= TOAST_TEXT_MIN;
                    row.insert(name.clone(), to_json(*oid, t));
                }
                Datum::Unchanged => {
                    long = true;
                    if before.is_none() {
                        before = self.toast.get(key).cloned().or_else(|| self.held(key));
                    }
                    match before.as_ref().and_then(|b| b.get(name)) {
                        Some(v) => {
                            row.insert(name.clone(), v.clone());
                        }
                        None => {
                            tracing::warn!(connector = %self.ctx.connector.name, key, column = %name,
                            "an unchanged TOASTed value asp does not hold: the column is left out")
                        }
                    }
                }
            }
        }
        if long {
            if self.toast.len() >= TOAST_ROWS_MAX {
                self.toast.clear();
            }
            self.toast.insert(key.to_owned(), row.clone());
        }
        row
    }

    /// The row asp holds under `key`.
    fn held(&self, key: &str) -> Option<Map<String, Value>> {
        let state = self
            .ctx
            .store
            .get(&self.ctx.connector.namespace, key)
            .ok()??;
        match serde_json::from_slice(&state.value?.bytes).ok()? {
            Value::Object(m) => Some(m),
            _ => None,
        }
    }

    /// Turns one replication event into messages (in `pending`).
    fn on_event(&mut self, ev: ReplicationEvent) -> Result<(), String> {
        match ev {
            ReplicationEvent::Begin { final_lsn, .. } => {
                self.txn = Some((final_lsn.as_u64(), 0));
            }
            ReplicationEvent::Commit { end_lsn, .. } => {
                self.txn = None;
                self.confirms.push_back((self.emitted, end_lsn.as_u64()));
            }
            ReplicationEvent::KeepAlive { wal_end, .. } => {
                // Everything before it was sent: once what was received is applied,
                // the slot may move there (idle tables keep it advancing).
                if self.txn.is_none() {
                    self.confirms.push_back((self.emitted, wal_end.as_u64()));
                }
            }
            ReplicationEvent::XLogData { data, .. } => self.on_change(decode(&data)?)?,
            ReplicationEvent::Message { .. } | ReplicationEvent::StoppedAt { .. } => {}
        }
        Ok(())
    }

    fn relation(&self, rel: u32) -> Result<Relation, String> {
        self.relations
            .get(&rel)
            .cloned()
            .ok_or_else(|| format!("pgoutput: a change of relation {rel} before its description"))
    }

    fn on_change(&mut self, change: Change) -> Result<(), String> {
        match change {
            Change::Relation { id, name, columns } => {
                self.relations.insert(id, Relation { name, columns });
            }
            Change::Insert { rel, new } => {
                let r = self.relation(rel)?;
                let key = self.key_of(&r.name, &r.columns, &new)?;
                let row = self.row_of(&key, &r.columns, &new);
                let p = self.next_position()?;
                self.pending
                    .push_back(self.message(p, &r.name, key, Some(&row)));
            }
            Change::Update { rel, old, new } => {
                let r = self.relation(rel)?;
                let key = self.key_of(&r.name, &r.columns, &new)?;
                if let Some(old) = old {
                    let old_key = self.key_of(&r.name, &r.columns, &old)?;
                    if old_key != key {
                        // The primary key changed: the old key is deleted.
                        let p = self.next_position()?;
                        self.toast.remove(&old_key);
                        self.pending
                            .push_back(self.message(p, &r.name, old_key, None));
                    }
                }
                let row = self.row_of(&key, &r.columns, &new);
                let p = self.next_position()?;
                self.pending
                    .push_back(self.message(p, &r.name, key, Some(&row)));
            }
            Change::Delete { rel, old } => {
                let r = self.relation(rel)?;
                let key = self.key_of(&r.name, &r.columns, &old)?;
                self.toast.remove(&key);
                let p = self.next_position()?;
                self.pending.push_back(self.message(p, &r.name, key, None));
            }
            Change::Truncate { rels } => {
                for rel in rels {
                    let r = self.relation(rel)?;
                    tracing::warn!(connector = %self.ctx.connector.name, table = %r.name, "TRUNCATE: every key of the table is deleted");
                    for key in self.held_keys(&r.name)? {
                        let p = self.next_position()?;
                        self.pending.push_back(self.message(p, &r.name, key, None));
                    }
                    self.toast.clear();
                }
            }
            Change::Other => {}
        }
        Ok(())
    }

    /// Every key asp holds of `table`.
    fn held_keys(&self, table: &str) -> Result<Vec<String>, String> {
        let prefix = format!("{table}/");
        let mut keys = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page = self
                .ctx
                .store
                .scan(
                    &self.ctx.connector.namespace,
                    &prefix,
                    after.as_deref(),
                    1000,
                    false,
                )
                .map_err(|e| format!("listing the keys of {table}: {e}"))?;
            for item in &page.items {
                keys.push(item.key.as_str().to_owned());
            }
            match page.next_after {
                Some(next) => after = Some(next.as_str().to_owned()),
                None => return Ok(keys),
            }
        }
    }

    /// Reads the next rows of the snapshot into `pending`; ends it after the last.
    async fn snapshot_rows(&mut self, max: usize) -> Result<(), String> {
        while self.pending.is_empty() {
            let Some(snap) = self.snapshot.as_mut() else {
                return Ok(());
            };
            let Some(table) = snap.open.clone() else {
                match snap.tables.pop_front() {
                    None => {
                        let rows = snap.rows;
                        // The snapshot's end, stored as the position (consistent point, 0):
                        // after every row, before every change of the stream. The runtime
                        // takes a message of this cluster as applied without writing it.
                        let end = Position(snap.consistent_point, 0);
                        self.snapshot = None;
                        self.emitted = Some(end);
                        self.pending.push_back(InMessage {
                            position: end,
                            cluster: Some(self.ctx.cluster.clone()),
                            fields: vec![("snapshot".into(), "end".into())],
                            ..Default::default()
                        });
                        self.sql
                            .batch_execute("COMMIT")
                            .await
                            .map_err(|e| format!("ending the snapshot: {e}"))?;
                        tracing::info!(connector = %self.ctx.connector.name, rows, "snapshot read; streaming");
                        self.notes
                            .insert("snapshot".into(), json!(format!("done: {rows} rows")));
                        return Ok(());
                    }
                    Some(t) => {
                        let columns = t
                            .columns
                            .iter()
                            .map(|(c, _)| quote_ident(c))
                            .collect::<Vec<_>>()
                            .join(", ");
                        self.sql
                            .batch_execute(&format!(
                                "DECLARE asp_snapshot NO SCROLL CURSOR FOR SELECT {columns} FROM {}",
                                t.name
                            ))
                            .await
                            .map_err(|e| format!("reading {}: {e}", t.name))?;
                        snap.open = Some(t);
                        continue;
                    }
                }
            };
            let answer = self
                .sql
                .simple_query(&format!("FETCH {max} FROM asp_snapshot"))
                .await
                .map_err(|e| format!("reading {}: {e}", table.name))?;
            let rows: Vec<_> = answer
                .into_iter()
                .filter_map(|m| match m {
                    SimpleQueryMessage::Row(r) => Some(r),
                    _ => None,
                })
                .collect();
            if rows.is_empty() {
                self.sql
                    .batch_execute("CLOSE asp_snapshot")
                    .await
                    .map_err(|e| format!("reading {}: {e}", table.name))?;
                let snap = self.snapshot.as_mut().expect("the snapshot");
                snap.open = None;
                if snap.again {
                    // Keys asp holds from the snapshot before that the table no longer has.
                    let seen = std::mem::take(&mut snap.seen);
                    let gone: Vec<String> = self
                        .held_keys(&table.name)?
                        .into_iter()
                        .filter(|k| !seen.contains(k))
                        .collect();
                    for key in gone {
                        let snap = self.snapshot.as_mut().expect("the snapshot");
                        snap.rows += 1;
                        let p = Position(snap.consistent_point - 1, snap.rows);
                        self.pending
                            .push_back(self.message(p, &table.name, key, None));
                    }
                }
                continue;
            }
            for r in rows {
                let tuple: Vec<Datum> = (0..table.columns.len())
                    .map(|i| r.get(i).map_or(Datum::Null, |t| Datum::Text(t.to_owned())))
                    .collect();
                let key = self.key_of(&table.name, &table.columns, &tuple)?;
                let row = self.row_of(&key, &table.columns, &tuple);
                let snap = self.snapshot.as_mut().expect("the snapshot");
                if snap.again {
                    snap.seen.insert(key.clone());
                    let value = serde_json::to_vec(&row).expect("JSON");
                    let held = self
                        .ctx
                        .store
                        .get(&self.ctx.connector.namespace, &key)
                        .ok()
                        .flatten()
                        .and_then(|s| s.value);
                    if held.is_some_and(|v| v.bytes[..] == value[..]) {
                        continue;
                    }
                }
                let snap = self.snapshot.as_mut().expect("the snapshot");
                snap.rows += 1;
                let p = Position(snap.consistent_point - 1, snap.rows);
                self.emitted = Some(p);
                self.pending
                    .push_back(self.message(p, &table.name, key, Some(&row)));
            }
        }
        Ok(())
    }

    /// Tells the slot the LSNs whose messages are all applied.
    fn confirm_applied(&mut self) {
        let mut lsn = None;
        while let Some(&(through, l)) = self.confirms.front()
            && through <= self.acked
        {
            lsn = Some(l);
            self.confirms.pop_front();
        }
        if let Some(l) = lsn {
            self.stream.update_applied_lsn(Lsn::from_u64(l));
        }
    }

    fn show(&self, slot: Option<&SlotState>) {
        let c = &self.ctx.connector;
        let mut detail = slot.map_or(json!({"slot": c.slot}), |s| s.detail(&c.slot));
        for (k, v) in &self.notes {
            detail[k] = v.clone();
        }
        self.side.set_detail(detail);
    }
}

impl Source for PostgresSource {
    async fn fetch(&mut self, max: usize) -> Result<Vec<InMessage>, String> {
        let deadline = Instant::now() + FETCH_WAIT;
        let mut out = Vec::new();
        if self.snapshot.is_some() && self.pending.is_empty() {
            self.snapshot_rows(max).await?;
        }
        while out.len() < max {
            if let Some(m) = self.pending.pop_front() {
                out.push(m);
                continue;
            }
            if self.snapshot.is_some() {
                break;
            }
            // Waits only while there is nothing to return.
            let wait = match out.is_empty() {
                true => deadline.saturating_duration_since(Instant::now()),
                false => Duration::ZERO,
            };
            let ev = match tokio::time::timeout(wait, self.stream.recv()).await {
                Err(_) => break,
                Ok(Ok(Some(ev))) => ev,
                Ok(Ok(None)) => return Err("the replication stream ended".into()),
                Ok(Err(e)) => {
                    return Err(format!(
                        "replication stream of slot {}: {e}",
                        self.ctx.connector.slot
                    ));
                }
            };
            self.on_event(ev)?;
        }
        // What was received while nothing was outstanding (keepalives, empty
        // transactions) is confirmed at once.
        self.confirm_applied();
        Ok(out)
    }

    async fn ack(&mut self, batch: &[InMessage]) -> Result<(), String> {
        if let Some(last) = batch.last() {
            self.acked = self.acked.max(Some(last.position));
        }
        self.confirm_applied();
        Ok(())
    }

    async fn head(&mut self) -> Option<(String, u64)> {
        let c = &self.ctx.connector;
        let slot = slot_state(&self.status, &c.slot).await.ok().flatten();
        self.show(slot.as_ref());
        let s = slot?;
        if s.wal_status.as_deref() == Some("lost") {
            tracing::error!(connector = %c.name, slot = %c.slot, "replication slot lost WAL it needed (wal_status = lost)");
        }
        Some((s.current, s.unconfirmed.unwrap_or(0).max(0) as u64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_join_the_primary_key_with_slashes() {
        assert_eq!(row_key("public.t", ["42"]), "public.t/42");
        assert_eq!(row_key("s.t", ["a/b", "50%"]), "s.t/a%2Fb/50%25");
    }
}
