//! Issuing: a cluster CA (`asp cert init`) and node certificates signed by it (`asp cert
//! node`), each with an ECDSA P-256 key. Keys are written readable by their owner only,
//! and nothing is overwritten unless asked.

use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use time::{Duration, OffsetDateTime};

use crate::{LABEL_URI_PREFIX, NODE_URI_PREFIX, TlsError};

/// File names of the CA inside its directory.
pub const CA_CERT_FILE: &str = "ca.pem";
pub const CA_KEY_FILE: &str = "ca.key";

/// Longest node name, label key and label value, in bytes.
pub const NAME_BYTES_MAX: usize = 64;
pub const LABEL_BYTES_MAX: usize = 128;
/// Labels per certificate, at most.
pub const LABELS_MAX: usize = 32;

/// The hosts a node certificate is valid for when none are given.
pub const DEFAULT_HOSTS: &[&str] = &["localhost", "127.0.0.1", "::1"];

/// What was written.
#[derive(Debug)]
pub struct Issued {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The hosts (DNS names and addresses) a node certificate is valid for.
    pub hosts: Vec<String>,
    pub not_after: OffsetDateTime,
}

fn invalid(message: impl Into<String>) -> TlsError {
    TlsError::Invalid(message.into())
}

fn rcgen_error(what: &str, e: rcgen::Error) -> TlsError {
    invalid(format!("{what}: {e}"))
}

/// A name usable as a file name and in a certificate: letters, digits, `.`, `_`, `-`.
pub fn check_name(name: &str) -> Result<(), TlsError> {
    let ok = !name.is_empty()
        && name.len() <= NAME_BYTES_MAX
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(invalid(format!(
            "node name {name:?}: use 1 to {NAME_BYTES_MAX} letters, digits, '.', '_' or '-' (not starting with '.')"
        )))
    }
}

/// A label `key=value`: a key of letters, digits, `.`, `_`, `-`, `/`; a value of the same
/// plus `:`; both 1 to 128 bytes.
pub fn parse_label(text: &str) -> Result<(String, String), TlsError> {
    let Some((k, v)) = text.split_once('=') else {
        return Err(invalid(format!("label {text:?} is not key=value")));
    };
    let allowed = |s: &str, colon: bool| {
        !s.is_empty()
            && s.len() <= LABEL_BYTES_MAX
            && s.bytes().all(|b| {
                b.is_ascii_alphanumeric()
                    || matches!(b, b'.' | b'_' | b'-' | b'/')
                    || (colon && b == b':')
            })
    };
    if !allowed(k, false) {
        return Err(invalid(format!(
            "label key {k:?}: use 1 to {LABEL_BYTES_MAX} letters, digits, '.', '_', '-' or '/'"
        )));
    }
    if !allowed(v, true) {
        return Err(invalid(format!(
            "label value {v:?} (of {k}): use 1 to {LABEL_BYTES_MAX} letters, digits, '.', '_', '-', '/' or ':'"
        )));
    }
    Ok((k.to_owned(), v.to_owned()))
}

fn serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    // Positive and without a leading zero byte, as RFC 5280 asks.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    SerialNumber::from(bytes.to_vec())
}

fn validity(params: &mut CertificateParams, days: u32) -> Result<(), TlsError> {
    if days == 0 || days > 36_500 {
        return Err(invalid(format!(
            "--days {days}: give 1 to 36500 days of validity"
        )));
    }
    let now = OffsetDateTime::now_utc();
    // A little slack for peers whose clocks are behind.
    params.not_before = now - Duration::hours(1);
    params.not_after = now + Duration::days(i64::from(days));
    Ok(())
}

/// Writes `bytes` to `path` (mode `mode`) through a temporary file and a rename, so a
/// crash leaves either the old file or the new one.
fn write_file(path: &Path, bytes: &[u8], mode: u32, force: bool) -> Result<(), TlsError> {
    use std::os::unix::fs::OpenOptionsExt;
    let io = |source| TlsError::Read {
        what: "file",
        path: path.to_owned(),
        source,
    };
    if !force && path.exists() {
        return Err(invalid(format!(
            "{} exists; move it away or pass --force to replace it",
            path.display()
        )));
    }
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io)?;
    file.write_all(bytes).map_err(io)?;
    file.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)?;
    if let Some(dir) = path.parent()
        && let Ok(dir) = std::fs::File::open(if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        })
    {
        let _ = dir.sync_all();
    }
    Ok(())
}

/// Creates a cluster CA in `dir`: `ca.pem` (give it to every node) and `ca.key` (keep it
/// off the nodes; it signs node certificates).
pub fn init_ca(dir: &Path, cluster: &str, days: u32, force: bool) -> Result<Issued, TlsError> {
    std::fs::create_dir_all(dir).map_err(|source| TlsError::Read {
        what: "directory",
        path: dir.to_owned(),
        source,
    })?;
    let cert_path = dir.join(CA_CERT_FILE);
    let key_path = dir.join(CA_KEY_FILE);
    if !force && (cert_path.exists() || key_path.exists()) {
        return Err(invalid(format!(
            "{} already holds a CA ({CA_CERT_FILE}, {CA_KEY_FILE}); replacing it would make every certificate it issued untrusted — pass --force if that is meant",
            dir.display()
        )));
    }
    let key = KeyPair::generate().map_err(|e| rcgen_error("cannot make a key", e))?;
    let mut params = CertificateParams::default();
    validity(&mut params, days)?;
    params.serial_number = Some(serial());
    let mut dn = DistinguishedName::new();
    // A random part keeps two clusters' CAs apart even under one cluster name: a
    // verifier matches an issuer by name first, and two CAs of one name give confusing
    // signature errors instead of "unknown issuer".
    let tag: u32 = rand::random();
    dn.push(
        DnType::CommonName,
        format!("asp cluster CA {cluster} {tag:08x}"),
    );
    dn.push(DnType::OrganizationName, "asp");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let cert = params
        .self_signed(&key)
        .map_err(|e| rcgen_error("cannot sign the CA certificate", e))?;
    write_file(&key_path, key.serialize_pem().as_bytes(), 0o600, force)?;
    write_file(&cert_path, cert.pem().as_bytes(), 0o644, force)?;
    Ok(Issued {
        cert: cert_path,
        key: key_path,
        hosts: Vec::new(),
        not_after: params.not_after,
    })
}

/// Issues `dir/NAME.pem` and `dir/NAME.key`, signed by the CA in `dir`, attesting the
/// node's name and labels, valid for `hosts` (default: [`DEFAULT_HOSTS`]).
pub fn issue_node(
    dir: &Path,
    name: &str,
    labels: &[(String, String)],
    hosts: &[String],
    days: u32,
    force: bool,
) -> Result<Issued, TlsError> {
    check_name(name)?;
    if name == "ca" {
        return Err(invalid("node name \"ca\" would overwrite the CA's files"));
    }
    if labels.len() > LABELS_MAX {
        return Err(invalid(format!("at most {LABELS_MAX} labels")));
    }
    for (i, (k, _)) in labels.iter().enumerate() {
        if labels[..i].iter().any(|(other, _)| other == k) {
            return Err(invalid(format!("label {k} given twice")));
        }
    }
    let ca_cert_path = dir.join(CA_CERT_FILE);
    let ca_key_path = dir.join(CA_KEY_FILE);
    let read = |what, path: &Path| {
        std::fs::read_to_string(path).map_err(|source| TlsError::Read {
            what,
            path: path.to_owned(),
            source,
        })
    };
    let ca_pem = read("CA certificate", &ca_cert_path)?;
    let ca_key_pem = read("CA key", &ca_key_path)?;
    let ca_key = KeyPair::from_pem(&ca_key_pem)
        .map_err(|e| rcgen_error(&format!("CA key {}", ca_key_path.display()), e))?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key)
        .map_err(|e| rcgen_error(&format!("CA certificate {}", ca_cert_path.display()), e))?;

    let hosts: Vec<String> = if hosts.is_empty() {
        DEFAULT_HOSTS.iter().map(|h| (*h).to_owned()).collect()
    } else {
        hosts.to_vec()
    };
    let mut params = CertificateParams::default();
    validity(&mut params, days)?;
    params.serial_number = Some(serial());
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    dn.push(DnType::OrganizationName, "asp");
    params.distinguished_name = dn;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    // One certificate for both ends of a peer link and for the API.
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    let uri = |s: String| {
        s.clone()
            .try_into()
            .map(SanType::URI)
            .map_err(|e| rcgen_error(&format!("{s:?}"), e))
    };
    let mut sans = vec![uri(format!("{NODE_URI_PREFIX}{name}"))?];
    for (k, v) in labels {
        sans.push(uri(format!("{LABEL_URI_PREFIX}{k}={v}"))?);
    }
    for host in &hosts {
        if let Ok(ip) = host.parse::<IpAddr>() {
            sans.push(SanType::IpAddress(ip));
        } else {
            rustls::pki_types::ServerName::try_from(host.as_str()).map_err(|_| {
                invalid(format!(
                    "--host {host:?} is neither an IP address nor a DNS name"
                ))
            })?;
            sans.push(SanType::DnsName(
                host.clone()
                    .try_into()
                    .map_err(|e| rcgen_error(&format!("host {host:?}"), e))?,
            ));
        }
    }
    params.subject_alt_names = sans;
    let key = KeyPair::generate().map_err(|e| rcgen_error("cannot make a key", e))?;
    let cert = params
        .signed_by(&key, &issuer)
        .map_err(|e| rcgen_error("cannot sign the node certificate", e))?;
    let cert_path = dir.join(format!("{name}.pem"));
    let key_path = dir.join(format!("{name}.key"));
    if !force && (cert_path.exists() || key_path.exists()) {
        return Err(invalid(format!(
            "{} or {} exists; pass --force to replace them",
            cert_path.display(),
            key_path.display()
        )));
    }
    write_file(&key_path, key.serialize_pem().as_bytes(), 0o600, force)?;
    write_file(&cert_path, cert.pem().as_bytes(), 0o644, force)?;
    Ok(Issued {
        cert: cert_path,
        key: key_path,
        hosts,
        not_after: params.not_after,
    })
}
