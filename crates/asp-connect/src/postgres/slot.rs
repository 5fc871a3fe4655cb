//! The replication slot: its state as `pg_replication_slots` shows it, and the record
//! of the slot this connector created (`<name>/slot` in `_asp.connectors`).

use std::time::Duration;

use asp_core::{ContentType, Key, Namespace};
use asp_store::WriteOp;
use serde_json::{Value, json};
use tokio_postgres::Client;

use crate::runtime::{Ctx, POSITIONS_NAMESPACE};

/// The slot as `pg_replication_slots` shows it.
#[derive(Clone, Debug)]
pub(super) struct SlotState {
    pub(super) plugin: Option<String>,
    pub(super) logical: bool,
    /// Of this connection's database.
    pub(super) here: bool,
    pub(super) active_pid: Option<i32>,
    pub(super) wal_status: Option<String>,
    pub(super) restart_lsn: Option<String>,
    pub(super) confirmed_flush: Option<String>,
    pub(super) current: String,
    pub(super) retained: Option<i64>,
    pub(super) unconfirmed: Option<i64>,
}

pub(super) async fn slot_state(sql: &Client, slot: &str) -> Result<Option<SlotState>, String> {
    let rows = sql
        .query(
            "SELECT plugin::text, slot_type = 'logical', coalesce(database = current_database(), false), active_pid, wal_status, \
                 restart_lsn::text, confirmed_flush_lsn::text, pg_current_wal_lsn()::text, \
                 (pg_current_wal_lsn() - restart_lsn)::int8, \
                 (pg_current_wal_lsn() - confirmed_flush_lsn)::int8 \
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(|e| format!("reading pg_replication_slots: {e}"))?;
    Ok(rows.first().map(|r| SlotState {
        plugin: r.get(0),
        logical: r.get(1),
        here: r.get(2),
        active_pid: r.get(3),
        wal_status: r.get(4),
        restart_lsn: r.get(5),
        confirmed_flush: r.get(6),
        current: r.get(7),
        retained: r.get(8),
        unconfirmed: r.get(9),
    }))
}

impl SlotState {
    pub(super) fn detail(&self, slot: &str) -> Value {
        json!({
            "slot": slot,
            "wal_status": self.wal_status,
            "retained_wal_bytes": self.retained,
            "restart_lsn": self.restart_lsn,
            "confirmed_flush_lsn": self.confirmed_flush,
            "current_wal_lsn": self.current,
            "active_pid": self.active_pid,
        })
    }
}

/// The record of the slot this connector created (`<name>/slot` in `_asp.connectors`):
/// its name and consistent point.
fn slot_record_key(ctx: &Ctx) -> String {
    format!("{}/slot", ctx.connector.name)
}

pub(super) fn slot_record(ctx: &Ctx) -> Option<(String, String)> {
    let ns = Namespace::new(POSITIONS_NAMESPACE).expect("a valid name");
    let state = ctx.store.get(&ns, &slot_record_key(ctx)).ok()??;
    let v: Value = serde_json::from_slice(&state.value?.bytes).ok()?;
    Some((
        v["slot"].as_str()?.to_owned(),
        v["consistent_point"].as_str()?.to_owned(),
    ))
}

pub(super) async fn save_slot_record(ctx: &Ctx, consistent_point: &str) -> Result<(), String> {
    let ns = Namespace::new(POSITIONS_NAMESPACE).expect("a valid name");
    let key = Key::new(&slot_record_key(ctx)).map_err(|e| e.to_string())?;
    let record = json!({
        "slot": ctx.connector.slot,
        "consistent_point": consistent_point,
        "created_ms": asp_store::clock::wall_ms(),
        "node": ctx.node.to_string(),
    });
    let op = WriteOp::put(
        key,
        ContentType::Json,
        serde_json::to_vec(&record).expect("JSON"),
    );
    loop {
        match ctx.store.write(ns.clone(), vec![op.clone()]).await {
            Ok(_) => return Ok(()),
            Err(asp_store::WriteError::Overloaded { .. }) if !ctx.shutdown.is_cancelled() => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => return Err(format!("recording the new slot: {e}")),
        }
    }
}
