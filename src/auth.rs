//! API-key index. Keys are stored only as SHA-256 digests; a presented key is hashed and
//! looked up by digest, then the digest is compared in constant time. The plaintext of a key
//! is never stored in the snapshot nor logged.

use std::collections::HashMap;
use std::sync::Arc;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

pub const PROJECT_KEY_PREFIX: &str = "mlx_sk_";
pub const MANAGEMENT_KEY_PREFIX: &str = "mlx_mk_";

pub type KeyDigest = [u8; 32];

/// Who is calling: resolved from a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// Project id for project keys; empty for management keys.
    pub project: Arc<str>,
    /// The key's configured name (safe to log and to label traces with).
    pub key_name: Arc<str>,
    /// Rate limits of this key (0: unlimited).
    pub limits: KeyLimits,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct KeyLimits {
    pub requests_per_minute: u64,
    pub tokens_per_minute: u64,
    /// Identifies the key's rate counters (`project/name`, `manage/name`).
    pub rate_key: Arc<str>,
}

impl Principal {
    pub fn new(project: &str, key_name: &str, requests_per_minute: u64, tokens_per_minute: u64) -> Principal {
        let scope = if project.is_empty() { "manage" } else { project };
        Principal {
            project: project.into(),
            key_name: key_name.into(),
            limits: KeyLimits {
                requests_per_minute,
                tokens_per_minute,
                rate_key: format!("{scope}/{key_name}").into(),
            },
        }
    }
}

#[derive(Debug, Default, Clone)]
pub struct KeyIndex {
    by_digest: HashMap<KeyDigest, (KeyDigest, Arc<Principal>)>,
}

pub fn digest(key: &str) -> KeyDigest {
    Sha256::digest(key.as_bytes()).into()
}

impl KeyIndex {
    /// Returns false when the digest is already present (duplicate key).
    pub fn insert(&mut self, digest: KeyDigest, principal: Principal) -> bool {
        if self.by_digest.contains_key(&digest) {
            return false;
        }
        self.by_digest.insert(digest, (digest, Arc::new(principal)));
        true
    }

    pub fn contains(&self, digest: &KeyDigest) -> bool {
        self.by_digest.contains_key(digest)
    }

    pub fn len(&self) -> usize {
        self.by_digest.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_digest.is_empty()
    }

    /// Authenticates a presented key. The map lookup only reveals which bucket a digest
    /// falls in (useless without a preimage); the final equality check is constant-time.
    pub fn authenticate(&self, presented: &str) -> Option<Arc<Principal>> {
        let d = digest(presented);
        let (stored, principal) = self.by_digest.get(&d)?;
        if bool::from(stored.ct_eq(&d)) {
            Some(principal.clone())
        } else {
            None
        }
    }
}

/// Extracts the token from `Authorization: Bearer <token>` (scheme case-insensitive).
pub fn bearer_token(header: Option<&[u8]>) -> Option<&str> {
    let value = std::str::from_utf8(header?).ok()?.trim();
    let (scheme, token) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let token = token.trim();
    (!token.is_empty()).then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authenticates_by_digest() {
        let mut idx = KeyIndex::default();
        let p = Principal::new("default", "dev", 600, 0);
        assert!(idx.insert(digest("mlx_sk_abc"), p.clone()));
        assert!(!idx.insert(digest("mlx_sk_abc"), p.clone()));
        assert_eq!(idx.authenticate("mlx_sk_abc").as_deref(), Some(&p));
        assert!(idx.authenticate("mlx_sk_abd").is_none());
        assert!(idx.authenticate("").is_none());
    }

    #[test]
    fn parses_bearer() {
        assert_eq!(bearer_token(Some(b"Bearer mlx_sk_1")), Some("mlx_sk_1"));
        assert_eq!(bearer_token(Some(b"bearer   mlx_sk_1 ")), Some("mlx_sk_1"));
        assert_eq!(bearer_token(Some(b"Basic abc")), None);
        assert_eq!(bearer_token(Some(b"Bearer ")), None);
        assert_eq!(bearer_token(None), None);
    }
}
