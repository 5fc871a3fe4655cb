//! Placement on real processes (issue 20, part 7): five nodes, thirty namespaces of two
//! replicas each. Each namespace's events reach only its two holders; every key is
//! readable through every node (a node that does not hold a namespace answers 307 to
//! one that does); a node removed, its namespaces move to the next members and nothing
//! is lost.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use axum::http::{Method, StatusCode};
use bytes::Bytes;
use common::Node;
use serde_json::{Value, json};

const NAMESPACES: usize = 30;
const KEYS: usize = 10;

fn names() -> Vec<String> {
    (0..NAMESPACES).map(|i| format!("placed{i:02}")).collect()
}

/// Sends a request to `first`, following 307s (at most 3) to the node whose API the
/// Location names. Returns the final answer and how many redirects it took.
async fn send(
    nodes: &[&Node],
    first: &Node,
    method: Method,
    path: &str,
    body: &str,
) -> (StatusCode, Value, usize) {
    let mut url = first.url();
    let mut path = path.to_owned();
    for hops in 0..4 {
        let node = nodes
            .iter()
            .find(|n| n.url() == url)
            .unwrap_or_else(|| panic!("a redirect to {url}, which is no node of the test"));
        let r = node
            .client()
            .send(
                method.clone(),
                &path,
                &[(axum::http::header::CONTENT_TYPE, "application/json")],
                Bytes::from(body.to_owned()),
            )
            .await
            .unwrap();
        if r.status != StatusCode::TEMPORARY_REDIRECT {
            return (r.status, r.json().unwrap_or(Value::Null), hops);
        }
        let location = r.headers[axum::http::header::LOCATION]
            .to_str()
            .unwrap()
            .to_owned();
        let at = location[8..].find('/').unwrap() + 8;
        url = location[..at].to_owned();
        path = location[at..].to_owned();
        assert_eq!(
            r.json().unwrap()["error"]["code"],
            "not_held",
            "a 307 says why"
        );
    }
    panic!("more than 3 redirects for {path}");
}

async fn placement(node: &Node, ns: &str) -> Value {
    node.get_json(&format!("/v1/ns/{ns}/placement")).await
}

/// Per namespace, the holders each node picks; equal on all of `nodes` once they agree.
async fn holders_seen(node: &Node) -> BTreeMap<String, BTreeSet<String>> {
    let mut out = BTreeMap::new();
    for ns in names() {
        let view = placement(node, &ns).await;
        let holders = view["holders"]
            .as_array()
            .map(|h| {
                h.iter()
                    .map(|h| h["node_id"].as_str().unwrap().to_owned())
                    .collect()
            })
            .unwrap_or_default();
        out.insert(ns, holders);
    }
    out
}

/// Events of `ns` this node holds (dots), from its status.
async fn events(node: &Node, ns: &str) -> u64 {
    common::events(&node.client(), ns).await
}

/// Waits until every node picks the same holders for every namespace, each set of two
/// members of `expected_members`, and returns them.
async fn agreed(
    nodes: &[&Node],
    expected_members: &BTreeSet<String>,
) -> BTreeMap<String, BTreeSet<String>> {
    let started = Instant::now();
    loop {
        let mut views = Vec::new();
        for n in nodes {
            views.push(holders_seen(n).await);
        }
        let same = views.windows(2).all(|w| w[0] == w[1]);
        let well_formed = views[0]
            .values()
            .all(|h| h.len() == 2 && h.is_subset(expected_members));
        if same && well_formed {
            return views.swap_remove(0);
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the nodes do not agree on the holders within 60 s: {views:#?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_nodes_hold_thirty_namespaces_two_each_and_lose_nothing_when_one_goes() {
    let dir = tempfile::tempdir().unwrap();
    let a = Node::start(&dir.path().join("a"), &["--dial-members"]).await;
    let mut others = Vec::new();
    for name in ["b", "c", "d", "e"] {
        others.push(
            Node::start(
                &dir.path().join(name),
                &["--peer", &a.peer_addr(), "--dial-members"],
            )
            .await,
        );
    }
    let mut all: Vec<Node> = vec![a];
    all.extend(others);
    let mut ids = Vec::new();
    for n in &all {
        ids.push(n.node_id().await);
    }
    let members: BTreeSet<String> = ids.iter().cloned().collect();
    {
        let nodes: Vec<&Node> = all.iter().collect();
        // Every node hears all five before anything is placed.
        for n in &nodes {
            common::eventually("every node hears five members", async || {
                let view = placement(n, "placed00").await;
                (view["members"].as_array().unwrap().len() == 5).then_some(())
            })
            .await;
        }
    }

    // Bad rules are refused with a clear error.
    let c = all[0].client();
    for (body, what) in [
        (json!({"replicas": 0}), "replicas must be 1 to 64"),
        (json!({"replicas": 2, "zone": "a"}), "unknown field"),
        (json!({"require": {"zone": "a"}}), "\"replicas\" must be"),
        (
            json!({"replicas": 2, "require": {"zone": 5}}),
            "must be a string",
        ),
    ] {
        let r = c
            .send(
                Method::PUT,
                "/v1/ns/placed00/placement",
                &[],
                Bytes::from(body.to_string()),
            )
            .await
            .unwrap();
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{body}");
        let message = r.json().unwrap()["error"]["message"]
            .as_str()
            .unwrap()
            .to_owned();
        assert!(message.contains(what), "{body}: {message}");
    }

    // The node's own namespaces go to every node: never placed.
    let r = c
        .send(
            Method::PUT,
            "/v1/ns/_asp.members/placement",
            &[],
            Bytes::from(json!({"replicas": 1}).to_string()),
        )
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{:?}", r.json());

    // Labels no member carries: nobody can serve it, and every node says why.
    let r = c
        .send(
            Method::PUT,
            "/v1/ns/nowhere/placement",
            &[],
            Bytes::from(json!({"replicas": 1, "require": {"zone": "z"}}).to_string()),
        )
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::OK);
    let r = c
        .send(Method::GET, "/v1/ns/nowhere/kv/k", &[], Bytes::new())
        .await
        .unwrap();
    let answer = r.json().unwrap();
    assert_eq!(r.status, StatusCode::CONFLICT, "{answer}");
    assert_eq!(answer["error"]["code"], "no_holder");
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap()
            .contains("zone=z"),
        "{answer}"
    );

    for ns in names() {
        let r = c
            .send(
                Method::PUT,
                &format!("/v1/ns/{ns}/placement"),
                &[],
                Bytes::from(json!({"replicas": 2}).to_string()),
            )
            .await
            .unwrap();
        assert_eq!(r.status, StatusCode::OK, "{:?}", r.json());
    }
    let nodes: Vec<&Node> = all.iter().collect();
    let holders = agreed(&nodes, &members).await;
    // Holders exchange a namespace over direct links only: --dial-members made a mesh.
    for n in &nodes {
        let view = placement(n, "placed00").await;
        for h in view["holders"].as_array().unwrap() {
            assert_eq!(h["linked"], true, "{view}");
        }
    }

    // Writes through every node in turn; a write to a node that does not hold the
    // namespace is redirected to one that does.
    let mut redirected = 0;
    for (i, ns) in names().iter().enumerate() {
        for k in 0..KEYS {
            let first = nodes[(i + k) % nodes.len()];
            let (status, answer, hops) = send(
                &nodes,
                first,
                Method::PUT,
                &format!("/v1/ns/{ns}/kv/k{k}"),
                &json!(format!("{ns}/{k}")).to_string(),
            )
            .await;
            assert_eq!(status, StatusCode::OK, "{answer}");
            let first_id = &ids[(i + k) % nodes.len()];
            assert_eq!(
                hops > 0,
                !holders[ns].contains(first_id),
                "{ns}: only a node that does not hold it redirects"
            );
            redirected += hops;
        }
    }
    assert!(redirected > 0);

    // Each redirect counts itself in the Location (asp_hops), and the holder serves the
    // request without it; a node that would redirect a request already redirected
    // twice refuses it instead (nodes that disagree on the holders would loop).
    {
        let ns = &names()[0];
        let at = ids.iter().position(|id| !holders[ns].contains(id)).unwrap();
        let c = nodes[at].client();
        let get = async |path: String| {
            let r = c.send(Method::GET, &path, &[], Bytes::new()).await.unwrap();
            let location = r
                .headers
                .get(axum::http::header::LOCATION)
                .map(|l| l.to_str().unwrap().to_owned());
            (r.status, r.json().unwrap_or(Value::Null), location)
        };
        let (status, _, location) = get(format!("/v1/ns/{ns}/kv/k0")).await;
        assert_eq!(status, StatusCode::TEMPORARY_REDIRECT);
        assert!(location.unwrap().ends_with("/kv/k0?asp_hops=1"));
        let (status, _, location) = get(format!("/v1/ns/{ns}/kv/k0?asp_hops=1")).await;
        assert_eq!(status, StatusCode::TEMPORARY_REDIRECT);
        assert!(location.unwrap().ends_with("/kv/k0?asp_hops=2"));
        let (status, answer, location) = get(format!("/v1/ns/{ns}/kv/k0?asp_hops=2")).await;
        assert_eq!(status, StatusCode::CONFLICT, "{answer}");
        assert_eq!(answer["error"]["code"], "no_holder");
        assert!(
            answer["error"]["message"]
                .as_str()
                .unwrap()
                .contains("disagree"),
            "{answer}"
        );
        assert_eq!(location, None);
    }

    // Each namespace's events are on its two holders and nowhere else.
    let wait_held =
        async |nodes: &[&Node], ids: &[String], holders: &BTreeMap<String, BTreeSet<String>>| {
            let started = Instant::now();
            loop {
                let mut wrong = Vec::new();
                for (n, id) in nodes.iter().zip(ids) {
                    for ns in names() {
                        let held = events(n, &ns).await;
                        let want = if holders[&ns].contains(id) {
                            KEYS as u64
                        } else {
                            0
                        };
                        if held != want {
                            wrong.push(format!("{id} holds {held} of {ns}'s events, not {want}"));
                        }
                    }
                }
                if wrong.is_empty() {
                    return;
                }
                assert!(
                    started.elapsed() < Duration::from_secs(90),
                    "not within 90 s: {wrong:#?}"
                );
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        };
    wait_held(&nodes, &ids, &holders).await;
    let mut per_node: BTreeMap<&String, usize> = BTreeMap::new();
    for h in holders.values() {
        for id in h {
            *per_node.entry(id).or_default() += 1;
        }
    }
    eprintln!("namespaces held per node: {per_node:?}");
    // 60 holdings over 5 nodes: 12 each on average; rendezvous hashing with random
    // node ids spreads them binomially (a standard deviation of about 2.7).
    assert_eq!(per_node.values().sum::<usize>(), 2 * NAMESPACES);
    for (id, n) in &per_node {
        assert!((3..=21).contains(n), "{id} holds {n} of 30");
    }

    // Write concern counts holders only: a node the namespace is withheld from
    // acknowledges the feed positions its events took, but never received them.
    let r = c
        .send(
            Method::PUT,
            "/v1/ns/concern/placement",
            &[],
            Bytes::from(json!({"replicas": 2}).to_string()),
        )
        .await
        .unwrap();
    let view = r.json().unwrap();
    let holder_ids: Vec<String> = view["holders"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["node_id"].as_str().unwrap().to_owned())
        .collect();
    let holder = nodes[ids.iter().position(|id| *id == holder_ids[0]).unwrap()];
    common::eventually("the first holder knows the rule", async || {
        let seen: Vec<String> = placement(holder, "concern").await["holders"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| h["node_id"].as_str().unwrap().to_owned())
            .collect();
        (seen == holder_ids).then_some(())
    })
    .await;
    let concern = async |query: &str| {
        let r = holder
            .client()
            .send(
                Method::PUT,
                &format!("/v1/ns/concern/kv/w?{query}"),
                &[(axum::http::header::CONTENT_TYPE, "application/json")],
                Bytes::from_static(b"1"),
            )
            .await
            .unwrap();
        (r.status, r.json().unwrap())
    };
    let (status, answer) = concern("replicas=all&timeout_ms=20000").await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["replicas"]["wanted"], 2, "all = the two holders");
    let (status, answer) = concern("replicas=3&timeout_ms=1500").await;
    assert_eq!(
        status,
        StatusCode::GATEWAY_TIMEOUT,
        "three nodes cannot hold a namespace of two replicas: {answer}"
    );
    assert_eq!(answer["replicas"]["acknowledged"], 2, "{answer}");

    // Every key, through every node.
    for n in &nodes {
        for ns in names() {
            for k in 0..KEYS {
                let (status, value, _) =
                    send(&nodes, n, Method::GET, &format!("/v1/ns/{ns}/kv/k{k}"), "").await;
                assert_eq!(status, StatusCode::OK, "{ns}/k{k}");
                assert_eq!(value, json!(format!("{ns}/{k}")));
            }
        }
    }

    // The node holding the most goes. Its namespaces move: the others agree on new
    // holders without it, the holder that stays brings each new one up to date.
    let (gone_at, _) = ids
        .iter()
        .enumerate()
        .max_by_key(|(_, id)| per_node.get(id).copied().unwrap_or(0))
        .unwrap();
    let gone_id = ids[gone_at].clone();
    all[gone_at].kill();
    let left: Vec<&Node> = all
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != gone_at)
        .map(|(_, n)| n)
        .collect();
    let left_ids: Vec<String> = ids.iter().filter(|id| **id != gone_id).cloned().collect();
    let left_members: BTreeSet<String> = left_ids.iter().cloned().collect();
    let after = agreed(&left, &left_members).await;
    let moved: Vec<&String> = holders
        .iter()
        .filter(|(_, h)| h.contains(&gone_id))
        .map(|(ns, _)| ns)
        .collect();
    assert!(!moved.is_empty());
    for (ns, h) in &holders {
        if !h.contains(&gone_id) {
            assert_eq!(
                &after[ns], h,
                "{ns} did not involve the node that went: it stays"
            );
        }
    }
    // A namespace's former holder keeps its copy (nothing drops it yet): the count on
    // a node that held it before is the whole namespace too.
    let started = Instant::now();
    loop {
        let mut missing = Vec::new();
        for (n, id) in left.iter().zip(&left_ids) {
            for ns in names() {
                if after[&ns].contains(id) && events(n, &ns).await != KEYS as u64 {
                    missing.push(format!("{id}: {ns}"));
                }
            }
        }
        if missing.is_empty() {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "new holders not brought up to date within 90 s: {missing:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    for n in &left {
        for ns in names() {
            for k in 0..KEYS {
                let (status, value, _) =
                    send(&left, n, Method::GET, &format!("/v1/ns/{ns}/kv/k{k}"), "").await;
                assert_eq!(status, StatusCode::OK, "{ns}/k{k} after a node went");
                assert_eq!(value, json!(format!("{ns}/{k}")));
            }
        }
    }
}
