//! Browser access (CORS): with `cors_origins` set, a preflight from an allowed origin
//! is answered, and answers to it — the change feed's too — carry its
//! `Access-Control-Allow-Origin`; another origin gets no CORS headers, so a browser
//! refuses it the response. Without `cors_origins`, no CORS headers at all.

use std::net::SocketAddr;

use asp_http::client::{Client, Response};
use asp_http::{ApiConfig, AppState};
use asp_store::{Store, StoreConfig};
use axum::http::{HeaderName, Method};
use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

const ALLOWED: &str = "http://app.example:5173";
const OTHER: &str = "http://evil.example";

struct Server {
    client: Client,
    addr: SocketAddr,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
    store: Store,
}

impl Server {
    async fn start(dir: &std::path::Path, origins: &[&str]) -> Server {
        let store = Store::open(StoreConfig::new(dir)).unwrap();
        let api_config = ApiConfig {
            cors_origins: origins.iter().map(|o| o.to_string()).collect(),
            ..ApiConfig::default()
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let state = AppState::new(store.clone(), None, api_config, addr, shutdown.clone());
        let task = tokio::spawn(asp_http::serve(listener, state));
        Server {
            client: Client::new(&format!("http://{addr}")).unwrap(),
            addr,
            shutdown,
            task,
            store,
        }
    }

    async fn send(&self, method: Method, path: &str, headers: &[(&str, &str)]) -> Response {
        let headers: Vec<(HeaderName, &str)> = headers
            .iter()
            .map(|(n, v)| (HeaderName::from_bytes(n.as_bytes()).unwrap(), *v))
            .collect();
        self.client
            .send(method, path, &headers, Bytes::new())
            .await
            .unwrap()
    }

    /// The head of the change feed's answer to a GET from `origin` (the stream
    /// itself does not end, so it is read up to the blank line).
    async fn feed_head(&self, origin: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(self.addr).await.unwrap();
        let request = format!(
            "GET /v1/ns/app/changes HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\nOrigin: {origin}\r\n\r\n"
        );
        s.write_all(request.as_bytes()).await.unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") && head.len() < 16 * 1024 {
            if s.read(&mut byte).await.unwrap() == 0 {
                break;
            }
            head.push(byte[0]);
        }
        String::from_utf8(head).unwrap().to_ascii_lowercase()
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap().unwrap();
        self.store.shutdown().await;
    }
}

fn preflight(origin: &'static str) -> Vec<(&'static str, &'static str)> {
    vec![
        ("origin", origin),
        ("access-control-request-method", "PATCH"),
        (
            "access-control-request-headers",
            "authorization, content-type",
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_allowed_origin_is_answered_and_another_is_not() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[ALLOWED]).await;
    let put = server
        .client
        .send(
            Method::PUT,
            "/v1/ns/app/kv/k",
            &[],
            Bytes::from_static(b"v"),
        )
        .await
        .unwrap();
    assert!(put.status.is_success(), "{}", put.status);

    // The preflight of a PATCH with a token: answered for the allowed origin, with
    // the method and the headers it asked for.
    let r = server
        .send(Method::OPTIONS, "/v1/ns/app/kv/k", &preflight(ALLOWED))
        .await;
    assert!(r.status.is_success(), "{}", r.status);
    assert_eq!(r.header("access-control-allow-origin"), Some(ALLOWED));
    let methods = r.header("access-control-allow-methods").unwrap();
    assert!(methods.contains("PATCH"), "{methods}");
    let headers = r.header("access-control-allow-headers").unwrap();
    assert!(headers.contains("authorization"), "{headers}");
    // Another origin's preflight gets no permission.
    let r = server
        .send(Method::OPTIONS, "/v1/ns/app/kv/k", &preflight(OTHER))
        .await;
    assert_eq!(r.header("access-control-allow-origin"), None);

    // A read: the same.
    let r = server
        .send(Method::GET, "/v1/ns/app/kv/k", &[("origin", ALLOWED)])
        .await;
    assert_eq!(r.status.as_u16(), 200);
    assert_eq!(&r.body[..], b"v");
    assert_eq!(r.header("access-control-allow-origin"), Some(ALLOWED));
    let r = server
        .send(Method::GET, "/v1/ns/app/kv/k", &[("origin", OTHER)])
        .await;
    assert_eq!(r.header("access-control-allow-origin"), None);

    // The change feed (what an EventSource opens).
    let head = server.feed_head(ALLOWED).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(
        head.contains(&format!("access-control-allow-origin: {ALLOWED}")),
        "{head}"
    );
    let head = server.feed_head(OTHER).await;
    assert!(!head.contains("access-control-allow-origin"), "{head}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_cors_origins_no_origin_is_answered_and_any_opens_all() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]).await;
    let r = server
        .send(Method::GET, "/v1/status", &[("origin", ALLOWED)])
        .await;
    assert_eq!(r.status.as_u16(), 200);
    assert_eq!(r.header("access-control-allow-origin"), None);
    let r = server
        .send(Method::OPTIONS, "/v1/ns/app/kv/k", &preflight(ALLOWED))
        .await;
    assert_eq!(r.header("access-control-allow-origin"), None);
    server.stop().await;

    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &["*"]).await;
    let r = server
        .send(Method::GET, "/v1/status", &[("origin", OTHER)])
        .await;
    assert_eq!(r.header("access-control-allow-origin"), Some("*"));
    server.stop().await;
}
