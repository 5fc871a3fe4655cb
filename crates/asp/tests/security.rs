//! Trust between real `asp serve` processes: mutual TLS on peer links, HTTPS on the
//! API, what a node without the cluster's certificate can and cannot do, and
//! certificate rotation without a restart.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use axum::http::Method;
use bytes::Bytes;
use common::{BIN, Node, audit_log, eventually};

/// Runs `asp cert ...`; panics with its stderr if it fails.
fn cert(args: &[&str]) {
    let out = Command::new(BIN).arg("cert").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "asp cert {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `asp serve` flags for node `name` of the CA in `dir` (trusting `ca`).
fn tls_flags(dir: &Path, name: &str, ca: &Path) -> Vec<String> {
    vec![
        "--tls-cert".into(),
        dir.join(format!("{name}.pem")).display().to_string(),
        "--tls-key".into(),
        dir.join(format!("{name}.key")).display().to_string(),
        "--tls-ca".into(),
        ca.display().to_string(),
    ]
}

async fn start(dir: &Path, mut flags: Vec<String>, more: &[&str]) -> Node {
    flags.extend(more.iter().map(|s| s.to_string()));
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    Node::start(dir, &flags).await
}

fn peers(status: &serde_json::Value) -> Vec<serde_json::Value> {
    status["replication"]["peers"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// The serial of the certificate a TLS server presents at `addr`, read by a client
/// that trusts `ca`.
async fn served_serial(addr: &str, ca: &Path, certs: &Path) -> String {
    // Any node certificate of the cluster serves as the client's (the API does not ask
    // for one; a peer port does).
    let material = asp_tls::Material::load(&asp_tls::TlsPaths {
        cert: certs.join("probe.pem"),
        key: certs.join("probe.key"),
        ca: ca.to_owned(),
    })
    .unwrap();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = material
        .peer_connector
        .connect(asp_tls::server_name(addr).unwrap(), tcp)
        .await
        .unwrap();
    asp_tls::peer_identity(tls.get_ref().1).unwrap().serial
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_carries_replication_and_refuses_every_stranger() {
    let root = tempfile::tempdir().unwrap();
    let ours = root.path().join("ours");
    let theirs = root.path().join("theirs");
    let ours_s = ours.display().to_string();
    let theirs_s = theirs.display().to_string();
    cert(&["init", "--dir", &ours_s]);
    cert(&[
        "node",
        "--dir",
        &ours_s,
        "--name",
        "n1",
        "--label",
        "region=eu",
    ]);
    cert(&[
        "node",
        "--dir",
        &ours_s,
        "--name",
        "n2",
        "--label",
        "region=eu",
    ]);
    cert(&["init", "--dir", &theirs_s]);
    cert(&["node", "--dir", &theirs_s, "--name", "x1"]);
    let ca = ours.join("ca.pem");

    let n1 = start(&root.path().join("n1"), tls_flags(&ours, "n1", &ca), &[]).await;
    let n2 = start(
        &root.path().join("n2"),
        tls_flags(&ours, "n2", &ca),
        &["--peer", &n1.peer_addr(), "--label", "region=eu"],
    )
    .await;
    // A node of another CA.
    let foreign = start(
        &root.path().join("x1"),
        tls_flags(&theirs, "x1", &theirs.join("ca.pem")),
        &["--peer", &n1.peer_addr()],
    )
    .await;
    // A stranger that trusts our CA (it has ca.pem) but holds no certificate from it.
    let both = root.path().join("both.pem");
    let mut bundle = std::fs::read(&ca).unwrap();
    bundle.extend(std::fs::read(theirs.join("ca.pem")).unwrap());
    std::fs::write(&both, bundle).unwrap();
    let stranger = start(
        &root.path().join("x2"),
        tls_flags(&theirs, "x1", &both),
        &["--peer", &n1.peer_addr()],
    )
    .await;
    // A node without TLS at all.
    let plain = start(
        &root.path().join("p"),
        Vec::new(),
        &["--peer", &n1.peer_addr()],
    )
    .await;

    // Writes cross the TLS link both ways.
    n1.client()
        .put("t", "a", "application/json", Bytes::from_static(b"1"), None)
        .await
        .unwrap();
    n2.client()
        .put("t", "b", "application/json", Bytes::from_static(b"2"), None)
        .await
        .unwrap();
    for node in [&n1, &n2] {
        eventually("writes replicate over TLS", async || {
            let a = node.client().get("t", "a", None).await.ok()??;
            let b = node.client().get("t", "b", None).await.ok()??;
            Some((a, b))
        })
        .await;
    }
    // Each side names the other from its certificate.
    let s2 = n2.client().status().await.unwrap();
    let link = peers(&s2)
        .into_iter()
        .find(|p| p["state"] == "active")
        .expect("n2's link to n1");
    assert_eq!(link["certificate"]["name"], "n1", "{link}");
    assert_eq!(link["certificate"]["labels"]["region"], "eu", "{link}");
    assert_eq!(s2["replication"]["tls"]["name"], "n2");

    // Every stranger is refused, and both sides say why.
    let refusals = eventually("n1 shows three kinds of refusal", async || {
        let s = n1.client().status().await.ok()?;
        let messages: Vec<String> = s["replication"]["refusals"]
            .as_array()?
            .iter()
            .filter(|r| r["code"] == "tls")
            .map(|r| r["message"].as_str().unwrap_or_default().to_owned())
            .collect();
        let has = |w: &str| messages.iter().any(|m| m.contains(w));
        (has("UnknownIssuer") && has("plain TCP") && has("UnknownCA")).then_some(messages)
    })
    .await;
    assert!(!refusals.is_empty());
    // The refusals are in n1's audit log, once a minute per peer host and reason.
    let audit = eventually("refusals in the audit log", async || {
        let text = audit_log(&n1.client()).await.ok()?;
        text.contains("peer_refused").then_some(text)
    })
    .await;
    assert!(audit.contains("UnknownIssuer"), "{audit}");
    let entries = audit.matches("peer_refused").count();
    assert!(
        entries <= 6,
        "refusals are rate-limited: {entries} entries\n{audit}"
    );
    let last_error = |node: &Node| {
        let client = node.client();
        async move {
            let s = client.status().await.ok()?;
            let e = peers(&s).first()?["last_error"].clone();
            (!e.is_null()).then(|| format!("{} {}", e["code"], e["message"]))
        }
    };
    let e = eventually("the foreign node shows why", async || {
        last_error(&foreign).await
    })
    .await;
    assert!(e.contains("tls") && e.contains("UnknownIssuer"), "{e}");
    let e = eventually("the stranger shows why", async || {
        last_error(&stranger).await
    })
    .await;
    assert!(
        e.contains("tls") && e.contains("refused this node's TLS certificate"),
        "{e}"
    );
    let e = eventually("the plain node shows why", async || {
        last_error(&plain).await
    })
    .await;
    assert!(e.contains("requires TLS"), "{e}");
    // None of them received anything.
    for node in [&foreign, &stranger, &plain] {
        let r = node.client().get("t", "a", None).await.unwrap();
        assert!(r.is_none(), "{r:?}");
    }

    // The API is HTTPS: a plain-HTTP client is told so, in plain HTTP.
    let plain_client =
        asp_http::client::Client::new(&format!("http://127.0.0.1:{}", n1.port)).unwrap();
    let answer = plain_client
        .send(Method::GET, "/v1/status", &[], Bytes::new())
        .await
        .unwrap();
    assert_eq!(answer.status, 400);
    assert_eq!(answer.json().unwrap()["error"]["code"], "https_required");
    // A client that does not trust the cluster CA does not get through.
    let wrong_ca = asp_http::client::Client::with_options(
        &n1.url(),
        &asp_http::client::ClientOptions {
            ca: Some(theirs.join("ca.pem")),
            token: None,
        },
    )
    .unwrap();
    let e = wrong_ca.status().await.unwrap_err().to_string();
    assert!(e.contains("UnknownIssuer"), "{e}");
    // The CLI needs the CA bundle for an https:// node, and works with it.
    let out = Command::new(BIN)
        .args(["get", "--node", &n1.url(), "--ns", "t", "a"])
        .env_remove("ASP_CA")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--ca"));
    let out = Command::new(BIN)
        .args(["get", "--node", &n1.url(), "--ns", "t", "a"])
        .env("ASP_CA", &ca)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_label_the_certificate_does_not_attest_stops_the_node_at_start() {
    let root = tempfile::tempdir().unwrap();
    let certs = root.path().join("certs");
    let certs_s = certs.display().to_string();
    cert(&["init", "--dir", &certs_s]);
    cert(&[
        "node",
        "--dir",
        &certs_s,
        "--name",
        "n1",
        "--label",
        "region=eu",
    ]);
    let ca = certs.join("ca.pem");
    let mut cases: Vec<(Vec<String>, &str)> = Vec::new();
    let mut flags = tls_flags(&certs, "n1", &ca);
    flags.extend(["--label".into(), "region=us".into()]);
    cases.push((flags, "attests region=eu"));
    let mut flags = tls_flags(&certs, "n1", &ca);
    flags.extend(["--label".into(), "zone=a".into()]);
    cases.push((flags, "does not attest it"));
    let mut flags = tls_flags(&certs, "n1", &ca);
    flags.truncate(4);
    cases.push((flags, "all three"));
    let mut flags = tls_flags(&certs, "n1", &ca);
    flags[3] = certs.join("ca.key").display().to_string();
    cases.push((flags, "does not go with"));
    for (flags, words) in cases {
        let out = Command::new(BIN)
            .arg("serve")
            .arg("--data-dir")
            .arg(root.path().join("d"))
            .args(["--api", "127.0.0.1:0", "--listen", "127.0.0.1:0"])
            .args(&flags)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{flags:?} started");
        assert!(stderr.contains(words), "{flags:?}: {stderr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotate_without_a_restart() {
    let root = tempfile::tempdir().unwrap();
    let certs = root.path().join("certs");
    let certs_s = certs.display().to_string();
    cert(&["init", "--dir", &certs_s]);
    for name in ["n1", "n2", "probe"] {
        cert(&["node", "--dir", &certs_s, "--name", name]);
    }
    let ca = certs.join("ca.pem");
    let mut n1 = start(&root.path().join("n1"), tls_flags(&certs, "n1", &ca), &[]).await;
    let mut n2 = start(
        &root.path().join("n2"),
        tls_flags(&certs, "n2", &ca),
        &["--peer", &n1.peer_addr()],
    )
    .await;
    let api = format!("127.0.0.1:{}", n1.port);
    let before = served_serial(&api, &ca, &certs).await;
    let peer_serial = |node: &Node| {
        let client = node.client();
        async move {
            let s = client.status().await.ok()?;
            let p = peers(&s).into_iter().find(|p| p["state"] == "active")?;
            p["certificate"]["serial"].as_str().map(str::to_owned)
        }
    };
    assert_eq!(
        eventually("n2 links to n1", async || peer_serial(&n2).await).await,
        before
    );

    // A new certificate for n1, written over the old files: picked up by the poll.
    cert(&["node", "--dir", &certs_s, "--name", "n1", "--force"]);
    let after = eventually("n1 serves its new certificate", async || {
        let s = served_serial(&api, &ca, &certs).await;
        (s != before).then_some(s)
    })
    .await;
    let status = n1.client().status().await.unwrap();
    assert_eq!(status["replication"]["tls"]["serial"], after.as_str());
    // New peer links present it too (n2 restarts; n1 does not).
    n2.signal(libc::SIGTERM);
    n2.restart().await;
    eventually("n2 sees n1's new certificate", async || {
        (peer_serial(&n2).await? == after).then_some(())
    })
    .await;

    // A broken file is refused and the node keeps serving the last good one; SIGHUP
    // asks at once and is counted.
    std::fs::write(certs.join("n1.pem"), b"-----BEGIN CERTIFICATE-----\nAAAA\n").unwrap();
    // SAFETY: kill(2) with our own child's pid and a signal number touches no memory.
    unsafe {
        libc::kill(n1.pid() as i32, libc::SIGHUP);
    }
    let metrics = eventually("the failed reload is counted", async || {
        let m = n1
            .client()
            .send(Method::GET, "/metrics", &[], Bytes::new())
            .await
            .ok()?;
        let text = String::from_utf8_lossy(&m.body).into_owned();
        text.contains("asp_tls_reloads_total{outcome=\"failed\"} 1")
            .then_some(text)
    })
    .await;
    assert!(
        metrics.contains("asp_tls_reloads_total{outcome=\"reloaded\"} 1"),
        "{metrics}"
    );
    assert_eq!(served_serial(&api, &ca, &certs).await, after);
    assert!(n1.log().contains("TLS reload failed"));
    n1.signal(libc::SIGTERM);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_gets_only_the_namespaces_its_certificate_is_allowed() {
    let root = tempfile::tempdir().unwrap();
    let certs = root.path().join("certs");
    let certs_s = certs.display().to_string();
    cert(&["init", "--dir", &certs_s]);
    for name in ["n1", "n2", "n3"] {
        cert(&["node", "--dir", &certs_s, "--name", name]);
    }
    let ca = certs.join("ca.pem");
    // n1 shares only "shared" with n2; every other peer gets everything.
    let config = root.path().join("n1.toml");
    std::fs::write(
        &config,
        "[replication.peer_namespaces]\nn2 = [\"shared\"]\n",
    )
    .unwrap();
    let n1 = start(
        &root.path().join("n1"),
        tls_flags(&certs, "n1", &ca),
        &["--config", &config.display().to_string()],
    )
    .await;
    let n2 = start(
        &root.path().join("n2"),
        tls_flags(&certs, "n2", &ca),
        &["--peer", &n1.peer_addr()],
    )
    .await;
    let n3 = start(
        &root.path().join("n3"),
        tls_flags(&certs, "n3", &ca),
        &["--peer", &n1.peer_addr()],
    )
    .await;
    for ns in ["shared", "secret"] {
        n1.client()
            .put(ns, "k", "application/json", Bytes::from_static(b"1"), None)
            .await
            .unwrap();
    }
    // n2 writes to both too: its "secret" never reaches n1 (n1 does not list it for
    // n2, so n2 does not send it), its "shared" does.
    n2.client()
        .put(
            "shared",
            "from-n2",
            "application/json",
            Bytes::from_static(b"2"),
            None,
        )
        .await
        .unwrap();
    n2.client()
        .put(
            "secret",
            "from-n2",
            "application/json",
            Bytes::from_static(b"2"),
            None,
        )
        .await
        .unwrap();
    eventually("n3 gets both namespaces", async || {
        let a = n3.client().get("shared", "k", None).await.ok()??;
        let b = n3.client().get("secret", "k", None).await.ok()??;
        let c = n1.client().get("shared", "from-n2", None).await.ok()??;
        Some((a, b, c))
    })
    .await;
    eventually("n2 gets shared", async || {
        n2.client().get("shared", "k", None).await.ok()?
    })
    .await;
    // A summary and anti-entropy later, still nothing of "secret" on n2, nor of n2's
    // "secret" on n1 (or, through n1, on n3).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        n2.client()
            .get("secret", "k", None)
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        n1.client()
            .get("secret", "from-n2", None)
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        n3.client()
            .get("secret", "from-n2", None)
            .await
            .unwrap()
            .is_none()
    );
    // n2's status does not even list "secret" among what it lags behind n1 in.
    let s2 = n2.client().status().await.unwrap();
    assert!(
        !s2["replication"].to_string().contains("\"secret\""),
        "{s2}"
    );
    // Rights need TLS.
    let plain_config = root.path().join("plain.toml");
    std::fs::write(
        &plain_config,
        "[replication.peer_namespaces]\nn2 = [\"a\"]\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .arg("serve")
        .arg("--data-dir")
        .arg(root.path().join("p"))
        .args([
            "--api",
            "127.0.0.1:0",
            "--listen",
            "127.0.0.1:0",
            "--config",
        ])
        .arg(&plain_config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs TLS"));
}

/// Every frame in a capture file (`ASP_TEST_CAPTURE_DIR`), in its debug form.
fn captured_frames(path: &Path) -> Vec<String> {
    let bytes = std::fs::read(path).unwrap();
    let mut at = 0;
    let mut out = Vec::new();
    while at < bytes.len() {
        let decoded = if out.is_empty() {
            asp_wire::decode_handshake(&bytes[at..])
        } else {
            asp_wire::decode(&bytes[at..])
        };
        match decoded {
            Ok(Some((frame, used))) => {
                out.push(format!("{frame:?}"));
                at += used;
            }
            other => panic!("{}: cannot decode at {at}: {other:?}", path.display()),
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resident_namespace_never_leaves_for_a_node_outside_its_rule() {
    let root = tempfile::tempdir().unwrap();
    let certs = root.path().join("certs");
    let certs_s = certs.display().to_string();
    cert(&["init", "--dir", &certs_s]);
    for (name, region) in [("n1", "eu"), ("n2", "eu"), ("n3", "us")] {
        cert(&[
            "node",
            "--dir",
            &certs_s,
            "--name",
            name,
            "--label",
            &format!("region={region}"),
        ]);
    }
    let ca = certs.join("ca.pem");
    let capture = root.path().join("capture");
    std::fs::create_dir_all(&capture).unwrap();
    // Anti-entropy every half second: reconciliation frames get their chance to leak.
    let config = root.path().join("fast.toml");
    // Compaction only when asked, collecting deletes as soon as every node in the rule
    // holds them (the horizon stays at its default: hours).
    std::fs::write(
        &config,
        "[replication]\nanti_entropy_interval_ms = 500\n\
         [compaction]\ninterval_ms = 0\ntombstone_ttl_ms = 0\n",
    )
    .unwrap();
    let config = config.display().to_string();
    let mut flags = tls_flags(&certs, "n1", &ca);
    flags.extend(["--config".into(), config.clone()]);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let capture_s = capture.display().to_string();
    let n1 = Node::start_with_env(
        &root.path().join("n1"),
        &flags,
        &[("ASP_TEST_CAPTURE_DIR", capture_s.as_str())],
    )
    .await;
    let n2 = start(
        &root.path().join("n2"),
        tls_flags(&certs, "n2", &ca),
        &["--peer", &n1.peer_addr(), "--config", &config],
    )
    .await;
    let n3 = start(
        &root.path().join("n3"),
        tls_flags(&certs, "n3", &ca),
        &["--peer", &n1.peer_addr(), "--config", &config],
    )
    .await;
    let pin = n1
        .client()
        .send(
            Method::PUT,
            "/v1/ns/eu-only/residency",
            &[(axum::http::header::CONTENT_TYPE, "application/json")],
            Bytes::from_static(br#"{"require":{"region":"eu"}}"#),
        )
        .await
        .unwrap();
    assert_eq!(pin.status, 200, "{:?}", pin.body);
    // n3 learns the rule (it cannot tell which namespace it is for until asked) and
    // refuses writes to the namespace.
    let refused = eventually("n3 refuses writes to eu-only", async || {
        let r = n3
            .client()
            .put(
                "eu-only",
                "x",
                "application/json",
                Bytes::from_static(b"1"),
                None,
            )
            .await;
        match r {
            Err(e) if e.to_string().contains("residency") => Some(e.to_string()),
            _ => None,
        }
    })
    .await;
    assert!(
        refused.contains("region=eu") && refused.contains("region=us"),
        "{refused}"
    );
    n1.client()
        .put(
            "eu-only",
            "secret-key-1",
            "application/json",
            Bytes::from_static(b"\"classified\""),
            None,
        )
        .await
        .unwrap();
    n2.client()
        .put(
            "eu-only",
            "secret-key-2",
            "application/json",
            Bytes::from_static(b"\"classified\""),
            None,
        )
        .await
        .unwrap();
    n1.client()
        .put(
            "pub",
            "k",
            "application/json",
            Bytes::from_static(b"1"),
            None,
        )
        .await
        .unwrap();
    eventually("eu-only reaches n2 and pub reaches n3", async || {
        n2.client()
            .get("eu-only", "secret-key-1", None)
            .await
            .ok()??;
        n1.client()
            .get("eu-only", "secret-key-2", None)
            .await
            .ok()??;
        n3.client().get("pub", "k", None).await.ok()?
    })
    .await;
    // Write concern: n3 acknowledges the feed positions eu-only's events took, but never
    // received them; only n1 and n2 hold a write.
    let r = n1
        .client()
        .send(
            Method::PUT,
            "/v1/ns/eu-only/kv/concern?replicas=3&timeout_ms=1500",
            &[(axum::http::header::CONTENT_TYPE, "application/json")],
            Bytes::from_static(b"1"),
        )
        .await
        .unwrap();
    let answer = r.json().unwrap();
    assert_eq!(r.status, 504, "{answer}");
    assert_eq!(answer["replicas"]["acknowledged"], 2, "{answer}");
    // Summaries and anti-entropy runs go on for a while.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(
        n3.client()
            .get("eu-only", "secret-key-1", None)
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        n3.client()
            .get("eu-only", "secret-key-2", None)
            .await
            .unwrap()
            .is_none()
    );

    // What left n1, frame by frame: nothing of eu-only towards n3, and it does go to n2.
    let files: Vec<_> = std::fs::read_dir(&capture)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    let to = |peer: &str| -> Vec<String> {
        files
            .iter()
            .filter(|p| p.to_string_lossy().ends_with(&format!("-{peer}.frames")))
            .flat_map(|p| captured_frames(p))
            .collect()
    };
    let to_n3 = to("n3");
    let to_n2 = to("n2");
    assert!(
        to_n3.iter().any(|f| f.contains("\"pub\"")),
        "the capture works: {to_n3:?}"
    );
    assert!(
        to_n3.iter().any(|f| f.starts_with("Summary")),
        "summaries went to n3"
    );
    for frame in &to_n3 {
        for secret in ["eu-only", "secret-key", "classified"] {
            assert!(!frame.contains(secret), "{secret} left for n3: {frame}");
        }
    }
    assert!(
        to_n2
            .iter()
            .any(|f| f.contains("eu-only") && f.contains("classified"))
    );

    // The residency view: who may hold it, bytes sent to each peer.
    let view = n1
        .client()
        .send(Method::GET, "/v1/ns/eu-only/residency", &[], Bytes::new())
        .await
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(view["require"]["region"], "eu", "{view}");
    assert_eq!(view["this_node"]["may_hold"], true, "{view}");
    let peer = |name: &str| {
        view["peers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .cloned()
            .unwrap()
    };
    assert_eq!(peer("n3")["may_hold"], false, "{view}");
    assert_eq!(peer("n3")["bytes_sent"], 0, "{view}");
    assert_eq!(peer("n2")["may_hold"], true, "{view}");
    assert!(peer("n2")["bytes_sent"].as_u64().unwrap() > 0, "{view}");

    // A delete in a pinned namespace is collected while n3, which can never hold it,
    // is up: collection waits for the nodes in the rule, not for n3 (and leaves no
    // epitaph, which would mean n3 was counted and given up on). A namespace of its
    // own: n3 wrote into eu-only above before it learned that rule, which rightly
    // keeps it in eu-only's collection.
    let pin = n1
        .client()
        .send(
            Method::PUT,
            "/v1/ns/eu-gc/residency",
            &[(axum::http::header::CONTENT_TYPE, "application/json")],
            Bytes::from_static(br#"{"require":{"region":"eu"}}"#),
        )
        .await
        .unwrap();
    assert_eq!(pin.status, 200, "{:?}", pin.body);
    eventually("n3 knows the rule", async || {
        let v = n3
            .client()
            .send(Method::GET, "/v1/ns/eu-gc/residency", &[], Bytes::new())
            .await
            .ok()?
            .json()
            .ok()?;
        (v["require"]["region"] == "eu").then_some(())
    })
    .await;
    n1.client()
        .put(
            "eu-gc",
            "k",
            "application/json",
            Bytes::from_static(b"1"),
            None,
        )
        .await
        .unwrap();
    n1.client().delete("eu-gc", "k", None).await.unwrap();
    eventually("the put and the delete reach n2", async || {
        (common::events(&n2.client(), "eu-gc").await == 2).then_some(())
    })
    .await;
    let report = eventually("n1 collects the delete", async || {
        let r = n1
            .client()
            .send(Method::POST, "/v1/admin/compact", &[], Bytes::new())
            .await
            .ok()?
            .json()
            .ok()?;
        (r["tombstones_collected"].as_u64()? > 0).then_some(r)
    })
    .await;
    assert_eq!(report["epitaphs_left"], 0, "{report}");
}
