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
        let connection =
            http.serve_connection(TokioIo::new(stream), TowerToHyperService::new(app.clone()));
        let token = token.clone();
        let close_rx = close_rx.clone();
        tokio::spawn(async move {
            let mut connection = std::pin::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => {}
                () = token.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    let _ = connection.await;
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
