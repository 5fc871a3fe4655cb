//! A connector's configuration (`[[connectors]]` in the node's configuration file),
//! checked before anything starts: every mistake is named with the connector's name.

use std::time::Duration;

use asp_core::Namespace;
use serde::{Deserialize, Serialize};

/// The most connectors one node runs.
pub const CONNECTORS_MAX: usize = 64;
/// The most messages one batch carries, either way.
pub const BATCH_MAX: usize = 1000;
/// Webhook deliveries tried before an event goes to the dead-letter namespace.
pub const DEFAULT_WEBHOOK_ATTEMPTS: u32 = 8;
/// The longest a connector waits between reconnection attempts.
pub const BACKOFF_MAX: Duration = Duration::from_secs(10);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    Nats,
    RedisStream,
    Webhook,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Nats => "nats",
            Kind::RedisStream => "redis-stream",
            Kind::Webhook => "webhook",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    In,
    Out,
    Both,
}

impl Direction {
    pub fn sends(self) -> bool {
        matches!(self, Direction::Out | Direction::Both)
    }
    pub fn receives(self) -> bool {
        matches!(self, Direction::In | Direction::Both)
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::In => "in",
            Direction::Out => "out",
            Direction::Both => "both",
        }
    }
}

/// One `[[connectors]]` table, as written.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectorConfig {
    /// Unique on the node: `[a-z0-9_-]`, 1 to 64 characters.
    pub name: String,
    pub kind: Kind,
    pub direction: Direction,
    pub namespace: String,
    pub url: String,
    /// NATS: out publishes to `<subject>.<key>`; in reads `<subject>.>`.
    pub subject: Option<String>,
    /// NATS: the JetStream stream (created if missing). Redis: the stream's key.
    pub stream: Option<String>,
    /// Redis: the consumer group in reads (default `asp-<name>`).
    pub group: Option<String>,
    /// Webhook: the Standard Webhooks secret (`whsec_` + base64, or any text).
    pub secret: Option<String>,
    /// Webhook: deliveries tried before an event goes to the dead-letter namespace.
    pub attempts: Option<u32>,
    /// Webhook: a PEM bundle of the CAs an `https://` receiver's certificate is checked
    /// against (default: the system's roots).
    pub ca: Option<String>,
    /// Where malformed messages (and undeliverable webhook events) go, with the reason
    /// (default `<namespace>.dead`).
    pub dead_letter: Option<String>,
    /// Messages per batch, either way (default 256, at most 1000).
    pub batch: Option<usize>,
}

/// A checked connector configuration.
#[derive(Clone, Debug)]
pub struct Connector {
    pub name: String,
    pub kind: Kind,
    pub direction: Direction,
    pub namespace: Namespace,
    pub url: String,
    pub subject: String,
    pub stream: String,
    pub group: String,
    pub secret: Vec<u8>,
    pub attempts: u32,
    /// Webhook: the trust anchors of `ca`, read and checked at start.
    pub ca: Option<std::sync::Arc<rustls::RootCertStore>>,
    pub dead_letter: Namespace,
    pub batch: usize,
}

/// Checks every connector of a configuration; the error names the connector and what
/// is wrong with it.
pub fn check(configs: &[ConnectorConfig]) -> Result<Vec<Connector>, String> {
    if configs.len() > CONNECTORS_MAX {
        return Err(format!(
            "{} connectors are configured; a node runs at most {CONNECTORS_MAX}",
            configs.len()
        ));
    }
    let mut out: Vec<Connector> = Vec::with_capacity(configs.len());
    for c in configs {
        let checked = check_one(c).map_err(|e| format!("connector {:?}: {e}", c.name))?;
        if out.iter().any(|o| o.name == checked.name) {
            return Err(format!(
                "connector {:?}: two connectors have this name; names are unique",
                c.name
            ));
        }
        out.push(checked);
    }
    Ok(out)
}

fn check_one(c: &ConnectorConfig) -> Result<Connector, String> {
    if c.name.is_empty()
        || c.name.len() > 64
        || !c
            .name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
    {
        return Err("a name is 1 to 64 of a-z, 0-9, '_' and '-'".into());
    }
    let namespace =
        Namespace::new(&c.namespace).map_err(|e| format!("namespace {:?}: {e}", c.namespace))?;
    if c.namespace.starts_with("_asp.") {
        return Err(format!(
            "namespace {:?} is one of asp's own (_asp.*); connect a namespace of yours",
            c.namespace
        ));
    }
    let dead_name = c
        .dead_letter
        .clone()
        .unwrap_or_else(|| format!("{}.dead", c.namespace));
    let dead_letter = Namespace::new(&dead_name)
        .map_err(|e| format!("dead_letter namespace {dead_name:?}: {e}"))?;
    if dead_name.starts_with("_asp.") {
        return Err(format!(
            "dead_letter namespace {dead_name:?} is one of asp's own (_asp.*)"
        ));
    }
    if dead_letter == namespace {
        return Err("dead_letter must be another namespace than the connected one".into());
    }
    let batch = c.batch.unwrap_or(256);
    if batch == 0 || batch > BATCH_MAX {
        return Err(format!("batch is 1 to {BATCH_MAX}; got {batch}"));
    }
    let need = |field: &Option<String>, what: &str| -> Result<String, String> {
        match field {
            Some(v) if !v.trim().is_empty() => Ok(v.clone()),
            _ => Err(format!("kind = \"{}\" needs {what}", c.kind.as_str())),
        }
    };
    let refuse = |field: bool, what: &str| -> Result<(), String> {
        if field {
            Err(format!(
                "{what} is not a setting of kind = \"{}\"",
                c.kind.as_str()
            ))
        } else {
            Ok(())
        }
    };
    let mut connector = Connector {
        name: c.name.clone(),
        kind: c.kind,
        direction: c.direction,
        namespace,
        url: c.url.clone(),
        subject: String::new(),
        stream: String::new(),
        group: String::new(),
        secret: Vec::new(),
        attempts: 0,
        ca: None,
        dead_letter,
        batch,
    };
    match c.kind {
        Kind::Nats => {
            if !c.url.starts_with("nats://") {
                return Err(format!("url must be nats://HOST:PORT; got {:?}", c.url));
            }
            let subject = need(
                &c.subject,
                "subject = \"...\" (messages go to <subject>.<key>)",
            )?;
            if subject
                .split('.')
                .any(|t| t.is_empty() || t.contains(['*', '>', ' ', '\t']))
            {
                return Err(format!(
                    "subject {subject:?} is not a NATS subject of literal tokens (no '*', '>', spaces or empty tokens)"
                ));
            }
            let stream = need(&c.stream, "stream = \"...\" (the JetStream stream)")?;
            if !stream
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            {
                return Err(format!(
                    "stream {stream:?}: a JetStream stream's name is letters, digits, '_' and '-'"
                ));
            }
            refuse(c.group.is_some(), "group")?;
            refuse(c.secret.is_some(), "secret")?;
            refuse(c.attempts.is_some(), "attempts")?;
            refuse(c.ca.is_some(), "ca")?;
            connector.subject = subject;
            connector.stream = stream;
        }
        Kind::RedisStream => {
            if c.url.starts_with("rediss://") {
                return Err("url: TLS to Redis (rediss://) is not built yet; use redis://".into());
            }
            if !c.url.starts_with("redis://") {
                return Err(format!(
                    "url must be redis://[USER:PASSWORD@]HOST:PORT[/DB]; got {:?}",
                    redacted(&c.url)
                ));
            }
            connector.stream = need(&c.stream, "stream = \"...\" (the stream's key)")?;
            connector.group = c.group.clone().unwrap_or_else(|| format!("asp-{}", c.name));
            refuse(c.subject.is_some(), "subject")?;
            refuse(c.secret.is_some(), "secret")?;
            refuse(c.attempts.is_some(), "attempts")?;
            refuse(c.ca.is_some(), "ca")?;
        }
        Kind::Webhook => {
            if c.direction != Direction::Out {
                return Err(format!(
                    "a webhook only sends: direction = \"out\", not {:?}",
                    c.direction.as_str()
                ));
            }
            if !(c.url.starts_with("http://") || c.url.starts_with("https://")) {
                return Err(format!("url must be http:// or https://; got {:?}", c.url));
            }
            let secret = need(&c.secret, "secret = \"...\" (signs each delivery)")?;
            connector.secret = crate::webhook::secret_bytes(&secret)?;
            let attempts = c.attempts.unwrap_or(DEFAULT_WEBHOOK_ATTEMPTS);
            if !(1..=100).contains(&attempts) {
                return Err(format!("attempts is 1 to 100; got {attempts}"));
            }
            connector.attempts = attempts;
            if let Some(path) = &c.ca {
                let path = std::path::Path::new(path);
                let pem = std::fs::read(path)
                    .map_err(|e| format!("ca: cannot read {}: {e}", path.display()))?;
                connector.ca = Some(asp_tls::roots(path, &pem).map_err(|e| format!("ca: {e}"))?);
            }
            refuse(c.subject.is_some(), "subject")?;
            refuse(c.stream.is_some(), "stream")?;
            refuse(c.group.is_some(), "group")?;
        }
    }
    Ok(connector)
}

/// A URL as status and logs show it: a password in it replaced by `***`.
pub fn redacted(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
            let shown = if userinfo.contains(':') {
                format!("{user}:***")
            } else {
                "***".to_owned()
            };
            format!("{scheme}://{shown}@{host}{path}")
        }
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base(kind: Kind, direction: Direction, url: &str) -> ConnectorConfig {
        ConnectorConfig {
            name: "c".into(),
            kind,
            direction,
            namespace: "orders".into(),
            url: url.into(),
            subject: None,
            stream: Some("S".into()),
            group: None,
            secret: None,
            attempts: None,
            ca: None,
            dead_letter: None,
            batch: None,
        }
    }

    #[test]
    fn passwords_are_not_shown() {
        assert_eq!(redacted("redis://:pw@h:6379/0"), "redis://:***@h:6379/0");
        assert_eq!(redacted("redis://u:pw@h:6379"), "redis://u:***@h:6379");
        assert_eq!(redacted("nats://token@h:4222"), "nats://***@h:4222");
        assert_eq!(redacted("https://h/a@b"), "https://h/a@b");
        assert_eq!(redacted("nats://h:4222"), "nats://h:4222");
    }

    #[test]
    fn mistakes_are_named() {
        let check1 = |c: ConnectorConfig| check(&[c]).map(|_| ()).unwrap_err();
        let mut c = base(Kind::RedisStream, Direction::In, "rediss://h:1");
        assert!(check1(c.clone()).contains("not built yet"));
        c.url = "redis://h:1".into();
        c.dead_letter = Some("_asp.x".into());
        assert!(check1(c.clone()).contains("asp's own"));
        c.dead_letter = Some("orders".into());
        assert!(check1(c.clone()).contains("another namespace"));
        c.dead_letter = None;
        c.batch = Some(0);
        assert!(check1(c.clone()).contains("batch is 1 to"));
        let mut w = base(Kind::Webhook, Direction::Out, "http://h/");
        w.stream = None;
        w.secret = Some("whsec_".into());
        assert!(check1(w.clone()).contains("at least 16"));
        w.secret = Some("short".into());
        assert!(check1(w.clone()).contains("at least 16"));
        w.secret = Some("a long enough secret".into());
        assert!(check(&[w.clone()]).is_ok());
        assert!(
            check(&[w.clone(), w.clone()])
                .unwrap_err()
                .contains("names are unique")
        );
        let mut n = base(Kind::Nats, Direction::Both, "nats://h:4222");
        assert!(check1(n.clone()).contains("needs subject"));
        n.subject = Some("a.*".into());
        assert!(check1(n.clone()).contains("literal tokens"));
        n.subject = Some("a.b".into());
        n.group = Some("g".into());
        assert!(check1(n.clone()).contains("not a setting"));
    }
}
