//! The node's configuration file (TOML) and how command-line flags override it.
//!
//! Size: one resolution of every setting, file then flags, with the checks of each;
//! half of the file is its tests, one per group of settings.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use asp_core::NodeId;
use asp_core::reconcile::ItemKey;
use asp_http::ApiConfig;
use asp_node::{DEFAULT_COMPACTION_INTERVAL_MS, ReplicationConfig};
use asp_store::{FsyncMode, StoreConfig};
use serde::Deserialize;

pub const DEFAULT_DATA_DIR: &str = "./asp-data";
pub const DEFAULT_API: &str = "127.0.0.1:7700";
pub const DEFAULT_PEER_LISTEN: &str = "127.0.0.1:7800";
pub const DEFAULT_CLUSTER_ID: &str = "default";

/// The file's shape. Every field is optional; unknown fields are errors, so that a typo
/// is reported rather than ignored.
#[derive(Deserialize, Default, Debug)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub data_dir: Option<PathBuf>,
    pub node_id: Option<String>,
    pub fsync: Option<String>,
    pub api: Option<String>,
    #[serde(default)]
    pub http: HttpSection,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub store: StoreSection,
    #[serde(default)]
    pub replication: ReplicationSection,
    #[serde(default)]
    pub compaction: CompactionSection,
    /// Conflict policies of namespaces: `name = "counter"` (the others are lww).
    #[serde(default)]
    pub policies: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    pub tls: TlsSection,
    #[serde(default)]
    pub auth: AuthSection,
    /// Residency rules set at start: `orders = { region = "eu" }` (the same as `PUT
    /// /v1/ns/orders/residency`; they replicate to every node).
    #[serde(default)]
    pub residency: std::collections::BTreeMap<String, std::collections::BTreeMap<String, String>>,
    /// Placement rules set at start: `orders = { replicas = 2, require = { zone = "a" }
    /// }` (the same as `PUT /v1/ns/orders/placement`; they replicate to every node).
    #[serde(default)]
    pub placement: std::collections::BTreeMap<String, PlacementSection>,
    /// Write modes a namespace starts in: `orders = { mode = "leader", leader = "<id>",
    /// voters = [...] }`. Applied only to a namespace with no mode yet (epoch 0): a
    /// promotion or failover since is not undone by a restart.
    #[serde(default)]
    pub modes: std::collections::BTreeMap<String, ModeSection>,
    /// Connectors to other systems (`[[connectors]]`; docs/CONNECTORS.md).
    #[serde(default)]
    pub connectors: Vec<asp_connect::ConnectorConfig>,
}

/// `[http]`: the HTTP API's browser access.
#[derive(Deserialize, Default, Debug)]
#[serde(deny_unknown_fields)]
pub struct HttpSection {
    /// Origins a browser may call the API from (CORS): `scheme://host[:port]`, or
    /// `*` for any. Empty (the default): none.
    #[serde(default)]
    pub cors_origins: Vec<String>,
    /// The API address members are told, `http(s)://host:port` (default: the address
    /// bound).
    pub advertise: Option<String>,
}

/// One entry of `[placement]`.
#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct PlacementSection {
    pub replicas: u32,
    #[serde(default)]
    pub require: std::collections::BTreeMap<String, String>,
}

/// One entry of `[modes]`.
#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct ModeSection {
    pub mode: String,
    pub leader: Option<String>,
    #[serde(default)]
    pub voters: Vec<String>,
}

/// `[auth]`: bearer tokens on the API.
#[derive(Deserialize, Default, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct AuthSection {
    /// Requests need a valid token (`/healthz` and `/v1/openapi.json` never do).
    pub required: Option<bool>,
    /// `"token"` (default): `/metrics` needs a token with node-wide read; `"open"`: not.
    pub metrics: Option<String>,
}

/// `[tls]`: the node's certificate, key and cluster CA bundle (all three, or none).
#[derive(Deserialize, Default, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub ca: Option<PathBuf>,
    /// How often the files are read again to pick up a rotation (SIGHUP: at once).
    pub reload_interval_ms: Option<u64>,
}

/// How often `asp serve` looks for new TLS files unless `[tls] reload_interval_ms` says.
pub const DEFAULT_TLS_RELOAD_INTERVAL_MS: u64 = 2_000;

#[derive(Deserialize, Default, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct CompactionSection {
    /// How often the node compacts its feed; 0: never.
    pub interval_ms: Option<u64>,
    /// Superseded events younger than this stay in the feed.
    pub retention_ms: Option<u64>,
    /// Only segments outside the newest this many bytes of feed are compacted (0: any).
    pub retention_bytes: Option<u64>,
    /// A segment is compacted once at least this fraction of it is superseded.
    pub dead_ratio: Option<f64>,
    /// Per-namespace `retention_ms`.
    #[serde(default)]
    pub namespace_retention_ms: std::collections::BTreeMap<String, u64>,
    /// Whether deletes of lww namespaces are collected at all (default true).
    pub collect_tombstones: Option<bool>,
    /// Deletes younger than this are kept (and only collected once every known node
    /// holds them).
    pub tombstone_ttl_ms: Option<u64>,
    /// A node not heard of for this long stops holding tombstone collection back.
    pub gc_horizon_ms: Option<u64>,
}

/// After a restart, local writes wait at most this long for a peer's summary.
pub const DEFAULT_OWN_EVENTS_WAIT_MS: u64 = 10_000;
/// How often `asp serve` scrubs the feed log unless `[store] scrub_interval_ms` says.
pub const DEFAULT_SCRUB_INTERVAL_MS: u64 = 24 * 60 * 60 * 1000;

#[derive(Deserialize, Default, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct ReplicationSection {
    pub cluster_id: Option<String>,
    /// `host:port`, or "off" to accept no peer links.
    pub listen: Option<String>,
    #[serde(default)]
    pub peers: Vec<String>,
    pub namespaces: Option<Vec<String>>,
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
    pub heartbeat_ms: Option<u64>,
    pub idle_timeout_ms: Option<u64>,
    /// How often each namespace's digest is compared with each peer's (0: never).
    pub anti_entropy_interval_ms: Option<u64>,
    /// The cluster's secret: 32 hex digits, the same on every node. Reconciliation
    /// hashes are keyed with it, context tokens with a key derived from it under a
    /// label of their own. Without it both keys are derived from the cluster id.
    pub reconcile_key: Option<String>,
    /// After a restart, how long local writes wait for a peer to say which of this
    /// node's own events it holds (0: never wait).
    pub own_events_wait_ms: Option<u64>,
    /// Per peer certificate name (`*`: any other peer), the namespaces replicated with
    /// it (needs TLS).
    #[serde(default)]
    pub peer_namespaces: std::collections::BTreeMap<String, Vec<String>>,
    /// Dial members learned by gossip that no `peers` entry names (default false).
    pub dial_members: Option<bool>,
    /// Relay trees: ask peers that relay copies of events this node already holds to
    /// stop relaying their origin (default true; docs/PROTOCOL.md, "Relay trees").
    pub relay_tree: Option<bool>,
    /// A leader namespace with three voters or more fails over once its leader has
    /// been silent this long (default 5000; 0: never).
    pub failover_ms: Option<u64>,
    /// `nats://HOST:PORT`: also link with the nodes of this cluster that reach the same
    /// NATS server, through it (docs/CONNECTORS.md, "Replication through NATS").
    pub transport: Option<String>,
    /// The peer address members are told, `host:port` (default: the address bound).
    pub advertise: Option<String>,
}

#[derive(Deserialize, Default, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    pub value_bytes_max: Option<usize>,
    pub batch_ops_max: Option<usize>,
    pub request_bytes_max: Option<usize>,
    pub write_queue_max: Option<usize>,
    pub write_queue_bytes_max: Option<usize>,
    pub write_queue_wait_ms: Option<u64>,
    /// Bytes of events from peers held without being applied (parked or quarantined).
    pub held_bytes_max: Option<u64>,
    /// A client has this long to send a request's header, or its connection closes.
    pub header_read_timeout_ms: Option<u64>,
    /// Open HTTP connections at most (one more is answered 503 and closed).
    pub http_connections_max: Option<usize>,
    /// Live change streams (SSE) at most (one more is answered 503).
    pub sse_streams_max: Option<usize>,
}

#[derive(Deserialize, Default, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct StoreSection {
    pub segment_bytes_max: Option<u64>,
    pub index_cache_bytes: Option<u64>,
    pub index_memtable_bytes: Option<u64>,
    pub max_clock_skew_ms: Option<u64>,
    /// Reconciliation symbols kept per namespace, at most (0: none; anti-entropy then
    /// scans).
    pub reconcile_window: Option<usize>,
    /// Memory for key-hash indexes that spare later anti-entropy runs a pass over a
    /// large namespace (0: none).
    pub reconcile_key_index_bytes: Option<usize>,
    /// Writes are refused (507) while the data directory's filesystem has less free.
    pub min_free_bytes: Option<u64>,
    /// How often to scrub the feed log (0: never).
    pub scrub_interval_ms: Option<u64>,
    /// Read rate of a scrub.
    pub scrub_bytes_per_s: Option<u64>,
}

/// A 128-bit key from 32 hex digits.
fn parse_key(hex: &str) -> anyhow::Result<ItemKey> {
    let hex = hex.trim();
    if hex.len() != 32 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        bail!(
            "reconcile_key must be 32 hex digits (128 bits), for example the output of `openssl rand -hex 16`"
        );
    }
    let mut bytes = [0u8; 16];
    for (i, b) in bytes.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).expect("checked hex");
    }
    Ok(ItemKey::new(bytes))
}

pub fn load(path: &Path) -> anyhow::Result<FileConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read config file {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("config file {} is not valid", path.display()))
}

/// Flags of `asp serve` that override the file.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub data_dir: Option<PathBuf>,
    pub node_id: Option<String>,
    pub fsync: Option<String>,
    pub api: Option<String>,
    pub limits: Limits,
    pub segment_bytes_max: Option<u64>,
    pub max_clock_skew_ms: Option<u64>,
    pub peer_listen: Option<String>,
    pub peers: Vec<String>,
    pub dial_members: bool,
    pub cluster_id: Option<String>,
    /// `MIN-MAX`, for tests of version negotiation only.
    pub protocol_versions: Option<String>,
    /// `--salvage`: open a damaged log anyway (see `StoreConfig::salvage`).
    pub salvage: bool,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub tls_ca: Option<PathBuf>,
    /// `--label k=v`, repeated.
    pub labels: Vec<String>,
    /// `--auth required|off`.
    pub auth: Option<String>,
    /// `--cors-origin`, repeated: replaces `[http] cors_origins` when given.
    pub cors_origins: Vec<String>,
    /// `--advertise-api`, `--advertise-peer`.
    pub advertise_api: Option<String>,
    pub advertise_peer: Option<String>,
}

/// Everything `asp serve` runs with.
pub struct NodeConfig {
    pub store: StoreConfig,
    pub api: ApiConfig,
    pub listen: SocketAddr,
    /// The API address members are told (`None`: the address bound).
    pub advertise_api: Option<String>,
    pub replication: ReplicationConfig,
    /// How often to compact the feed (`None`: never).
    pub compaction_interval: Option<Duration>,
    /// How often to scrub the feed log (`None`: never).
    pub scrub_interval: Option<Duration>,
    /// How often to look for new TLS files (with TLS on).
    pub tls_reload_interval: Duration,
    pub auth: asp_http::auth::AuthConfig,
    pub residency: Vec<(
        asp_core::Namespace,
        std::collections::BTreeMap<String, String>,
    )>,
    /// `[placement]`, checked.
    pub placement: Vec<(asp_core::Namespace, asp_node::placement::Rule)>,
    /// `[modes]`: namespace, leader (`None`: multi-master), voters.
    pub modes: Vec<(
        asp_core::Namespace,
        Option<asp_core::NodeId>,
        Vec<asp_core::NodeId>,
    )>,
    /// `[[connectors]]`, checked.
    pub connectors: Vec<asp_connect::Connector>,
    /// `[replication] transport`: the NATS server peer links also go through.
    pub transport: Option<String>,
}

/// Checks an advertised API address: `http://` or `https://`, a host and a port
/// (members dial it as it is written, so the port is not left to a default).
fn advertised_api(url: &str) -> Result<(), String> {
    if url == "*" {
        return Err("\"*\" is not an address".into());
    }
    asp_http::cors_origin(url).map_err(|e| e.replace("or * for any", "with the port"))?;
    let after_host = url.rsplit(']').next().unwrap_or(url);
    let port = after_host
        .split("://")
        .last()
        .and_then(|rest| rest.rsplit_once(':'))
        .map(|(_, port)| port);
    match port {
        Some(p) if p.parse::<u16>().is_ok_and(|p| p > 0) => Ok(()),
        _ => Err(format!(
            "{url:?} has no port: write scheme://host:port, e.g. http://asp-0.asp-peers:7700"
        )),
    }
}

/// Checks an advertised peer address: `host:port`, the host a name or an IP address.
fn advertised_peer(addr: &str) -> Result<(), String> {
    let bad = |why: &str| {
        Err(format!(
            "{addr:?} is not host:port: {why} (e.g. asp-0.asp-peers:7800 or 10.0.0.5:7800)"
        ))
    };
    let Some((host, port)) = addr.rsplit_once(':') else {
        return bad("no port");
    };
    if !port.parse::<u16>().is_ok_and(|p| p > 0) {
        return bad("the port must be a number from 1 to 65535");
    }
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if host.is_empty()
        || host.len() > 253
        || !host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':'))
    {
        return bad("the host may hold only letters, digits, '.', '-' (and ':' in brackets)");
    }
    if host == "0.0.0.0" || host == "::" {
        return bad("members cannot dial the unspecified address");
    }
    Ok(())
}

pub fn resolve(file: FileConfig, flags: Overrides) -> anyhow::Result<NodeConfig> {
    let data_dir = flags
        .data_dir
        .or(file.data_dir)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));
    let mut store = StoreConfig::new(data_dir);
    if let Some(id) = flags.node_id.or(file.node_id) {
        let id: NodeId = id
            .parse()
            .with_context(|| format!("invalid node id {id:?}"))?;
        store.node_id = Some(id);
    }
    if let Some(mode) = flags.fsync.or(file.fsync) {
        store.fsync = mode.parse::<FsyncMode>()?;
    }
    let api = flags
        .api
        .or(file.api)
        .unwrap_or_else(|| DEFAULT_API.to_owned());
    let listen: SocketAddr = api.parse().with_context(|| {
        format!("invalid API address {api:?}: use IP:PORT, for example 127.0.0.1:7700")
    })?;

    let pick = |flag: Option<usize>, file: Option<usize>| flag.or(file);
    let limits = &file.limits;
    let mut api_config = ApiConfig {
        cors_origins: if flags.cors_origins.is_empty() {
            file.http.cors_origins.clone()
        } else {
            flags.cors_origins.clone()
        },
        ..ApiConfig::default()
    };
    for origin in &api_config.cors_origins {
        asp_http::cors_origin(origin).map_err(|e| anyhow::anyhow!("cors_origins: {e}"))?;
    }
    let advertise_api = flags.advertise_api.clone().or(file.http.advertise.clone());
    if let Some(url) = &advertise_api {
        advertised_api(url).map_err(|e| anyhow::anyhow!("advertise_api: {e}"))?;
    }
    if let Some(v) = pick(flags.limits.value_bytes_max, limits.value_bytes_max) {
        store.value_bytes_max = v;
    }
    if let Some(v) = pick(flags.limits.batch_ops_max, limits.batch_ops_max) {
        store.batch_ops_max = v;
    }
    if let Some(v) = pick(flags.limits.request_bytes_max, limits.request_bytes_max) {
        if v == 0 {
            bail!("request_bytes_max must be at least 1");
        }
        api_config.request_bytes_max = v;
    }
    if let Some(ms) = flags
        .limits
        .header_read_timeout_ms
        .or(limits.header_read_timeout_ms)
    {
        if ms == 0 {
            bail!("header_read_timeout_ms must be at least 1");
        }
        api_config.header_read_timeout = Duration::from_millis(ms);
    }
    if let Some(v) = pick(
        flags.limits.http_connections_max,
        limits.http_connections_max,
    ) {
        if v == 0 {
            bail!("http_connections_max must be at least 1");
        }
        api_config.connections_max = v;
    }
    if let Some(v) = pick(flags.limits.sse_streams_max, limits.sse_streams_max) {
        api_config.streams_max = v;
    }
    if let Some(v) = pick(flags.limits.write_queue_max, limits.write_queue_max) {
        store.write_queue_max = v;
    }
    if let Some(v) = pick(
        flags.limits.write_queue_bytes_max,
        limits.write_queue_bytes_max,
    ) {
        store.write_queue_bytes_max = v;
    }
    if let Some(ms) = flags
        .limits
        .write_queue_wait_ms
        .or(limits.write_queue_wait_ms)
    {
        store.write_queue_wait = Duration::from_millis(ms);
    }
    if let Some(v) = flags.limits.held_bytes_max.or(limits.held_bytes_max) {
        store.held_bytes_max = v;
    }
    if let Some(v) = flags.segment_bytes_max.or(file.store.segment_bytes_max) {
        store.segment_bytes_max = v;
    }
    if let Some(v) = file.store.index_cache_bytes {
        store.index_cache_bytes = v;
    }
    if let Some(v) = file.store.index_memtable_bytes {
        store.index_memtable_bytes = v;
    }
    if let Some(v) = flags.max_clock_skew_ms.or(file.store.max_clock_skew_ms) {
        store.max_clock_skew_ms = v;
    }
    if let Some(v) = file.store.reconcile_window {
        store.reconcile_window = v;
    }
    if let Some(v) = file.store.reconcile_key_index_bytes {
        store.reconcile_key_index_bytes = v;
    }
    if let Some(v) = file.store.min_free_bytes {
        store.min_free_bytes = v;
    }
    if let Some(v) = file.store.scrub_bytes_per_s {
        store.scrub_bytes_per_s = v;
    }
    store.salvage = flags.salvage;
    let scrub_interval = match file
        .store
        .scrub_interval_ms
        .unwrap_or(DEFAULT_SCRUB_INTERVAL_MS)
    {
        0 => None,
        ms => Some(Duration::from_millis(ms)),
    };
    let compaction = file.compaction;
    if let Some(v) = compaction.retention_ms {
        store.compaction_retention_ms = v;
    }
    if let Some(v) = compaction.retention_bytes {
        store.compaction_retention_bytes = v;
    }
    if let Some(v) = compaction.dead_ratio {
        store.compaction_dead_ratio = v;
    }
    store.compaction_namespace_retention_ms = compaction.namespace_retention_ms;
    if let Some(v) = compaction.tombstone_ttl_ms {
        store.tombstone_ttl_ms = Some(v);
    }
    if compaction.collect_tombstones == Some(false) {
        store.tombstone_ttl_ms = None;
    }
    if let Some(v) = compaction.gc_horizon_ms {
        store.gc_horizon_ms = v;
    }
    for (ns, name) in &file.policies {
        asp_core::Namespace::new(ns).map_err(|e| anyhow::anyhow!("[policies] {ns:?}: {e}"))?;
        let policy = asp_core::crdt::Policy::parse(name).with_context(|| {
            format!("[policies] {ns} = {name:?}: choose lww, siblings, counter, set or json-map")
        })?;
        store.namespace_policies.insert(ns.clone(), policy);
    }
    let compaction_interval = match compaction
        .interval_ms
        .unwrap_or(DEFAULT_COMPACTION_INTERVAL_MS)
    {
        0 => None,
        ms => Some(Duration::from_millis(ms)),
    };
    store
        .validate()
        .map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?;

    let section = file.replication;
    let transport = section.transport.clone();
    let cluster_id = flags
        .cluster_id
        .or(section.cluster_id)
        .unwrap_or_else(|| DEFAULT_CLUSTER_ID.to_owned());
    let mut replication = ReplicationConfig::new(cluster_id);
    let peer_listen = flags
        .peer_listen
        .or(section.listen)
        .unwrap_or_else(|| DEFAULT_PEER_LISTEN.to_owned());
    replication.listen = if peer_listen == "off" {
        None
    } else {
        Some(peer_listen.parse().with_context(|| {
            format!(
                "invalid peer listen address {peer_listen:?}: use IP:PORT (for example 127.0.0.1:7800) or \"off\""
            )
        })?)
    };
    replication.dial_members = flags.dial_members || section.dial_members.unwrap_or(false);
    replication.advertise = flags.advertise_peer.clone().or(section.advertise.clone());
    if let Some(peer) = &replication.advertise {
        advertised_peer(peer).map_err(|e| anyhow::anyhow!("advertise_peer: {e}"))?;
    }
    // Peers from the file and from flags together.
    replication.peers = section.peers;
    replication.peers.extend(flags.peers);
    if let Some(namespaces) = section.namespaces {
        replication.namespaces = namespaces;
    }
    let mut labels = section.labels;
    for label in &flags.labels {
        let (k, v) =
            asp_tls::issue::parse_label(label).map_err(|e| anyhow::anyhow!("--label: {e}"))?;
        labels.insert(k, v);
    }
    let tls_file = file.tls;
    let tls = match (
        flags.tls_cert.or(tls_file.cert),
        flags.tls_key.or(tls_file.key),
        flags.tls_ca.or(tls_file.ca),
    ) {
        (None, None, None) => None,
        (Some(cert), Some(key), Some(ca)) => {
            let tls = asp_tls::Tls::load(asp_tls::TlsPaths { cert, key, ca })?;
            // A node's labels are what its certificate attests: peers read them from
            // there. A label configured here must agree with it.
            let attested = tls.current().identity.labels.clone();
            for (k, v) in &labels {
                match attested.get(k) {
                    Some(a) if a == v => {}
                    Some(a) => bail!(
                        "label {k}={v} is configured, but the certificate attests {k}={a}: issue a certificate with --label {k}={v} (asp cert node) or drop the label"
                    ),
                    None => bail!(
                        "label {k}={v} is configured, but the certificate does not attest it: issue a certificate with --label {k}={v} (asp cert node) or drop the label"
                    ),
                }
            }
            labels = attested;
            Some(tls)
        }
        _ => bail!(
            "TLS needs all three of --tls-cert, --tls-key and --tls-ca (or cert, key and ca in [tls])"
        ),
    };
    let tls_reload_interval = Duration::from_millis(
        tls_file
            .reload_interval_ms
            .unwrap_or(DEFAULT_TLS_RELOAD_INTERVAL_MS)
            .max(100),
    );
    replication.labels = labels.into_iter().collect();
    replication.tls = tls;
    replication.peer_namespaces = section.peer_namespaces;
    let required = match flags.auth.as_deref() {
        Some("required") => true,
        Some("off") => false,
        Some(other) => bail!("--auth {other:?}: use required or off"),
        None => file.auth.required.unwrap_or(false),
    };
    let metrics_open = match file.auth.metrics.as_deref() {
        None | Some("token") => false,
        Some("open") => true,
        Some(other) => bail!("[auth] metrics = {other:?}: use \"token\" or \"open\""),
    };
    let auth = asp_http::auth::AuthConfig {
        required,
        metrics_open,
    };
    let mut residency = Vec::new();
    for (ns, require) in file.residency {
        let namespace = asp_core::Namespace::new(&ns)
            .map_err(|e| anyhow::anyhow!("[residency] {ns:?}: {e}"))?;
        if ns.starts_with(asp_auth::RESERVED_PREFIX) {
            bail!("[residency] {ns:?}: the node's own namespaces go to every node");
        }
        asp_node::residency::check_rule(&require)
            .map_err(|e| anyhow::anyhow!("[residency] {ns}: {e}"))?;
        residency.push((namespace, require));
    }
    let mut placement = Vec::new();
    for (ns, section) in file.placement {
        let namespace = asp_core::Namespace::new(&ns)
            .map_err(|e| anyhow::anyhow!("[placement] {ns:?}: {e}"))?;
        if ns.starts_with(asp_auth::RESERVED_PREFIX) {
            bail!("[placement] {ns:?}: the node's own namespaces go to every node");
        }
        let rule = asp_node::placement::Rule {
            replicas: section.replicas,
            require: section.require,
        };
        asp_node::placement::check_rule(&rule)
            .map_err(|e| anyhow::anyhow!("[placement] {ns}: {e}"))?;
        placement.push((namespace, rule));
    }
    let mut modes = Vec::new();
    for (ns, m) in file.modes {
        let what = |e: String| anyhow::anyhow!("[modes] {ns:?}: {e}");
        let namespace = asp_core::Namespace::new(&ns).map_err(|e| what(e.to_string()))?;
        if ns.starts_with(asp_auth::RESERVED_PREFIX) {
            bail!("[modes] {ns:?}: the node's own namespaces stay multi-master");
        }
        let node = |s: &str| {
            s.parse::<asp_core::NodeId>().map_err(|_| {
                what(format!(
                    "{s:?} is no node id: 16 hex digits, as `asp status` shows node_id"
                ))
            })
        };
        let voters = m
            .voters
            .iter()
            .map(|v| node(v))
            .collect::<Result<Vec<_>, _>>()?;
        let leader = match (m.mode.as_str(), m.leader.as_deref()) {
            ("leader", Some(l)) => Some(node(l)?),
            ("leader", None) => {
                return Err(what(
                    "mode = \"leader\" needs leader = \"<node id>\"".into(),
                ));
            }
            ("multi-master", None) if voters.is_empty() => None,
            ("multi-master", _) => {
                return Err(what(
                    "a multi-master namespace has no leader and no voters".into(),
                ));
            }
            (other, _) => {
                return Err(what(format!(
                    "mode is \"leader\" or \"multi-master\"; got {other:?}"
                )));
            }
        };
        modes.push((namespace, leader, voters));
    }
    // Token keys and revocations reach the other nodes through this namespace.
    if required
        && !replication
            .namespaces
            .iter()
            .any(|n| n == "*" || n == asp_auth::AUTH_NAMESPACE)
    {
        replication
            .namespaces
            .push(asp_auth::AUTH_NAMESPACE.to_owned());
    }
    if let Some(ms) = section.heartbeat_ms {
        replication.heartbeat = Duration::from_millis(ms);
    }
    if let Some(ms) = section.failover_ms {
        replication.failover_after = Duration::from_millis(ms);
    }
    if let Some(ms) = section.idle_timeout_ms {
        replication.idle_timeout = Duration::from_millis(ms);
    }
    if let Some(ms) = section.anti_entropy_interval_ms {
        replication.anti_entropy_interval = Duration::from_millis(ms);
    }
    if let Some(on) = section.relay_tree {
        replication.relay_tree = on;
    }
    // A node that replicates learns what its peers hold of its own events before it
    // issues counters again after a restart (see docs/PROTOCOL.md, *Counters*).
    let replicates = replication.listen.is_some() || !replication.peers.is_empty();
    if replicates {
        store.own_events_wait = Duration::from_millis(
            section
                .own_events_wait_ms
                .unwrap_or(DEFAULT_OWN_EVENTS_WAIT_MS),
        );
    }
    if let Some(range) = flags.protocol_versions {
        let (min, max) = range
            .split_once('-')
            .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)))
            .with_context(|| format!("--protocol-versions takes MIN-MAX, got {range:?}"))?;
        replication.version_min = min;
        replication.version_max = max;
    }
    // One secret (or, without one, the cluster id), one key per purpose: the
    // reconciliation key is the secret itself (as before: peers of earlier builds
    // keep reconciling), the context-token key a derivation under its own label.
    let (item_key, secret) = match &section.reconcile_key {
        Some(hex) => {
            let key = parse_key(hex)?;
            (key, hex.to_ascii_lowercase().into_bytes())
        }
        None => (
            ItemKey::derive(replication.cluster_id.as_bytes()),
            replication.cluster_id.as_bytes().to_vec(),
        ),
    };
    store.item_key = item_key;
    store.context_key = ItemKey::derive(&[b"asp context tokens\0".as_slice(), &secret].concat());
    replication
        .validate()
        .map_err(|e| anyhow::anyhow!("invalid replication configuration: {e}"))?;
    let connectors =
        asp_connect::check(&file.connectors).map_err(|e| anyhow::anyhow!("[[connectors]]: {e}"))?;
    if let Some(url) = &transport {
        if !url.starts_with("nats://") {
            bail!(
                "[replication] transport must be nats://HOST:PORT; got {:?}",
                asp_connect::config::redacted(url)
            );
        }
        if replication.cluster_id == DEFAULT_CLUSTER_ID {
            bail!(
                "[replication] transport needs a cluster_id of your own: every node on that NATS server with cluster_id {DEFAULT_CLUSTER_ID:?} would join this cluster"
            );
        }
        if replication.tls.is_some() {
            bail!(
                "[replication] transport carries peer links without TLS, and this node requires TLS on peer links: TLS through the NATS transport is not built yet (drop transport, or run the cluster without [tls])"
            );
        }
    }
    Ok(NodeConfig {
        connectors,
        transport,
        store,
        api: api_config,
        listen,
        advertise_api,
        replication,
        compaction_interval,
        scrub_interval,
        tls_reload_interval,
        auth,
        residency,
        placement,
        modes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_the_file() {
        let file: FileConfig = toml::from_str(
            r#"
            data_dir = "/var/lib/asp"
            fsync = "never"
            api = "127.0.0.1:9000"
            [limits]
            value_bytes_max = 4096
            header_read_timeout_ms = 250
            http_connections_max = 64
            sse_streams_max = 0
            "#,
        )
        .unwrap();
        let flags = Overrides {
            fsync: Some("interval:10".into()),
            ..Overrides::default()
        };
        let c = resolve(file, flags).unwrap();
        assert_eq!(c.store.data_dir, PathBuf::from("/var/lib/asp"));
        assert_eq!(c.store.fsync, FsyncMode::Interval { ms: 10 });
        assert_eq!(c.listen.port(), 9000);
        assert_eq!(c.store.value_bytes_max, 4096);
        assert_eq!(c.api.header_read_timeout, Duration::from_millis(250));
        assert_eq!(c.api.connections_max, 64);
        assert_eq!(c.api.streams_max, 0);
    }

    #[test]
    fn placement_rules_are_checked_and_reach_the_node() {
        let file: FileConfig = toml::from_str(
            r#"
            [placement]
            orders = { replicas = 2, require = { zone = "a" } }
            carts = { replicas = 3 }
            "#,
        )
        .unwrap();
        let c = resolve(file, Overrides::default()).unwrap();
        let rules: Vec<(String, u32, usize)> = c
            .placement
            .iter()
            .map(|(ns, r)| (ns.to_string(), r.replicas, r.require.len()))
            .collect();
        assert_eq!(rules, vec![("carts".into(), 3, 0), ("orders".into(), 2, 1)]);
        for (toml, says) in [
            (
                "[placement]\norders = { replicas = 0 }",
                "replicas must be 1 to 64",
            ),
            (
                "[placement]\n\"_asp.x\" = { replicas = 1 }",
                "go to every node",
            ),
            (
                "[placement]\norders = { replicas = 1, zone = \"a\" }",
                "unknown field",
            ),
        ] {
            let e = match toml::from_str::<FileConfig>(toml) {
                Ok(file) => format!("{:#}", resolve(file, Overrides::default()).err().unwrap()),
                Err(e) => e.to_string(),
            };
            assert!(e.contains(says), "{toml}: {e}");
        }
    }

    #[test]
    fn compaction_and_anti_entropy_settings_reach_the_node() {
        let file: FileConfig = toml::from_str(
            r#"
            [store]
            reconcile_window = 0
            reconcile_key_index_bytes = 1048576
            [replication]
            anti_entropy_interval_ms = 5000
            relay_tree = false
            own_events_wait_ms = 2500
            [policies]
            hits = "counter"
            [compaction]
            interval_ms = 0
            retention_ms = 1000
            dead_ratio = 0.3
            namespace_retention_ms = { audit = 86400000 }
            tombstone_ttl_ms = 5000
            gc_horizon_ms = 60000
            "#,
        )
        .unwrap();
        let c = resolve(file, Overrides::default()).unwrap();
        assert_eq!(c.store.reconcile_window, 0);
        assert_eq!(c.store.reconcile_key_index_bytes, 1 << 20);
        assert_eq!(c.replication.anti_entropy_interval, Duration::from_secs(5));
        assert!(!c.replication.relay_tree);
        assert_eq!(c.compaction_interval, None);
        assert_eq!(c.store.compaction_retention_ms, 1000);
        assert_eq!(c.store.tombstone_ttl_ms, Some(5000));
        assert_eq!(c.store.gc_horizon_ms, 60_000);
        assert_eq!(c.store.own_events_wait, Duration::from_millis(2500));
        let off: FileConfig = toml::from_str("[compaction]\ncollect_tombstones = false").unwrap();
        assert_eq!(
            resolve(off, Overrides::default())
                .unwrap()
                .store
                .tombstone_ttl_ms,
            None
        );
        let bad = toml::from_str::<FileConfig>("[compaction]\ngc_horizon_ms = 0").unwrap();
        let e = format!("{:#}", resolve(bad, Overrides::default()).err().unwrap());
        assert!(e.contains("gc_horizon_ms"), "{e}");
        assert_eq!(
            c.store.namespace_policies.get("hits"),
            Some(&asp_core::crdt::Policy::Counter)
        );
        let bad = toml::from_str::<FileConfig>("[policies]\nhits = \"sum\"").unwrap();
        let e = format!("{:#}", resolve(bad, Overrides::default()).err().unwrap());
        assert!(e.contains("json-map"), "{e}");
        assert_eq!(c.store.compaction_retention_ms_of("audit"), 86_400_000);
        let defaults = resolve(FileConfig::default(), Overrides::default()).unwrap();
        assert_eq!(
            defaults.compaction_interval,
            Some(Duration::from_millis(DEFAULT_COMPACTION_INTERVAL_MS))
        );
        // The reconciliation key: derived from the cluster id, or the configured secret.
        let derived = ItemKey::derive(b"default");
        assert_eq!(defaults.store.item_key, derived);
        let keyed: FileConfig =
            toml::from_str("[replication]\nreconcile_key = \"000102030405060708090a0b0c0d0e0f\"")
                .unwrap();
        let keyed = resolve(keyed, Overrides::default()).unwrap();
        assert_eq!(
            keyed.store.item_key,
            ItemKey::new(std::array::from_fn(|i| i as u8))
        );
        // Context tokens have a key of their own, from the same secret (or cluster id).
        assert_ne!(keyed.store.context_key, keyed.store.item_key);
        assert_ne!(defaults.store.context_key, defaults.store.item_key);
        assert_ne!(keyed.store.context_key, defaults.store.context_key);
        let short: FileConfig = toml::from_str("[replication]\nreconcile_key = \"abc\"").unwrap();
        let e = resolve(short, Overrides::default())
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("32 hex digits"), "{e}");
        let bad = toml::from_str::<FileConfig>("[compaction]\ndead_ratio = 2.0").unwrap();
        let e = resolve(bad, Overrides::default())
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("dead_ratio"), "{e}");
    }

    #[test]
    fn modes_are_read_and_checked() {
        let ok: FileConfig = toml::from_str(
            r#"
            [modes.orders]
            mode = "leader"
            leader = "9f3c2a0b11d4e5f6"
            voters = ["9f3c2a0b11d4e5f6", "00000000000000a1", "00000000000000a2"]
            [modes.free]
            mode = "multi-master"
            "#,
        )
        .unwrap();
        let c = resolve(ok, Overrides::default()).unwrap();
        assert_eq!(c.modes.len(), 2);
        let orders = c.modes.iter().find(|m| m.0.as_str() == "orders").unwrap();
        assert_eq!(orders.1.unwrap().to_string(), "9f3c2a0b11d4e5f6");
        assert_eq!(orders.2.len(), 3);
        for (bad, says) in [
            ("[modes.o]\nmode = \"leader\"", "needs leader"),
            (
                "[modes.o]\nmode = \"leader\"\nleader = \"nope\"",
                "no node id",
            ),
            ("[modes.o]\nmode = \"primary\"", "\"leader\" or"),
            (
                "[modes.o]\nmode = \"multi-master\"\nvoters = [\"00000000000000a1\"]",
                "no leader and no voters",
            ),
            (
                "[modes.\"_asp.x\"]\nmode = \"multi-master\"",
                "stay multi-master",
            ),
        ] {
            let file: FileConfig = toml::from_str(bad).unwrap();
            let err = resolve(file, Overrides::default())
                .err()
                .unwrap()
                .to_string();
            assert!(err.contains(says), "{bad}: {err}");
        }
    }

    #[test]
    fn advertised_addresses_come_from_the_file_or_the_flags_and_are_checked() {
        let file = || {
            toml::from_str::<FileConfig>(
                "[http]\nadvertise = \"http://asp-0.asp-peers:7700\"\n[replication]\nadvertise = \"asp-0.asp-peers:7800\"",
            )
            .unwrap()
        };
        let c = resolve(file(), Overrides::default()).unwrap();
        assert_eq!(
            c.advertise_api.as_deref(),
            Some("http://asp-0.asp-peers:7700")
        );
        assert_eq!(
            c.replication.advertise.as_deref(),
            Some("asp-0.asp-peers:7800")
        );
        let flags = Overrides {
            advertise_api: Some("https://[fd00::5]:7700".into()),
            advertise_peer: Some("10.0.0.5:7800".into()),
            ..Overrides::default()
        };
        let c = resolve(file(), flags).unwrap();
        assert_eq!(c.advertise_api.as_deref(), Some("https://[fd00::5]:7700"));
        assert_eq!(c.replication.advertise.as_deref(), Some("10.0.0.5:7800"));
        let c = resolve(FileConfig::default(), Overrides::default()).unwrap();
        assert_eq!((c.advertise_api, c.replication.advertise), (None, None));
        for (api, peer, says) in [
            (Some("asp-0:7700"), None, "no scheme"),
            (Some("http://asp-0"), None, "no port"),
            (Some("http://asp-0:7700/"), None, "nothing may follow"),
            (Some("*"), None, "not an address"),
            (None, Some("asp-0"), "no port"),
            (None, Some("asp-0:http"), "the port must be"),
            (None, Some("0.0.0.0:7800"), "unspecified"),
            (None, Some("as p:7800"), "the host may hold"),
        ] {
            let flags = Overrides {
                advertise_api: api.map(str::to_owned),
                advertise_peer: peer.map(str::to_owned),
                ..Overrides::default()
            };
            let err = resolve(FileConfig::default(), flags)
                .err()
                .unwrap()
                .to_string();
            assert!(err.contains(says), "{api:?} {peer:?}: {err}");
        }
    }

    #[test]
    fn mistakes_are_reported() {
        let typo = toml::from_str::<FileConfig>("fsynk = \"always\"").unwrap_err();
        assert!(typo.to_string().contains("fsynk"), "{typo}");
        let bad_api = resolve(
            FileConfig {
                api: Some("localhost".into()),
                ..Default::default()
            },
            Overrides::default(),
        );
        assert!(bad_api.err().unwrap().to_string().contains("IP:PORT"));
        let bad_fsync = resolve(
            FileConfig {
                fsync: Some("sometimes".into()),
                ..Default::default()
            },
            Overrides::default(),
        );
        assert!(
            bad_fsync
                .err()
                .unwrap()
                .to_string()
                .contains("interval:<ms>")
        );
    }

    #[test]
    fn cors_origins_come_from_the_file_or_the_flags_and_are_checked() {
        let file = || -> FileConfig {
            toml::from_str(
                r#"
                [http]
                cors_origins = ["https://app.example.com", "http://localhost:5173"]
                "#,
            )
            .unwrap()
        };
        let c = resolve(file(), Overrides::default()).unwrap();
        assert_eq!(
            c.api.cors_origins,
            ["https://app.example.com", "http://localhost:5173"]
        );
        let flags = Overrides {
            cors_origins: vec!["http://[::1]:8080".into()],
            ..Overrides::default()
        };
        assert_eq!(
            resolve(file(), flags).unwrap().api.cors_origins,
            ["http://[::1]:8080"]
        );
        for good in [
            "*",
            "http://[::1]",
            "http://127.0.0.1:80",
            "https://a-b.example",
        ] {
            let flags = Overrides {
                cors_origins: vec![good.into()],
                ..Overrides::default()
            };
            assert!(resolve(FileConfig::default(), flags).is_ok(), "{good}");
        }
        assert!(
            resolve(FileConfig::default(), Overrides::default())
                .unwrap()
                .api
                .cors_origins
                .is_empty()
        );
        for (bad, why) in [
            ("app.example.com", "no scheme"),
            ("ftp://app.example.com", "http or https"),
            ("https://app.example.com/", "not even a /"),
            ("https://app.example.com/path", "not even a /"),
            ("https://app_example.com", "the host may hold only"),
            ("https://app.example.com:99999", "the port"),
            ("https://", "the host may hold only"),
            ("http://[::1", "closing ]"),
            ("http://[::1]x", "only :port"),
            ("http://[zz]:80", "IPv6 address"),
        ] {
            let flags = Overrides {
                cors_origins: vec![bad.into()],
                ..Overrides::default()
            };
            let err = resolve(FileConfig::default(), flags)
                .err()
                .unwrap()
                .to_string();
            assert!(
                err.contains("cors_origins") && err.contains(why),
                "{bad}: {err}"
            );
        }
        let typo = toml::from_str::<FileConfig>("[http]\ncors_origin = [\"*\"]").unwrap_err();
        assert!(typo.to_string().contains("cors_origin"), "{typo}");
    }
}
