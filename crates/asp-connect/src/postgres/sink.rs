//! PostgreSQL's out side: each change of the namespace upserted into `table` (`key text
//! primary key, value jsonb, version text, origin text`, created if missing), deletes
//! delete the row, one transaction per batch.

use std::collections::HashMap;
use std::sync::Arc;

use asp_core::ContentType;
use serde_json::json;
use tokio_postgres::Client;

use super::connect_sql;
use crate::runtime::{Ctx, OutMessage, Sink, Undelivered};
use crate::status::Side;

pub(crate) struct PostgresSink {
    ctx: Arc<Ctx>,
    sql: Client,
}

pub(crate) async fn sink(ctx: Arc<Ctx>, side: Arc<Side>) -> Result<PostgresSink, String> {
    let sql = connect_sql(&ctx).await?;
    let table = &ctx.connector.table;
    sql.batch_execute(&format!(
        "CREATE TABLE IF NOT EXISTS {table} (key text PRIMARY KEY, value jsonb, version text, origin text)"
    ))
    .await
    .map_err(|e| format!("creating table {table}: {e}"))?;
    side.set_detail(json!({"table": table}));
    Ok(PostgresSink { ctx, sql })
}

/// A value as JSON text for a `jsonb` column: JSON as it is, text as a JSON string,
/// other content types as JSON when they convert, else `{"base64": ...}`.
fn json_text(ct: ContentType, v: &[u8]) -> String {
    match ct {
        ContentType::Json => String::from_utf8_lossy(v).into_owned(),
        ContentType::Text => crate::runtime::text_or_base64(ct, v).to_string(),
        _ => match asp_http::formats::convert(v, ct, ContentType::Json) {
            Ok(j) => String::from_utf8_lossy(&j).into_owned(),
            Err(_) => crate::runtime::text_or_base64(ct, v).to_string(),
        },
    }
}

impl Sink for PostgresSink {
    async fn send(&mut self, batch: &[OutMessage]) -> Result<Undelivered, String> {
        let table = &self.ctx.connector.table;
        let mut undelivered = Vec::new();
        // One transaction: only each key's last change of the batch matters.
        let mut last: HashMap<&str, usize> = HashMap::new();
        for (i, m) in batch.iter().enumerate() {
            last.insert(&m.key, i);
        }
        let (mut keys, mut values, mut versions, mut origins, mut deleted) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (i, m) in batch.iter().enumerate() {
            if last[m.key.as_str()] != i {
                continue;
            }
            match &m.value {
                Some((ct, v)) => {
                    let text = json_text(*ct, v);
                    // jsonb refuses the NUL character.
                    if text.contains("\\u0000") {
                        undelivered.push((i, "jsonb cannot hold the character U+0000".to_owned()));
                        continue;
                    }
                    keys.push(m.key.clone());
                    values.push(text);
                    versions.push(m.hlc.to_string());
                    origins.push(m.dot.origin.to_string());
                }
                None => deleted.push(m.key.clone()),
            }
        }
        let tx = self
            .sql
            .transaction()
            .await
            .map_err(|e| format!("BEGIN on {table}: {e}"))?;
        if !keys.is_empty() {
            tx.execute(
                &format!(
                    "INSERT INTO {table} (key, value, version, origin) \
                     SELECT k, v::jsonb, ver, o FROM unnest($1::text[], $2::text[], $3::text[], $4::text[]) AS u(k, v, ver, o) \
                     ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value, version = EXCLUDED.version, origin = EXCLUDED.origin"
                ),
                &[&keys, &values, &versions, &origins],
            )
            .await
            .map_err(|e| format!("upserting into {table}: {e}"))?;
        }
        if !deleted.is_empty() {
            tx.execute(
                &format!("DELETE FROM {table} WHERE key = ANY($1::text[])"),
                &[&deleted],
            )
            .await
            .map_err(|e| format!("deleting from {table}: {e}"))?;
        }
        tx.commit()
            .await
            .map_err(|e| format!("COMMIT on {table}: {e}"))?;
        Ok(undelivered)
    }
}
