//! In a real browser (Debian's headless Chromium): the console renders a three-node
//! cluster with its live lag (a screenshot is kept as an artifact under
//! `target/tmp/browser/`, and the page's text is checked), and an `EventSource` on the
//! change feed from an allowed other origin receives changes while one from a
//! disallowed origin is refused.
//!
//! Chromium is `/usr/bin/chromium` (or `ASP_CHROMIUM`). `.ci/run` installs it; when
//! it is missing and the tests run as root, they install it with apt-get, as `.ci/run`
//! does; otherwise they fail saying how to install it.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Once;
use std::time::Duration;

use axum::response::Html;
use common::{Node, put_json};

fn chromium() -> PathBuf {
    static INSTALL: Once = Once::new();
    let path =
        PathBuf::from(std::env::var("ASP_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into()));
    INSTALL.call_once(|| {
        if path.exists() {
            return;
        }
        let root = Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| o.stdout.starts_with(b"0"));
        assert!(
            root,
            "{} is missing: install Debian's chromium (apt-get install chromium) or set ASP_CHROMIUM",
            path.display()
        );
        eprintln!("installing Debian's chromium for the browser tests (apt-get)");
        let install = || {
            Command::new("apt-get")
                .args(["install", "-y", "-q", "chromium"])
                .env("DEBIAN_FRONTEND", "noninteractive")
                .status()
                .is_ok_and(|s| s.success())
        };
        if !install() {
            let _ = Command::new("apt-get").args(["update", "-q"]).status();
            assert!(install(), "apt-get install chromium failed");
        }
    });
    assert!(path.exists(), "{} is missing", path.display());
    path
}

/// Runs headless Chromium on `url` with `mode` (`--dump-dom` or `--screenshot=FILE`)
/// after letting the page run for `budget_ms` of virtual time; bounded at 90 s.
fn browse(url: &str, mode: &str, budget_ms: u64) -> String {
    let profile = tempfile::tempdir().unwrap();
    // A clean environment: what cargo sets for tests (LD_LIBRARY_PATH among it) is
    // not for the browser.
    let mut child = Command::new(chromium())
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("HOME", profile.path())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--window-size=1300,1900",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(format!("--virtual-time-budget={budget_ms}"))
        .arg(mode)
        .arg(url)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start chromium");
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("chromium did not finish {url} within 90 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut out = String::new();
    std::io::Read::read_to_string(child.stdout.as_mut().unwrap(), &mut out).unwrap();
    out
}

fn artifacts() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("browser");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_renders_a_three_node_cluster_with_live_lag() {
    let dir = tempfile::tempdir().unwrap();
    let a = Node::start(&dir.path().join("a"), &[]).await;
    let b = Node::start(&dir.path().join("b"), &["--peer", &a.peer_addr()]).await;
    let c = Node::start(&dir.path().join("c"), &["--peer", &b.peer_addr()]).await;
    let ids = [a.node_id().await, b.node_id().await, c.node_id().await];
    for i in 0..12 {
        put_json(&a, "orders", &format!("a{i}"), "1").await;
        put_json(&c, "orders", &format!("c{i}"), "2").await;
    }
    common::converge(&[&a, &b, &c], "orders", 24, Duration::from_secs(30)).await;
    // a learns of c (linked to b only) by gossip: the page is opened once a's cluster
    // view holds all three with their status.
    common::eventually("a's cluster view holds every member", async || {
        let v = a.get_json("/v1/cluster").await;
        let nodes = v["nodes"].as_array()?;
        (nodes.len() == 3 && nodes.iter().all(|n| n["status"].is_object())).then_some(())
    })
    .await;
    let url = format!("{}/ui", a.url());
    let (page, shot) = tokio::task::spawn_blocking(move || {
        let shot = artifacts().join("console.png");
        let _ = std::fs::remove_file(&shot);
        let page = browse(&url, "--dump-dom", 5000);
        browse(&url, &format!("--screenshot={}", shot.display()), 5000);
        (page, shot)
    })
    .await
    .unwrap();
    // What the page drew from the live stream: three members, each by id, the links'
    // lag, convergence per pair and per origin, the namespace.
    assert!(page.contains("3 members"), "{page}");
    assert!(page.contains(">live<"), "{page}");
    for id in &ids {
        assert!(page.contains(id.as_str()), "{id} missing:\n{page}");
    }
    assert!(page.contains("lag (events)"), "{page}");
    assert!(page.contains("in sync"), "{page}");
    assert!(
        page.contains("2 of 2"),
        "every origin reached both others:\n{page}"
    );
    // The namespace row, with its key count (GET /v1/ns/orders/stats) as text.
    let text = page
        .split('<')
        .map(|part| part.split_once('>').map_or(part, |(_, t)| t))
        .collect::<Vec<_>>()
        .join(" ");
    let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(
        text.contains("orders lww multi-master anywhere 24 – 0"),
        "{text}"
    );
    // The topology graph: one circle per node, one line per active link (a line).
    assert_eq!(page.matches("<circle").count(), 3, "{page}");
    assert_eq!(page.matches("<line").count(), 2, "{page}");
    let png = std::fs::read(&shot).expect("the screenshot");
    assert!(png.starts_with(b"\x89PNG"), "not a PNG");
    assert!(png.len() > 20_000, "a blank page? {} bytes", png.len());
    eprintln!("console screenshot: {}", shot.display());
}

/// A page that opens an EventSource on the node's change feed and
/// writes what happened into the page.
fn feed_page(node: &str) -> String {
    format!(
        r#"<!doctype html><html><body><p id="out">waiting</p><script>
const out = document.getElementById("out");
const es = new EventSource("{node}/v1/ns/web/changes?since=0");
es.addEventListener("change", (e) => {{ out.textContent = "received " + JSON.parse(e.data).key; es.close(); }});
es.onerror = () => {{ if (es.readyState === EventSource.CLOSED) out.textContent = "refused"; }};
</script></body></html>"#
    )
}

async fn serve_page(page: String) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let app = axum::Router::new().route(
        "/",
        axum::routing::get(move || {
            let page = page.clone();
            async move { Html(page) }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_source_from_an_allowed_origin_receives_changes_and_another_is_refused() {
    // Two pages of the same content on two origins; the node allows only the first.
    let dir = tempfile::tempdir().unwrap();
    // The node's port is known only once it runs, and the allowed origin must be given
    // at start: take the page ports first.
    let allowed_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let allowed_port = allowed_listener.local_addr().unwrap().port();
    let origin = format!("http://127.0.0.1:{allowed_port}");
    let node = Node::start(&dir.path().join("a"), &["--cors-origin", &origin]).await;
    put_json(&node, "web", "hello", r#"{"from":"asp"}"#).await;
    let page = feed_page(&node.url());
    allowed_listener.set_nonblocking(true).unwrap();
    let listener = tokio::net::TcpListener::from_std(allowed_listener).unwrap();
    let app = axum::Router::new().route(
        "/",
        axum::routing::get({
            let page = page.clone();
            move || {
                let page = page.clone();
                async move { Html(page) }
            }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await });
    let other_port = serve_page(page).await;
    let (allowed, other) = tokio::task::spawn_blocking(move || {
        (
            browse(
                &format!("http://127.0.0.1:{allowed_port}/"),
                "--dump-dom",
                5000,
            ),
            browse(
                &format!("http://127.0.0.1:{other_port}/"),
                "--dump-dom",
                5000,
            ),
        )
    })
    .await
    .unwrap();
    let said = |dom: &str| {
        let from = dom.find(r#"<p id="out">"#).expect("the page's paragraph") + 12;
        dom[from..from + dom[from..].find("</p>").unwrap()].to_owned()
    };
    assert_eq!(said(&allowed), "received hello", "{allowed}");
    assert!(said(&other).ends_with("refused"), "{other}");
    assert!(!said(&other).contains("received"), "{other}");
}
