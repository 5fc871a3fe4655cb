//! `asp`: run a node (`asp serve`) or talk to one (`put`, `get`, `del`, `scan`, `watch`,
//! `status`, ...). Argument parsing and printing only; the work lives in the library
//! crates. The benchmarks and the demo are not here: they live in the `asp-bench`
//! crate, so this binary links neither them nor what they compare against.

mod commands;
mod config;
mod serve;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "asp",
    version,
    about = "asp: asynchronous data synchronization — a durable, replicating key-value node"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a node (data in ./asp-data, API on 127.0.0.1:7700, peers on 127.0.0.1:7800
    /// unless told otherwise).
    Serve(Box<ServeArgs>),
    /// Write a value.
    Put(PutArgs),
    /// Read a value (printed as is to stdout).
    Get(GetArgs),
    /// Delete a key.
    Del(DelArgs),
    /// List keys.
    Scan(ScanArgs),
    /// Follow a namespace's changes live, one JSON line per change.
    Watch(WatchArgs),
    /// Show a node's status.
    Status(StatusArgs),
    /// Show a namespace's conflict policy, or set it (lww, siblings, counter, set,
    /// json-map; fixed once the namespace holds data).
    Policy(PolicyArgs),
    /// Add to a key of a counter namespace (negative to subtract).
    Incr(IncrArgs),
    /// Show the events from peers held in quarantine (their policy differs from their
    /// namespace's here), or resolve a namespace's: retry (after setting its policy) or
    /// discard.
    Quarantine(QuarantineArgs),
    /// Make a cluster CA and node certificates for TLS (mutual on peer links).
    #[command(subcommand)]
    Cert(CertCommand),
    /// Make, narrow, show and revoke bearer tokens for the API (`--auth required`).
    #[command(subcommand)]
    Token(TokenCommand),
    /// Share namespaces with another cluster (federation): create an offer, accept it,
    /// list and revoke installed shares.
    #[command(subcommand)]
    Share(ShareCommand),
    /// Moved to `asp-bench bench`; says so and exits with 2.
    #[command(hide = true, disable_help_flag = true)]
    Bench(MovedArgs),
    /// Moved to `asp-bench demo`; says so and exits with 2.
    #[command(hide = true, disable_help_flag = true)]
    Demo(MovedArgs),
}

/// Whatever was given to a command that moved, so that the redirect names it whole.
#[derive(Args)]
struct MovedArgs {
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    args: Vec<String>,
}

/// Exit code of a command that moved: a usage error, as clap's own.
const MOVED_EXIT_CODE: u8 = 2;

/// Says in one line where a command of `asp` went, and how to run it with its arguments.
fn moved(command: &str, args: &MovedArgs) -> ExitCode {
    let mut run = format!("cargo run --release -p asp-bench -- {command}");
    for arg in &args.args {
        run.push(' ');
        run.push_str(arg);
    }
    eprintln!("asp: `asp {command}` moved to its own binary, asp-bench; run: {run}");
    ExitCode::from(MOVED_EXIT_CODE)
}

#[derive(Args)]
struct ServeArgs {
    /// TOML configuration file; flags override it.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Where the node keeps its data [default: ./asp-data].
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Address of the HTTP API [default: 127.0.0.1:7700].
    #[arg(long, value_name = "ADDR")]
    api: Option<String>,
    /// When to fsync: always (default), interval:MS, or never.
    #[arg(long, value_name = "MODE")]
    fsync: Option<String>,
    /// Node id (16 hex digits) for a new data directory; must match an existing one.
    #[arg(long, value_name = "ID")]
    node_id: Option<String>,
    /// Largest value in bytes [default: 1048576].
    #[arg(long, value_name = "BYTES")]
    value_bytes_max: Option<usize>,
    /// Most operations in one batch [default: 10000].
    #[arg(long, value_name = "N")]
    batch_ops_max: Option<usize>,
    /// Largest batch request body in bytes [default: 16777216].
    #[arg(long, value_name = "BYTES")]
    request_bytes_max: Option<usize>,
    /// Most write requests waiting for the writer [default: 4096].
    #[arg(long, value_name = "N")]
    write_queue_max: Option<usize>,
    /// How long a write waits for room before 503 [default: 5000].
    #[arg(long, value_name = "MS")]
    write_queue_wait_ms: Option<u64>,
    /// Bytes of events from peers held without being applied (parked: clock too far
    /// ahead; quarantined: another policy) [default: 67108864].
    #[arg(long, value_name = "BYTES")]
    held_bytes_max: Option<u64>,
    /// Log segment size in bytes [default: 134217728].
    #[arg(long, value_name = "BYTES")]
    segment_bytes_max: Option<u64>,
    /// Remote clock readings further ahead are refused [default: 60000].
    #[arg(long, value_name = "MS")]
    max_clock_skew_ms: Option<u64>,
    /// Address for peer links, or "off" [default: 127.0.0.1:7800].
    #[arg(long, value_name = "ADDR")]
    listen: Option<String>,
    /// A peer to connect to (host:port); repeat for several.
    #[arg(long = "peer", value_name = "ADDR")]
    peers: Vec<String>,
    /// Also dial members learned by gossip that no --peer names.
    #[arg(long)]
    dial_members: bool,
    /// Nodes only replicate with nodes of the same cluster [default: default].
    #[arg(long, value_name = "ID")]
    cluster_id: Option<String>,
    /// Open a damaged feed log anyway: move damaged segments to DATA_DIR/damaged,
    /// keep every intact record, report what was lost (peers send it back).
    #[arg(long)]
    salvage: bool,
    /// This node's certificate (PEM; from `asp cert node`). With --tls-key and --tls-ca,
    /// peer links are mutual TLS and the API is HTTPS.
    #[arg(long, value_name = "FILE")]
    tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM).
    #[arg(long, value_name = "FILE")]
    tls_key: Option<PathBuf>,
    /// The cluster's CA bundle (PEM): peers must present a certificate it signed.
    #[arg(long, value_name = "FILE")]
    tls_ca: Option<PathBuf>,
    /// A label of this node, key=value; repeat for several. With TLS each must be
    /// attested by the certificate.
    #[arg(long = "label", value_name = "K=V")]
    labels: Vec<String>,
    /// `required`: API requests need a bearer token (`asp token create`); `off`: not
    /// [default: off, or `[auth] required`].
    #[arg(long, value_name = "MODE", value_parser = ["required", "off"])]
    auth: Option<String>,
    /// An origin a browser may call the API from (CORS), `scheme://host[:port]`, or `*`
    /// for any; repeat for several. Replaces `[http] cors_origins` [default: none].
    #[arg(long = "cors-origin", value_name = "ORIGIN")]
    cors_origins: Vec<String>,
    /// The API address members are told (gossip: the console's cluster view, a
    /// follower's `not_leader` answer), `http(s)://host:port`, when it is not the
    /// address bound (`--api 0.0.0.0:7700` in a container) [default: the bound one].
    /// Replaces `[http] advertise`.
    #[arg(long, value_name = "URL")]
    advertise_api: Option<String>,
    /// The peer address members are told (`--dial-members` dials it), `host:port`,
    /// when it is not the one bound [default: the bound one]. Replaces `[replication]
    /// advertise`.
    #[arg(long, value_name = "HOST:PORT")]
    advertise_peer: Option<String>,
    /// Protocol versions offered, MIN-MAX (for testing version negotiation).
    #[arg(long, value_name = "MIN-MAX", hide = true)]
    protocol_versions: Option<String>,
}

#[derive(Subcommand)]
enum CertCommand {
    /// Create a cluster CA: DIR/ca.pem (give it to every node) and DIR/ca.key (keep it
    /// off the nodes; it signs node certificates).
    Init {
        /// Where to write ca.pem and ca.key (created if missing).
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// Named in the CA's subject [default: default].
        #[arg(long, value_name = "ID", default_value = "default")]
        cluster_id: String,
        /// Days of validity.
        #[arg(long, value_name = "N", default_value_t = 3650)]
        days: u32,
        /// Replace an existing CA (every certificate it issued stops being trusted).
        #[arg(long)]
        force: bool,
    },
    /// Issue a node certificate signed by the CA in DIR: DIR/NAME.pem and DIR/NAME.key.
    /// Its labels are attested: peers take a node's labels from its certificate.
    Node {
        /// The directory holding ca.pem and ca.key; the certificate is written there.
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// The node's name (letters, digits, '.', '_', '-').
        #[arg(long, value_name = "NAME")]
        name: String,
        /// A label to attest, key=value; repeat for several.
        #[arg(long = "label", value_name = "K=V")]
        labels: Vec<String>,
        /// A DNS name or IP address the node is reached at (peers and API clients check
        /// it); repeat for several [default: localhost, 127.0.0.1, ::1].
        #[arg(long = "host", value_name = "H")]
        hosts: Vec<String>,
        /// Days of validity.
        #[arg(long, value_name = "N", default_value_t = 365)]
        days: u32,
        /// Replace an existing certificate and key of this name.
        #[arg(long)]
        force: bool,
    },
}

/// A token's scope, as flags.
#[derive(Args)]
pub struct ScopeArgs {
    /// Namespaces: `*`, a name, or a name prefix ending in `*`; comma-separated or
    /// repeated.
    #[arg(long, value_name = "PATTERN", value_delimiter = ',', required = true)]
    ns: Vec<String>,
    /// Operations: read, write, admin; comma-separated.
    #[arg(long, value_name = "OPS", value_delimiter = ',', required = true)]
    ops: Vec<String>,
    /// Only keys starting with this.
    #[arg(long, value_name = "KEYPREFIX", default_value = "")]
    prefix: String,
    /// Valid for this long: a number with s, m, h or d (30m, 12h, 7d) [default: no
    /// expiry].
    #[arg(long, value_name = "DURATION")]
    ttl: Option<String>,
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Sign a token with the key of the node at DIR; prints the token alone on stdout
    /// (its id on stderr).
    Create {
        /// The data directory of a node started with `--auth required` (its token.key
        /// signs; every node of the cluster accepts what it signs).
        #[arg(long, value_name = "DIR")]
        data_dir: PathBuf,
        #[command(flatten)]
        scope: ScopeArgs,
    },
    /// Narrow a token offline (no key needed): the result allows only what both allow.
    Narrow {
        /// The token to narrow ("-": read it from stdin).
        token: String,
        #[command(flatten)]
        scope: ScopeArgs,
    },
    /// Show what a token allows and its ids (checks nothing: no key needed).
    Show {
        /// The token ("-": read it from stdin).
        token: String,
    },
    /// Revoke a token and every token narrowed from it, cluster-wide (needs admin).
    Revoke {
        /// The token's id (from `create` or `show`), or the token itself.
        id: String,
        #[command(flatten)]
        node: NodeArgs,
    },
}

#[derive(Subcommand)]
enum ShareCommand {
    /// Offer namespaces to another cluster: signs the share with this cluster's CA key
    /// and prints it (JSON) on stdout, for the other cluster to accept.
    Create {
        /// This cluster's CA directory (ca.pem and ca.key, from `asp cert init`).
        #[arg(long, value_name = "DIR")]
        ca_dir: PathBuf,
        /// This cluster's id (the nodes' --cluster-id).
        #[arg(long, value_name = "ID", default_value = "default")]
        cluster_id: String,
        /// The other cluster's CA certificate (its ca.pem).
        #[arg(long, value_name = "FILE")]
        peer_ca: PathBuf,
        /// A namespace to share, NS or NS:KEYPREFIX; comma-separated or repeated.
        #[arg(
            long,
            value_name = "NS[:PREFIX]",
            value_delimiter = ',',
            required = true
        )]
        ns: Vec<String>,
        /// read: the other cluster receives the namespaces; write: it may send changes
        /// to them; comma-separated.
        #[arg(long, value_name = "OPS", value_delimiter = ',', required = true)]
        ops: Vec<String>,
        /// A label every node of the other cluster must attest (its certificate) to
        /// receive anything, key=value; repeat for several.
        #[arg(long = "require", value_name = "K=V")]
        require: Vec<String>,
        /// Valid for this long: a number with s, m, h or d.
        #[arg(long, value_name = "DURATION", default_value = "30d")]
        ttl: String,
        /// Write the share here instead of stdout.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// Accept a share: with --ca-dir (the accepting cluster), countersign an offer;
    /// with --install, install the accepted share on a node of this cluster (both
    /// clusters install the same accepted document).
    Accept {
        /// The share document ("-": stdin).
        file: String,
        /// This cluster's CA directory: countersign the offer made to it.
        #[arg(long, value_name = "DIR")]
        ca_dir: Option<PathBuf>,
        /// This cluster's id (with --ca-dir; the nodes' --cluster-id).
        #[arg(long, value_name = "ID", default_value = "default")]
        cluster_id: String,
        /// Write the accepted share here (with --ca-dir) [default: stdout].
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
        /// Install the accepted share on the node given by --node (needs admin).
        #[arg(long)]
        install: bool,
        #[command(flatten)]
        node: NodeArgs,
    },
    /// List the shares installed on a node's cluster.
    List {
        #[command(flatten)]
        node: NodeArgs,
    },
    /// Revoke a share for the whole cluster: links under it close at once (needs admin).
    Revoke {
        /// The share's id.
        id: String,
        #[command(flatten)]
        node: NodeArgs,
    },
}

#[derive(Args, Clone)]
pub struct StatusArgs {
    #[command(flatten)]
    node: NodeArgs,
    /// Redraw a compact live view of the whole cluster (from `GET
    /// /v1/cluster/stream`: members, links and lag, convergence) until interrupted
    #[arg(long)]
    watch: bool,
    /// Milliseconds between redraws with --watch (250 to 60000)
    #[arg(long, value_name = "MS", default_value_t = 1000, requires = "watch")]
    interval_ms: u64,
}

#[derive(Args, Clone)]
pub struct NodeArgs {
    /// The node's API.
    #[arg(
        long,
        env = "ASP_NODE",
        default_value = "http://127.0.0.1:7700",
        value_name = "URL"
    )]
    node: String,
    /// The CA bundle (PEM) that signed an https:// node's certificate.
    #[arg(long, env = "ASP_CA", value_name = "FILE")]
    ca: Option<PathBuf>,
    /// A bearer token for a node that requires one (`asp token create`).
    #[arg(long, env = "ASP_TOKEN", value_name = "TOKEN", hide_env_values = true)]
    token: Option<String>,
}

/// The node options of a client command.
fn node_args(command: &Command) -> Option<&NodeArgs> {
    Some(match command {
        Command::Put(a) => &a.target.node,
        Command::Get(a) => &a.target.node,
        Command::Del(a) => &a.target.node,
        Command::Scan(a) => &a.target.node,
        Command::Watch(a) => &a.target.node,
        Command::Status(a) => &a.node,
        Command::Policy(a) => &a.target.node,
        Command::Incr(a) => &a.target.node,
        Command::Quarantine(a) => &a.node,
        Command::Token(TokenCommand::Revoke { node, .. }) => node,
        Command::Share(
            ShareCommand::Accept { node, .. }
            | ShareCommand::List { node }
            | ShareCommand::Revoke { node, .. },
        ) => node,
        Command::Serve(_)
        | Command::Share(ShareCommand::Create { .. })
        | Command::Cert(_)
        | Command::Token(_)
        | Command::Bench(_)
        | Command::Demo(_) => {
            return None;
        }
    })
}

#[derive(Args)]
struct NsArgs {
    #[command(flatten)]
    node: NodeArgs,
    /// Namespace.
    #[arg(long, env = "ASP_NS", default_value = "default", value_name = "NS")]
    ns: String,
}

#[derive(Args)]
struct PutArgs {
    #[command(flatten)]
    target: NsArgs,
    /// The key: 1 to 1024 bytes of UTF-8.
    key: String,
    /// The value; read from stdin when absent or "-".
    value: Option<String>,
    /// Media type [default: application/json if the value parses as JSON, else text/plain
    /// if it is UTF-8, else application/octet-stream].
    #[arg(long, value_name = "TYPE")]
    content_type: Option<String>,
    /// Write only if the current version is this one ("*": only if the key exists).
    #[arg(long, value_name = "VERSION")]
    if_match: Option<String>,
    /// The key expires this many milliseconds after the write, on every node.
    #[arg(long, value_name = "MS")]
    ttl_ms: Option<u64>,
}

#[derive(Args)]
struct GetArgs {
    #[command(flatten)]
    target: NsArgs,
    /// The key: 1 to 1024 bytes of UTF-8.
    key: String,
    /// Ask for this media type (JSON, CBOR and MessagePack convert into each other).
    #[arg(long, value_name = "TYPE")]
    accept: Option<String>,
}

#[derive(Args)]
struct DelArgs {
    #[command(flatten)]
    target: NsArgs,
    /// The key: 1 to 1024 bytes of UTF-8.
    key: String,
    /// Delete only if the current version is this one.
    #[arg(long, value_name = "VERSION")]
    if_match: Option<String>,
}

#[derive(Args)]
struct PolicyArgs {
    #[command(flatten)]
    target: NsArgs,
    /// The policy to set; without it, the current one is shown.
    #[arg(value_parser = ["lww", "siblings", "counter", "set", "json-map"])]
    policy: Option<String>,
}

#[derive(Args)]
struct QuarantineArgs {
    #[command(flatten)]
    node: NodeArgs,
    /// The namespace to show or resolve [default: every namespace, to show].
    #[arg(long, env = "ASP_NS", value_name = "NS")]
    ns: Option<String>,
    /// retry: apply the events the namespace's policy accepts now; discard: drop them
    /// from this node (their origins keep them). Without it, the quarantine is shown.
    #[arg(value_parser = ["retry", "discard"])]
    action: Option<String>,
}

#[derive(Args)]
struct IncrArgs {
    #[command(flatten)]
    target: NsArgs,
    /// The key: 1 to 1024 bytes of UTF-8.
    key: String,
    /// The amount (negative to subtract).
    #[arg(default_value_t = 1, allow_negative_numbers = true)]
    by: i64,
}

#[derive(Args)]
struct ScanArgs {
    #[command(flatten)]
    target: NsArgs,
    /// Only keys starting with this.
    #[arg(long, default_value = "")]
    prefix: String,
    /// Most keys to list (all pages are followed up to this many).
    #[arg(long, default_value_t = 100)]
    limit: usize,
    /// Print values too.
    #[arg(long)]
    values: bool,
}

#[derive(Args)]
struct WatchArgs {
    #[command(flatten)]
    target: NsArgs,
    /// Start after this feed position (0: from the beginning).
    #[arg(long, default_value_t = 0)]
    since: u64,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(node) = node_args(&cli.command) {
        commands::set_client_options(asp_http::client::ClientOptions {
            ca: node.ca.clone(),
            token: node.token.clone(),
        });
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("asp: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Serve(a) => {
                let a = *a;
                let flags = config::Overrides {
                    data_dir: a.data_dir,
                    node_id: a.node_id,
                    fsync: a.fsync,
                    api: a.api,
                    limits: config::Limits {
                        value_bytes_max: a.value_bytes_max,
                        batch_ops_max: a.batch_ops_max,
                        request_bytes_max: a.request_bytes_max,
                        write_queue_max: a.write_queue_max,
                        write_queue_bytes_max: None,
                        write_queue_wait_ms: a.write_queue_wait_ms,
                        held_bytes_max: a.held_bytes_max,
                        ..config::Limits::default()
                    },
                    segment_bytes_max: a.segment_bytes_max,
                    max_clock_skew_ms: a.max_clock_skew_ms,
                    peer_listen: a.listen,
                    peers: a.peers,
                    dial_members: a.dial_members,
                    cluster_id: a.cluster_id,
                    protocol_versions: a.protocol_versions,
                    salvage: a.salvage,
                    tls_cert: a.tls_cert,
                    tls_key: a.tls_key,
                    tls_ca: a.tls_ca,
                    labels: a.labels,
                    auth: a.auth,
                    cors_origins: a.cors_origins,
                    advertise_api: a.advertise_api,
                    advertise_peer: a.advertise_peer,
                };
                serve::run(a.config.as_deref(), flags).await
            }
            Command::Put(a) => {
                commands::put(
                    &a.target.node.node,
                    &a.target.ns,
                    &a.key,
                    a.value,
                    a.content_type,
                    a.if_match,
                    a.ttl_ms,
                )
                .await
            }
            Command::Get(a) => {
                commands::get(&a.target.node.node, &a.target.ns, &a.key, a.accept).await
            }
            Command::Del(a) => {
                commands::del(&a.target.node.node, &a.target.ns, &a.key, a.if_match).await
            }
            Command::Scan(a) => {
                commands::scan(
                    &a.target.node.node,
                    &a.target.ns,
                    &a.prefix,
                    a.limit,
                    a.values,
                )
                .await
            }
            Command::Watch(a) => commands::watch(&a.target.node.node, &a.target.ns, a.since).await,
            Command::Status(a) if a.watch => {
                commands::status_watch(&a.node.node, a.interval_ms).await
            }
            Command::Status(a) => commands::status(&a.node.node).await,
            Command::Policy(a) => {
                commands::policy(&a.target.node.node, &a.target.ns, a.policy.as_deref()).await
            }
            Command::Incr(a) => {
                commands::incr(&a.target.node.node, &a.target.ns, &a.key, a.by).await
            }
            Command::Quarantine(a) => {
                commands::quarantine(&a.node.node, a.ns.as_deref(), a.action.as_deref()).await
            }
            Command::Cert(c) => commands::cert(c),
            Command::Token(t) => commands::token(t).await,
            Command::Share(s) => commands::share(s).await,
            Command::Bench(a) => Ok(moved("bench", &a)),
            Command::Demo(a) => Ok(moved("demo", &a)),
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("asp: {e:#}");
            ExitCode::FAILURE
        }
    }
}
