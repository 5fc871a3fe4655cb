//! A real `asp serve` on a damaged feed log: it refuses to start (non-zero exit, a
//! message naming the file and the offset), and `--salvage` starts it with every intact
//! record.

mod common;

use std::os::unix::fs::FileExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{BIN, Node, free_port};

/// Regression (issue 11): one byte flipped a third of the way into the log, and the
/// node started without complaint with most acknowledged keys gone.
#[tokio::test]
async fn serve_refuses_a_corrupt_log_and_salvage_keeps_every_intact_record() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("node");
    let mut node = Node::start(&data, &["--fsync", "always"]).await;
    let client = node.client();
    for i in 0..300 {
        client
            .put(
                "c",
                &format!("k{i}"),
                "text/plain",
                Bytes::from(format!("v{i}")),
                None,
            )
            .await
            .unwrap();
    }
    assert!(node.signal(libc::SIGTERM).success());
    let segment = data.join("log").join(format!("{:020}.log", 1));
    let len = std::fs::metadata(&segment).unwrap().len();
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&segment)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, len / 3).unwrap();
    f.write_all_at(&[b[0] ^ 0x10], len / 3).unwrap();
    drop(f);

    let mut child = Command::new(BIN)
        .arg("serve")
        .arg("--data-dir")
        .arg(&data)
        .arg("--api")
        .arg(format!("127.0.0.1:{}", free_port()))
        .arg("--listen")
        .arg(format!("127.0.0.1:{}", free_port()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            panic!("asp serve started on a corrupt log");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let stderr = std::io::read_to_string(child.stderr.take().unwrap()).unwrap();
    assert!(!status.success(), "exit {status}; {stderr}");
    assert!(stderr.contains("corrupt"), "{stderr}");
    assert!(stderr.contains(&segment.display().to_string()), "{stderr}");
    assert!(stderr.contains("offset"), "{stderr}");
    assert!(stderr.contains("--salvage"), "{stderr}");

    let node = Node::start(&data, &["--fsync", "always", "--salvage"]).await;
    let client = node.client();
    let status = client.status().await.unwrap();
    let salvage = &status["recovery"]["salvage"];
    assert_eq!(salvage["positions_lost"], 1, "{status}");
    let mut present = 0;
    for i in 0..300 {
        present += u32::from(
            client
                .get("c", &format!("k{i}"), None)
                .await
                .unwrap()
                .is_some(),
        );
    }
    assert_eq!(present, 299, "every intact record is kept");
}
