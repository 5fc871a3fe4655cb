//! Redis Streams (`kind = "redis-stream"`): out adds one entry per change (`XADD`,
//! pipelined per batch) with the fields `key`, `value` (JSON text), `op`, `origin`,
//! `dot`, `version` and `cluster`; in reads through a consumer group (`XREADGROUP`),
//! acknowledges after the write (`XACK`), claims entries stuck with another consumer
//! (`XAUTOCLAIM`), and stores the entry id as the source position.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use asp_core::ContentType;
use bytes::Bytes;
use redis::Value;
use redis::aio::MultiplexedConnection;
use redis::streams::{StreamAutoClaimReply, StreamId, StreamReadReply};

use crate::runtime::{Ctx, InMessage, OutMessage, Position, Sink, Source, Undelivered};

/// An entry another consumer holds unacknowledged this long is claimed.
const CLAIM_IDLE_MS: u64 = 30_000;

async fn connect(ctx: &Ctx) -> Result<MultiplexedConnection, String> {
    let c = &ctx.connector;
    let client = redis::Client::open(c.url.as_str())
        .map_err(|e| format!("url {}: {e}", crate::config::redacted(&c.url)))?;
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(5)))
        .set_response_timeout(Some(Duration::from_secs(10)));
    client
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .map_err(|e| format!("connecting to {}: {e}", crate::config::redacted(&c.url)))
}

pub(crate) struct RedisSink {
    con: MultiplexedConnection,
    ctx: Arc<Ctx>,
}

pub(crate) async fn sink(ctx: Arc<Ctx>) -> Result<RedisSink, String> {
    Ok(RedisSink {
        con: connect(&ctx).await?,
        ctx,
    })
}

impl Sink for RedisSink {
    async fn send(&mut self, batch: &[OutMessage]) -> Result<Undelivered, String> {
        let c = &self.ctx.connector;
        let mut pipe = redis::pipe();
        for m in batch {
            let cmd = pipe.cmd("XADD").arg(&c.stream).arg("*");
            cmd.arg("key").arg(&m.key).arg("op").arg(m.op());
            if let Some((ct, v)) = &m.value {
                // The value as JSON text when it has one; as it is, with its type, if not.
                match asp_http::formats::convert(v, *ct, ContentType::Json) {
                    Ok(json) => {
                        cmd.arg("value").arg(json);
                    }
                    Err(_) => {
                        cmd.arg("value")
                            .arg(&v[..])
                            .arg("content_type")
                            .arg(ct.mime());
                    }
                }
            }
            cmd.arg("origin")
                .arg(m.dot.origin.to_string())
                .arg("dot")
                .arg(m.dot.to_string())
                .arg("version")
                .arg(m.hlc.to_string())
                .arg("cluster")
                .arg(&self.ctx.cluster)
                .ignore();
        }
        pipe.query_async::<()>(&mut self.con)
            .await
            .map_err(|e| format!("XADD to {}: {e}", c.stream))?;
        Ok(Vec::new())
    }
}

pub(crate) struct RedisSource {
    con: MultiplexedConnection,
    ctx: Arc<Ctx>,
    consumer: String,
    /// Reading this consumer's own unacknowledged entries first (after a restart).
    pending_first: bool,
    last_claim: Option<Instant>,
    claim_cursor: String,
    last: Option<Position>,
}

pub(crate) async fn source(ctx: Arc<Ctx>, stored: Option<Position>) -> Result<RedisSource, String> {
    let c = &ctx.connector;
    let mut con = connect(&ctx).await?;
    let start = stored.map_or("0".to_owned(), |p| p.render(true));
    let created: Result<(), redis::RedisError> = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&c.stream)
        .arg(&c.group)
        .arg(&start)
        .arg("MKSTREAM")
        .query_async(&mut con)
        .await;
    if let Err(e) = created
        && e.code() != Some("BUSYGROUP")
    {
        return Err(format!(
            "creating consumer group {} on {}: {e}",
            c.group, c.stream
        ));
    }
    Ok(RedisSource {
        con,
        consumer: format!("asp-{}", ctx.node),
        ctx,
        pending_first: true,
        last_claim: None,
        claim_cursor: "0-0".to_owned(),
        last: stored,
    })
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Int(i) => Some(i.to_string()),
        _ => None,
    }
}

fn message(entry: StreamId) -> Result<InMessage, String> {
    let position = Position::parse(&entry.id)
        .ok_or_else(|| format!("entry id {:?} is not ms-seq", entry.id))?;
    let map: HashMap<String, Value> = entry.map;
    let field = |name: &str| map.get(name).and_then(text);
    let value = match map.get("value") {
        Some(Value::BulkString(b)) => Bytes::copy_from_slice(b),
        Some(v) => Bytes::from(text(v).unwrap_or_default()),
        None => Bytes::new(),
    };
    let mut fields: Vec<(String, String)> = map
        .iter()
        .filter(|(k, _)| k.as_str() != "value")
        .map(|(k, v)| (k.clone(), text(v).unwrap_or_default()))
        .collect();
    fields.sort();
    Ok(InMessage {
        position,
        key: field("key"),
        op: field("op"),
        content_type: field("content_type"),
        value,
        cluster: field("cluster"),
        fields,
        ..Default::default()
    })
}

impl RedisSource {
    /// `XREADGROUP` of this consumer from `id` (`0`: its pending entries; `>`: new
    /// ones), waiting up to `block_ms` for some.
    async fn read_group(
        &mut self,
        id: &str,
        block_ms: Option<u64>,
        max: usize,
    ) -> Result<Vec<StreamId>, String> {
        let c = &self.ctx.connector;
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(&c.group)
            .arg(&self.consumer)
            .arg("COUNT")
            .arg(max);
        if let Some(ms) = block_ms {
            cmd.arg("BLOCK").arg(ms);
        }
        let reply: Option<StreamReadReply> = cmd
            .arg("STREAMS")
            .arg(&c.stream)
            .arg(id)
            .query_async(&mut self.con)
            .await
            .map_err(|e| format!("XREADGROUP ({id}) on {}: {e}", c.stream))?;
        Ok(reply
            .into_iter()
            .flat_map(|r| r.keys)
            .flat_map(|k| k.ids)
            .collect())
    }
}

impl Source for RedisSource {
    async fn fetch(&mut self, max: usize) -> Result<Vec<InMessage>, String> {
        let c = &self.ctx.connector;
        let claim_due = self
            .last_claim
            .is_none_or(|t| t.elapsed() >= Duration::from_millis(CLAIM_IDLE_MS / 2));
        let entries = if self.pending_first {
            // This consumer's own entries, delivered before a restart and not acknowledged.
            let entries = self.read_group("0", None, max).await?;
            if entries.is_empty() {
                self.pending_first = false;
            }
            entries
        } else if claim_due {
            let reply: StreamAutoClaimReply = redis::cmd("XAUTOCLAIM")
                .arg(&c.stream)
                .arg(&c.group)
                .arg(&self.consumer)
                .arg(CLAIM_IDLE_MS)
                .arg(&self.claim_cursor)
                .arg("COUNT")
                .arg(max)
                .query_async(&mut self.con)
                .await
                .map_err(|e| format!("XAUTOCLAIM on {}: {e}", c.stream))?;
            self.claim_cursor = reply.next_stream_id;
            if self.claim_cursor == "0-0" {
                self.last_claim = Some(Instant::now());
            }
            reply.claimed
        } else {
            self.read_group(">", Some(1000), max).await?
        };
        let mut out = Vec::with_capacity(entries.len());
        for e in entries {
            let m = message(e)?;
            self.last = self.last.max(Some(m.position));
            out.push(m);
        }
        // Claimed entries may be older than those read before: the runtime compares
        // each with the stored position, so sort them into the source's order.
        out.sort_by_key(|m| m.position);
        Ok(out)
    }

    async fn ack(&mut self, batch: &[InMessage]) -> Result<(), String> {
        if batch.is_empty() {
            return Ok(());
        }
        let c = &self.ctx.connector;
        let mut cmd = redis::cmd("XACK");
        cmd.arg(&c.stream).arg(&c.group);
        for m in batch {
            cmd.arg(m.position.render(true));
        }
        cmd.query_async::<()>(&mut self.con)
            .await
            .map_err(|e| format!("XACK on {}: {e}", c.stream))
    }

    async fn head(&mut self) -> Option<(String, u64)> {
        let c = &self.ctx.connector;
        let groups: Vec<HashMap<String, Value>> = redis::cmd("XINFO")
            .arg("GROUPS")
            .arg(&c.stream)
            .query_async(&mut self.con)
            .await
            .ok()?;
        let group = groups
            .into_iter()
            .find(|g| g.get("name").and_then(text).as_deref() == Some(c.group.as_str()))?;
        let num = |name: &str| match group.get(name) {
            Some(Value::Int(i)) => (*i).max(0) as u64,
            _ => 0,
        };
        let lag = num("lag") + num("pending");
        let last: Vec<StreamId> = redis::cmd("XREVRANGE")
            .arg(&c.stream)
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1)
            .query_async::<redis::streams::StreamRangeReply>(&mut self.con)
            .await
            .ok()?
            .ids;
        let head = last.first().map(|e| e.id.clone()).unwrap_or_default();
        Some((head, lag))
    }
}
