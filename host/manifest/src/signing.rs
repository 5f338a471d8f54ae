//! Public keys of component signers: `ed25519:` and the key's 32 bytes in
//! standard base64 (`[gateway] trusted_keys`, `wasmgate keygen`'s `.pub`).

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use std::fmt;
use std::str::FromStr;

/// An Ed25519 public key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PublicKey(pub [u8; 32]);

/// The text form's prefix.
const PREFIX: &str = "ed25519:";

impl FromStr for PublicKey {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let what = "a public key is `ed25519:` and 32 bytes in base64 (the line in the `.pub` file `wasmgate keygen` writes)";
        let Some(b64) = s.trim().strip_prefix(PREFIX) else {
            return Err(format!("{s:?} is not a public key: {what}"));
        };
        let bytes = STANDARD
            .decode(b64)
            .map_err(|e| format!("{s:?} is not a public key ({e}): {what}"))?;
        let key: [u8; 32] = bytes.try_into().map_err(|b: Vec<u8>| {
            format!(
                "{s:?} is not a public key ({} bytes, not 32): {what}",
                b.len()
            )
        })?;
        Ok(Self(key))
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PREFIX}{}", STANDARD.encode(self.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_reads_back_as_written_and_bad_ones_are_named() {
        let key = PublicKey([7; 32]);
        let text = key.to_string();
        assert_eq!(text.parse::<PublicKey>().unwrap(), key);
        for bad in ["", "ed25519:", "rsa:AAAA", "ed25519:!!!", "ed25519:AAAA"] {
            let err = bad.parse::<PublicKey>().unwrap_err();
            assert!(err.contains("is not a public key"), "{bad}: {err}");
        }
    }
}
