//! `asp serve`: open the store, serve the API, stop cleanly on SIGINT or SIGTERM.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use asp_http::AppState;
use asp_node::Replicator;
use asp_store::Store;
use tokio_util::sync::CancellationToken;

use crate::config::{self, Overrides};

pub async fn run(config_file: Option<&Path>, flags: Overrides) -> anyhow::Result<ExitCode> {
    init_logging();
    test_clock_offset()?;
    let file = match config_file {
        Some(path) => config::load(path)?,
        None => config::FileConfig::default(),
    };
    let config = config::resolve(file, flags)?;
    let listener = tokio::net::TcpListener::bind(config.listen).await.with_context(|| {
        format!(
            "cannot listen on {} (is another asp or another program using it? choose another with --api)",
            config.listen
        )
    })?;
    let store_config = config.store.clone();
    let store = tokio::task::spawn_blocking(move || Store::open(store_config))
        .await
        .context("the store's open task failed")?
        .with_context(|| {
            format!(
                "cannot open the store in {}",
                config.store.data_dir.display()
            )
        })?;
    let listen = listener.local_addr().unwrap_or(config.listen);
    let shutdown = CancellationToken::new();
    let mut replication = config.replication.clone();
    let api_scheme = if replication.tls.is_some() {
        "https"
    } else {
        "http"
    };
    replication.api_address = Some(
        config
            .advertise_api
            .clone()
            .unwrap_or_else(|| format!("{api_scheme}://{listen}")),
    );
    // An address bound on every interface is no address to dial: say so once.
    if listen.ip().is_unspecified() && config.advertise_api.is_none() {
        tracing::warn!(
            api = %listen,
            "the API listens on every interface: members are told {api_scheme}://{listen}, which they cannot reach (the console's cluster view, not_leader answers); give --advertise-api"
        );
    }
    if let Some(peer) = replication.listen
        && peer.ip().is_unspecified()
        && replication.advertise.is_none()
    {
        tracing::warn!(
            listen = %peer,
            "peer links listen on every interface: members are told {peer}, which --dial-members cannot dial; give --advertise-peer"
        );
    }
    let replicator = Replicator::start(store.clone(), replication, shutdown.child_token()).await?;
    // Residency rules of the configuration, before any client can write.
    for (ns, require) in &config.residency {
        let residency = replicator.residency();
        if residency.rule(ns).as_ref() != Some(require) {
            residency
                .set(&store, ns, require)
                .await
                .map_err(anyhow::Error::msg)
                .with_context(|| format!("setting the residency of {ns} from [residency]"))?;
            tracing::info!(namespace = %ns, require = ?require, "residency rule set from the configuration");
        }
    }
    // Placement rules of the configuration, likewise.
    for (ns, rule) in &config.placement {
        let placement = replicator.placement();
        if placement.rule(ns).as_ref() != Some(rule) {
            placement
                .set(&store, ns, Some(rule))
                .await
                .map_err(anyhow::Error::msg)
                .with_context(|| format!("setting the placement of {ns} from [placement]"))?;
            tracing::info!(namespace = %ns, replicas = rule.replicas, require = ?rule.require, "placement rule set from the configuration");
        }
    }
    // Modes of the configuration, for namespaces that have none yet.
    for (ns, leader, voters) in &config.modes {
        let modes = replicator.modes();
        if modes.history(ns).current().is_none() {
            modes
                .set(&store, ns, *leader, voters.clone())
                .await
                .with_context(|| format!("setting the mode of {ns} from [modes]"))?;
            tracing::info!(namespace = %ns, leader = ?leader, "mode set from the configuration");
        }
    }
    if config.auth.required
        && config.replication.tls.is_none()
        && (config.replication.listen.is_some() || !config.replication.peers.is_empty())
    {
        tracing::warn!(
            "--auth required with plain peer links: tokens are only as safe as the peer port, since a process that reaches it can replicate a token key of its own into _asp.auth; give the nodes certificates (--tls-cert, --tls-key, --tls-ca)"
        );
    }
    let auth = if config.auth.required {
        Some(start_auth(&store, &config).await?)
    } else {
        None
    };
    let tls = config.replication.tls.clone();
    if let Some(tls) = &tls {
        tokio::spawn(asp_tls::watch(
            tls.clone(),
            config.tls_reload_interval,
            shutdown.child_token(),
        ));
    }
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut state = AppState::new(
        store.clone(),
        Some(replicator.clone()),
        config.api.clone(),
        listen,
        shutdown.clone(),
    );
    if let Some(auth) = auth {
        state = state.with_auth(auth);
    }
    if let Some(tls) = &tls {
        // The console's cluster view asks the other members' HTTPS APIs.
        state = state.with_api_ca(tls.paths().ca.clone());
    }
    let connectors = asp_connect::Connectors::start(
        store.clone(),
        store.node_id(),
        config.replication.cluster_id.clone(),
        config.connectors.clone(),
        shutdown.child_token(),
    );
    if !connectors.is_empty() {
        state = state.with_connectors(std::sync::Arc::new(connectors.clone()));
    }
    let transport = config.transport.clone().map(|url| {
        asp_connect::transport::Transport::start(
            replicator.clone(),
            store.node_id(),
            &config.replication.cluster_id,
            url,
            shutdown.child_token(),
        )
    });
    if let Some(transport) = &transport {
        let transport = transport.clone();
        state = state.with_transport(std::sync::Arc::new(move || {
            serde_json::to_value(transport.status()).unwrap_or_default()
        }));
    }
    tracing::info!(
        node_id = %store.node_id(),
        api = %format!("{scheme}://{listen}"),
        tls = %tls.as_ref().map_or("off".to_owned(), |t| {
            let id = t.current().identity.clone();
            format!("{} (serial {})", id.name, id.serial)
        }),
        data_dir = %config.store.data_dir.display(),
        fsync = %config.store.fsync,
        peers_listen = %replicator.listen_addr().map_or("off".to_owned(), |a| a.to_string()),
        cluster = %config.replication.cluster_id,
        auth = if config.auth.required { "required" } else { "off" },
        "asp node serving"
    );

    let compactor = config.compaction_interval.map(|every| {
        tokio::spawn(asp_node::run_compaction_schedule(
            store.clone(),
            every,
            shutdown.clone(),
        ))
    });

    let scrubber = config.scrub_interval.map(|every| {
        tokio::spawn(asp_node::run_scrub_schedule(
            store.clone(),
            every,
            shutdown.clone(),
        ))
    });

    let signals = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("stopping: finishing requests in flight (signal again to exit at once)");
        signals.cancel();
        wait_for_signal().await;
        tracing::warn!("second signal: exiting without waiting");
        std::process::exit(130);
    });

    let served = asp_http::serve_with_tls(listener, state, tls).await;
    shutdown.cancel();
    // Connectors finish the write in hand (its source position with it).
    connectors.stopped().await;
    if let Some(transport) = &transport {
        transport.stopped().await;
    }
    // Peers hear why the links close; then the store finishes what it accepted.
    replicator.shutdown().await;
    if let Some(compactor) = compactor {
        // A run in progress finishes its segment first.
        let _ = compactor.await;
    }
    if let Some(scrubber) = scrubber {
        scrubber.abort();
        let _ = scrubber.await;
    }
    store.shutdown().await;
    drop(store);
    served.context("the API server failed")?;
    tracing::info!("stopped cleanly; every acknowledged write is on disk");
    Ok(ExitCode::SUCCESS)
}

/// Loads (or makes) this node's token key and publishes its public half in
/// `_asp.auth`, where the other nodes find it.
async fn start_auth(
    store: &Store,
    config: &config::NodeConfig,
) -> anyhow::Result<std::sync::Arc<asp_http::auth::NodeAuth>> {
    let dir = &config.store.data_dir;
    let (key, made) = asp_auth::keyfile::load_or_create(dir).map_err(anyhow::Error::msg)?;
    if made {
        tracing::info!(
            file = %asp_auth::keyfile::path_in(dir).display(),
            "made this node's token key; `asp token create --data-dir` signs with it"
        );
    }
    let public = key.public();
    let record = serde_json::to_vec(&asp_http::auth::public_key_record(&public))?;
    let ns = asp_core::Namespace::new(asp_auth::AUTH_NAMESPACE)?;
    let node = store.node_id();
    let key_name = asp_auth::public_key_key(node.get());
    let current = store.get(&ns, &key_name)?;
    if current.and_then(|s| s.value).map(|v| v.bytes.to_vec()) != Some(record.clone()) {
        store
            .write(
                ns,
                vec![asp_store::WriteOp::put(
                    asp_core::Key::new(&key_name)?,
                    asp_core::ContentType::Json,
                    record,
                )],
            )
            .await
            .context("publishing this node's token key")?;
    }
    Ok(asp_http::auth::NodeAuth::new(
        node,
        public,
        store.clone(),
        config.auth.clone(),
    ))
}

/// The test seam of the store's wall clock (`asp_store::clock`): a node whose clock
/// runs `ASP_TEST_CLOCK_OFFSET_MS` (signed) ahead, without libfaketime.
fn test_clock_offset() -> anyhow::Result<()> {
    const VAR: &str = "ASP_TEST_CLOCK_OFFSET_MS";
    let Ok(text) = std::env::var(VAR) else {
        return Ok(());
    };
    let ms: i64 = text.trim().parse().with_context(|| {
        format!("{VAR} must be a whole number of milliseconds (negative: behind); got {text:?}")
    })?;
    asp_store::clock::set_test_offset_ms(ms);
    tracing::warn!(
        offset_ms = ms,
        "{VAR} is set: this node's clock runs {ms} ms off the system clock (a test seam; unset it in production)"
    );
    Ok(())
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,fjall=warn,lsm_tree=warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}
