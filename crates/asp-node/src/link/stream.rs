//! A link's connection before its session: the TLS handshake (or plain TCP), which
//! kind of peer it is (a member, or another cluster through a share), and the test
//! capture of every frame sent.

use asp_core::session::{ErrorCode, Frame};
use tokio::net::TcpStream;
use tokio_rustls::TlsStream;

use crate::federation::Rights;
use crate::registry::{Direction, Inner, wall_ms};

/// The first byte of a TLS connection (a handshake record).
pub(super) const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// A peer link's connection: plain TCP, or TLS over it, or a byte stream carried by
/// another transport (the NATS transport's connections: see [`crate::Replicator::attach`]).
pub(super) enum PeerStream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
    Carried(tokio::io::DuplexStream),
}

/// A connection handed to a link: a TCP socket, or a carried byte stream (which the
/// transport that carries it secures, so no TLS handshake runs over it).
pub(crate) enum Connection {
    Tcp(TcpStream),
    Carried(tokio::io::DuplexStream),
}

/// With TLS configured, the handshake: the acceptor requires a certificate from the
/// cluster CA, the dialer checks the acceptor's against the host it dialed. Returns the
/// stream and what the peer's certificate attests.
pub(super) async fn upgrade(
    inner: &Inner,
    stream: Connection,
    direction: Direction,
    address: &str,
) -> Result<(PeerStream, Option<asp_tls::Identity>, Option<Rights>), String> {
    let stream = match stream {
        Connection::Tcp(stream) => stream,
        Connection::Carried(stream) => return Ok((PeerStream::Carried(stream), None, None)),
    };
    let Some(tls) = &inner.config.tls else {
        return Ok((PeerStream::Plain(stream), None, None));
    };
    let material = tls.current();
    if direction == Direction::Inbound {
        // A peer without TLS: tell it why in its own framing, then close.
        let mut first = [0u8; 1];
        let peeked =
            tokio::time::timeout(inner.config.handshake_timeout, stream.peek(&mut first)).await;
        if matches!(peeked, Ok(Ok(1)) if first[0] != TLS_HANDSHAKE_RECORD) {
            let mut bytes = Vec::new();
            let refusal = Frame::Error {
                code: ErrorCode::Protocol,
                message: "this node requires TLS on peer links (mutual, with a certificate from the cluster CA): start the node with --tls-cert, --tls-key and --tls-ca".into(),
            };
            if asp_wire::encode(&refusal, &mut bytes).is_ok() {
                let _ = stream.try_write(&bytes);
            }
            return Err(format!(
                "the peer at {address} speaks plain TCP; this node requires TLS on peer links"
            ));
        }
    }
    let handshake = async {
        match direction {
            Direction::Inbound => material
                .peer_acceptor
                .accept(stream)
                .await
                .map(TlsStream::from)
                .map_err(|e| format!("TLS handshake with {address} failed: {e}")),
            Direction::Outbound => {
                let name = asp_tls::server_name(address).map_err(|e| e.to_string())?;
                material
                    .peer_connector
                    .connect(name, stream)
                    .await
                    .map(TlsStream::from)
                    .map_err(|e| {
                        let hint = if e.to_string().contains("InvalidContentType") {
                            " (does the peer run without TLS?)"
                        } else {
                            ""
                        };
                        format!("TLS handshake with {address} failed: {e}{hint}")
                    })
            }
        }
    };
    let stream = tokio::time::timeout(inner.config.handshake_timeout, handshake)
        .await
        .map_err(|_| {
            format!(
                "no TLS handshake with {address} within {:?}",
                inner.config.handshake_timeout
            )
        })??;
    let identity = asp_tls::peer_identity(stream.get_ref().1);
    // A certificate from this cluster's CA makes a member; one from a partner CA, a
    // federated link with the rights of the shares that name that CA.
    let mut rights = None;
    if let Some(peer) = &identity
        && !material.is_member(peer)
    {
        match inner.federation.rights_for(peer, wall_ms()) {
            Some(r) => rights = Some(r),
            None => {
                return Err(format!(
                    "the certificate of {address} ({}) is not from this cluster's CA, and no active share names its CA (revoked or expired?)",
                    peer.name
                ));
            }
        }
    }
    Ok((PeerStream::Tls(Box::new(stream)), identity, rights))
}

/// With `ASP_TEST_CAPTURE_DIR` set (tests that check what leaves a node), a file that
/// gets every frame a link sends: `<dir>/<this node>-<link id>-<peer>.frames`, where the
/// peer is the name its certificate attests or its address.
pub(super) fn capture_file(inner: &Inner, id: u64, peer: &str) -> Option<std::fs::File> {
    let dir = std::env::var_os("ASP_TEST_CAPTURE_DIR")?;
    let peer: String = peer
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    let path = std::path::Path::new(&dir).join(format!("{}-{id}-{peer}.frames", inner.node_id));
    match std::fs::File::create(&path) {
        Ok(f) => Some(f),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot capture frames");
            None
        }
    }
}
