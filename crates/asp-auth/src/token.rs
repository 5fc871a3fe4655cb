//! Bearer tokens: a chain of Ed25519-signed blocks, each a [`Scope`]; a token allows what
//! every one of its blocks allows.
//!
//! The first block is signed by a node's token key (the *root*, named by the node id). Each
//! block names a fresh public key, and the token carries the matching private key, so its
//! holder can append a narrower block offline: signed with that key, over the previous
//! block's signature, naming the next fresh key. Nobody can change a block (each
//! signature covers the ones before) or remove one (the token must carry the private key
//! of its last block's next key, and appending drops the one before), and appending only
//! ever narrows (scopes intersect). This is the shape of Biscuit's chain; the scope is four fields instead of
//! Datalog, because the checks a request needs (a namespace pattern, an operation, every
//! key of a 10,000-operation batch within a prefix, an expiry) are then a few string
//! comparisons per block.
//!
//! Text form: `asp1.` followed by URL-safe base64 (no padding) of the body:
//! `root node id (u64 LE) | blocks (u8) | per block: scope length (u16 LE), scope (JSON),
//! next public key (32), signature (64) | next private seed (32)`.

use base64::Engine;
use ring::rand::SystemRandom;
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};

use crate::scope::Scope;

/// Prefix of a token's text form (and its format version).
pub const TOKEN_PREFIX: &str = "asp1.";
/// Blocks per token, at most.
pub const BLOCKS_MAX: usize = 8;
/// A token's text form, at most (bytes).
pub const TOKEN_BYTES_MAX: usize = 16 << 10;
/// Domain separation for block signatures: no other signature of asp's covers these
/// bytes first.
const SIGNING_CONTEXT: &[u8] = b"asp token v1\0";

const SEED_BYTES: usize = 32;
const PUBLIC_BYTES: usize = 32;
const SIGNATURE_BYTES: usize = 64;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("not an asp token: {0}")]
    Malformed(String),
    #[error("the token's signature does not verify (altered, or signed by another key)")]
    BadSignature,
    #[error("{0}")]
    Invalid(String),
}

fn malformed(what: impl Into<String>) -> TokenError {
    TokenError::Malformed(what.into())
}

/// One signed block.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Block {
    /// The scope's bytes exactly as signed.
    scope_bytes: Vec<u8>,
    pub scope: Scope,
    next: [u8; PUBLIC_BYTES],
    signature: [u8; SIGNATURE_BYTES],
}

impl Block {
    /// The block's id (hex of the first 16 bytes of its signature): revoking it revokes
    /// every token that holds this block.
    pub fn id(&self) -> String {
        hex(&self.signature[..16])
    }
}

/// A parsed token (not yet verified: see [`Token::verify`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Token {
    /// The node whose token key signed the first block.
    pub root: u64,
    pub blocks: Vec<Block>,
    next_seed: [u8; SEED_BYTES],
}

/// A node's token-signing key (Ed25519).
pub struct SigningKey {
    pair: Ed25519KeyPair,
    pkcs8: Vec<u8>,
}

impl SigningKey {
    pub fn generate() -> Result<SigningKey, TokenError> {
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
            .map_err(|_| TokenError::Invalid("cannot make a key".into()))?;
        SigningKey::from_pkcs8(pkcs8.as_ref())
    }

    pub fn from_pkcs8(bytes: &[u8]) -> Result<SigningKey, TokenError> {
        let pair = Ed25519KeyPair::from_pkcs8(bytes)
            .map_err(|e| TokenError::Invalid(format!("not an Ed25519 key (PKCS#8): {e}")))?;
        Ok(SigningKey {
            pair,
            pkcs8: bytes.to_vec(),
        })
    }

    pub fn pkcs8(&self) -> &[u8] {
        &self.pkcs8
    }

    pub fn public(&self) -> [u8; PUBLIC_BYTES] {
        let mut out = [0u8; PUBLIC_BYTES];
        out.copy_from_slice(self.pair.public_key().as_ref());
        out
    }
}

fn fresh_seed() -> Result<[u8; SEED_BYTES], TokenError> {
    use ring::rand::SecureRandom;
    let mut seed = [0u8; SEED_BYTES];
    SystemRandom::new()
        .fill(&mut seed)
        .map_err(|_| TokenError::Invalid("no randomness".into()))?;
    Ok(seed)
}

fn pair_of_seed(seed: &[u8; SEED_BYTES]) -> Result<Ed25519KeyPair, TokenError> {
    // The seed came from this module (or a token's holder): any 32 bytes are a valid
    // Ed25519 private key.
    let pair = Ed25519KeyPair::from_seed_unchecked(seed)
        .map_err(|_| malformed("the token's attenuation key is not a key"))?;
    Ok(pair)
}

fn public_of(pair: &Ed25519KeyPair) -> [u8; PUBLIC_BYTES] {
    let mut out = [0u8; PUBLIC_BYTES];
    out.copy_from_slice(pair.public_key().as_ref());
    out
}

/// The bytes a block's signature covers.
fn signed_bytes(previous: Option<&[u8; SIGNATURE_BYTES]>, scope: &[u8], next: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(SIGNING_CONTEXT.len() + SIGNATURE_BYTES + scope.len() + 40);
    m.extend_from_slice(SIGNING_CONTEXT);
    if let Some(p) = previous {
        m.extend_from_slice(p);
    }
    m.extend_from_slice(&(scope.len() as u32).to_le_bytes());
    m.extend_from_slice(scope);
    m.extend_from_slice(next);
    m
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Token {
    /// A new token of `scope`, signed by `root_key` of node `root`.
    pub fn issue(root: u64, root_key: &SigningKey, scope: Scope) -> Result<Token, TokenError> {
        scope.validate().map_err(TokenError::Invalid)?;
        let scope_bytes = scope.to_bytes();
        let next_seed = fresh_seed()?;
        let next = public_of(&pair_of_seed(&next_seed)?);
        let sig = root_key.pair.sign(&signed_bytes(None, &scope_bytes, &next));
        let mut signature = [0u8; SIGNATURE_BYTES];
        signature.copy_from_slice(sig.as_ref());
        Ok(Token {
            root,
            blocks: vec![Block {
                scope_bytes,
                scope,
                next,
                signature,
            }],
            next_seed,
        })
    }

    /// This token with one more block: it then allows only what it allowed and `scope`
    /// allows. Needs no key but the one the token carries.
    pub fn narrow(&self, scope: Scope) -> Result<Token, TokenError> {
        scope.validate().map_err(TokenError::Invalid)?;
        if self.blocks.len() >= BLOCKS_MAX {
            return Err(TokenError::Invalid(format!(
                "a token holds at most {BLOCKS_MAX} blocks"
            )));
        }
        let last = self.blocks.last().expect("a token has a block");
        let signer = pair_of_seed(&self.next_seed)?;
        let scope_bytes = scope.to_bytes();
        let next_seed = fresh_seed()?;
        let next = public_of(&pair_of_seed(&next_seed)?);
        let sig = signer.sign(&signed_bytes(Some(&last.signature), &scope_bytes, &next));
        let mut signature = [0u8; SIGNATURE_BYTES];
        signature.copy_from_slice(sig.as_ref());
        let mut blocks = self.blocks.clone();
        blocks.push(Block {
            scope_bytes,
            scope,
            next,
            signature,
        });
        Ok(Token {
            root: self.root,
            blocks,
            next_seed,
        })
    }

    /// Checks every signature of the chain against the root's public key, and that the
    /// token carries the private key of its last block's next key. (Without that proof a
    /// holder could cut the blocks that narrowed its token off and get the wider one
    /// back: each block's signature covers only the blocks before it. The key of the
    /// block before the last was dropped when the last was appended.)
    pub fn verify(&self, root_public: &[u8]) -> Result<(), TokenError> {
        let mut key: Vec<u8> = root_public.to_vec();
        let mut previous: Option<&[u8; SIGNATURE_BYTES]> = None;
        for block in &self.blocks {
            UnparsedPublicKey::new(&ED25519, &key)
                .verify(
                    &signed_bytes(previous, &block.scope_bytes, &block.next),
                    &block.signature,
                )
                .map_err(|_| TokenError::BadSignature)?;
            key = block.next.to_vec();
            previous = Some(&block.signature);
        }
        let proof = public_of(&pair_of_seed(&self.next_seed)?);
        if proof != self.blocks.last().expect("a token has a block").next {
            return Err(TokenError::BadSignature);
        }
        Ok(())
    }

    /// The id of the first block: revoking it revokes this token and every token
    /// narrowed from it.
    pub fn id(&self) -> String {
        self.blocks[0].id()
    }

    /// Every block's id (a token is refused if any of them is revoked).
    pub fn ids(&self) -> Vec<String> {
        self.blocks.iter().map(Block::id).collect()
    }

    pub fn encode(&self) -> String {
        let mut body = Vec::new();
        body.extend_from_slice(&self.root.to_le_bytes());
        body.push(self.blocks.len() as u8);
        for b in &self.blocks {
            body.extend_from_slice(&(b.scope_bytes.len() as u16).to_le_bytes());
            body.extend_from_slice(&b.scope_bytes);
            body.extend_from_slice(&b.next);
            body.extend_from_slice(&b.signature);
        }
        body.extend_from_slice(&self.next_seed);
        format!(
            "{TOKEN_PREFIX}{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(body)
        )
    }

    pub fn decode(text: &str) -> Result<Token, TokenError> {
        let text = text.trim();
        if text.len() > TOKEN_BYTES_MAX {
            return Err(malformed(format!("longer than {TOKEN_BYTES_MAX} bytes")));
        }
        let body = text
            .strip_prefix(TOKEN_PREFIX)
            .ok_or_else(|| malformed(format!("it does not start with {TOKEN_PREFIX:?}")))?;
        let body = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|_| malformed("not URL-safe base64"))?;
        let mut r = Reader(&body);
        let root = u64::from_le_bytes(r.array()?);
        let n = r.take(1)?[0] as usize;
        if n == 0 || n > BLOCKS_MAX {
            return Err(malformed(format!("{n} blocks (1 to {BLOCKS_MAX})")));
        }
        let mut blocks = Vec::with_capacity(n);
        for _ in 0..n {
            let len = u16::from_le_bytes(r.array()?) as usize;
            let scope_bytes = r.take(len)?.to_vec();
            let scope = Scope::from_bytes(&scope_bytes)
                .map_err(|e| malformed(format!("a block's scope: {e}")))?;
            blocks.push(Block {
                scope_bytes,
                scope,
                next: r.array()?,
                signature: r.array()?,
            });
        }
        let next_seed = r.array()?;
        if !r.0.is_empty() {
            return Err(malformed("bytes after the end"));
        }
        Ok(Token {
            root,
            blocks,
            next_seed,
        })
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], TokenError> {
        if self.0.len() < n {
            return Err(malformed("cut short"));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], TokenError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }
}
