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
    Kafka,
    Postgres,
    Amqp,
    Mqtt,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Nats => "nats",
            Kind::RedisStream => "redis-stream",
            Kind::Webhook => "webhook",
            Kind::Kafka => "kafka",
            Kind::Postgres => "postgres",
            Kind::Amqp => "amqp",
            Kind::Mqtt => "mqtt",
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
    /// The system's address (every kind but Kafka, which takes `brokers`).
    #[serde(default)]
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
    /// Kafka: the bootstrap brokers, `HOST:PORT[,HOST:PORT...]`.
    pub brokers: Option<String>,
    /// Kafka: the topic. MQTT: the topic prefix (messages go to `<topic>/<key>`).
    pub topic: Option<String>,
    /// PostgreSQL in: the publication (created for `tables` if missing).
    pub publication: Option<String>,
    /// PostgreSQL in: the logical replication slot (created if missing, never dropped).
    pub slot: Option<String>,
    /// PostgreSQL in: the tables captured, `schema.table`.
    pub tables: Option<Vec<String>>,
    /// PostgreSQL out: the table each change is upserted into (created if missing).
    pub table: Option<String>,
    /// AMQP: the exchange out publishes to (declared if missing).
    pub exchange: Option<String>,
    /// AMQP: the queue in consumes (declared, and bound to `exchange` when given).
    pub queue: Option<String>,
    /// AMQP: the routing key prefix (messages go with `<routing_key>.<key>`).
    pub routing_key: Option<String>,
    /// MQTT out: publish retained messages (each topic's current value).
    pub retain: Option<bool>,
}

impl ConnectorConfig {
    /// A configuration with only the settings every kind has; the rest unset.
    pub fn new(name: &str, kind: Kind, direction: Direction, namespace: &str, url: &str) -> Self {
        ConnectorConfig {
            name: name.to_owned(),
            kind,
            direction,
            namespace: namespace.to_owned(),
            url: url.to_owned(),
            subject: None,
            stream: None,
            group: None,
            secret: None,
            attempts: None,
            ca: None,
            dead_letter: None,
            batch: None,
            brokers: None,
            topic: None,
            publication: None,
            slot: None,
            tables: None,
            table: None,
            exchange: None,
            queue: None,
            routing_key: None,
            retain: None,
        }
    }
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
    pub brokers: String,
    pub topic: String,
    pub publication: String,
    pub slot: String,
    pub tables: Vec<String>,
    pub table: String,
    pub exchange: String,
    pub queue: String,
    pub routing_key: String,
    pub retain: bool,
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
    // MQTT's default is the largest batch: its redelivered duplicates are told apart
    // only within the last 16 batches (`runtime::MQTT_RECENT_BATCHES`), and Mosquitto can
    // redeliver more than a thousand messages after a crash (docs/CONNECTORS.md, MQTT).
    let default_batch = if c.kind == Kind::Mqtt { BATCH_MAX } else { 256 };
    let batch = c.batch.unwrap_or(default_batch);
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
    let side_only = |set: bool, what: &str, side: &str| -> Result<(), String> {
        match set {
            true => Err(format!(
                "{what} is a setting of the {side} side; direction is {:?}",
                c.direction.as_str()
            )),
            false => Ok(()),
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
        brokers: String::new(),
        topic: String::new(),
        publication: String::new(),
        slot: String::new(),
        tables: Vec::new(),
        table: String::new(),
        exchange: String::new(),
        queue: String::new(),
        routing_key: String::new(),
        retain: false,
    };
    // Settings that belong to other kinds are refused by name.
    let given = [
        ("subject", c.subject.is_some()),
        ("stream", c.stream.is_some()),
        ("group", c.group.is_some()),
        ("secret", c.secret.is_some()),
        ("attempts", c.attempts.is_some()),
        ("ca", c.ca.is_some()),
        ("brokers", c.brokers.is_some()),
        ("topic", c.topic.is_some()),
        ("publication", c.publication.is_some()),
        ("slot", c.slot.is_some()),
        ("tables", c.tables.is_some()),
        ("table", c.table.is_some()),
        ("exchange", c.exchange.is_some()),
        ("queue", c.queue.is_some()),
        ("routing_key", c.routing_key.is_some()),
        ("retain", c.retain.is_some()),
    ];
    let allowed: &[&str] = match c.kind {
        Kind::Nats => &["subject", "stream"],
        Kind::RedisStream => &["stream", "group"],
        Kind::Webhook => &["secret", "attempts", "ca"],
        Kind::Kafka => &["brokers", "topic", "group"],
        Kind::Postgres => &["publication", "slot", "tables", "table"],
        Kind::Amqp => &["exchange", "queue", "routing_key"],
        Kind::Mqtt => &["topic", "retain"],
    };
    for (what, set) in given {
        refuse(set && !allowed.contains(&what), what)?;
    }
    if c.kind != Kind::Kafka && c.url.trim().is_empty() {
        return Err(format!(
            "kind = \"{}\" needs url = \"...\"",
            c.kind.as_str()
        ));
    }
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
        }
        Kind::Kafka => {
            if !c.url.is_empty() {
                return Err("kind = \"kafka\" takes brokers = \"HOST:PORT,...\", not url".into());
            }
            let brokers = need(&c.brokers, "brokers = \"HOST:PORT[,HOST:PORT...]\"")?;
            if brokers.split(',').any(|b| {
                b.trim()
                    .rsplit_once(':')
                    .is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err())
            }) {
                return Err(format!(
                    "brokers {brokers:?}: each broker is HOST:PORT, separated by commas"
                ));
            }
            let topic = need(&c.topic, "topic = \"...\"")?;
            if topic.len() > 249
                || !topic
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
            {
                return Err(format!(
                    "topic {topic:?}: a Kafka topic is 1 to 249 of letters, digits, '.', '_' and '-'"
                ));
            }
            connector.brokers = brokers;
            connector.topic = topic;
            connector.group = c.group.clone().unwrap_or_else(|| format!("asp-{}", c.name));
        }
        Kind::Postgres => {
            if !(c.url.starts_with("postgres://") || c.url.starts_with("postgresql://")) {
                return Err(format!(
                    "url must be postgres://USER[:PASSWORD]@HOST:PORT/DATABASE; got {:?}",
                    redacted(&c.url)
                ));
            }
            let ident = |what: &str, v: &str| -> Result<(), String> {
                if v.is_empty()
                    || v.len() > 63
                    || !v
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
                {
                    return Err(format!(
                        "{what} {v:?}: 1 to 63 of a-z, 0-9 and '_' (an unquoted PostgreSQL name)"
                    ));
                }
                Ok(())
            };
            let table_name = |what: &str, v: &str| -> Result<String, String> {
                let (schema, table) = v.split_once('.').unwrap_or(("public", v));
                ident(what, schema)?;
                ident(what, table)?;
                Ok(format!("{schema}.{table}"))
            };
            if c.direction.receives() {
                let publication = need(
                    &c.publication,
                    "publication = \"...\" (in: the publication read)",
                )?;
                ident("publication", &publication)?;
                let slot = need(&c.slot, "slot = \"...\" (in: the replication slot)")?;
                ident("slot", &slot)?;
                let tables = c.tables.clone().unwrap_or_default();
                if tables.is_empty() {
                    return Err(
                        "kind = \"postgres\" in needs tables = [\"schema.table\", ...]".into(),
                    );
                }
                if tables.len() > 64 {
                    return Err(format!("tables: at most 64; got {}", tables.len()));
                }
                for t in &tables {
                    connector.tables.push(table_name("tables:", t)?);
                }
                connector.publication = publication;
                connector.slot = slot;
            } else {
                side_only(c.publication.is_some(), "publication", "in")?;
                side_only(c.slot.is_some(), "slot", "in")?;
                side_only(c.tables.is_some(), "tables", "in")?;
            }
            if c.direction.sends() {
                let table = need(
                    &c.table,
                    "table = \"schema.table\" (out: where changes are upserted)",
                )?;
                connector.table = table_name("table", &table)?;
                if connector.tables.contains(&connector.table) {
                    return Err(format!(
                        "table {:?} is also captured (tables): out would feed in",
                        connector.table
                    ));
                }
            } else {
                side_only(c.table.is_some(), "table", "out")?;
            }
        }
        Kind::Amqp => {
            if !(c.url.starts_with("amqp://") || c.url.starts_with("amqps://")) {
                return Err(format!(
                    "url must be amqp://USER:PASSWORD@HOST:PORT[/VHOST]; got {:?}",
                    redacted(&c.url)
                ));
            }
            if c.url.starts_with("amqps://") {
                return Err("url: TLS to AMQP (amqps://) is not built yet; use amqp://".into());
            }
            let name_ok = |what: &str, v: &str| -> Result<(), String> {
                if v.is_empty() || v.len() > 255 || v.chars().any(|ch| ch.is_control()) {
                    return Err(format!(
                        "{what} {v:?}: 1 to 255 bytes, no control characters"
                    ));
                }
                Ok(())
            };
            if c.direction.sends() {
                let exchange = need(
                    &c.exchange,
                    "exchange = \"...\" (out: where changes are published)",
                )?;
                name_ok("exchange", &exchange)?;
                connector.exchange = exchange;
            } else if let Some(exchange) = &c.exchange {
                name_ok("exchange", exchange)?;
                connector.exchange = exchange.clone();
            }
            if c.direction.receives() {
                let queue = need(&c.queue, "queue = \"...\" (in: the queue consumed)")?;
                name_ok("queue", &queue)?;
                connector.queue = queue;
            } else {
                side_only(c.queue.is_some(), "queue", "in")?;
            }
            let routing_key = c.routing_key.clone().unwrap_or_else(|| c.namespace.clone());
            name_ok("routing_key", &routing_key)?;
            // The in side binds `<routing_key>.#`, which must be a short string too, and
            // match only this prefix: no wildcard in it.
            if routing_key.len() > 253 || routing_key.contains(['*', '#']) {
                return Err(format!(
                    "routing_key {routing_key:?}: at most 253 bytes, without '*' or '#' (the in side binds <routing_key>.#)"
                ));
            }
            connector.routing_key = routing_key;
        }
        Kind::Mqtt => {
            if c.url.starts_with("mqtts://") || c.url.starts_with("ssl://") {
                return Err("url: TLS to MQTT (mqtts://) is not built yet; use mqtt://".into());
            }
            if !(c.url.starts_with("mqtt://") || c.url.starts_with("tcp://")) {
                return Err(format!(
                    "url must be mqtt://[USER:PASSWORD@]HOST:PORT; got {:?}",
                    redacted(&c.url)
                ));
            }
            crate::mqtt::broker(&c.url).map_err(|e| format!("{e}; got {:?}", redacted(&c.url)))?;
            let topic = need(
                &c.topic,
                "topic = \"...\" (the prefix: messages go to <topic>/<key>)",
            )?;
            if topic.is_empty()
                || topic.len() > 1024
                || topic.contains(['+', '#', '\0'])
                || topic.ends_with('/')
                || topic.starts_with('$')
            {
                return Err(format!(
                    "topic {topic:?}: a topic prefix of literal levels (no '+', '#', trailing '/', or leading '$': the broker's own)"
                ));
            }
            connector.topic = topic;
            connector.retain = c.retain.unwrap_or(false);
            if connector.retain && !c.direction.sends() {
                return Err("retain is a setting of the out side (direction out or both)".into());
            }
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
            stream: Some("S".into()),
            ..ConnectorConfig::new("c", kind, direction, "orders", url)
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

    #[test]
    fn mqtt_mistakes_are_named() {
        let check1 = |c: ConnectorConfig| check(&[c]).map(|_| ()).unwrap_err();
        let mut m =
            ConnectorConfig::new("m", Kind::Mqtt, Direction::Both, "orders", "mqtt://h:1883");
        assert!(check1(m.clone()).contains("needs topic"));
        for bad in ["a/+", "a/#", "a/", "$SYS/x"] {
            m.topic = Some(bad.into());
            assert!(check1(m.clone()).contains("literal levels"), "{bad}");
        }
        m.topic = Some("asp/orders".into());
        m.retain = Some(true);
        let ok = check(&[m.clone()]).unwrap();
        assert_eq!((ok[0].topic.as_str(), ok[0].retain), ("asp/orders", true));
        m.direction = Direction::In;
        assert!(check1(m.clone()).contains("out side"));
        m.retain = None;
        m.url = "mqtts://h:8883".into();
        assert!(check1(m.clone()).contains("not built yet"));
        m.url = "mqtt://h:99999".into();
        assert!(check1(m.clone()).contains("port"));
        m.url = "mqtt://u:secret@h:1883/x".into();
        let e = check1(m.clone());
        assert!(e.contains("no path") && !e.contains("secret"), "{e}");
        m.url = "mqtt://h".into();
        m.stream = Some("s".into());
        assert!(check1(m.clone()).contains("not a setting"));
    }

    #[test]
    fn postgres_settings_are_checked_per_side() {
        let check1 = |c: ConnectorConfig| check(&[c]).map(|_| ()).unwrap_err();
        let pg = |direction| ConnectorConfig {
            publication: Some("asp_pub".into()),
            slot: Some("asp_slot".into()),
            tables: Some(vec!["public.items".into(), "orders".into()]),
            table: Some("asp_out".into()),
            ..ConnectorConfig::new(
                "p",
                Kind::Postgres,
                direction,
                "orders",
                "postgres://u@h/db",
            )
        };
        let c = check(&[pg(Direction::Both)]).unwrap().remove(0);
        assert_eq!(
            c.tables,
            ["public.items", "public.orders"],
            "public by default"
        );
        assert_eq!(
            (c.table.as_str(), c.slot.as_str()),
            ("public.asp_out", "asp_slot")
        );
        assert!(check1(pg(Direction::Out)).contains("setting of the in side"));
        assert!(check1(pg(Direction::In)).contains("setting of the out side"));
        let mut c = pg(Direction::Both);
        c.table = Some("public.items".into());
        assert!(check1(c.clone()).contains("out would feed in"));
        c.table = Some("asp_out".into());
        c.slot = Some("Bad-Slot".into());
        assert!(check1(c.clone()).contains("unquoted PostgreSQL name"));
        c.slot = Some("asp_slot".into());
        c.tables = Some(vec![]);
        assert!(check1(c.clone()).contains("needs tables"));
        c.tables = Some(vec!["a.b.c".into()]);
        assert!(check1(c.clone()).contains("tables:"));
        c.tables = Some(vec!["items".into()]);
        c.url = "mysql://h/db".into();
        assert!(check1(c.clone()).contains("postgres://"));
        c.url = "postgresql://u:pw@h:5432/db".into();
        assert!(check(&[c.clone()]).is_ok());
        c.stream = Some("s".into());
        assert!(check1(c.clone()).contains("not a setting"));
    }

    #[test]
    fn amqp_settings_are_checked_per_side() {
        let check1 = |c: ConnectorConfig| check(&[c]).map(|_| ()).unwrap_err();
        let amqp = |direction| ConnectorConfig {
            exchange: Some("asp".into()),
            queue: Some("asp-in".into()),
            ..ConnectorConfig::new("a", Kind::Amqp, direction, "orders", "amqp://h:5672")
        };
        let c = check(&[amqp(Direction::Both)]).unwrap().remove(0);
        assert_eq!((c.exchange.as_str(), c.queue.as_str()), ("asp", "asp-in"));
        assert_eq!(c.routing_key, "orders", "the namespace by default");
        let mut out = amqp(Direction::Out);
        assert!(check1(out.clone()).contains("setting of the in side"));
        out.queue = None;
        assert!(check(&[out.clone()]).is_ok());
        out.exchange = None;
        assert!(check1(out.clone()).contains("needs exchange"));
        let mut r#in = amqp(Direction::In);
        r#in.exchange = None;
        assert!(check(&[r#in.clone()]).is_ok(), "in without an exchange");
        r#in.queue = None;
        assert!(check1(r#in.clone()).contains("needs queue"));
        let mut c = amqp(Direction::In);
        c.url = "amqps://h:5671".into();
        assert!(check1(c.clone()).contains("not built yet"));
        c.url = "http://h".into();
        assert!(check1(c.clone()).contains("amqp://"));
        c.url = "amqp://h".into();
        for bad in ["a.*", "#", &"x".repeat(254)] {
            c.routing_key = Some(bad.to_owned());
            assert!(check1(c.clone()).contains("routing_key"), "{bad}");
        }
        c.routing_key = None;
        c.stream = Some("s".into());
        assert!(check1(c.clone()).contains("not a setting"));
    }

    #[test]
    fn kafka_settings_are_checked() {
        let check1 = |c: ConnectorConfig| check(&[c]).map(|_| ()).unwrap_err();
        let kafka = || ConnectorConfig {
            brokers: Some("h1:9092, h2:9093".into()),
            topic: Some("asp.orders_1-x".into()),
            ..ConnectorConfig::new("k", Kind::Kafka, Direction::Both, "orders", "")
        };
        let c = check(&[kafka()]).unwrap().remove(0);
        assert_eq!(
            (c.brokers.as_str(), c.topic.as_str(), c.group.as_str()),
            ("h1:9092, h2:9093", "asp.orders_1-x", "asp-k"),
            "the group is asp-<name> by default"
        );
        let mut k = kafka();
        k.group = Some("mine".into());
        assert_eq!(check(&[k]).unwrap()[0].group, "mine");
        let mut k = kafka();
        k.url = "kafka://h:9092".into();
        assert!(check1(k).contains("not url"));
        let mut k = kafka();
        k.brokers = None;
        assert!(check1(k).contains("needs brokers"));
        for bad in ["h", "h:", ":9092", "h:99999", "h:1,,h:2", "h:x"] {
            let mut k = kafka();
            k.brokers = Some(bad.into());
            assert!(check1(k).contains("each broker is HOST:PORT"), "{bad}");
        }
        for missing in [None, Some(" ".to_owned())] {
            let mut k = kafka();
            k.topic = missing;
            assert!(check1(k).contains("needs topic"));
        }
        for bad in ["a b", "a/b", "a*", &"t".repeat(250)] {
            let mut k = kafka();
            k.topic = Some(bad.to_owned());
            assert!(check1(k).contains("a Kafka topic is"), "{bad:?}");
        }
        let mut k = kafka();
        k.topic = Some("t".repeat(249));
        assert!(check(&[k]).is_ok(), "249 characters is the limit");
        let mut k = kafka();
        k.stream = Some("s".into());
        assert!(check1(k).contains("not a setting"));
    }
}
