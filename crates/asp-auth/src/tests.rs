use std::collections::{HashMap, HashSet};

use proptest::prelude::*;

use super::*;

#[derive(Default)]
struct Book {
    keys: HashMap<u64, Vec<u8>>,
    revoked: HashSet<String>,
}

impl KeyBook for Book {
    fn public_key(&self, node: u64) -> Option<Vec<u8>> {
        self.keys.get(&node).cloned()
    }
    fn revoked(&self, id: &str) -> bool {
        self.revoked.contains(id)
    }
}

fn scope(ns: &[&str], ops: &[Op], prefix: &str) -> Scope {
    Scope {
        ns: ns.iter().map(|s| (*s).to_owned()).collect(),
        ops: ops.to_vec(),
        prefix: prefix.to_owned(),
        expires_ms: None,
    }
}

fn access<'a>(ns: &'a str, op: Op, keys: Keys<'a>) -> Access<'a> {
    Access {
        namespace: Some(ns),
        op,
        keys,
    }
}

fn setup() -> (SigningKey, Book) {
    let key = SigningKey::generate().unwrap();
    let mut book = Book::default();
    book.keys.insert(7, key.public().to_vec());
    (key, book)
}

#[test]
fn a_token_allows_its_scope_and_nothing_else() {
    let (key, book) = setup();
    let t = Token::issue(7, &key, scope(&["orders*"], &[Op::Read, Op::Write], "eu/")).unwrap();
    let text = t.encode();
    assert!(text.starts_with("asp1."));
    let ok = |a: Access<'_>| authorize(&text, &book, &a, 0);
    ok(access("orders", Op::Read, Keys::Key("eu/1"))).unwrap();
    ok(access("orders-2", Op::Write, Keys::Prefix("eu/x"))).unwrap();
    for (a, words) in [
        (
            access("orders", Op::Admin, Keys::Any),
            "does not allow admin",
        ),
        (
            access("users", Op::Read, Keys::Key("eu/1")),
            "namespace \"users\"",
        ),
        (
            access("orders", Op::Read, Keys::Key("us/1")),
            "starting with \"eu/\"",
        ),
        (
            access("orders", Op::Read, Keys::Prefix("")),
            "starting with",
        ),
        (access("orders", Op::Read, Keys::Any), "may touch any key"),
    ] {
        match ok(a) {
            Err(AuthError::Forbidden(m)) => assert!(m.contains(words), "{m}"),
            other => panic!("{a:?}: {other:?}"),
        }
    }
    let node_wide = Access {
        namespace: None,
        op: Op::Read,
        keys: Keys::Any,
    };
    assert!(matches!(ok(node_wide), Err(AuthError::Forbidden(_))));
}

#[test]
fn narrowing_offline_only_ever_takes_away() {
    let (key, book) = setup();
    let wide = Token::issue(
        7,
        &key,
        scope(&["*"], &[Op::Read, Op::Write, Op::Admin], ""),
    )
    .unwrap();
    // The holder narrows without any key but the one the token carries.
    let narrow = Token::decode(&wide.encode())
        .unwrap()
        .narrow(scope(&["orders"], &[Op::Read], "a"))
        .unwrap();
    let text = narrow.encode();
    authorize(
        &text,
        &book,
        &access("orders", Op::Read, Keys::Key("a1")),
        0,
    )
    .unwrap();
    for a in [
        access("orders", Op::Write, Keys::Key("a1")),
        access("users", Op::Read, Keys::Key("a1")),
        access("orders", Op::Read, Keys::Key("b1")),
    ] {
        assert!(
            matches!(authorize(&text, &book, &a, 0), Err(AuthError::Forbidden(_))),
            "{a:?}"
        );
    }
    // A block that claims more than the one before does not widen anything.
    let claims_more = narrow
        .narrow(scope(&["*"], &[Op::Admin, Op::Write], ""))
        .unwrap();
    let a = access("users", Op::Write, Keys::Any);
    assert!(matches!(
        authorize(&claims_more.encode(), &book, &a, 0),
        Err(AuthError::Forbidden(_))
    ));
    // Cutting the narrowing block off does not give the wide token back: the token no
    // longer carries the key its last block names.
    let mut cut = narrow.clone();
    cut.blocks.pop();
    let e = authorize(
        &cut.encode(),
        &book,
        &access("users", Op::Write, Keys::Any),
        0,
    );
    assert!(matches!(e, Err(AuthError::Unauthenticated(_))), "{e:?}");
}

#[test]
fn altered_foreign_revoked_and_expired_tokens_are_unauthenticated() {
    let (key, mut book) = setup();
    let t = Token::issue(7, &key, scope(&["*"], &[Op::Read], "")).unwrap();
    let a = access("x", Op::Read, Keys::Any);
    // Another key under the same root id.
    let other = SigningKey::generate().unwrap();
    let forged = Token::issue(7, &other, scope(&["*"], &[Op::Read], "")).unwrap();
    let unauthenticated = |r: Result<Verified, AuthError>, words: &str| match r {
        Err(AuthError::Unauthenticated(m)) => assert!(m.contains(words), "{m}"),
        other => panic!("{other:?}"),
    };
    unauthenticated(authorize(&forged.encode(), &book, &a, 0), "does not verify");
    // An unknown root.
    let stranger = Token::issue(8, &key, scope(&["*"], &[Op::Read], "")).unwrap();
    unauthenticated(authorize(&stranger.encode(), &book, &a, 0), "does not know");
    // Every byte flipped in turn: never accepted.
    let text = t.encode();
    let body = base64::Engine::decode(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD,
        &text[5..],
    )
    .unwrap();
    for i in 0..body.len() {
        let mut b = body.clone();
        b[i] ^= 0x01;
        let flipped = format!(
            "asp1.{}",
            base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, &b)
        );
        assert!(
            authorize(&flipped, &book, &a, 0).is_err(),
            "byte {i} flipped still verifies"
        );
    }
    // Revoked: the token, and one narrowed from it.
    let narrowed = t.narrow(scope(&["x"], &[Op::Read], "")).unwrap();
    book.revoked.insert(t.id());
    unauthenticated(authorize(&text, &book, &a, 0), "revoked");
    unauthenticated(authorize(&narrowed.encode(), &book, &a, 0), "revoked");
    // Expired.
    let mut s = scope(&["*"], &[Op::Read], "");
    s.expires_ms = Some(1_000);
    let short = Token::issue(7, &key, s).unwrap().encode();
    authorize(&short, &book, &a, 1_000).unwrap();
    unauthenticated(authorize(&short, &book, &a, 1_001), "expired");
    // Garbage.
    for bad in ["", "Bearer x", "asp1.", "asp1.!!", "asp2.AAAA"] {
        unauthenticated(authorize(bad, &book, &a, 0), "");
    }
}

#[test]
fn bad_scopes_are_named() {
    let (key, _) = setup();
    for (s, words) in [
        (scope(&[], &[Op::Read], ""), "namespace pattern"),
        (scope(&["a b"], &[Op::Read], ""), "\"a b\""),
        (scope(&["*x"], &[Op::Read], ""), "\"*x\""),
        (scope(&["x"], &[], ""), "operation"),
    ] {
        let e = Token::issue(7, &key, s).unwrap_err().to_string();
        assert!(e.contains(words), "{e}");
    }
}

proptest! {
    // Whatever the bytes, decoding never panics, and what decodes re-encodes the same.
    #[test]
    fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let text = format!("asp1.{}", base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, &bytes));
        if let Ok(t) = Token::decode(&text) {
            prop_assert_eq!(t.encode(), text);
        }
    }
}

#[test]
fn the_cache_skips_the_signature_check_but_never_revocation_or_a_new_key() {
    let (key, mut book) = setup();
    let cache = VerifyCache::default();
    let t = Token::issue(7, &key, scope(&["*"], &[Op::Read], "")).unwrap();
    let text = t.encode();
    verify_with(&text, &book, Some(&cache)).unwrap();
    verify_with(&text, &book, Some(&cache)).unwrap();
    // Revoked after it was cached: refused.
    book.revoked.insert(t.id());
    assert!(matches!(
        verify_with(&text, &book, Some(&cache)),
        Err(AuthError::Unauthenticated(_))
    ));
    book.revoked.clear();
    // The node's key replaced: the cached verification does not carry over.
    let other = SigningKey::generate().unwrap();
    book.keys.insert(7, other.public().to_vec());
    assert!(matches!(
        verify_with(&text, &book, Some(&cache)),
        Err(AuthError::Unauthenticated(_))
    ));
    // A token that never verified is never cached.
    let forged = Token::issue(7, &key, scope(&["*"], &[Op::Read], ""))
        .unwrap()
        .encode();
    for _ in 0..2 {
        assert!(verify_with(&forged, &book, Some(&cache)).is_err());
    }
}
