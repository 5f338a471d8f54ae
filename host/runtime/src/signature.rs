//! Signed components: an Ed25519 signature over the component's SHA-256
//! digest, in a detached `FILE.wasm.sig` next to it (JSON:
//! `{"algorithm": "ed25519", "key": "ed25519:…", "sha256": "…", "signature": "…"}`).
//!
//! What is signed is [`CONTEXT`] followed by the 32 bytes of the digest, so
//! a signature made for something else with the same key never passes as a
//! component's. The bytes that are verified are the bytes that are compiled
//! (the file is read once).

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::{Path, PathBuf};
use wasmgate_manifest::Manifest;
use wasmgate_manifest::signing::PublicKey;

/// What precedes the digest in the signed message.
pub const CONTEXT: &[u8] = b"wasmgate component signature v1\n";

/// The largest signature file read (a real one is about 250 bytes).
pub const MAX_SIGNATURE_FILE: u64 = 4096;

/// A detached signature file's contents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignatureFile {
    /// Always `ed25519`.
    pub algorithm: String,
    /// The signer's public key, `ed25519:BASE64`.
    pub key: String,
    /// The signed component's SHA-256, hex.
    pub sha256: String,
    /// The 64-byte signature, base64.
    pub signature: String,
}

/// Why a component's signature was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum SignatureError {
    /// `require_signature = true` and there is no signature file.
    #[error(
        "no signature: {sig} does not exist and [gateway] require_signature = true (sign the component with `wasmgate sign {path} --key KEY`)",
        sig = sig.display(),
        path = path.display()
    )]
    Missing {
        /// The component.
        path: PathBuf,
        /// The signature file it needs.
        sig: PathBuf,
    },
    /// The signature file could not be read.
    #[error("cannot read the signature {}: {message}", sig.display())]
    Unreadable {
        /// The signature file.
        sig: PathBuf,
        /// Why.
        message: String,
    },
    /// The signature file is not one.
    #[error("{} is not a wasmgate signature: {message}", sig.display())]
    Malformed {
        /// The signature file.
        sig: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The signer is not trusted.
    #[error("{} is signed by {key}, which is not a trusted key", sig.display())]
    Untrusted {
        /// The signature file.
        sig: PathBuf,
        /// The signer.
        key: PublicKey,
    },
    /// The file is not the one that was signed.
    #[error(
        "{} is not the file that was signed: its SHA-256 is {actual}, the signature {} is for {signed} (changed after signing?)",
        path.display(),
        sig.display()
    )]
    Changed {
        /// The component.
        path: PathBuf,
        /// The signature file.
        sig: PathBuf,
        /// The component's digest.
        actual: String,
        /// The digest in the signature file.
        signed: String,
    },
    /// The signature does not verify.
    #[error("the signature in {} does not verify: {key} did not sign this digest", sig.display())]
    Invalid {
        /// The signature file.
        sig: PathBuf,
        /// The key it names.
        key: PublicKey,
    },
}

/// `PATH.sig`.
pub fn signature_path(component: &Path) -> PathBuf {
    let mut name = component.as_os_str().to_os_string();
    name.push(".sig");
    PathBuf::from(name)
}

/// The message an Ed25519 signature covers for a component of `bytes`.
fn message(digest: &[u8]) -> Vec<u8> {
    let mut m = CONTEXT.to_vec();
    m.extend_from_slice(digest);
    m
}

/// Signs `bytes` with a PKCS#8 Ed25519 key (what `wasmgate keygen` writes).
pub fn sign(pkcs8: &[u8], bytes: &[u8]) -> Result<SignatureFile, String> {
    let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(pkcs8)
        .map_err(|e| format!("not an Ed25519 private key in PKCS#8: {e}"))?;
    let digest = Sha256::digest(bytes);
    let public: [u8; 32] = pair
        .public_key()
        .as_ref()
        .try_into()
        .map_err(|_| "an Ed25519 public key has 32 bytes".to_string())?;
    Ok(SignatureFile {
        algorithm: "ed25519".into(),
        key: PublicKey(public).to_string(),
        sha256: hex::encode(digest),
        signature: STANDARD.encode(pair.sign(&message(&digest)).as_ref()),
    })
}

/// Checks that `sig` is a valid signature of `bytes` by one of `trusted`;
/// returns the signer. `path` and `sig_path` only name the files in errors.
pub fn verify(
    path: &Path,
    sig_path: &Path,
    sig: &SignatureFile,
    bytes: &[u8],
    trusted: &[PublicKey],
) -> Result<PublicKey, SignatureError> {
    let malformed = |message: String| SignatureError::Malformed {
        sig: sig_path.to_path_buf(),
        message,
    };
    if sig.algorithm != "ed25519" {
        return Err(malformed(format!(
            "algorithm {:?}, not \"ed25519\"",
            sig.algorithm
        )));
    }
    let key: PublicKey = sig.key.parse().map_err(malformed)?;
    if sig.sha256.len() != 64 || !sig.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(malformed("sha256 is not 64 hex digits".into()));
    }
    let signature = STANDARD
        .decode(&sig.signature)
        .map_err(|e| malformed(format!("signature: {e}")))?;
    if !trusted.contains(&key) {
        return Err(SignatureError::Untrusted {
            sig: sig_path.to_path_buf(),
            key,
        });
    }
    let digest = Sha256::digest(bytes);
    let actual = hex::encode(digest);
    if !actual.eq_ignore_ascii_case(&sig.sha256) {
        return Err(SignatureError::Changed {
            path: path.to_path_buf(),
            sig: sig_path.to_path_buf(),
            actual,
            signed: sig.sha256.clone(),
        });
    }
    UnparsedPublicKey::new(&ED25519, key.0)
        .verify(&message(&digest), &signature)
        .map_err(|_| SignatureError::Invalid {
            sig: sig_path.to_path_buf(),
            key,
        })?;
    Ok(key)
}

/// Reads a signature file, at most [`MAX_SIGNATURE_FILE`] bytes; `None`
/// when there is none.
pub fn read_signature(sig_path: &Path) -> Result<Option<SignatureFile>, SignatureError> {
    let unreadable = |message: String| SignatureError::Unreadable {
        sig: sig_path.to_path_buf(),
        message,
    };
    let malformed = |message: String| SignatureError::Malformed {
        sig: sig_path.to_path_buf(),
        message,
    };
    match std::fs::metadata(sig_path) {
        Ok(m) if !m.is_file() => return Err(malformed("not a regular file".into())),
        Ok(m) if m.len() > MAX_SIGNATURE_FILE => {
            return Err(malformed(format!("larger than {MAX_SIGNATURE_FILE} bytes")));
        }
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(unreadable(e.to_string())),
    }
    let file = std::fs::File::open(sig_path).map_err(|e| unreadable(e.to_string()))?;
    let mut bytes = Vec::new();
    file.take(MAX_SIGNATURE_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| unreadable(e.to_string()))?;
    let text = String::from_utf8(bytes).map_err(|_| malformed("not UTF-8 text".into()))?;
    if text.len() as u64 > MAX_SIGNATURE_FILE {
        return Err(SignatureError::Malformed {
            sig: sig_path.to_path_buf(),
            message: format!("larger than {MAX_SIGNATURE_FILE} bytes"),
        });
    }
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| SignatureError::Malformed {
            sig: sig_path.to_path_buf(),
            message: e.to_string(),
        })
}

/// A manifest's signing policy: with no trusted keys, signatures are not
/// read; with some, a component that has a signature file loads only if
/// it verifies, and with `require_signature` one without is refused too.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    trusted: Vec<PublicKey>,
    required: bool,
}

impl Policy {
    /// The manifest's `[gateway] trusted_keys` and `require_signature`.
    pub fn of(manifest: &Manifest) -> Self {
        Self {
            trusted: manifest.trusted_keys(),
            required: manifest.requires_signature(),
        }
    }

    /// Checks the component at `path`, whose contents are `bytes`; returns
    /// the signer, if it was signed.
    pub fn check(&self, path: &Path, bytes: &[u8]) -> Result<Option<PublicKey>, SignatureError> {
        if self.trusted.is_empty() && !self.required {
            return Ok(None);
        }
        let sig_path = signature_path(path);
        match read_signature(&sig_path)? {
            Some(sig) => verify(path, &sig_path, &sig, bytes, &self.trusted).map(Some),
            None if self.required => Err(SignatureError::Missing {
                path: path.to_path_buf(),
                sig: sig_path,
            }),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::rand::SystemRandom;

    fn keypair() -> (Vec<u8>, PublicKey) {
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).unwrap();
        let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
        let key = PublicKey(pair.public_key().as_ref().try_into().unwrap());
        (pkcs8.as_ref().to_vec(), key)
    }

    #[test]
    fn a_signature_verifies_for_its_file_and_signer_only() {
        let (pkcs8, key) = keypair();
        let (_, other) = keypair();
        let p = Path::new("c.wasm");
        let s = Path::new("c.wasm.sig");
        let sig = sign(&pkcs8, b"component").unwrap();
        assert_eq!(
            verify(p, s, &sig, b"component", &[other, key]).unwrap(),
            key
        );
        assert!(matches!(
            verify(p, s, &sig, b"component", &[other]),
            Err(SignatureError::Untrusted { .. })
        ));
        assert!(matches!(
            verify(p, s, &sig, b"componenT", &[key]),
            Err(SignatureError::Changed { .. })
        ));
        // A digest rewritten to match a changed file: the signature fails.
        let forged = SignatureFile {
            sha256: hex::encode(Sha256::digest(b"componenT")),
            ..sig.clone()
        };
        assert!(matches!(
            verify(p, s, &forged, b"componenT", &[key]),
            Err(SignatureError::Invalid { .. })
        ));
        // The same key's signature of other bytes does not transfer.
        let wrong = SignatureFile {
            signature: sign(&pkcs8, b"other").unwrap().signature,
            ..sig
        };
        assert!(matches!(
            verify(p, s, &wrong, b"component", &[key]),
            Err(SignatureError::Invalid { .. })
        ));
    }
}
