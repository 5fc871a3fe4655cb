//! Webhooks (`kind = "webhook"`, out only): each change is one `POST` of a JSON body
//! signed as Standard Webhooks sign it (`webhook-id`, `webhook-timestamp`,
//! `webhook-signature: v1,<base64 HMAC-SHA256 of "id.timestamp.body">`). The id is the
//! event's dot, the same on every attempt, so a receiver dedupes by it. A delivery that
//! fails is tried again with backoff; after `attempts` failures the event goes to the
//! dead-letter namespace and the next one is sent.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use serde_json::json;

use crate::runtime::{Backoff, Ctx, OutMessage, Sink, Undelivered, text_or_base64};
use crate::status::Side;

/// The bytes a secret signs with: a `whsec_` secret is base64 after the prefix (the
/// Standard Webhooks form); any other text is used as it is.
pub(crate) fn secret_bytes(secret: &str) -> Result<Vec<u8>, String> {
    match secret.strip_prefix("whsec_") {
        Some(b64) => match base64::engine::general_purpose::STANDARD.decode(b64) {
            Ok(key) if key.len() >= 16 => Ok(key),
            Ok(key) => Err(format!(
                "secret: the key after whsec_ is {} bytes; use at least 16",
                key.len()
            )),
            Err(e) => Err(format!("secret: after whsec_ comes base64: {e}")),
        },
        None if secret.len() < 16 => {
            Err("secret: use at least 16 characters (or whsec_ and base64)".into())
        }
        None => Ok(secret.as_bytes().to_vec()),
    }
}

/// `v1,<signature>` of one delivery.
pub fn sign(secret: &[u8], id: &str, timestamp: u64, body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    let mut ctx = ring::hmac::Context::with_key(&key);
    ctx.update(id.as_bytes());
    ctx.update(b".");
    ctx.update(timestamp.to_string().as_bytes());
    ctx.update(b".");
    ctx.update(body);
    let tag = ctx.sign();
    format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(tag.as_ref())
    )
}

pub(crate) struct WebhookSink {
    client: reqwest::Client,
    ctx: Arc<Ctx>,
    /// Where failed attempts are reported (state, errors, last error).
    side: Arc<Side>,
}

pub(crate) async fn sink(ctx: Arc<Ctx>, side: Arc<Side>) -> Result<WebhookSink, String> {
    let roots = match &ctx.connector.ca {
        Some(roots) => roots.clone(),
        None => {
            let found = rustls_native_certs::load_native_certs();
            let mut roots = rustls::RootCertStore::empty();
            let (added, _) = roots.add_parsable_certificates(found.certs);
            if added == 0 && ctx.connector.url.starts_with("https://") {
                return Err(format!(
                    "no system CA certificates found ({:?}); give the receiver's CA bundle as ca = \"FILE\"",
                    found.errors.first().map(|e| e.to_string())
                ));
            }
            Arc::new(roots)
        }
    };
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| format!("TLS: {e}"))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let client = reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .timeout(Duration::from_secs(10))
        .connect_timeout(Duration::from_secs(5))
        .build()
        .map_err(|e| format!("building the HTTP client: {e}"))?;
    Ok(WebhookSink { client, ctx, side })
}

impl WebhookSink {
    fn body(&self, m: &OutMessage) -> Vec<u8> {
        let c = &self.ctx.connector;
        let value = m.value.as_ref().map(|(ct, v)| match ct {
            asp_core::ContentType::Json => serde_json::from_slice::<serde_json::Value>(v)
                .unwrap_or_else(|_| text_or_base64(*ct, v)),
            _ => text_or_base64(*ct, v),
        });
        serde_json::to_vec(&json!({
            "type": format!("asp.{}", m.op()),
            "timestamp": m.hlc.physical_ms(),
            "data": {
                "namespace": c.namespace.as_str(),
                "key": m.key,
                "op": m.op(),
                "value": value,
                "content_type": m.value.as_ref().map(|(ct, _)| ct.mime()),
                "origin": m.dot.origin.to_string(),
                "dot": m.dot.to_string(),
                "version": m.hlc.to_string(),
                "cluster": self.ctx.cluster,
            }
        }))
        .expect("JSON")
    }

    /// One attempt: `Ok` on a 2xx answer.
    async fn attempt(&self, id: &str, body: &[u8]) -> Result<(), String> {
        let c = &self.ctx.connector;
        let timestamp = asp_store::clock::wall_ms() / 1000;
        let answer = self
            .client
            .post(&c.url)
            .header("content-type", "application/json")
            .header("webhook-id", id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", sign(&c.secret, id, timestamp, body))
            .body(body.to_vec())
            .send()
            .await
            .map_err(|e| {
                // The causes say why (a refused connection, a certificate from an
                // unknown CA); the URL, with any password, is left out.
                let e = e.without_url();
                let mut why = e.to_string();
                let mut cause = std::error::Error::source(&e);
                while let Some(c) = cause {
                    why.push_str(": ");
                    why.push_str(&c.to_string());
                    cause = c.source();
                }
                format!("POST {}: {why}", crate::config::redacted(&c.url))
            })?;
        let status = answer.status();
        if status.is_success() {
            Ok(())
        } else {
            Err(format!(
                "POST {} answered {status}",
                crate::config::redacted(&c.url)
            ))
        }
    }
}

impl Sink for WebhookSink {
    async fn send(&mut self, batch: &[OutMessage]) -> Result<Undelivered, String> {
        let attempts = self.ctx.connector.attempts;
        let mut undelivered = Vec::new();
        for (i, m) in batch.iter().enumerate() {
            let id = m.dot.to_string();
            let body = self.body(m);
            let backoff = Backoff::new();
            let mut tried = 0;
            loop {
                tried += 1;
                match self.attempt(&id, &body).await {
                    Ok(()) => {
                        if tried > 1 {
                            self.side.set_state("running");
                        }
                        break;
                    }
                    Err(e) if tried >= attempts => {
                        self.side.error(format!("event {id}: attempt {tried}: {e}"));
                        self.side.set_state("running");
                        undelivered.push((i, format!("{tried} attempts failed; the last: {e}")));
                        break;
                    }
                    Err(e) => {
                        self.side.error(format!("event {id}: attempt {tried}: {e}"));
                        if !backoff.wait(&self.ctx.shutdown).await {
                            return Err("stopping".into());
                        }
                    }
                }
            }
        }
        Ok(undelivered)
    }
}
