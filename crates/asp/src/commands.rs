//! The client commands: each sends one request (or follows a stream) and prints.

use std::io::{Read, Write};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use asp_http::client::{Client, ClientError, ClientOptions, EventStream};
use bytes::Bytes;

/// The CA bundle and token of this run's client command (`--ca`, `--token`).
static CLIENT_OPTIONS: std::sync::OnceLock<ClientOptions> = std::sync::OnceLock::new();

pub fn set_client_options(options: ClientOptions) {
    let _ = CLIENT_OPTIONS.set(options);
}

fn client(node: &str) -> anyhow::Result<Client> {
    let options = CLIENT_OPTIONS.get().cloned().unwrap_or_default();
    Ok(Client::with_options(node, &options)?)
}

fn print_json(v: &serde_json::Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

pub async fn put(
    node: &str,
    ns: &str,
    key: &str,
    value: Option<String>,
    content_type: Option<String>,
    if_match: Option<String>,
    ttl_ms: Option<u64>,
) -> anyhow::Result<ExitCode> {
    let value: Vec<u8> = match value.as_deref() {
        None | Some("-") => {
            let mut buf = Vec::new();
            std::io::stdin()
                .read_to_end(&mut buf)
                .context("reading the value from stdin")?;
            buf
        }
        Some(v) => v.as_bytes().to_vec(),
    };
    let content_type = content_type.unwrap_or_else(|| {
        if serde_json::from_slice::<serde::de::IgnoredAny>(&value).is_ok() {
            "application/json".into()
        } else if std::str::from_utf8(&value).is_ok() {
            "text/plain".into()
        } else {
            "application/octet-stream".into()
        }
    });
    let answer = client(node)?
        .put_expiring(
            ns,
            key,
            &content_type,
            Bytes::from(value),
            if_match.as_deref(),
            ttl_ms,
        )
        .await?;
    print_json(&answer);
    Ok(ExitCode::SUCCESS)
}

pub async fn get(
    node: &str,
    ns: &str,
    key: &str,
    accept: Option<String>,
) -> anyhow::Result<ExitCode> {
    match client(node)?.get(ns, key, accept.as_deref()).await? {
        Some(response) => {
            let mut out = std::io::stdout().lock();
            out.write_all(&response.body)?;
            if response
                .header("content-type")
                .is_some_and(|c| c.starts_with("application/json") || c.starts_with("text/"))
                && !response.body.ends_with(b"\n")
            {
                out.write_all(b"\n")?;
            }
            if let Some(etag) = response.header("etag") {
                eprintln!("version {}", etag.trim_matches('"'));
            }
            Ok(ExitCode::SUCCESS)
        }
        None => {
            eprintln!("asp: key {key:?} does not exist in namespace {ns}");
            Ok(ExitCode::from(1))
        }
    }
}

pub async fn del(
    node: &str,
    ns: &str,
    key: &str,
    if_match: Option<String>,
) -> anyhow::Result<ExitCode> {
    print_json(&client(node)?.delete(ns, key, if_match.as_deref()).await?);
    Ok(ExitCode::SUCCESS)
}

pub async fn policy(node: &str, ns: &str, set: Option<&str>) -> anyhow::Result<ExitCode> {
    print_json(&client(node)?.policy(ns, set).await?);
    Ok(ExitCode::SUCCESS)
}

/// Shows the quarantined events (of `ns`, or of every namespace), or resolves `ns`'s.
pub async fn quarantine(
    node: &str,
    ns: Option<&str>,
    action: Option<&str>,
) -> anyhow::Result<ExitCode> {
    let client = client(node)?;
    if let Some(action) = action {
        let ns = ns.context("name the namespace to resolve with --ns")?;
        print_json(&client.quarantine(ns, action).await?);
        return Ok(ExitCode::SUCCESS);
    }
    let status = client.status().await?;
    let quarantine: Vec<serde_json::Value> = status["held"]["quarantine"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|q| ns.is_none_or(|ns| q["namespace"] == ns))
        .collect();
    print_json(&serde_json::Value::Array(quarantine));
    Ok(ExitCode::SUCCESS)
}

pub async fn incr(node: &str, ns: &str, key: &str, by: i64) -> anyhow::Result<ExitCode> {
    print_json(
        &client(node)?
            .operate(ns, key, serde_json::json!({ "incr": by }))
            .await?,
    );
    Ok(ExitCode::SUCCESS)
}

pub async fn scan(
    node: &str,
    ns: &str,
    prefix: &str,
    limit: usize,
    values: bool,
) -> anyhow::Result<ExitCode> {
    let client = client(node)?;
    let mut after: Option<String> = None;
    let mut shown = 0;
    let mut out = std::io::stdout().lock();
    while shown < limit {
        let page = client
            .list(
                ns,
                prefix,
                after.as_deref(),
                (limit - shown).min(1000),
                values,
            )
            .await?;
        let items = page["items"].as_array().cloned().unwrap_or_default();
        for item in &items {
            if values {
                writeln!(out, "{}", serde_json::to_string(item)?)?;
            } else {
                writeln!(
                    out,
                    "{}\t{}\t{}\t{}",
                    item["key"].as_str().unwrap_or_default(),
                    item["version"].as_str().unwrap_or_default(),
                    item["content_type"].as_str().unwrap_or_default(),
                    item["size"]
                )?;
            }
        }
        shown += items.len();
        match page["next_after"].as_str() {
            Some(next) if !items.is_empty() => after = Some(next.to_owned()),
            _ => break,
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn status(node: &str) -> anyhow::Result<ExitCode> {
    print_json(&client(node)?.status().await?);
    Ok(ExitCode::SUCCESS)
}

/// Opens a stream with `open`, again and again (200 ms, doubling to 10 s between
/// tries) while the node cannot be reached; an answer of the node (an API error)
/// ends it.
async fn open_retrying<F, Fut>(mut open: F) -> anyhow::Result<EventStream>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<EventStream, ClientError>>,
{
    let mut backoff = Duration::from_millis(200);
    loop {
        match open().await {
            Ok(s) => return Ok(s),
            Err(e @ ClientError::Api { .. }) => return Err(e.into()),
            Err(e) => {
                eprintln!("asp: {e}; retrying in {backoff:?}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
    }
}

/// `asp status --watch`: redraws the cluster view of `GET /v1/cluster/stream` on
/// every event (clearing a terminal first; frames one after another otherwise),
/// reconnecting when the stream drops.
pub async fn status_watch(node: &str, interval_ms: u64) -> anyhow::Result<ExitCode> {
    use std::io::{IsTerminal, Write};
    let client = client(node)?;
    let terminal = std::io::stdout().is_terminal();
    let path = format!("/v1/cluster/stream?interval_ms={interval_ms}");
    loop {
        let mut stream = open_retrying(|| client.stream(&path, &[])).await?;
        loop {
            match stream.next().await {
                Ok(Some(event)) if event.event.as_deref() == Some("cluster") => {
                    let view: serde_json::Value =
                        serde_json::from_str(&event.data).map_err(|e| {
                            anyhow::anyhow!("the node sent a cluster event that is not JSON: {e}")
                        })?;
                    let text = cluster_text(&view);
                    let mut out = std::io::stdout().lock();
                    let written = if terminal {
                        // Home, clear the screen, then the frame.
                        write!(out, "\x1b[H\x1b[2J{text}")
                    } else {
                        writeln!(out, "{text}")
                    }
                    .and_then(|()| out.flush());
                    match written {
                        Ok(()) => {}
                        // The reader went (`| head`): done.
                        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
                            return Ok(ExitCode::SUCCESS);
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(e) => {
                    eprintln!("asp: the stream dropped: {e}; reconnecting");
                    break;
                }
            }
        }
    }
}

/// The first 8 hex digits of a node id.
fn short_id(v: &serde_json::Value) -> String {
    v.as_str().unwrap_or("?").chars().take(8).collect()
}

/// A compact text view of a `GET /v1/cluster` document: members, links with lag,
/// and per origin the slowest node's delay (as the console shows them).
pub fn cluster_text(view: &serde_json::Value) -> String {
    use std::fmt::Write as _;
    let empty = Vec::new();
    let nodes = view["nodes"].as_array().unwrap_or(&empty);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "asp cluster · {} members · seen by {} at {} (Unix ms)",
        nodes.len(),
        short_id(&view["node_id"]),
        view["generated_ms"]
    );
    let _ = writeln!(
        out,
        "\n{:<10} {:<7} {:>10} {:>10} {:>6}  ERROR",
        "NODE", "STATE", "FEED HEAD", "EVENTS", "LINKS"
    );
    for n in nodes {
        let st = &n["status"];
        let events: u64 = st["namespaces"]
            .as_array()
            .map(|a| a.iter().filter_map(|x| x["events"].as_u64()).sum())
            .unwrap_or(0);
        let links = st["replication"]["peers"]
            .as_array()
            .map(|a| a.iter().filter(|p| p["state"] == "active").count())
            .unwrap_or(0);
        let mark = if n["this_node"] == true { "*" } else { "" };
        let dash = |v: String| if st.is_null() { "-".to_owned() } else { v };
        let _ = writeln!(
            out,
            "{:<10} {:<7} {:>10} {:>10} {:>6}  {}",
            format!("{}{mark}", short_id(&n["node_id"])),
            if n["error"].is_string() {
                "error"
            } else {
                n["state"].as_str().unwrap_or("?")
            },
            dash(st["feed"]["head_seq"].to_string()),
            dash(events.to_string()),
            dash(links.to_string()),
            n["error"].as_str().unwrap_or("")
        );
    }
    let _ = writeln!(
        out,
        "\n{:<19} {:<16} {:>8} {:>10} {:>8}",
        "LINK", "NAMESPACE", "LAG", "LAG TIME", "MISSING"
    );
    for n in nodes {
        for p in n["status"]["replication"]["peers"]
            .as_array()
            .unwrap_or(&empty)
        {
            for x in p["namespaces"].as_array().unwrap_or(&empty) {
                let _ = writeln!(
                    out,
                    "{:<19} {:<16} {:>8} {:>10} {:>8}",
                    format!("{}>{}", short_id(&n["node_id"]), short_id(&p["node_id"])),
                    x["name"].as_str().unwrap_or("?"),
                    x["lag_events"].to_string(),
                    format!("{} ms", x["lag_ms"]),
                    x["missing_events"].to_string()
                );
            }
        }
    }
    // Per origin, the slowest receiver: the time until every node held a write.
    let mut origins: std::collections::BTreeMap<String, (u64, u64, u64, usize)> =
        Default::default();
    for n in nodes {
        for d in n["status"]["convergence"]["origins"]
            .as_array()
            .unwrap_or(&empty)
        {
            let e = origins.entry(short_id(&d["origin"])).or_default();
            e.0 = e.0.max(d["events"].as_u64().unwrap_or(0));
            e.1 = e.1.max(d["p50_ms"].as_u64().unwrap_or(0));
            e.2 = e.2.max(d["p99_ms"].as_u64().unwrap_or(0));
            e.3 += 1;
        }
    }
    let _ = writeln!(
        out,
        "\n{:<10} {:>10} {:>8} {:>12} {:>12}   (writes of the last 5 min, to every node)",
        "ORIGIN", "WRITES", "NODES", "P50", "P99"
    );
    for (origin, (events, p50, p99, reached)) in origins {
        let _ = writeln!(
            out,
            "{origin:<10} {events:>10} {reached:>8} {:>12} {:>12}",
            format!("{p50} ms"),
            format!("{p99} ms")
        );
    }
    out
}

/// Follows the stream, reconnecting from the last position seen when the connection
/// drops, so that no change is missed or shown twice.
pub async fn watch(node: &str, ns: &str, since: u64) -> anyhow::Result<ExitCode> {
    let client = client(node)?;
    let mut position = since;
    loop {
        let mut stream = open_retrying(|| client.watch(ns, position)).await?;
        loop {
            match stream.next().await {
                Ok(Some(event)) => {
                    if event.event.as_deref() == Some("error") {
                        anyhow::bail!("the node reported: {}", event.data);
                    }
                    println!("{}", event.data);
                    if let Some(id) = event.id.and_then(|i| i.parse().ok()) {
                        position = id;
                    }
                }
                Ok(None) => {
                    eprintln!(
                        "asp: the node closed the stream; reconnecting after position {position}"
                    );
                    break;
                }
                Err(e) => {
                    eprintln!("asp: {e}; reconnecting after position {position}");
                    break;
                }
            }
        }
        // A pause before reconnecting: a node that ends streams at once is not spun on.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `asp cert init` and `asp cert node`.
pub fn cert(command: crate::CertCommand) -> anyhow::Result<ExitCode> {
    use asp_tls::issue;
    match command {
        crate::CertCommand::Init {
            dir,
            cluster_id,
            days,
            force,
        } => {
            let issued = issue::init_ca(&dir, &cluster_id, days, force)?;
            eprintln!(
                "wrote {} (copy it to every node) and {} (keep it off the nodes: it signs node certificates); valid until {}",
                issued.cert.display(),
                issued.key.display(),
                issued.not_after.date()
            );
        }
        crate::CertCommand::Node {
            dir,
            name,
            labels,
            hosts,
            days,
            force,
        } => {
            let labels = labels
                .iter()
                .map(|l| issue::parse_label(l))
                .collect::<Result<Vec<_>, _>>()?;
            let issued = issue::issue_node(&dir, &name, &labels, &hosts, days, force)?;
            eprintln!(
                "wrote {} and {} for node {name}{}; valid for {} until {}",
                issued.cert.display(),
                issued.key.display(),
                if labels.is_empty() {
                    String::new()
                } else {
                    let l: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                    format!(" (labels {})", l.join(", "))
                },
                issued.hosts.join(", "),
                issued.not_after.date()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// A duration like `30s`, `15m`, `12h`, `7d`, in milliseconds.
fn parse_duration_ms(text: &str) -> anyhow::Result<u64> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| anyhow::anyhow!("--ttl {text:?}: use a number with s, m, h or d (30m, 7d)"))?;
    let unit_ms: u64 = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => anyhow::bail!("--ttl {text:?}: use a number with s, m, h or d (30m, 7d)"),
    };
    let ms = n
        .checked_mul(unit_ms)
        .filter(|&ms| ms > 0)
        .ok_or_else(|| anyhow::anyhow!("--ttl {text:?}: give a positive duration that fits"))?;
    Ok(ms)
}

fn scope_of(args: &crate::ScopeArgs) -> anyhow::Result<asp_auth::Scope> {
    let ops = args
        .ops
        .iter()
        .map(|o| asp_auth::Op::parse(o).map_err(anyhow::Error::msg))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let expires_ms = match &args.ttl {
        Some(ttl) => Some(
            asp_store::clock::wall_ms()
                .checked_add(parse_duration_ms(ttl)?)
                .context("--ttl is too long")?,
        ),
        None => None,
    };
    let scope = asp_auth::Scope {
        ns: args.ns.clone(),
        ops,
        prefix: args.prefix.clone(),
        expires_ms,
    };
    scope.validate().map_err(anyhow::Error::msg)?;
    Ok(scope)
}

fn token_text(arg: &str) -> anyhow::Result<String> {
    if arg == "-" {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .context("reading the token from stdin")?;
        Ok(text.trim().to_owned())
    } else {
        Ok(arg.trim().to_owned())
    }
}

/// `asp token create|narrow|show|revoke`.
pub async fn token(command: crate::TokenCommand) -> anyhow::Result<ExitCode> {
    use asp_auth::Token;
    match command {
        crate::TokenCommand::Create { data_dir, scope } => {
            let scope = scope_of(&scope)?;
            let node = asp_store::node_id_of(&data_dir).map_err(anyhow::Error::msg)?;
            let key = asp_auth::keyfile::load(&data_dir).map_err(anyhow::Error::msg)?;
            let token = Token::issue(node.get(), &key, scope)?;
            println!("{}", token.encode());
            eprintln!(
                "token id {} (signed by node {node}; revoke with: asp token revoke {})",
                token.id(),
                token.id()
            );
        }
        crate::TokenCommand::Narrow { token, scope } => {
            let scope = scope_of(&scope)?;
            let token = Token::decode(&token_text(&token)?)?;
            let narrowed = token.narrow(scope)?;
            println!("{}", narrowed.encode());
            eprintln!(
                "token id {} (narrowed from {}; revoking either revokes it)",
                narrowed.ids().last().cloned().unwrap_or_default(),
                token.id()
            );
        }
        crate::TokenCommand::Show { token } => {
            let token = Token::decode(&token_text(&token)?)?;
            let blocks: Vec<serde_json::Value> = token
                .blocks
                .iter()
                .map(|b| {
                    serde_json::json!({
                        "id": b.id(),
                        "ns": b.scope.ns,
                        "ops": b.scope.ops,
                        "prefix": b.scope.prefix,
                        "expires_ms": b.scope.expires_ms,
                    })
                })
                .collect();
            print_json(&serde_json::json!({
                "id": token.id(),
                "signed_by": format!("{:016x}", token.root),
                "blocks": blocks,
                "note": "a request is allowed only if every block allows it; nothing here is verified",
            }));
        }
        crate::TokenCommand::Revoke { id, node } => {
            let id = if asp_auth::is_token_id(&id) {
                id
            } else {
                Token::decode(&token_text(&id)?)
                    .map_err(|e| {
                        anyhow::anyhow!(
                            "{id:?} is neither a token id (32 hex digits) nor a token: {e}"
                        )
                    })?
                    .id()
            };
            let body = serde_json::to_vec(&serde_json::json!({ "id": id }))?;
            let answer = client(&node.node)?
                .send(
                    axum::http::Method::POST,
                    "/v1/admin/tokens/revoke",
                    &[(axum::http::header::CONTENT_TYPE, "application/json")],
                    Bytes::from(body),
                )
                .await?
                .ok()?;
            let _ = answer;
            eprintln!("revoked {id}; every node refuses it once the revocation reaches it");
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn read_input(arg: &str) -> anyhow::Result<Vec<u8>> {
    if arg == "-" {
        let mut bytes = Vec::new();
        std::io::stdin()
            .read_to_end(&mut bytes)
            .context("reading the share from stdin")?;
        Ok(bytes)
    } else {
        std::fs::read(arg).with_context(|| format!("cannot read {arg}"))
    }
}

fn write_output(out: Option<&std::path::Path>, text: &str) -> anyhow::Result<()> {
    match out {
        Some(path) => {
            std::fs::write(path, format!("{text}\n"))
                .with_context(|| format!("cannot write {}", path.display()))?;
            eprintln!("wrote {}", path.display());
        }
        None => println!("{text}"),
    }
    Ok(())
}

fn describe(terms: &asp_tls::share::Terms) -> String {
    let names: Vec<String> = terms.namespaces.iter().map(ToString::to_string).collect();
    format!(
        "share {} from cluster {}: {} ({})",
        terms.id,
        terms.cluster,
        names.join(", "),
        terms.ops.join(",")
    )
}

pub async fn share(command: crate::ShareCommand) -> anyhow::Result<ExitCode> {
    use asp_tls::share;
    let read_ca = |dir: &std::path::Path| -> anyhow::Result<(String, String)> {
        let cert = std::fs::read_to_string(dir.join(asp_tls::issue::CA_CERT_FILE))
            .with_context(|| format!("cannot read {}/ca.pem", dir.display()))?;
        let key = std::fs::read_to_string(dir.join(asp_tls::issue::CA_KEY_FILE))
            .with_context(|| format!("cannot read {}/ca.key", dir.display()))?;
        Ok((cert, key))
    };
    match command {
        crate::ShareCommand::Create {
            ca_dir,
            cluster_id,
            peer_ca,
            ns,
            ops,
            require,
            ttl,
            out,
        } => {
            let (ca, key) = read_ca(&ca_dir)?;
            let peer_ca = std::fs::read_to_string(&peer_ca)
                .with_context(|| format!("cannot read {}", peer_ca.display()))?;
            let namespaces = ns
                .iter()
                .map(|n| share::parse_shared(n))
                .collect::<Result<Vec<_>, _>>()?;
            let require = require
                .iter()
                .map(|l| asp_tls::issue::parse_label(l))
                .collect::<Result<std::collections::BTreeMap<_, _>, _>>()?;
            let now = asp_store::clock::wall_ms();
            let terms = share::Terms {
                id: share::new_id(),
                cluster: cluster_id,
                ca,
                peer_ca,
                namespaces,
                ops,
                require,
                created_ms: now,
                expires_ms: now
                    .checked_add(parse_duration_ms(&ttl)?)
                    .context("--ttl is too long")?,
            };
            let document = share::offer(&terms, &key)?;
            write_output(out.as_deref(), &serde_json::to_string_pretty(&document)?)?;
            eprintln!(
                "offered {}; the other cluster accepts it with: asp share accept FILE --ca-dir ITS_CA_DIR --cluster-id ITS_ID",
                describe(&terms)
            );
        }
        crate::ShareCommand::Accept {
            file,
            ca_dir,
            cluster_id,
            out,
            install,
            node,
        } => {
            let bytes = read_input(&file)?;
            let mut found = share::Share::parse(&bytes)?;
            if let Some(dir) = ca_dir {
                let (_, key) = read_ca(&dir)?;
                let accepted = share::accept(
                    &found.document,
                    &cluster_id,
                    &key,
                    asp_store::clock::wall_ms(),
                )?;
                found = share::Share::check(&accepted)?;
                if !install || out.is_some() {
                    write_output(out.as_deref(), &serde_json::to_string_pretty(&accepted)?)?;
                }
                eprintln!(
                    "accepted {} for cluster {cluster_id}; both clusters install this accepted document: asp share accept FILE --install --node URL",
                    describe(&found.terms)
                );
            } else if found.acceptance.is_none() {
                anyhow::bail!(
                    "this share is an offer not yet accepted: the cluster it is offered to countersigns it with --ca-dir DIR --cluster-id ID"
                );
            }
            if install {
                let body = serde_json::to_vec(&found.document)?;
                let answer = client(&node.node)?
                    .send(
                        axum::http::Method::POST,
                        "/v1/admin/shares",
                        &[(axum::http::header::CONTENT_TYPE, "application/json")],
                        Bytes::from(body),
                    )
                    .await?
                    .ok()?;
                print_json(&answer.json()?);
            }
        }
        crate::ShareCommand::List { node } => {
            let answer = client(&node.node)?
                .send(
                    axum::http::Method::GET,
                    "/v1/admin/shares",
                    &[],
                    Bytes::new(),
                )
                .await?
                .ok()?;
            print_json(&answer.json()?);
        }
        crate::ShareCommand::Revoke { id, node } => {
            let answer = client(&node.node)?
                .send(
                    axum::http::Method::POST,
                    &format!("/v1/admin/shares/{id}/revoke"),
                    &[],
                    Bytes::new(),
                )
                .await?
                .ok()?;
            let v = answer.json()?;
            print_json(&v);
            if let Some(keeps) = v["partner_keeps"].as_str() {
                eprintln!("revoked share {id}: {keeps}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::cluster_text;

    #[test]
    fn the_cluster_text_shows_members_links_and_the_slowest_node_per_origin() {
        let view = serde_json::json!({
            "generated_ms": 1,
            "node_id": "aaaaaaaaaaaaaaaa",
            "nodes": [
                {"node_id": "aaaaaaaaaaaaaaaa", "this_node": true, "state": "alive", "error": null,
                 "status": {"feed": {"head_seq": 12}, "namespaces": [{"events": 12}],
                    "replication": {"peers": [{"node_id": "bbbbbbbbbbbbbbbb", "state": "active",
                        "namespaces": [{"name": "app", "lag_events": 3, "lag_ms": 40, "missing_events": 0}]}]},
                    "convergence": {"origins": [{"origin": "bbbbbbbbbbbbbbbb", "events": 5, "p50_ms": 4, "p99_ms": 9}]}}},
                {"node_id": "bbbbbbbbbbbbbbbb", "this_node": false, "state": "alive", "error": null,
                 "status": {"feed": {"head_seq": 9}, "namespaces": [{"events": 9}],
                    "convergence": {"origins": [{"origin": "aaaaaaaaaaaaaaaa", "events": 7, "p50_ms": 2, "p99_ms": 30}]}}},
                {"node_id": "cccccccccccccccc", "this_node": false, "state": "suspect",
                 "error": "no answer within 2000 ms", "status": null}
            ]
        });
        let text = cluster_text(&view);
        let line = |start: &str| {
            // The last such line (an origin's comes after its member's).
            text.lines()
                .rfind(|l| l.starts_with(start))
                .unwrap_or_else(|| panic!("no line {start}:\n{text}"))
                .split_whitespace()
                .collect::<Vec<_>>()
        };
        assert!(
            text.starts_with("asp cluster · 3 members · seen by aaaaaaaa"),
            "{text}"
        );
        assert_eq!(line("aaaaaaaa*"), ["aaaaaaaa*", "alive", "12", "12", "1"]);
        assert_eq!(
            line("cccccccc"),
            [
                "cccccccc", "error", "-", "-", "-", "no", "answer", "within", "2000", "ms"
            ]
        );
        assert_eq!(
            line("aaaaaaaa>"),
            ["aaaaaaaa>bbbbbbbb", "app", "3", "40", "ms", "0"]
        );
        assert_eq!(
            line("bbbbbbbb  "),
            ["bbbbbbbb", "5", "1", "4", "ms", "9", "ms"]
        );
        assert_eq!(
            line("aaaaaaaa  "),
            ["aaaaaaaa", "7", "1", "2", "ms", "30", "ms"]
        );
    }
}
