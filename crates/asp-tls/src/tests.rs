use std::path::Path;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::issue::{init_ca, issue_node, parse_label};
use super::*;

fn labels(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn paths(dir: &Path, name: &str) -> TlsPaths {
    TlsPaths {
        cert: dir.join(format!("{name}.pem")),
        key: dir.join(format!("{name}.key")),
        ca: dir.join("ca.pem"),
    }
}

fn cluster(dir: &Path, names: &[&str]) {
    init_ca(dir, "test", 30, false).unwrap();
    for name in names {
        issue_node(dir, name, &labels(&[("region", "eu")]), &[], 30, false).unwrap();
    }
}

#[test]
fn a_node_certificate_attests_its_name_and_labels() {
    let dir = tempfile::tempdir().unwrap();
    init_ca(dir.path(), "test", 30, false).unwrap();
    let issued = issue_node(
        dir.path(),
        "n1",
        &labels(&[("region", "eu"), ("zone", "eu-west:1")]),
        &["db1.example".into(), "10.0.0.7".into()],
        30,
        false,
    )
    .unwrap();
    assert_eq!(issued.hosts, vec!["db1.example", "10.0.0.7"]);
    let material = Material::load(&paths(dir.path(), "n1")).unwrap();
    assert_eq!(material.identity.name, "n1");
    assert_eq!(
        material.identity.labels,
        BTreeMap::from([
            ("region".to_owned(), "eu".to_owned()),
            ("zone".to_owned(), "eu-west:1".to_owned())
        ])
    );
    assert_eq!(material.identity.serial.len(), 32);
    // The key is for its owner only.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.path().join("n1.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let mode = std::fs::metadata(dir.path().join("ca.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
}

#[test]
fn nothing_is_overwritten_unless_forced_and_bad_input_is_named() {
    let dir = tempfile::tempdir().unwrap();
    init_ca(dir.path(), "test", 30, false).unwrap();
    let again = init_ca(dir.path(), "test", 30, false).unwrap_err();
    assert!(again.to_string().contains("--force"), "{again}");
    issue_node(dir.path(), "n1", &[], &[], 30, false).unwrap();
    let again = issue_node(dir.path(), "n1", &[], &[], 30, false).unwrap_err();
    assert!(again.to_string().contains("--force"), "{again}");
    issue_node(dir.path(), "n1", &[], &[], 30, true).unwrap();
    for (name, words) in [
        ("../x", "node name"),
        ("", "node name"),
        ("ca", "CA's files"),
    ] {
        let e = issue_node(dir.path(), name, &[], &[], 30, false).unwrap_err();
        assert!(e.to_string().contains(words), "{name}: {e}");
    }
    let e = issue_node(dir.path(), "n2", &[], &["bad host!".into()], 30, false).unwrap_err();
    assert!(e.to_string().contains("bad host!"), "{e}");
    let e = issue_node(dir.path(), "n2", &[], &[], 0, false).unwrap_err();
    assert!(e.to_string().contains("--days"), "{e}");
    let twice = labels(&[("region", "eu"), ("region", "us")]);
    let e = issue_node(dir.path(), "n2", &twice, &[], 30, false).unwrap_err();
    assert!(e.to_string().contains("twice"), "{e}");
    assert_eq!(
        parse_label("region=eu").unwrap(),
        ("region".into(), "eu".into())
    );
    for bad in [
        "region",
        "=eu",
        "region=",
        "re gion=eu",
        "region=e u",
        "a=b=c",
    ] {
        assert!(parse_label(bad).is_err(), "{bad}");
    }
    let e = issue_node(
        tempfile::tempdir().unwrap().path(),
        "n1",
        &[],
        &[],
        30,
        false,
    )
    .unwrap_err();
    assert!(e.to_string().contains("ca.pem"), "{e}");
}

#[test]
fn a_certificate_from_another_ca_or_a_wrong_key_does_not_load() {
    let ours = tempfile::tempdir().unwrap();
    let theirs = tempfile::tempdir().unwrap();
    cluster(ours.path(), &["n1", "n2"]);
    cluster(theirs.path(), &["x1"]);
    let mut foreign = paths(theirs.path(), "x1");
    foreign.ca = ours.path().join("ca.pem");
    let e = Material::load(&foreign).err().unwrap();
    assert!(e.to_string().contains("not valid under CA bundle"), "{e}");
    let mut mixed = paths(ours.path(), "n1");
    mixed.key = ours.path().join("n2.key");
    let e = Material::load(&mixed).err().unwrap();
    assert!(e.to_string().contains("does not go with"), "{e}");
    let mut garbage = paths(ours.path(), "n1");
    garbage.ca = ours.path().join("n1.key");
    let e = Material::load(&garbage).err().unwrap();
    assert!(e.to_string().contains("CA bundle"), "{e}");
}

/// A peer link's handshake over loopback: the acceptor with `server`, the dialer with
/// `client`. Returns the identity each side read from the other, or the error.
async fn handshake(server: &Material, client: &Material) -> Result<(Identity, Identity), String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = server.peer_acceptor.clone();
    let accepted = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut tls = acceptor.accept(tcp).await.map_err(|e| e.to_string())?;
        let id = peer_identity(tls.get_ref().1).ok_or("no peer certificate")?;
        tls.write_all(b"ok").await.map_err(|e| e.to_string())?;
        tls.flush().await.map_err(|e| e.to_string())?;
        Ok::<_, String>(id)
    });
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = server_name(&addr.to_string()).unwrap();
    let dialed = async {
        let mut tls = client
            .peer_connector
            .connect(name, tcp)
            .await
            .map_err(|e| e.to_string())?;
        // With TLS 1.3 a refused client certificate shows on the client's first read.
        let mut buf = [0u8; 2];
        tls.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
        peer_identity(tls.get_ref().1).ok_or_else(|| "no server certificate".to_owned())
    }
    .await;
    match (accepted.await.unwrap(), dialed) {
        (Ok(a), Ok(d)) => Ok((a, d)),
        (a, d) => Err(format!("acceptor: {a:?}; dialer: {d:?}")),
    }
}

#[tokio::test]
async fn peers_of_one_ca_see_each_other_and_a_foreign_one_is_refused() {
    let ours = tempfile::tempdir().unwrap();
    let theirs = tempfile::tempdir().unwrap();
    cluster(ours.path(), &["n1", "n2"]);
    cluster(theirs.path(), &["x1"]);
    let n1 = Material::load(&paths(ours.path(), "n1")).unwrap();
    let n2 = Material::load(&paths(ours.path(), "n2")).unwrap();
    let (seen_by_n1, seen_by_n2) = handshake(&n1, &n2).await.unwrap();
    assert_eq!(seen_by_n1.name, "n2");
    assert_eq!(seen_by_n2.name, "n1");
    assert_eq!(seen_by_n1.labels["region"], "eu");
    // A node of another cluster, trusting its own CA only, dials ours: each side
    // refuses the other's certificate.
    let x1 = Material::load(&paths(theirs.path(), "x1")).unwrap();
    let e = handshake(&n1, &x1).await.unwrap_err();
    assert!(e.contains("certificate"), "{e}");
    // A stranger that trusts our CA (it has ca.pem) but holds no certificate from it.
    let mut stranger = paths(theirs.path(), "x1");
    stranger.ca = theirs.path().join("ca.pem");
    let mut trusts_ours = Material::load(&stranger).unwrap();
    let roots = roots(
        &ours.path().join("ca.pem"),
        &std::fs::read(ours.path().join("ca.pem")).unwrap(),
    )
    .unwrap();
    let key = PrivateKeyDer::from_pem_file(theirs.path().join("x1.key")).unwrap();
    let chain = parse_certs(
        "certificate",
        &theirs.path().join("x1.pem"),
        &std::fs::read(theirs.path().join("x1.pem")).unwrap(),
    )
    .unwrap();
    let client = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .unwrap();
    trusts_ours.peer_connector = TlsConnector::from(Arc::new(client));
    let e = handshake(&n1, &trusts_ours).await.unwrap_err();
    assert!(e.contains("certificate"), "{e}");
}

#[test]
fn a_reload_takes_new_files_keeps_the_old_on_bad_ones_and_reports_a_failure_once() {
    let dir = tempfile::tempdir().unwrap();
    cluster(dir.path(), &["n1"]);
    let tls = Tls::load(paths(dir.path(), "n1")).unwrap();
    let metrics = tls.metrics().clone();
    let first = tls.current().identity.serial.clone();
    assert_eq!(reload_once(&tls, false), ReloadOutcome::Unchanged);
    issue_node(
        dir.path(),
        "n1",
        &labels(&[("region", "us")]),
        &[],
        30,
        true,
    )
    .unwrap();
    assert_eq!(reload_once(&tls, false), ReloadOutcome::Reloaded);
    let second = tls.current().identity.clone();
    assert_ne!(second.serial, first);
    assert_eq!(second.labels["region"], "us");
    // A half-written certificate: the node keeps what it has.
    std::fs::write(
        dir.path().join("n1.pem"),
        b"-----BEGIN CERTIFICATE-----\nAAAA",
    )
    .unwrap();
    assert_eq!(reload_once(&tls, false), ReloadOutcome::Failed);
    assert_eq!(tls.current().identity, second);
    // Polls do not report the same bad files again; a SIGHUP does.
    assert_eq!(reload_once(&tls, false), ReloadOutcome::Unchanged);
    assert_eq!(reload_once(&tls, true), ReloadOutcome::Failed);
    // A file gone in the middle of a rotation: reported once too.
    std::fs::remove_file(dir.path().join("n1.key")).unwrap();
    assert_eq!(reload_once(&tls, false), ReloadOutcome::Failed);
    assert_eq!(reload_once(&tls, false), ReloadOutcome::Unchanged);
    assert_eq!(tls.current().identity, second);
    assert_eq!(metrics.get(ReloadOutcome::Reloaded), 1);
    assert_eq!(metrics.get(ReloadOutcome::Failed), 3);
    assert_eq!(metrics.get(ReloadOutcome::Unchanged), 0);
}

#[test]
fn a_dialer_checks_the_host_it_dialed() {
    assert!(matches!(
        server_name("127.0.0.1:7800").unwrap(),
        ServerName::IpAddress(_)
    ));
    assert!(matches!(
        server_name("[::1]:7800").unwrap(),
        ServerName::IpAddress(_)
    ));
    assert!(matches!(
        server_name("db1.example:7800").unwrap(),
        ServerName::DnsName(_)
    ));
    assert!(server_name("bad host:1").is_err());
}

fn share_terms(a: &Path, b: &Path) -> share::Terms {
    share::Terms {
        id: share::new_id(),
        cluster: "org-a".into(),
        ca: std::fs::read_to_string(a.join("ca.pem")).unwrap(),
        peer_ca: std::fs::read_to_string(b.join("ca.pem")).unwrap(),
        namespaces: vec![share::parse_shared("orders:eu/").unwrap()],
        ops: vec!["read".into()],
        require: Default::default(),
        created_ms: 1,
        expires_ms: u64::MAX,
    }
}

#[test]
fn a_share_is_signed_by_one_ca_and_countersigned_by_the_other() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    cluster(a.path(), &["a1"]);
    cluster(b.path(), &["b1"]);
    let key = |d: &Path| std::fs::read_to_string(d.join("ca.key")).unwrap();
    let terms = share_terms(a.path(), b.path());
    // Only the offering CA's key makes an offer.
    let err = share::offer(&terms, &key(b.path()))
        .unwrap_err()
        .to_string();
    assert!(err.contains("does not go with"), "{err}");
    let offer = share::offer(&terms, &key(a.path())).unwrap();
    // Only the accepting CA's key accepts it.
    let err = share::accept(&offer, "org-b", &key(a.path()), 2)
        .unwrap_err()
        .to_string();
    assert!(err.contains("does not go with"), "{err}");
    let accepted = share::accept(&offer, "org-b", &key(b.path()), 2).unwrap();
    let text = serde_json::to_vec(&accepted).unwrap();
    let share = share::Share::parse(&text).unwrap();
    assert_eq!(share.acceptance.as_ref().unwrap().cluster, "org-b");

    let own = |d: &Path| parse_certs("ca", d, &std::fs::read(d.join("ca.pem")).unwrap()).unwrap();
    let from_a = share.seen_from(&own(a.path())).unwrap();
    assert!(from_a.offering && from_a.sends(&share) && !from_a.receives(&share));
    assert_eq!(from_a.partner_cluster, "org-b");
    let from_b = share.seen_from(&own(b.path())).unwrap();
    assert!(!from_b.offering && !from_b.sends(&share) && from_b.receives(&share));
    let c = tempfile::tempdir().unwrap();
    cluster(c.path(), &[]);
    assert!(share.seen_from(&own(c.path())).is_none());

    // Any change to what was signed breaks it: a wider prefix, a second op.
    for (from, to) in [
        ("eu/", "e"),
        ("[\\\"read\\\"]", "[\\\"read\\\",\\\"write\\\"]"),
    ] {
        let tampered = String::from_utf8(text.clone()).unwrap().replace(from, to);
        assert_ne!(tampered.as_bytes(), &text[..], "{from}");
        let err = share::Share::parse(tampered.as_bytes())
            .unwrap_err()
            .to_string();
        assert!(err.contains("signature does not verify"), "{err}");
    }
    // `_asp.*` and `*` are never shared.
    assert!(share::parse_shared("_asp.auth").is_err());
    assert!(share::parse_shared("*").is_err());
}

#[test]
fn a_share_names_two_clusters_and_two_cas() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    cluster(a.path(), &[]);
    cluster(b.path(), &[]);
    let key = |d: &Path| std::fs::read_to_string(d.join("ca.key")).unwrap();
    let mut to_self = share_terms(a.path(), b.path());
    to_self.peer_ca = to_self.ca.clone();
    let err = share::offer(&to_self, &key(a.path()))
        .unwrap_err()
        .to_string();
    assert!(err.contains("own CA"), "{err}");
    let offer = share::offer(&share_terms(a.path(), b.path()), &key(a.path())).unwrap();
    let err = share::accept(&offer, "org-a", &key(b.path()), 2)
        .unwrap_err()
        .to_string();
    assert!(err.contains("an id of its own"), "{err}");
}
