//! Bearer tokens between real `asp serve` processes: 401 and 403 by scope, a token
//! signed on one node accepted on another, offline narrowing, and a revocation that
//! reaches the other node.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use asp_http::client::{Client, ClientOptions};
use axum::http::Method;
use bytes::Bytes;
use common::{BIN, Node};

fn asp(args: &[&str], stdin: Option<&str>) -> (bool, String, String) {
    use std::io::Write;
    let mut child = Command::new(BIN)
        .args(args)
        .env_remove("ASP_TOKEN")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    if let Some(text) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
    }
    drop(child.stdin.take());
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn create(dir: &Path, extra: &[&str]) -> String {
    let dir = dir.display().to_string();
    let mut args = vec!["token", "create", "--data-dir", &dir];
    args.extend_from_slice(extra);
    let (ok, token, err) = asp(&args, None);
    assert!(ok, "asp token create {extra:?}: {err}");
    assert!(
        token.starts_with("asp1.") && !token.contains('\n'),
        "{token}"
    );
    token
}

fn client(node: &Node, token: Option<&str>) -> Client {
    Client::with_options(
        &node.url(),
        &ClientOptions {
            ca: None,
            token: token.map(str::to_owned),
        },
    )
    .unwrap()
}

/// The status and error code of `method path` with `token`.
async fn call(
    node: &Node,
    token: Option<&str>,
    method: Method,
    path: &str,
    body: &str,
) -> (u16, String) {
    let r = client(node, token)
        .send(
            method,
            path,
            &[(axum::http::header::CONTENT_TYPE, "application/json")],
            Bytes::from(body.to_owned()),
        )
        .await
        .unwrap();
    let code = r
        .json()
        .ok()
        .and_then(|v| v["error"]["code"].as_str().map(str::to_owned))
        .unwrap_or_default();
    (r.status.as_u16(), code)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_allow_their_scope_work_on_every_node_and_revocation_reaches_them() {
    let root = tempfile::tempdir().unwrap();
    let d1 = root.path().join("n1");
    let n1 = Node::start(&d1, &["--auth", "required"]).await;
    let n2 = Node::start(
        &root.path().join("n2"),
        &["--auth", "required", "--peer", &n1.peer_addr()],
    )
    .await;
    let admin = create(&d1, &["--ns", "*", "--ops", "read,write,admin"]);
    let writer = create(
        &d1,
        &["--ns", "orders*", "--ops", "read,write", "--prefix", "eu/"],
    );
    let reader = create(&d1, &["--ns", "orders", "--ops", "read", "--ttl", "1h"]);

    // No token, a bad one: 401 with the usual JSON error; health stays open.
    assert_eq!(call(&n1, None, Method::GET, "/healthz", "").await.0, 200);
    assert_eq!(
        call(&n1, None, Method::GET, "/v1/openapi.json", "").await.0,
        200
    );
    for token in [None, Some("asp1.AAAA"), Some("nonsense")] {
        assert_eq!(
            call(&n1, token, Method::GET, "/v1/ns/orders/kv/eu%2F1", "").await,
            (401, "unauthorized".into()),
            "{token:?}"
        );
    }
    assert_eq!(
        call(&n1, None, Method::GET, "/metrics", "").await.0,
        401,
        "metrics need a token unless [auth] metrics = \"open\""
    );
    assert_eq!(
        call(&n1, Some(&admin), Method::GET, "/metrics", "").await.0,
        200
    );

    // In scope: 2xx; out of scope: 403.
    let put = |token: &str, path: &str| {
        let token = token.to_owned();
        let path = path.to_owned();
        let n1 = &n1;
        async move { call(n1, Some(&token), Method::PUT, &path, "1").await }
    };
    assert_eq!(put(&writer, "/v1/ns/orders/kv/eu%2F1").await.0, 200);
    assert_eq!(put(&writer, "/v1/ns/orders-old/kv/eu%2F2").await.0, 200);
    for (token, path, why) in [
        (&writer, "/v1/ns/orders/kv/us%2F1", "key outside the prefix"),
        (&writer, "/v1/ns/users/kv/eu%2F1", "another namespace"),
        (&reader, "/v1/ns/orders/kv/eu%2F1", "read-only"),
        (&writer, "/v1/ns/orders/policy", "policy needs admin"),
        (&admin, "/v1/ns/_asp.auth/kv/x", "a reserved namespace"),
    ] {
        assert_eq!(put(token, path).await, (403, "forbidden".into()), "{why}");
    }
    assert_eq!(
        call(
            &n1,
            Some(&reader),
            Method::GET,
            "/v1/ns/orders/kv/eu%2F1",
            ""
        )
        .await
        .0,
        200
    );
    assert_eq!(
        call(&n1, Some(&writer), Method::GET, "/v1/ns/orders/changes", "")
            .await
            .0,
        403,
        "a prefix token cannot read the whole feed"
    );
    assert_eq!(
        call(
            &n1,
            Some(&writer),
            Method::GET,
            "/v1/ns/orders/kv?prefix=eu%2F",
            ""
        )
        .await
        .0,
        200
    );
    assert_eq!(
        call(&n1, Some(&writer), Method::GET, "/v1/status", "")
            .await
            .0,
        403
    );
    // A batch with one key outside the prefix writes nothing.
    let batch =
        r#"{"ops":[{"op":"put","key":"eu/3","value":1},{"op":"put","key":"us/3","value":1}]}"#;
    assert_eq!(
        call(
            &n1,
            Some(&writer),
            Method::POST,
            "/v1/ns/orders/batch",
            batch
        )
        .await
        .0,
        403
    );
    assert_eq!(
        call(
            &n1,
            Some(&admin),
            Method::GET,
            "/v1/ns/orders/kv/eu%2F3",
            ""
        )
        .await
        .0,
        404
    );

    // Narrowed offline by its holder: only what both allow.
    let (ok, narrow, err) = asp(
        &["token", "narrow", "-", "--ns", "orders", "--ops", "read"],
        Some(&writer),
    );
    assert!(ok, "{err}");
    assert_eq!(
        call(
            &n1,
            Some(&narrow),
            Method::GET,
            "/v1/ns/orders/kv/eu%2F1",
            ""
        )
        .await
        .0,
        200
    );
    assert_eq!(put(&narrow, "/v1/ns/orders/kv/eu%2F1").await.0, 403);

    // n2 accepts what n1 signed once n1's key has replicated; then n1 revokes the
    // writer token and n2 refuses it, and the token narrowed from it.
    let started = Instant::now();
    loop {
        let (status, _) = call(
            &n2,
            Some(&writer),
            Method::GET,
            "/v1/ns/orders/kv/eu%2F1",
            "",
        )
        .await;
        if status == 200 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "n2 never accepted n1's token ({status})"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (ok, _, err) = asp(
        &[
            "token",
            "revoke",
            &writer,
            "--node",
            &n1.url(),
            "--token",
            &admin,
        ],
        None,
    );
    assert!(ok, "{err}");
    let started = Instant::now();
    loop {
        let (status, _) = call(
            &n2,
            Some(&writer),
            Method::GET,
            "/v1/ns/orders/kv/eu%2F1",
            "",
        )
        .await;
        if status == 401 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "n2 still accepts a revoked token"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!(
        "revocation reached the other node in {:?}",
        started.elapsed()
    );
    assert_eq!(
        call(
            &n2,
            Some(&narrow),
            Method::GET,
            "/v1/ns/orders/kv/eu%2F1",
            ""
        )
        .await
        .0,
        401
    );
    assert_eq!(
        call(
            &n2,
            Some(&admin),
            Method::GET,
            "/v1/ns/orders/kv/eu%2F1",
            ""
        )
        .await
        .0,
        200,
        "other tokens still work"
    );
    // n1's audit log names the revocation; it stays on n1.
    let audit = |node: &Node| {
        let admin = admin.clone();
        let client = client(node, Some(&admin));
        async move { common::audit_log(&client).await.unwrap() }
    };
    let revoked_id = {
        let (_, shown, _) = asp(&["token", "show", &writer], None);
        let v: serde_json::Value = serde_json::from_str(&shown).unwrap();
        v["id"].as_str().unwrap().to_owned()
    };
    let started = Instant::now();
    loop {
        let log = audit(&n1).await;
        if log.contains("token_revoked") && log.contains(&revoked_id) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no audit entry: {log}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        !audit(&n2).await.contains("token_revoked"),
        "the audit log replicated"
    );
    // Revoking needs admin.
    let (ok, _, err) = asp(
        &[
            "token",
            "revoke",
            &admin,
            "--node",
            &n1.url(),
            "--token",
            &reader,
        ],
        None,
    );
    assert!(!ok && err.contains("403"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_commands_name_what_is_wrong() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("n1");
    let mut n1 = Node::start(&dir, &[]).await;
    n1.signal(libc::SIGTERM);
    let d = dir.display().to_string();
    for (args, words) in [
        (vec!["--ns", "*", "--ops", "read"], "--auth required"),
        (vec!["--ns", "*", "--ops", "fly"], "fly"),
        (vec!["--ns", "a b", "--ops", "read"], "\"a b\""),
        (vec!["--ns", "*", "--ops", "read", "--ttl", "soon"], "--ttl"),
    ] {
        let mut all = vec!["token", "create", "--data-dir", &d];
        all.extend_from_slice(&args);
        let (ok, out, err) = asp(&all, None);
        assert!(!ok && out.is_empty(), "{args:?}");
        assert!(err.contains(words), "{args:?}: {err}");
    }
    let (ok, _, err) = asp(
        &[
            "token",
            "create",
            "--data-dir",
            "/nonexistent",
            "--ns",
            "*",
            "--ops",
            "read",
        ],
        None,
    );
    assert!(!ok && err.contains("not an asp data directory"), "{err}");
    let (ok, _, err) = asp(&["token", "show", "asp1.xyz"], None);
    assert!(!ok && err.contains("not an asp token"), "{err}");
}
