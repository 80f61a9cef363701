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

/// The request header carrying the caller's own provider key for one call (BYOK,
/// PRODUCT.md §2.3).
pub const PROVIDER_KEY_HEADER: &str = "x-modelux-provider-key";

/// A provider key the caller sent for one call: held only for that call, never stored,
/// logged or printed (`Debug` shows its fingerprint).
pub struct ProviderKey {
    key: Box<str>,
    pub fingerprint: String,
}

impl ProviderKey {
    pub fn new(key: &str) -> ProviderKey {
        ProviderKey { key: key.into(), fingerprint: mask_key(key) }
    }

    pub fn secret(&self) -> &str {
        &self.key
    }
}

impl std::fmt::Debug for ProviderKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ProviderKey({})", self.fingerprint)
    }
}

/// The fingerprint a trace keeps of a provider key (PRODUCT.md §2.3): its vendor prefix
/// (up to and including the last `-` within the first 8 characters), `...`, and its last 4
/// characters (`sk-proj-...TA0A`). A key too short to hide anything shows only `...`.
pub fn mask_key(key: &str) -> String {
    let chars: Vec<char> = key.chars().collect();
    if chars.len() < 12 {
        return "...".into();
    }
    let head: String = chars.iter().take(8).collect();
    let prefix = head.rfind('-').map_or("", |i| &head[..=i]);
    let tail: String = chars[chars.len() - 4..].iter().collect();
    format!("{prefix}...{tail}")
}

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
    fn provider_keys_are_masked_to_their_prefix_and_last_four() {
        assert_eq!(mask_key("sk-proj-abcdefghijklmnopqrstuvwxyzTA0A"), "sk-proj-...TA0A");
        assert_eq!(mask_key("sk-ant-api03-abcdefghijklmnop-wxyz"), "sk-ant-...wxyz");
        assert_eq!(mask_key("AIzaSyAbcdefghijklmnop1234"), "...1234");
        assert_eq!(mask_key("short-key"), "...");
        assert_eq!(
            format!("{:?}", ProviderKey::new("sk-proj-secretsecretsecretTA0A")),
            "ProviderKey(sk-proj-...TA0A)"
        );
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
