//! A link's writer task: the frames the link task queues, written to the socket in
//! order (see the module docs of [`super`] for why the link never writes while it could
//! be reading).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::io::{AsyncWriteExt, WriteHalf};
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::{Notify, mpsc};
use tokio_rustls::TlsStream;

/// The sending side of a link's connection.
pub(super) enum Writer {
    Plain(Arc<OwnedWriteHalf>),
    Tls(WriteHalf<TlsStream<TcpStream>>),
    Carried(WriteHalf<tokio::io::DuplexStream>),
}

/// Writes queued frames to the socket, in order.
pub(super) async fn write_loop(
    wr: Writer,
    rx: mpsc::UnboundedReceiver<Vec<u8>>,
    queued: Arc<AtomicUsize>,
    drained: Arc<Notify>,
) {
    match wr {
        Writer::Plain(wr) => write_plain(wr, rx, queued, drained).await,
        Writer::Tls(wr) => write_whole(wr, rx, queued, drained).await,
        Writer::Carried(wr) => write_whole(wr, rx, queued, drained).await,
    }
}

/// TLS and carried streams (no `try_write`): each queued frame is written whole; queued
/// frames go out in one flush.
async fn write_whole<W: tokio::io::AsyncWrite>(
    mut wr: WriteHalf<W>,
    mut rx: mpsc::UnboundedReceiver<Vec<u8>>,
    queued: Arc<AtomicUsize>,
    drained: Arc<Notify>,
) {
    while let Some(bytes) = rx.recv().await {
        if wr.write_all(&bytes).await.is_err() {
            return;
        }
        queued.fetch_sub(bytes.len(), Ordering::AcqRel);
        let mut more = true;
        while more {
            match rx.try_recv() {
                Ok(bytes) => {
                    if wr.write_all(&bytes).await.is_err() {
                        return;
                    }
                    queued.fetch_sub(bytes.len(), Ordering::AcqRel);
                }
                Err(_) => more = false,
            }
        }
        if wr.flush().await.is_err() {
            return;
        }
        drained.notify_one();
    }
    // The link is done: close_notify, then the connection's sending side closes.
    let _ = wr.shutdown().await;
}

async fn write_plain(
    wr: Arc<OwnedWriteHalf>,
    mut rx: mpsc::UnboundedReceiver<Vec<u8>>,
    queued: Arc<AtomicUsize>,
    drained: Arc<Notify>,
) {
    while let Some(bytes) = rx.recv().await {
        let mut at = 0;
        while at < bytes.len() {
            if wr.writable().await.is_err() {
                return;
            }
            match wr.try_write(&bytes[at..]) {
                Ok(n) => at += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => return,
            }
        }
        queued.fetch_sub(bytes.len(), Ordering::AcqRel);
        drained.notify_one();
    }
    // Dropping the last handle of the write half shuts the connection's sending side.
}
