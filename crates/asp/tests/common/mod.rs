//! Runs real `asp serve` processes for tests.

#![allow(dead_code)]

use std::collections::HashMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use asp_http::client::{Client, ClientOptions};

pub const BIN: &str = env!("CARGO_BIN_EXE_asp");

/// A free port on loopback (released for the node to take), below Linux's ephemeral
/// range (32768 and up by default): a port the kernel hands out for port 0 is also
/// what it gives outgoing connections, so one of another test's connections could
/// take it while a node restarts (CI rehearsal: `restart` found its API port taken).
/// Each test process walks the range from its own starting point.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOW: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let start = std::process::id().wrapping_mul(7919) % SPAN;
    for _ in 0..SPAN {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (LOW + (start + n) % SPAN) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port between {LOW} and {}", LOW + SPAN)
}

pub struct Node {
    pub dir: PathBuf,
    pub port: u16,
    /// Where the node accepts peer links.
    pub peer_port: u16,
    pub extra: Vec<String>,
    /// Environment variables of the process (besides `RUST_LOG`).
    pub env: Vec<(String, String)>,
    child: Option<Child>,
    starts: u32,
}

impl Node {
    /// Starts a node on a fresh port and waits until it answers.
    pub async fn start(dir: &Path, extra: &[&str]) -> Node {
        Node::start_with_env(dir, extra, &[]).await
    }

    /// Like [`Node::start`], with environment variables.
    pub async fn start_with_env(dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> Node {
        let mut node = Node {
            dir: dir.to_owned(),
            port: free_port(),
            peer_port: free_port(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            child: None,
            starts: 0,
        };
        // A port free_port found may be taken again before the node binds it (another
        // test's connection gets it as its local port): try fresh ones a few times.
        for _ in 0..5 {
            node.spawn();
            if node.wait_healthy(Duration::from_secs(30), true).await {
                return node;
            }
            node.port = free_port();
            node.peer_port = free_port();
        }
        panic!(
            "asp serve found its ports taken five times:\n{}",
            node.log()
        );
    }

    pub fn peer_addr(&self) -> String {
        format!("127.0.0.1:{}", self.peer_port)
    }

    /// The value of `--flag` among the extra arguments.
    pub fn flag(&self, flag: &str) -> Option<&str> {
        let at = self.extra.iter().position(|a| a == flag)?;
        self.extra.get(at + 1).map(String::as_str)
    }

    pub fn url(&self) -> String {
        let scheme = if self.flag("--tls-cert").is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// A client of the API: with the node's CA bundle when it serves HTTPS, and with
    /// `ASP_TEST_TOKEN` from its environment when set.
    pub fn client(&self) -> Client {
        let options = ClientOptions {
            ca: self.flag("--tls-ca").map(PathBuf::from),
            token: self
                .env
                .iter()
                .find(|(k, _)| k == "ASP_TEST_TOKEN")
                .map(|(_, v)| v.clone()),
        };
        Client::with_options(&self.url(), &options).unwrap()
    }

    /// The JSON answer of a 2xx to `GET path` (panics otherwise).
    pub async fn get_json(&self, path: &str) -> serde_json::Value {
        self.client()
            .send(axum::http::Method::GET, path, &[], bytes::Bytes::new())
            .await
            .unwrap()
            .ok()
            .unwrap()
            .json()
            .unwrap()
    }

    /// The node's id, from its status.
    pub async fn node_id(&self) -> String {
        self.client().status().await.unwrap()["node_id"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    /// Where the current run's stderr goes.
    pub fn log_path(&self) -> PathBuf {
        self.dir.with_extension(format!("log.{}", self.starts))
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// (Re)starts the process on the same port and data directory.
    pub async fn restart(&mut self) {
        self.spawn();
        self.wait_healthy(Duration::from_secs(30), false).await;
    }

    fn spawn(&mut self) {
        assert!(self.child.is_none(), "the node is still running");
        self.starts += 1;
        let log = std::fs::File::create(self.log_path()).unwrap();
        let child = Command::new(BIN)
            .arg("serve")
            .arg("--data-dir")
            .arg(&self.dir)
            .arg("--api")
            .arg(format!("127.0.0.1:{}", self.port))
            // A test that gives --listen itself (`off`) gets no peer port of ours.
            .args(
                (!self.extra.iter().any(|a| a == "--listen"))
                    .then(|| {
                        [
                            "--listen".to_owned(),
                            format!("127.0.0.1:{}", self.peer_port),
                        ]
                    })
                    .into_iter()
                    .flatten(),
            )
            .args(&self.extra)
            .env("RUST_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start asp serve");
        self.child = Some(child);
    }

    /// Waits until the node answers `/healthz` (true). With `port_taken_ok`, a node that
    /// exits because its port is taken is not a failure: false.
    async fn wait_healthy(&mut self, limit: Duration, port_taken_ok: bool) -> bool {
        let client = self.client();
        let started = Instant::now();
        loop {
            if let Ok(r) = client
                .send(
                    axum::http::Method::GET,
                    "/healthz",
                    &[],
                    bytes::Bytes::new(),
                )
                .await
                && r.status.is_success()
            {
                return true;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                if port_taken_ok && self.log().contains("Address already in use") {
                    self.child = None;
                    return false;
                }
                panic!(
                    "asp serve exited with {status} while starting:\n{}",
                    self.log()
                );
            }
            assert!(
                started.elapsed() < limit,
                "asp serve did not become healthy in {limit:?}:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGKILL: no chance to flush anything.
    pub fn kill(&mut self) {
        let mut child = self.child.take().expect("running");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// Sends a signal and waits for the process to exit.
    pub fn signal(&mut self, signal: i32) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        // SAFETY: kill(2) takes two integers and touches no memory of ours; the pid is
        // our own child's, not yet waited for, so it cannot name another process.
        unsafe {
            libc::kill(child.id() as i32, signal);
        }
        let started = Instant::now();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "asp serve did not stop after signal {signal}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The running process's id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Every change of a namespace, following pages from the start.
pub async fn whole_feed(client: &Client, ns: &str) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    let mut since = 0;
    loop {
        let page = client.changes(ns, since, 10_000).await.unwrap();
        let changes = page["changes"].as_array().unwrap();
        if changes.is_empty() {
            break;
        }
        out.extend(changes.iter().cloned());
        since = page["next"].as_u64().unwrap();
    }
    out
}

/// A small deterministic generator, so a failing run can be replayed from its seed.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

pub fn seed() -> u64 {
    std::env::var("ASP_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        })
}

/// Every live key of a namespace with its version and value, through the listing API:
/// two nodes with the same state give the same digest.
pub async fn digest(client: &Client, ns: &str) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = client
            .list(ns, "", after.as_deref(), 1000, true)
            .await
            .unwrap();
        for item in page["items"].as_array().unwrap() {
            let value = item
                .get("value")
                .map(|v| v.to_string())
                .or_else(|| item.get("value_text").map(|v| v.to_string()))
                .or_else(|| item.get("value_base64").map(|v| v.to_string()))
                .unwrap_or_default();
            out.push((
                item["key"].as_str().unwrap().to_owned(),
                item["version"].as_str().unwrap().to_owned(),
                value,
            ));
        }
        match page["next_after"].as_str() {
            Some(k) => after = Some(k.to_owned()),
            None => return out,
        }
    }
}

/// A namespace's version vector as status shows it.
pub async fn vector(client: &Client, ns: &str) -> serde_json::Value {
    let status = client.status().await.unwrap();
    status["namespaces"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == ns)
        .map(|n| n["origins"].clone())
        .unwrap_or(serde_json::Value::Null)
}

/// The number of events of a namespace a node holds.
pub async fn events(client: &Client, ns: &str) -> u64 {
    let status = client.status().await.unwrap();
    status["namespaces"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == ns)
        .and_then(|n| n["events"].as_u64())
        .unwrap_or(0)
}

/// Waits (bounded by `limit`) until every node holds `expected` events of `ns` and the
/// same vector.
pub async fn converge(nodes: &[&Node], ns: &str, expected: u64, limit: Duration) {
    let started = Instant::now();
    loop {
        let mut counts = Vec::new();
        let mut vectors = Vec::new();
        for n in nodes {
            let c = n.client();
            counts.push(events(&c, ns).await);
            vectors.push(vector(&c, ns).await);
        }
        if counts.iter().all(|&c| c == expected) && vectors.windows(2).all(|w| w[0] == w[1]) {
            return;
        }
        assert!(
            started.elapsed() < limit,
            "no convergence to {expected} events within {limit:?}: {counts:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Polls `condition` every 20 ms until it holds, and fails naming `what` if it does
/// not within `limit`. Tests wait for a condition this way, never with a fixed sleep
/// before an assertion.
pub async fn wait_until<F, Fut>(what: &str, limit: Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !condition().await {
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls `f` every 50 ms until it returns `Some` (its value is returned), and fails
/// naming `what` if it does not within 60 s.
pub async fn eventually<T>(what: &str, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    let started = Instant::now();
    loop {
        if let Some(t) = f().await {
            return t;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "{what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The node's audit log (`_asp.audit`), every entry with its value, as text.
pub async fn audit_log(client: &Client) -> Result<String, asp_http::client::ClientError> {
    let page = client
        .send(
            axum::http::Method::GET,
            "/v1/ns/_asp.audit/kv?values=true",
            &[],
            bytes::Bytes::new(),
        )
        .await?;
    Ok(String::from_utf8_lossy(&page.body).into_owned())
}

/// Runs `asp serve` on configuration `toml` (written under `dir` as `name`.toml, with a
/// data directory beside it), which must refuse to start: returns what it printed.
pub fn refused_at_start(dir: &Path, name: &str, toml: &str) -> String {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, toml).unwrap();
    let out = Command::new(BIN)
        .args(["serve", "--data-dir"])
        .arg(dir.join(format!("{name}.data")))
        .arg("--config")
        .arg(&path)
        .args(["--api", "127.0.0.1:0", "--listen", "off"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "{name}: asp serve started:\n{stderr}"
    );
    stderr
}

/// A name no other run uses, for a test's streams, topics and queues on a shared broker.
pub fn unique() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{}{}", std::process::id(), nanos % 1_000_000_000)
}

/// Starts a node with configuration `toml`, written as `asp.toml` in a directory beside
/// the data directory `dir`.
pub async fn start(dir: &Path, toml: &str) -> Node {
    let conf = dir.with_extension("conf");
    std::fs::create_dir_all(&conf).unwrap();
    let path = conf.join("asp.toml");
    std::fs::write(&path, toml).unwrap();
    Node::start(dir, &["--config", path.to_str().unwrap()]).await
}

/// `GET /v1/connectors`: the named connector's entry.
pub async fn connector(node: &Node, name: &str) -> serde_json::Value {
    let answer = node
        .client()
        .send(
            axum::http::Method::GET,
            "/v1/connectors",
            &[],
            bytes::Bytes::new(),
        )
        .await
        .unwrap()
        .ok()
        .unwrap()
        .json()
        .unwrap();
    answer["connectors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no connector {name} in {answer}"))
        .clone()
}

/// Waits (up to 60 s) until the named connector's in side runs.
pub async fn in_side_running(node: &Node, name: &str) {
    let what = format!("the in side of {name} running");
    wait_until(&what, Duration::from_secs(60), || async {
        connector(node, name).await["in"]["state"] == "running"
    })
    .await;
}

/// Writes `value` with its content type: the version written.
pub async fn put(node: &Node, ns: &str, key: &str, content_type: &str, value: &str) -> String {
    let w = node
        .client()
        .put(
            ns,
            key,
            content_type,
            bytes::Bytes::from(value.to_owned()),
            None,
        )
        .await
        .unwrap();
    w["version"].as_str().unwrap().to_owned()
}

/// Writes a JSON value: the version written.
pub async fn put_json(node: &Node, ns: &str, key: &str, json: &str) -> String {
    put(node, ns, key, "application/json", json).await
}

/// The live keys of a namespace and their values as JSON text.
pub async fn values(node: &Node, ns: &str) -> HashMap<String, String> {
    digest(&node.client(), ns)
        .await
        .into_iter()
        .map(|(k, _, v)| (k, v))
        .collect()
}

/// The live keys of a namespace and their values, parsed.
pub async fn json_values(node: &Node, ns: &str) -> HashMap<String, serde_json::Value> {
    values(node, ns)
        .await
        .into_iter()
        .map(|(k, v)| (k, serde_json::from_str(&v).unwrap()))
        .collect()
}

/// The changes every out connector test makes: in `orders`, a JSON put of `o-1`, a
/// text put of `a b/é` and the delete of `o-1`; then a put in `other`, which is no
/// connector's. Returns the node's id and the three versions, in order.
pub async fn out_test_changes(node: &Node) -> (String, [String; 3]) {
    let client = node.client();
    let node_id = client.status().await.unwrap()["node_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let v1 = put_json(node, "orders", "o-1", r#"{"qty":3}"#).await;
    let v2 = put(node, "orders", "a b/é", "text/plain", "plain text").await;
    let v3 = client.delete("orders", "o-1", None).await.unwrap()["version"]
        .as_str()
        .unwrap()
        .to_owned();
    put_json(node, "other", "x", "1").await;
    (node_id, [v1, v2, v3])
}
