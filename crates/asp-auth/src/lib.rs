//! Access control for asp's API: bearer tokens (`token`), what they allow (`scope`), and
//! the check a request passes ([`authorize`]). Where the keys and revocations live is
//! the node's business: it hands them in through [`KeyBook`].

pub mod keyfile;
pub mod scope;
pub mod token;

pub use scope::{Access, Denied, Keys, Op, Scope};
pub use token::{SigningKey, Token, TokenError};

/// The namespace of the cluster's token keys and revocations. Names starting with
/// [`RESERVED_PREFIX`] are the node's own: clients cannot write them.
pub const AUTH_NAMESPACE: &str = "_asp.auth";
pub const RESERVED_PREFIX: &str = "_asp.";

/// Key of a node's token public key in [`AUTH_NAMESPACE`].
pub fn public_key_key(node: u64) -> String {
    format!("key/{node:016x}")
}

/// Key of a revoked token id in [`AUTH_NAMESPACE`].
pub fn revoked_key(id: &str) -> String {
    format!("revoked/{id}")
}

/// Whether `id` has the shape of a token id (32 lowercase hex digits).
pub fn is_token_id(id: &str) -> bool {
    id.len() == 32 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Where the verifier finds token keys and revocations.
pub trait KeyBook {
    /// The token public key of node `node`, if this node knows it.
    fn public_key(&self, node: u64) -> Option<Vec<u8>>;
    /// Whether token (block) id `id` is revoked.
    fn revoked(&self, id: &str) -> bool;
}

/// Why a request is refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AuthError {
    /// No valid token: missing, malformed, not verifying, unknown key, revoked, expired
    /// (HTTP 401).
    Unauthenticated(String),
    /// A valid token that does not cover the request (HTTP 403).
    Forbidden(String),
}

/// A token whose signatures and revocations were checked.
#[derive(Clone, Debug)]
pub struct Verified {
    pub token: Token,
}

impl Verified {
    /// Whether every block allows `access` at `now_ms`.
    pub fn allows(&self, access: &Access<'_>, now_ms: u64) -> Result<(), AuthError> {
        for block in &self.token.blocks {
            match block.scope.allows(access, now_ms) {
                Ok(()) => {}
                Err(Denied::Expired { expired_ms }) => {
                    return Err(AuthError::Unauthenticated(format!(
                        "the token expired at {expired_ms} ms since the epoch"
                    )));
                }
                Err(Denied::OutOfScope(why)) => return Err(AuthError::Forbidden(why)),
            }
        }
        Ok(())
    }
}

/// Tokens whose signatures verified, by their text and the root key they verified
/// under: a client sends the same token again and again, and a signature check costs
/// far more than the rest of a request's check. Revocation and expiry are checked at
/// every use, never cached.
#[derive(Default)]
pub struct VerifyCache {
    entries: std::sync::Mutex<std::collections::HashMap<(String, Vec<u8>), Token>>,
}

/// Tokens a cache holds, at most (it starts over when full), and the longest it holds:
/// at most 2 MiB of tokens.
pub const VERIFY_CACHE_MAX: usize = 1024;
pub const VERIFY_CACHE_TOKEN_BYTES_MAX: usize = 2048;

impl VerifyCache {
    fn get(&self, text: &str, key: &[u8]) -> Option<Token> {
        self.entries
            .lock()
            .unwrap()
            .get(&(text.to_owned(), key.to_vec()))
            .cloned()
    }

    fn put(&self, text: &str, key: &[u8], token: &Token) {
        if text.len() > VERIFY_CACHE_TOKEN_BYTES_MAX {
            return;
        }
        let mut entries = self.entries.lock().unwrap();
        if entries.len() >= VERIFY_CACHE_MAX {
            entries.clear();
        }
        entries.insert((text.to_owned(), key.to_vec()), token.clone());
    }
}

/// Checks the text of an `Authorization` header's bearer token: parsed, every signature
/// verified against its root's key, none of its blocks revoked.
pub fn verify(text: &str, book: &impl KeyBook) -> Result<Verified, AuthError> {
    verify_with(text, book, None)
}

/// [`verify`], remembering signatures that verified in `cache`.
pub fn verify_with(
    text: &str,
    book: &impl KeyBook,
    cache: Option<&VerifyCache>,
) -> Result<Verified, AuthError> {
    let text = text.trim();
    let token = Token::decode(text).map_err(|e| AuthError::Unauthenticated(e.to_string()))?;
    let key = book.public_key(token.root).ok_or_else(|| {
        AuthError::Unauthenticated(format!(
            "the token is signed by node {:016x}, whose token key this node does not know (it reaches other nodes through replication of {AUTH_NAMESPACE})",
            token.root
        ))
    })?;
    let token = match cache.and_then(|c| c.get(text, &key)) {
        Some(cached) => cached,
        None => {
            token
                .verify(&key)
                .map_err(|e| AuthError::Unauthenticated(e.to_string()))?;
            if let Some(c) = cache {
                c.put(text, &key, &token);
            }
            token
        }
    };
    for id in token.ids() {
        if book.revoked(&id) {
            return Err(AuthError::Unauthenticated(format!(
                "the token is revoked (id {id})"
            )));
        }
    }
    Ok(Verified { token })
}

/// [`verify`], then [`Verified::allows`].
pub fn authorize(
    text: &str,
    book: &impl KeyBook,
    access: &Access<'_>,
    now_ms: u64,
) -> Result<Verified, AuthError> {
    let verified = verify(text, book)?;
    verified.allows(access, now_ms)?;
    Ok(verified)
}

#[cfg(test)]
mod tests;
