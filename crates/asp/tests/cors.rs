//! Browser access through a real `asp serve` with `--cors-origin` and tokens
//! required: the preflight (which carries no token) is answered, a refusal for a
//! missing token still carries the origin's permission (so the page can read the
//! 401), and a bad origin stops the node at start with a clear message.

mod common;

use std::process::Command;

use asp_http::client::{Client, ClientOptions};
use axum::http::{HeaderName, Method};
use bytes::Bytes;
use common::{BIN, Node};

const ALLOWED: &str = "http://app.example:5173";

fn token(dir: &std::path::Path) -> String {
    let out = Command::new(BIN)
        .args(["token", "create", "--data-dir"])
        .arg(dir)
        .args(["--ns", "*", "--ops", "read,write"])
        .env_remove("ASP_TOKEN")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

async fn send(
    node: &Node,
    token: Option<&str>,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
) -> asp_http::client::Response {
    let client = Client::with_options(
        &node.url(),
        &ClientOptions {
            ca: None,
            token: token.map(str::to_owned),
        },
    )
    .unwrap();
    let headers: Vec<(HeaderName, &str)> = headers
        .iter()
        .map(|(n, v)| (HeaderName::from_bytes(n.as_bytes()).unwrap(), *v))
        .collect();
    client
        .send(method, path, &headers, Bytes::new())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_of_an_allowed_origin_reaches_a_node_that_requires_tokens() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("n");
    let node = Node::start(&dir, &["--auth", "required", "--cors-origin", ALLOWED]).await;
    let preflight = [
        ("origin", ALLOWED),
        ("access-control-request-method", "GET"),
        ("access-control-request-headers", "authorization"),
    ];
    let r = send(
        &node,
        None,
        Method::OPTIONS,
        "/v1/ns/app/changes",
        &preflight,
    )
    .await;
    assert!(r.status.is_success(), "{}", r.status);
    assert_eq!(r.header("access-control-allow-origin"), Some(ALLOWED));
    let origin = [("origin", ALLOWED)];
    let r = send(&node, None, Method::GET, "/v1/ns/app/kv/k", &origin).await;
    assert_eq!(r.status.as_u16(), 401);
    assert_eq!(r.header("access-control-allow-origin"), Some(ALLOWED));
    let token = token(&dir);
    let r = send(&node, Some(&token), Method::GET, "/v1/ns/app/kv/k", &origin).await;
    assert_eq!(r.status.as_u16(), 404);
    assert_eq!(r.header("access-control-allow-origin"), Some(ALLOWED));
    let other = [("origin", "http://other.example")];
    let r = send(&node, Some(&token), Method::GET, "/v1/ns/app/kv/k", &other).await;
    assert_eq!(r.header("access-control-allow-origin"), None);
}

#[test]
fn a_bad_origin_stops_the_node_with_a_clear_message() {
    let root = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args(["serve", "--data-dir"])
        .arg(root.path())
        .args(["--api", "127.0.0.1:0", "--cors-origin", "app.example.com/"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cors_origins") && err.contains("is not an origin"),
        "{err}"
    );
}
