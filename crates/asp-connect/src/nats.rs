//! NATS JetStream (`kind = "nats"`): out publishes each change to `<subject>.<key>`
//! with the asp headers and waits for the stream's acknowledgements; in reads
//! `<subject>.>` from an ephemeral consumer that starts just after the stored stream
//! sequence, so the stream sequence is the source position.

use std::sync::Arc;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, consumer, stream};
use bytes::Bytes;
use futures_util::StreamExt;

use crate::runtime::{Ctx, InMessage, OutMessage, Position, Sink, Source, Undelivered};

/// How long a request to the server (a publish's acknowledgement, stream info) waits.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

async fn connect(ctx: &Ctx) -> Result<(jetstream::Context, stream::Stream), String> {
    let c = &ctx.connector;
    let client = async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(5))
        .request_timeout(Some(REQUEST_TIMEOUT))
        .connect(c.url.as_str())
        .await
        .map_err(|e| format!("connecting to {}: {e}", crate::config::redacted(&c.url)))?;
    let js = jetstream::new(client);
    let stream = js
        .get_or_create_stream(stream::Config {
            name: c.stream.clone(),
            subjects: vec![format!("{}.>", c.subject)],
            ..Default::default()
        })
        .await
        .map_err(|e| format!("finding or creating stream {}: {e}", c.stream))?;
    Ok((js, stream))
}

/// The subject a key is published to: `<subject>.<key>`, with the bytes a subject
/// cannot hold (whitespace, `*`, `>`, `%`, and a `.` that would make an empty token)
/// written `%XX`. The `asp-key` header always holds the key as it is.
pub fn subject_for(prefix: &str, key: &str) -> String {
    let mut out = String::with_capacity(prefix.len() + 1 + key.len());
    out.push_str(prefix);
    out.push('.');
    let bytes = key.as_bytes();
    for (i, ch) in key.char_indices() {
        // Every byte that needs escaping is ASCII; other characters go as they are.
        let b = if ch.is_ascii() { ch as u8 } else { b'a' };
        let empty_token =
            b == b'.' && (i == 0 || i + 1 == bytes.len() || bytes.get(i + 1) == Some(&b'.'));
        let bad = b <= b' ' || b == 0x7f || matches!(b, b'*' | b'>' | b'%') || empty_token;
        if bad {
            out.push_str(&format!("%{b:02X}"));
        } else {
            out.push(ch);
        }
    }
    out
}

/// The key a subject's suffix names: `%XX` (as [`subject_for`] writes it) decoded; a
/// `%` not followed by two hex digits stays as it is.
pub fn key_of_subject(suffix: &str) -> String {
    let bytes = suffix.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(hex) = suffix.get(i + 1..i + 3)
            && let Ok(b) = u8::from_str_radix(hex, 16)
        {
            out.push(b);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).unwrap_or_else(|_| suffix.to_owned())
}

pub(crate) struct NatsSink {
    js: jetstream::Context,
    ctx: Arc<Ctx>,
}

pub(crate) async fn sink(ctx: Arc<Ctx>) -> Result<NatsSink, String> {
    let (js, _) = connect(&ctx).await?;
    Ok(NatsSink { js, ctx })
}

impl Sink for NatsSink {
    async fn send(&mut self, batch: &[OutMessage]) -> Result<Undelivered, String> {
        let c = &self.ctx.connector;
        let mut acks = Vec::with_capacity(batch.len());
        for m in batch {
            let mut headers = HeaderMap::new();
            for (name, value) in m.headers(&self.ctx.cluster) {
                headers.insert(name, value.as_str());
            }
            // A consumer that dedupes by JetStream's own id gets it too.
            headers.insert("Nats-Msg-Id", m.dot.to_string().as_str());
            let payload = m.value.as_ref().map(|(_, v)| v.clone()).unwrap_or_default();
            let ack = self
                .js
                .publish_with_headers(subject_for(&c.subject, &m.key), headers, payload)
                .await
                .map_err(|e| format!("publishing to {}: {e}", c.subject))?;
            acks.push(ack);
        }
        for ack in acks {
            ack.await
                .map_err(|e| format!("waiting for stream {}'s acknowledgement: {e}", c.stream))?;
        }
        Ok(Vec::new())
    }
}

pub(crate) struct NatsSource {
    stream: stream::Stream,
    consumer: consumer::PullConsumer,
    prefix: String,
    last: Option<Position>,
    /// The last message of each batch `fetch` returned and `ack` did not acknowledge
    /// yet, oldest first (the runtime fetches the next batch while it writes one).
    unacked: std::collections::VecDeque<jetstream::Message>,
}

pub(crate) async fn source(ctx: Arc<Ctx>, stored: Option<Position>) -> Result<NatsSource, String> {
    let c = &ctx.connector;
    let (_, stream) = connect(&ctx).await?;
    let deliver_policy = match stored {
        Some(p) => consumer::DeliverPolicy::ByStartSequence {
            start_sequence: p.0 + 1,
        },
        None => consumer::DeliverPolicy::All,
    };
    let consumer = stream
        .create_consumer(consumer::pull::Config {
            deliver_policy,
            ack_policy: consumer::AckPolicy::All,
            filter_subject: format!("{}.>", c.subject),
            inactive_threshold: Duration::from_secs(60),
            ..Default::default()
        })
        .await
        .map_err(|e| format!("creating a consumer on stream {}: {e}", c.stream))?;
    Ok(NatsSource {
        stream,
        consumer,
        prefix: format!("{}.", c.subject),
        last: stored,
        unacked: std::collections::VecDeque::new(),
    })
}

impl Source for NatsSource {
    async fn fetch(&mut self, max: usize) -> Result<Vec<InMessage>, String> {
        let mut batch = self
            .consumer
            .fetch()
            .max_messages(max)
            .expires(Duration::from_secs(1))
            .messages()
            .await
            .map_err(|e| format!("fetching: {e}"))?;
        let mut out = Vec::new();
        let mut last_msg = None;
        while let Some(m) = batch.next().await {
            let m = m.map_err(|e| format!("fetching: {e}"))?;
            let info = m
                .info()
                .map_err(|e| format!("a message without its info: {e}"))?;
            let position = Position(info.stream_sequence, 0);
            let header = |name: &str| {
                m.headers
                    .as_ref()
                    .and_then(|h| h.get(name))
                    .map(|v| v.as_str().to_owned())
            };
            let key = header("asp-key").or_else(|| {
                m.subject
                    .as_str()
                    .strip_prefix(&self.prefix)
                    .map(key_of_subject)
            });
            let fields = m
                .headers
                .as_ref()
                .map(|h| {
                    h.iter()
                        .flat_map(|(k, vs)| {
                            vs.iter()
                                .map(move |v| (k.to_string(), v.as_str().to_owned()))
                        })
                        .collect()
                })
                .unwrap_or_default();
            out.push(InMessage {
                position,
                key,
                op: header("asp-op"),
                content_type: header("content-type").or_else(|| header("Content-Type")),
                value: Bytes::copy_from_slice(&m.payload),
                cluster: header("asp-cluster"),
                fields,
                ..Default::default()
            });
            self.last = Some(position);
            last_msg = Some(m);
        }
        self.unacked.extend(last_msg);
        Ok(out)
    }

    /// After the batch is written: AckPolicy::All, so acknowledging its last message
    /// acknowledges every earlier one. (The stored position, not the acknowledgement,
    /// decides where a new consumer starts; acknowledging only after the write keeps a
    /// work-queue or interest stream from dropping what was not written.)
    async fn ack(&mut self, _batch: &[InMessage]) -> Result<(), String> {
        if let Some(m) = self.unacked.pop_front() {
            m.ack()
                .await
                .map_err(|e| format!("acknowledging to the stream: {e}"))?;
        }
        Ok(())
    }

    async fn head(&mut self) -> Option<(String, u64)> {
        let info = self.stream.info().await.ok()?;
        let head = info.state.last_sequence;
        let at = self.last.map_or(0, |p| p.0);
        Some((head.to_string(), head.saturating_sub(at)))
    }
}

#[cfg(test)]
mod tests {
    use super::subject_for;

    #[test]
    fn subjects_escape_what_nats_cannot_hold_and_keep_the_rest() {
        assert_eq!(subject_for("p", "a.b"), "p.a.b");
        assert_eq!(subject_for("p", "a b/é"), "p.a%20b/é");
        assert_eq!(subject_for("p", ".a..b."), "p.%2Ea%2E.b%2E");
        assert_eq!(subject_for("p", "*>%\t"), "p.%2A%3E%25%09");
        assert_eq!(subject_for("p", "日本"), "p.日本");
    }

    #[test]
    fn subject_keys_decode_back() {
        use super::key_of_subject;
        for key in ["a.b", "a b/é", ".a..b.", "*>%\t", "日本", "100%"] {
            let subject = subject_for("p", key);
            assert_eq!(key_of_subject(subject.strip_prefix("p.").unwrap()), key);
        }
        assert_eq!(key_of_subject("50%zz"), "50%zz");
    }

    proptest::proptest! {
        /// Any key goes to a subject of literal, non-empty tokens and comes back whole.
        #[test]
        fn any_key_round_trips_through_its_subject(key in "\\PC{1,40}|[ .*>%a-z]{1,12}") {
            let subject = subject_for("p", &key);
            for token in subject.split('.') {
                proptest::prop_assert!(!token.is_empty(), "{subject}");
                proptest::prop_assert!(!token.contains(['*', '>', ' ', '\t']), "{subject}");
            }
            proptest::prop_assert_eq!(super::key_of_subject(subject.strip_prefix("p.").unwrap()), key);
        }

        /// Decoding any suffix and any position text never panics.
        #[test]
        fn any_text_decodes_or_is_refused(text in "\\PC{0,40}") {
            let _ = super::key_of_subject(&text);
            let _ = crate::runtime::Position::parse(&text);
        }
    }
}
