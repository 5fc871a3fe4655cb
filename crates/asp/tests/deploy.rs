//! The deployment files stay true to the binary: the example configuration that the
//! Debian package installs as /etc/asp/asp.toml (deploy/asp.toml) starts a node (every
//! key in it is one `asp serve` knows; unknown keys stop a node at start), with the
//! addresses and data directory given as flags, as a test needs.

mod common;

use common::Node;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_configuration_starts_a_node() {
    let dir = tempfile::tempdir().unwrap();
    let config = concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy/asp.toml");
    let node = Node::start(&dir.path().join("a"), &["--config", config]).await;
    let status = node.client().status().await.unwrap();
    assert_eq!(status["fsync"], "always", "{status}");
    assert_eq!(status["replication"]["cluster_id"], "default", "{status}");
}
