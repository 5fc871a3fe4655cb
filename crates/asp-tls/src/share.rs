//! Shares: what one cluster offers another (namespaces, key prefixes, operations,
//! residency, expiry), signed by the offering cluster's CA and countersigned by the
//! accepting cluster's CA. A node trusts the other cluster's CA for peer links only
//! while an accepted, unexpired, unrevoked share names it, and a link between the two
//! clusters carries only what the share names.
//!
//! The document is JSON with the signed parts kept as the exact text that was signed,
//! so that no canonical form is needed:
//!
//! ```json
//! {"asp_share": 1,
//!  "terms": "{\"id\":...}",  "offer_sig": "<base64url>",
//!  "acceptance": "{\"cluster\":...}", "accept_sig": "<base64url>"}
//! ```
//!
//! `offer_sig` signs `asp-share-offer-v1\0` + terms with the offering CA's key;
//! `accept_sig` signs `asp-share-accept-v1\0` + terms + `\0` + acceptance with the
//! accepting CA's key (ECDSA P-256, as `asp cert init` makes them). Each side checks a
//! signature against the CA certificate the terms carry, and a node checks that one of
//! the two CAs is its own.

use std::collections::BTreeMap;

use base64::Engine as _;
use rustls::pki_types::CertificateDer;
use serde::{Deserialize, Serialize};

use crate::TlsError;

/// The document's format version.
pub const SHARE_FORMAT: u32 = 1;
/// Namespaces per share, at most.
pub const SHARE_NAMESPACES_MAX: usize = 64;
/// Bytes of a share document, at most.
pub const SHARE_BYTES_MAX: usize = 64 * 1024;

const OFFER_CONTEXT: &[u8] = b"asp-share-offer-v1\0";
const ACCEPT_CONTEXT: &[u8] = b"asp-share-accept-v1\0";

fn invalid(message: impl Into<String>) -> TlsError {
    TlsError::Invalid(message.into())
}

/// One namespace a share names, with the key prefix it is limited to (empty: all keys).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SharedNamespace {
    pub ns: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub prefix: String,
}

/// `NS`, or `NS:PREFIX` (as `--ns` takes it).
impl std::fmt::Display for SharedNamespace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.prefix.is_empty() {
            f.write_str(&self.ns)
        } else {
            write!(f, "{}:{}", self.ns, self.prefix)
        }
    }
}

/// What the offering cluster grants, as it signed it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Terms {
    /// Random, 16 hex digits: names the share in `list` and `revoke`.
    pub id: String,
    /// The offering cluster's id (what its nodes send in their Hello).
    pub cluster: String,
    /// The offering cluster's CA, PEM.
    pub ca: String,
    /// The accepting cluster's CA, PEM.
    pub peer_ca: String,
    pub namespaces: Vec<SharedNamespace>,
    /// `read`: the accepting cluster receives the namespaces; `write`: it may send
    /// changes to them.
    pub ops: Vec<String>,
    /// Labels every node of the accepting cluster must attest to get anything.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub require: BTreeMap<String, String>,
    pub created_ms: u64,
    /// Past this (Unix milliseconds) the share carries nothing.
    pub expires_ms: u64,
}

/// What the accepting cluster adds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Acceptance {
    /// The accepting cluster's id.
    pub cluster: String,
    pub accepted_ms: u64,
}

/// The document as it travels.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ShareDocument {
    pub asp_share: u32,
    pub terms: String,
    pub offer_sig: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acceptance: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accept_sig: Option<String>,
}

/// A share whose signatures were checked.
#[derive(Clone, Debug)]
pub struct Share {
    pub terms: Terms,
    pub acceptance: Option<Acceptance>,
    pub document: ShareDocument,
    /// The two CAs, DER (parsed from the terms).
    pub ca_der: Vec<u8>,
    pub peer_ca_der: Vec<u8>,
}

/// The namespaces a share may name: not asp's own (`_asp.*`), which hold keys, rules,
/// membership and the audit log of one cluster.
pub fn check_namespace(ns: &str) -> Result<(), TlsError> {
    if ns.is_empty() || ns.len() > 255 {
        return Err(invalid(format!("namespace {ns:?}: 1 to 255 bytes")));
    }
    if ns.starts_with("_asp.") || ns == "*" {
        return Err(invalid(format!(
            "namespace {ns:?} cannot be shared: name each namespace (no *), and asp's own (_asp.*) stay in their cluster"
        )));
    }
    Ok(())
}

/// Parses `NS` or `NS:PREFIX`.
pub fn parse_shared(text: &str) -> Result<SharedNamespace, TlsError> {
    let (ns, prefix) = match text.split_once(':') {
        Some((ns, prefix)) => (ns, prefix),
        None => (text, ""),
    };
    check_namespace(ns)?;
    if prefix.len() > 1024 {
        return Err(invalid("a key prefix is at most 1024 bytes"));
    }
    Ok(SharedNamespace {
        ns: ns.to_owned(),
        prefix: prefix.to_owned(),
    })
}

fn check_terms(terms: &Terms) -> Result<(), TlsError> {
    if terms.id.len() != 16 || !terms.id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(invalid("share id: 16 hex digits"));
    }
    if terms.namespaces.is_empty() || terms.namespaces.len() > SHARE_NAMESPACES_MAX {
        return Err(invalid(format!(
            "a share names 1 to {SHARE_NAMESPACES_MAX} namespaces"
        )));
    }
    for (i, n) in terms.namespaces.iter().enumerate() {
        check_namespace(&n.ns)?;
        if terms.namespaces[..i].iter().any(|o| o.ns == n.ns) {
            return Err(invalid(format!("namespace {} named twice", n.ns)));
        }
    }
    if terms.ops.is_empty() || terms.ops.iter().any(|o| o != "read" && o != "write") {
        return Err(invalid("ops: read, write or both"));
    }
    if terms.cluster.is_empty() {
        return Err(invalid("the offering cluster's id is empty"));
    }
    Ok(())
}

fn ca_der(what: &str, pem: &str) -> Result<Vec<u8>, TlsError> {
    let certs = crate::parse_certs("CA certificate", std::path::Path::new(what), pem.as_bytes())?;
    if certs.len() != 1 {
        return Err(invalid(format!("{what}: exactly one CA certificate")));
    }
    Ok(certs[0].as_ref().to_vec())
}

/// The subject name of a certificate, DER (how a peer's issuer is matched to a CA).
pub fn subject_of(der: &[u8]) -> Result<Vec<u8>, TlsError> {
    let (_, x509) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| invalid(format!("cannot parse a certificate: {e}")))?;
    Ok(x509.subject().as_raw().to_vec())
}

fn public_key_of(der: &[u8]) -> Result<Vec<u8>, TlsError> {
    let (_, x509) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| invalid(format!("cannot parse a certificate: {e}")))?;
    Ok(x509.public_key().subject_public_key.data.to_vec())
}

fn sign(ca_key_pem: &str, message: &[u8]) -> Result<String, TlsError> {
    let key = rcgen::KeyPair::from_pem(ca_key_pem)
        .map_err(|e| invalid(format!("cannot read the CA key: {e}")))?;
    if key.algorithm() != &rcgen::PKCS_ECDSA_P256_SHA256 {
        return Err(invalid(
            "shares are signed with an ECDSA P-256 CA key (as `asp cert init` makes)",
        ));
    }
    let rng = ring::rand::SystemRandom::new();
    let pair = ring::signature::EcdsaKeyPair::from_pkcs8(
        &ring::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
        &key.serialize_der(),
        &rng,
    )
    .map_err(|e| invalid(format!("cannot use the CA key: {e}")))?;
    let sig = pair
        .sign(&rng, message)
        .map_err(|e| invalid(format!("cannot sign: {e}")))?;
    Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sig.as_ref()))
}

fn verify(ca_der: &[u8], message: &[u8], sig: &str, whose: &str) -> Result<(), TlsError> {
    let sig = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(sig)
        .map_err(|_| invalid(format!("the {whose} signature is not base64url")))?;
    let key = public_key_of(ca_der)?;
    ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_ASN1, key)
        .verify(message, &sig)
        .map_err(|_| {
            invalid(format!(
                "the {whose} signature does not verify under the {whose} CA named in the share"
            ))
        })
}

fn offer_message(terms: &str) -> Vec<u8> {
    [OFFER_CONTEXT, terms.as_bytes()].concat()
}

fn accept_message(terms: &str, acceptance: &str) -> Vec<u8> {
    [
        ACCEPT_CONTEXT,
        terms.as_bytes(),
        b"\0",
        acceptance.as_bytes(),
    ]
    .concat()
}

/// Makes an offer: `terms.ca` must be the CA whose key is `ca_key_pem`.
pub fn offer(terms: &Terms, ca_key_pem: &str) -> Result<ShareDocument, TlsError> {
    check_terms(terms)?;
    let text = serde_json::to_string(terms).expect("terms serialize");
    let document = ShareDocument {
        asp_share: SHARE_FORMAT,
        offer_sig: sign(ca_key_pem, &offer_message(&text))?,
        terms: text,
        acceptance: None,
        accept_sig: None,
    };
    // Signed with the key of the CA the terms name, or nobody could verify it.
    Share::check(&document).map_err(|e| {
        if e.to_string().contains("signature does not verify") {
            invalid("the CA key does not go with the CA certificate named as the offering CA")
        } else {
            e
        }
    })?;
    Ok(document)
}

/// Countersigns an offer as the accepting cluster `cluster`, whose CA key is
/// `ca_key_pem` (its certificate must be the offer's `peer_ca`).
pub fn accept(
    document: &ShareDocument,
    cluster: &str,
    ca_key_pem: &str,
    now_ms: u64,
) -> Result<ShareDocument, TlsError> {
    let share = Share::check(document)?;
    if share.acceptance.is_some() {
        return Err(invalid("this share is already accepted"));
    }
    if share.terms.expires_ms <= now_ms {
        return Err(invalid("this share has expired"));
    }
    if cluster.is_empty() {
        return Err(invalid("the accepting cluster's id is empty"));
    }
    if cluster == share.terms.cluster {
        return Err(invalid(format!(
            "the offering cluster is {cluster:?} too: the accepting cluster needs an id of its own (its nodes' --cluster-id)"
        )));
    }
    let acceptance = Acceptance {
        cluster: cluster.to_owned(),
        accepted_ms: now_ms,
    };
    let text = serde_json::to_string(&acceptance).expect("acceptance serializes");
    let mut accepted = document.clone();
    accepted.accept_sig = Some(sign(ca_key_pem, &accept_message(&document.terms, &text))?);
    accepted.acceptance = Some(text);
    Share::check(&accepted).map_err(|e| {
        if e.to_string().contains("signature does not verify") {
            invalid("the CA key does not go with the CA certificate the share was offered to")
        } else {
            e
        }
    })?;
    Ok(accepted)
}

impl Share {
    /// Parses a document and checks its signatures (both, if accepted).
    pub fn parse(bytes: &[u8]) -> Result<Share, TlsError> {
        if bytes.len() > SHARE_BYTES_MAX {
            return Err(invalid(format!(
                "a share document is at most {SHARE_BYTES_MAX} bytes"
            )));
        }
        let document: ShareDocument = serde_json::from_slice(bytes)
            .map_err(|e| invalid(format!("not a share document: {e}")))?;
        Share::check(&document)
    }

    pub fn check(document: &ShareDocument) -> Result<Share, TlsError> {
        if document.asp_share != SHARE_FORMAT {
            return Err(invalid(format!(
                "share format {} is not known to this build (it reads {SHARE_FORMAT})",
                document.asp_share
            )));
        }
        let terms: Terms = serde_json::from_str(&document.terms)
            .map_err(|e| invalid(format!("the share's terms: {e}")))?;
        check_terms(&terms)?;
        let ca = ca_der("the offering CA", &terms.ca)?;
        let peer_ca = ca_der("the accepting CA", &terms.peer_ca)?;
        if ca == peer_ca {
            return Err(invalid(
                "the share is offered to the offering cluster's own CA: --peer-ca names the other cluster's ca.pem",
            ));
        }
        if subject_of(&ca)? == subject_of(&peer_ca)? {
            return Err(invalid(
                "the two CAs have the same subject name: a peer's issuer could not tell the clusters apart",
            ));
        }
        verify(
            &ca,
            &offer_message(&document.terms),
            &document.offer_sig,
            "offering",
        )?;
        let acceptance = match (&document.acceptance, &document.accept_sig) {
            (None, None) => None,
            (Some(text), Some(sig)) => {
                verify(
                    &peer_ca,
                    &accept_message(&document.terms, text),
                    sig,
                    "accepting",
                )?;
                Some(
                    serde_json::from_str::<Acceptance>(text)
                        .map_err(|e| invalid(format!("the share's acceptance: {e}")))?,
                )
            }
            _ => {
                return Err(invalid(
                    "an acceptance without its signature, or the reverse",
                ));
            }
        };
        Ok(Share {
            terms,
            acceptance,
            document: document.clone(),
            ca_der: ca,
            peer_ca_der: peer_ca,
        })
    }

    /// The other cluster's CA and id, seen from the cluster whose CA is `own_ca`, and
    /// whether that cluster is the offering one. `None`: neither CA is `own_ca`.
    pub fn seen_from(&self, own_ca: &[CertificateDer<'_>]) -> Option<Side> {
        let own = |der: &[u8]| own_ca.iter().any(|c| c.as_ref() == der);
        let accepted = self.acceptance.as_ref()?;
        if own(&self.ca_der) {
            Some(Side {
                offering: true,
                own_cluster: self.terms.cluster.clone(),
                partner_cluster: accepted.cluster.clone(),
                partner_ca: self.peer_ca_der.clone(),
            })
        } else if own(&self.peer_ca_der) {
            Some(Side {
                offering: false,
                own_cluster: accepted.cluster.clone(),
                partner_cluster: self.terms.cluster.clone(),
                partner_ca: self.ca_der.clone(),
            })
        } else {
            None
        }
    }

    /// Whether the accepting cluster receives (`read`) or may send (`write`).
    pub fn grants(&self, op: &str) -> bool {
        self.terms.ops.iter().any(|o| o == op)
    }
}

/// A share as one of its clusters sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Side {
    /// This cluster made the offer.
    pub offering: bool,
    pub own_cluster: String,
    pub partner_cluster: String,
    /// The other cluster's CA, DER.
    pub partner_ca: Vec<u8>,
}

impl Side {
    /// Whether this cluster sends the share's namespaces to the other.
    pub fn sends(&self, share: &Share) -> bool {
        if self.offering {
            share.grants("read")
        } else {
            share.grants("write")
        }
    }

    /// Whether this cluster takes changes of the share's namespaces from the other.
    pub fn receives(&self, share: &Share) -> bool {
        if self.offering {
            share.grants("write")
        } else {
            share.grants("read")
        }
    }
}

/// A new random share id.
pub fn new_id() -> String {
    format!("{:016x}", rand::random::<u64>())
}
