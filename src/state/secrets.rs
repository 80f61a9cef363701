//! Secrets at rest: provider keys are stored encrypted with AES-256-GCM under one master
//! key, and decrypted only when a provider is built into the snapshot.
//!
//! The master key comes from `MODELUX_MASTER_KEY` or `state.master_key` (64 hex characters
//! or 32 bytes in base64). Without either, one is generated once into
//! `<data_dir>/master.key` (mode 0600) and reused from there.

use std::io::Write as _;
use std::path::Path;

use aes_gcm::aead::{Aead, KeyInit, OsRng};
use aes_gcm::{AeadCore, Aes256Gcm, Key, Nonce};
use base64::Engine as _;

/// Marks the format of a stored secret: version, then base64 of nonce ‖ ciphertext ‖ tag.
const PREFIX: &str = "enc:v1:";
const NONCE_LEN: usize = 12;

pub struct MasterKey {
    cipher: Aes256Gcm,
}

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey(…)")
    }
}

/// Where the master key came from (logged at start; never the key itself).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeySource {
    Environment,
    Config,
    File,
    Generated,
}

fn parse(text: &str) -> Result<[u8; 32], String> {
    let text = text.trim();
    let mut key = [0u8; 32];
    if hex::decode_to_slice(text, &mut key).is_ok() {
        return Ok(key);
    }
    match base64::engine::general_purpose::STANDARD.decode(text) {
        Ok(bytes) if bytes.len() == 32 => {
            key.copy_from_slice(&bytes);
            Ok(key)
        }
        _ => Err("the master key must be 64 hexadecimal characters or 32 bytes in base64".into()),
    }
}

impl MasterKey {
    pub fn from_bytes(key: &[u8; 32]) -> MasterKey {
        MasterKey { cipher: Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(key)) }
    }

    /// The master key from the environment, the config, or `<data_dir>/master.key`
    /// (generated there when none exists).
    pub fn load(
        env: Option<&str>,
        configured: Option<&str>,
        data_dir: &Path,
    ) -> Result<(MasterKey, KeySource), String> {
        if let Some(text) = env.filter(|t| !t.trim().is_empty()) {
            return Ok((
                MasterKey::from_bytes(&parse(text).map_err(|e| format!("MODELUX_MASTER_KEY: {e}"))?),
                KeySource::Environment,
            ));
        }
        if let Some(text) = configured.filter(|t| !t.trim().is_empty()) {
            return Ok((
                MasterKey::from_bytes(&parse(text).map_err(|e| format!("state.master_key: {e}"))?),
                KeySource::Config,
            ));
        }
        let path = data_dir.join("master.key");
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                let key = parse(&text).map_err(|e| format!("{}: {e}", path.display()))?;
                Ok((MasterKey::from_bytes(&key), KeySource::File))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key = Aes256Gcm::generate_key(OsRng);
                std::fs::create_dir_all(data_dir)
                    .map_err(|e| format!("cannot create {}: {e}", data_dir.display()))?;
                write_private(&path, &hex::encode(key))?;
                Ok((MasterKey { cipher: Aes256Gcm::new(&key) }, KeySource::Generated))
            }
            Err(e) => Err(format!("cannot read {}: {e}", path.display())),
        }
    }

    pub fn encrypt(&self, plaintext: &str) -> Result<String, String> {
        let nonce = Aes256Gcm::generate_nonce(&mut OsRng);
        let sealed =
            self.cipher.encrypt(&nonce, plaintext.as_bytes()).map_err(|_| "encryption failed".to_string())?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&sealed);
        Ok(format!("{PREFIX}{}", base64::engine::general_purpose::STANDARD.encode(out)))
    }

    /// `Err` for a value not sealed by this key (another master key, or tampered with).
    pub fn decrypt(&self, sealed: &str) -> Result<String, String> {
        let bad = || "cannot decrypt: not sealed by this master key".to_string();
        let raw = sealed.strip_prefix(PREFIX).ok_or_else(bad)?;
        let bytes = base64::engine::general_purpose::STANDARD.decode(raw).map_err(|_| bad())?;
        if bytes.len() < NONCE_LEN {
            return Err(bad());
        }
        let (nonce, ciphertext) = bytes.split_at(NONCE_LEN);
        let plain = self.cipher.decrypt(Nonce::from_slice(nonce), ciphertext).map_err(|_| bad())?;
        String::from_utf8(plain).map_err(|_| bad())
    }
}

/// Creates `path` readable by its owner only, or fails if it already exists.
fn write_private(path: &Path, text: &str) -> Result<(), String> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
    f.write_all(text.as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seals_opens_and_refuses_other_keys_and_tampering() {
        let dir = tempfile::tempdir().unwrap();
        let (key, source) = MasterKey::load(None, None, dir.path()).unwrap();
        assert_eq!(source, KeySource::Generated);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("master.key")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let sealed = key.encrypt("sk-live-123").unwrap();
        assert!(!sealed.contains("sk-live"));
        assert_ne!(sealed, key.encrypt("sk-live-123").unwrap(), "a fresh nonce every time");
        assert_eq!(key.decrypt(&sealed).unwrap(), "sk-live-123");
        // The same file gives the same key; another key cannot open it.
        let (again, source) = MasterKey::load(None, None, dir.path()).unwrap();
        assert_eq!(source, KeySource::File);
        assert_eq!(again.decrypt(&sealed).unwrap(), "sk-live-123");
        let (other, _) = MasterKey::load(Some(&"ab".repeat(32)), None, dir.path()).unwrap();
        assert!(other.decrypt(&sealed).is_err());
        let mut tampered = sealed.clone();
        tampered.pop();
        tampered.push(if sealed.ends_with('A') { 'B' } else { 'A' });
        assert!(key.decrypt(&tampered).is_err());
        assert!(MasterKey::load(Some("short"), None, dir.path()).is_err());
    }
}
