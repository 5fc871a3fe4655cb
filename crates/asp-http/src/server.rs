//! The server loop: accepts connections up to `connections_max`, serves each with
//! hyper's HTTP/1 under a header read timeout, and on shutdown lets requests in flight
//! finish. (axum's own `serve` has no timer, so a client that sends half a request
//! line would hold its connection forever.)

use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};

use crate::routes::{AppState, router};

/// Serves the API on `listener` until the state's shutdown token is cancelled, then
/// finishes the requests in flight.
pub async fn serve(listener: TcpListener, state: AppState) -> std::io::Result<()> {
    serve_with_tls(listener, state, None).await
}

/// As [`serve`], over HTTPS when `tls` is given (each connection takes the material of
/// the moment it arrives, so a reloaded certificate serves new connections). A client
/// that speaks plain HTTP to it is answered, in plain HTTP, that the port wants HTTPS.
pub async fn serve_with_tls(
    listener: TcpListener,
    state: AppState,
    tls: Option<Arc<asp_tls::Tls>>,
) -> std::io::Result<()> {
    let config = state.config().clone();
    let token = state.shutdown_token();
    let refused = state.connections_refused();
    let app = router(state);
    let slots = Arc::new(Semaphore::new(config.connections_max));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(config.header_read_timeout);
    // Each connection task holds a receiver; the loop waits for all of them to go.
    let (close_tx, close_rx) = watch::channel(());
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) if is_connection_error(&e) => continue,
                Err(e) => {
                    // Out of file descriptors, most likely: wait for some to close
                    // rather than spin.
                    tracing::error!(error = %e, "accepting an HTTP connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = token.cancelled() => break,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            refused.inc();
            refuse(&stream, config.connections_max);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let token = token.clone();
        let close_rx = close_rx.clone();
        let service = TowerToHyperService::new(app.clone());
        let http = http.clone();
        let acceptor = tls.as_ref().map(|t| t.current().api_acceptor.clone());
        let handshake_timeout = config.header_read_timeout;
        tokio::spawn(async move {
            match acceptor {
                None => run_connection(&http, stream, service, &token).await,
                Some(acceptor) => {
                    let handshake = async {
                        if speaks_plain_http(&stream).await {
                            answer_plain_http(&stream);
                            return None;
                        }
                        acceptor.accept(stream).await.ok()
                    };
                    // Bounded like a request's header: a client that opens a
                    // connection and says nothing does not hold a slot.
                    let accepted = tokio::select! {
                        a = tokio::time::timeout(handshake_timeout, handshake) => a.ok().flatten(),
                        () = token.cancelled() => None,
                    };
                    if let Some(stream) = accepted {
                        run_connection(&http, stream, service, &token).await;
                    }
                }
            }
            drop(slot);
            drop(close_rx);
        });
    }
    drop(close_rx);
    drop(listener);
    close_tx.closed().await;
    Ok(())
}

/// Serves one connection until it ends or the server shuts down (then gracefully).
async fn run_connection<IO, S>(
    http: &hyper::server::conn::http1::Builder,
    io: IO,
    service: S,
    token: &tokio_util::sync::CancellationToken,
) where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::HttpService<hyper::body::Incoming> + Send,
    S::Future: Send + 'static,
    S::ResBody: Send + 'static,
    <S::ResBody as hyper::body::Body>::Data: Send,
    <S::ResBody as hyper::body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let connection = http.serve_connection(TokioIo::new(io), service);
    let mut connection = std::pin::pin!(connection);
    tokio::select! {
        _ = connection.as_mut() => {}
        () = token.cancelled() => {
            connection.as_mut().graceful_shutdown();
            let _ = connection.await;
        }
    }
}

/// Whether the client's first byte is a letter (an HTTP request line) rather than a TLS
/// record (0x16, handshake).
async fn speaks_plain_http(stream: &TcpStream) -> bool {
    let mut first = [0u8; 1];
    matches!(stream.peek(&mut first).await, Ok(1) if first[0].is_ascii_uppercase())
}

/// Tells a plain-HTTP client, once and in its own language, that this port is HTTPS.
fn answer_plain_http(stream: &TcpStream) {
    let body = r#"{"error":{"code":"https_required","message":"this node serves its API over HTTPS on this port: use https:// (with the cluster's CA bundle)"}}"#;
    let answer = format!(
        "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.try_write(answer.as_bytes());
}

/// Answers a connection over the limit with a 503 if its socket takes it at once (never
/// waiting on the client), then closes it.
fn refuse(stream: &TcpStream, connections_max: usize) {
    let body = format!(
        r#"{{"error":{{"code":"too_many_connections","message":"this node serves at most {connections_max} HTTP connections at once (http_connections_max); retry later"}}}}"#
    );
    let answer = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.try_write(answer.as_bytes());
}

/// Errors of one connection that leave the listener as good as before.
fn is_connection_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionRefused | ConnectionAborted | ConnectionReset
    )
}
