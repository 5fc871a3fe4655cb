//! TLS for asp: a cluster CA and node certificates that attest a node's name and labels
//! ([`issue`]), the rustls configurations a node serves and dials with ([`Material`]),
//! and reloading them while the node runs ([`Tls`]).
//!
//! One certificate per node serves both of its ports: peer links are mutual (each side
//! presents a certificate from the cluster CA and checks the other's), the HTTP API is
//! server-authenticated only (its clients prove themselves with tokens). TLS 1.3 only,
//! with the `ring` provider.
//!
//! A node's identity lives in its certificate's subject alternative names:
//! `asp-node:NAME` names it, each `asp-label:KEY=VALUE` attests one label. Peers read
//! them from the certificate the handshake verified, never from what the node says
//! about itself.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use tokio_rustls::{TlsAcceptor, TlsConnector};

pub mod issue;
pub mod share;
mod watch;

pub use watch::{ReloadMetrics, ReloadOutcome, reload_once, watch};

/// The subject alternative name (URI) prefix that names a node.
pub const NODE_URI_PREFIX: &str = "asp-node:";
/// The subject alternative name (URI) prefix of an attested label: `asp-label:k=v`.
pub const LABEL_URI_PREFIX: &str = "asp-label:";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{what} {path} holds no usable PEM {kind}: {detail}")]
    Pem {
        what: &'static str,
        path: PathBuf,
        kind: &'static str,
        detail: String,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Rustls(#[from] rustls::Error),
}

/// Where a node's certificate, key and CA bundle are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsPaths {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

/// What a certificate attests.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Identity {
    /// The node name (`asp-node:` SAN), or the subject's common name without one.
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// The certificate's serial number, hex.
    pub serial: String,
    /// When it stops being valid, seconds since the Unix epoch.
    pub not_after: i64,
    /// The issuer's name, DER: which CA (this cluster's, or a partner's through a
    /// share) vouches for the peer.
    pub issuer: Vec<u8>,
}

impl Identity {
    /// Reads the name and labels a certificate attests.
    pub fn of(cert: &CertificateDer<'_>) -> Result<Identity, TlsError> {
        use x509_parser::extensions::GeneralName;
        let (_, x509) = x509_parser::parse_x509_certificate(cert.as_ref())
            .map_err(|e| TlsError::Invalid(format!("cannot parse a certificate: {e}")))?;
        let mut identity = Identity {
            serial: x509.raw_serial_as_string().replace(':', ""),
            not_after: x509.validity().not_after.timestamp(),
            issuer: x509.issuer().as_raw().to_vec(),
            ..Identity::default()
        };
        if let Ok(Some(san)) = x509.subject_alternative_name() {
            for name in &san.value.general_names {
                let GeneralName::URI(uri) = name else {
                    continue;
                };
                if let Some(node) = uri.strip_prefix(NODE_URI_PREFIX) {
                    identity.name = node.to_owned();
                } else if let Some(label) = uri.strip_prefix(LABEL_URI_PREFIX)
                    && let Some((k, v)) = label.split_once('=')
                {
                    identity.labels.insert(k.to_owned(), v.to_owned());
                }
            }
        }
        if identity.name.is_empty()
            && let Some(cn) = x509.subject().iter_common_name().next()
            && let Ok(cn) = cn.as_str()
        {
            identity.name = cn.to_owned();
        }
        Ok(identity)
    }
}

/// One loaded certificate, key and CA bundle, as ready-made rustls configurations.
pub struct Material {
    /// Accepts peer links: a client certificate from the CA is required.
    pub peer_acceptor: TlsAcceptor,
    /// Dials peer links: presents this node's certificate, checks the peer's.
    pub peer_connector: TlsConnector,
    /// Serves the HTTP API (no client certificate asked for).
    pub api_acceptor: TlsAcceptor,
    /// What this node's own certificate attests.
    pub identity: Identity,
    /// This cluster's CA bundle, DER.
    pub own_ca: Vec<CertificateDer<'static>>,
    /// The subject names of [`Material::own_ca`], DER: a peer whose certificate one of
    /// them issued is a member of this cluster.
    pub own_ca_subjects: Vec<Vec<u8>>,
    /// Partner CAs (from accepted shares) trusted for peer links besides the bundle.
    pub partners: Vec<Vec<u8>>,
    /// The file contents these were built from (to see whether a reload changes them).
    contents: [Vec<u8>; 3],
}

/// The provider every configuration uses: ring, TLS 1.3.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_owned(),
        source,
    })
}

/// Every certificate in a PEM file (at least one).
pub fn parse_certs(
    what: &'static str,
    path: &Path,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            what,
            path: path.to_owned(),
            kind: "certificate",
            detail: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            what,
            path: path.to_owned(),
            kind: "certificate",
            detail: "no CERTIFICATE section".into(),
        });
    }
    Ok(certs)
}

/// A root store of every certificate in the CA bundle.
pub fn roots(path: &Path, pem: &[u8]) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in parse_certs("CA bundle", path, pem)? {
        roots.add(cert).map_err(|e| {
            TlsError::Invalid(format!(
                "CA bundle {}: a certificate is not a usable trust anchor: {e}",
                path.display()
            ))
        })?;
    }
    Ok(Arc::new(roots))
}

impl Material {
    /// Reads and checks the three files: the key matches the certificate, and the
    /// certificate is valid today under the CA bundle, for both ends of a peer link.
    pub fn load(paths: &TlsPaths) -> Result<Material, TlsError> {
        let contents = [
            read("certificate", &paths.cert)?,
            read("key", &paths.key)?,
            read("CA bundle", &paths.ca)?,
        ];
        Material::build(paths, contents, Vec::new())
    }

    /// Whether a peer's certificate (its [`Identity::issuer`]) comes from this cluster's
    /// CA.
    pub fn is_member(&self, peer: &Identity) -> bool {
        self.own_ca_subjects.contains(&peer.issuer)
    }

    fn build(
        paths: &TlsPaths,
        contents: [Vec<u8>; 3],
        partners: Vec<Vec<u8>>,
    ) -> Result<Material, TlsError> {
        let chain = parse_certs("certificate", &paths.cert, &contents[0])?;
        let key = PrivateKeyDer::from_pem_slice(&contents[1]).map_err(|e| TlsError::Pem {
            what: "key",
            path: paths.key.clone(),
            kind: "private key",
            detail: e.to_string(),
        })?;
        let own_ca = parse_certs("CA bundle", &paths.ca, &contents[2])?;
        let own_ca_subjects = own_ca
            .iter()
            .map(|c| share::subject_of(c.as_ref()))
            .collect::<Result<Vec<_>, _>>()?;
        let mut roots = (*roots(&paths.ca, &contents[2])?).clone();
        for partner in &partners {
            if roots.add(CertificateDer::from(partner.clone())).is_err() {
                tracing::warn!("a partner CA from a share is not a usable trust anchor");
            }
        }
        let roots = Arc::new(roots);
        let provider = provider();
        let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|e| TlsError::Invalid(format!("cannot use the CA bundle: {e}")))?;
        // The node's own certificate must pass the check its peers make, or every link
        // would fail later with a less clear message.
        verifier
            .verify_client_cert(&chain[0], &chain[1..], UnixTime::now())
            .map_err(|e| {
                TlsError::Invalid(format!(
                    "certificate {} is not valid under CA bundle {}: {e} (was it issued by this cluster's CA with `asp cert node`, and is it still in date?)",
                    paths.cert.display(),
                    paths.ca.display()
                ))
            })?;
        let identity = Identity::of(&chain[0])?;
        let versions = &[&rustls::version::TLS13];
        let peer_server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(versions)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(|e| key_error(paths, e))?;
        let peer_client = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(versions)?
            .with_root_certificates(roots.clone())
            .with_client_auth_cert(chain.clone(), key.clone_key())
            .map_err(|e| key_error(paths, e))?;
        let api_server = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .map_err(|e| key_error(paths, e))?;
        Ok(Material {
            peer_acceptor: TlsAcceptor::from(Arc::new(peer_server)),
            peer_connector: TlsConnector::from(Arc::new(peer_client)),
            api_acceptor: TlsAcceptor::from(Arc::new(api_server)),
            identity,
            own_ca,
            own_ca_subjects,
            partners,
            contents,
        })
    }
}

fn key_error(paths: &TlsPaths, e: rustls::Error) -> TlsError {
    TlsError::Invalid(format!(
        "key {} does not go with certificate {}: {e}",
        paths.key.display(),
        paths.cert.display()
    ))
}

/// The name a dialer checks the peer's certificate against: the host of `host:port`.
pub fn server_name(address: &str) -> Result<ServerName<'static>, TlsError> {
    let host = match address.rsplit_once(':') {
        Some((host, _)) => host,
        None => address,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(host.to_owned())
        .map_err(|e| TlsError::Invalid(format!("{host:?} is not a host name for TLS: {e}")))
}

/// A node's TLS, swapped whole on reload: a link or connection takes the material of
/// the moment it starts and keeps it.
pub struct Tls {
    paths: TlsPaths,
    current: RwLock<Arc<Material>>,
    /// Serializes reloads (a file poll and a SIGHUP at once); holds the contents that
    /// last failed to load, so that a poll reports them once.
    failed: Mutex<Option<[Vec<u8>; 3]>>,
    /// The last error reading the files, reported once.
    unreadable: Mutex<Option<String>>,
    metrics: ReloadMetrics,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("paths", &self.paths)
            .field("identity", &self.current().identity)
            .finish()
    }
}

impl Tls {
    pub fn load(paths: TlsPaths) -> Result<Arc<Tls>, TlsError> {
        let material = Material::load(&paths)?;
        Ok(Arc::new(Tls {
            paths,
            current: RwLock::new(Arc::new(material)),
            failed: Mutex::new(None),
            unreadable: Mutex::new(None),
            metrics: ReloadMetrics::default(),
        }))
    }

    /// Trusts exactly these partner CAs (DER, from accepted shares) for peer links
    /// besides the CA bundle, from the next link on. Returns whether that changed.
    pub fn set_partners(&self, mut partners: Vec<Vec<u8>>) -> Result<bool, TlsError> {
        partners.sort();
        partners.dedup();
        let _serial = self.failed.lock().unwrap();
        let current = self.current();
        if current.partners == partners {
            return Ok(false);
        }
        let material = Material::build(&self.paths, current.contents.clone(), partners)?;
        *self.current.write().unwrap() = Arc::new(material);
        Ok(true)
    }

    /// The reload counter, to register with the node's metrics.
    pub fn metrics(&self) -> &ReloadMetrics {
        &self.metrics
    }

    pub fn paths(&self) -> &TlsPaths {
        &self.paths
    }

    pub fn current(&self) -> Arc<Material> {
        self.current.read().unwrap().clone()
    }

    /// Reads the files again; if they changed and are good, new links and connections
    /// use them. `Ok(false)`: unchanged (or, unless `again`, the same contents that
    /// failed last time). On an error the old material stays.
    pub fn reload(&self, again: bool) -> Result<bool, TlsError> {
        let mut failed = self.failed.lock().unwrap();
        let read_all = || -> Result<[Vec<u8>; 3], TlsError> {
            Ok([
                read("certificate", &self.paths.cert)?,
                read("key", &self.paths.key)?,
                read("CA bundle", &self.paths.ca)?,
            ])
        };
        let contents = match read_all() {
            Ok(contents) => {
                *self.unreadable.lock().unwrap() = None;
                contents
            }
            // A file missing in the middle of a rotation: reported once, not at every
            // poll (a SIGHUP reports it again).
            Err(e) => {
                let message = e.to_string();
                let mut unreadable = self.unreadable.lock().unwrap();
                if !again && unreadable.as_deref() == Some(message.as_str()) {
                    return Ok(false);
                }
                *unreadable = Some(message);
                return Err(e);
            }
        };
        if contents == self.current().contents || (!again && failed.as_ref() == Some(&contents)) {
            return Ok(false);
        }
        let partners = self.current().partners.clone();
        match Material::build(&self.paths, contents.clone(), partners) {
            Ok(material) => {
                *self.current.write().unwrap() = Arc::new(material);
                *failed = None;
                Ok(true)
            }
            Err(e) => {
                *failed = Some(contents);
                Err(e)
            }
        }
    }
}

/// The peer's certificate as verified by a finished handshake.
pub fn peer_identity(conn: &rustls::CommonState) -> Option<Identity> {
    conn.peer_certificates()
        .and_then(|c| c.first())
        .and_then(|c| Identity::of(c).ok())
}

#[cfg(test)]
mod tests;
