//! `[admin]`: the admin listener (metrics, status, the `/v1/` API).

use serde::Deserialize;
use std::net::SocketAddr;
use std::path::PathBuf;
use toml::Spanned;

/// `[admin]`. The local Unix socket (`state_dir/admin.sock`, mode 0600) is
/// always served; a TCP listener only when `listen` is set, and then every
/// request but `/metrics` and `/healthz` must carry the bearer token.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Address of the TCP listener (off when absent).
    pub listen: Option<Spanned<SocketAddr>>,
    /// File holding the bearer token (relative to the manifest).
    pub token_file: Option<Spanned<PathBuf>>,
    /// Environment variable holding the bearer token.
    pub token_env: Option<Spanned<String>>,
    /// TLS for the TCP listener (the same table as `[http.tls]`: `cert`,
    /// `key`, optional `sni` and `client_ca` for mutual TLS).
    pub tls: Option<crate::TlsConfig>,
}

/// Fewest characters a bearer token may have.
pub const MIN_TOKEN_CHARS: usize = 16;

/// Largest token file read, in bytes.
pub const MAX_TOKEN_FILE_BYTES: u64 = 4096;

/// Checks a token's text (already read and trimmed): long enough, and
/// only visible ASCII (it travels in a header).
pub fn validate_token(token: &str) -> Result<(), String> {
    if token.chars().count() < MIN_TOKEN_CHARS {
        return Err(format!(
            "the token has {} characters; at least {MIN_TOKEN_CHARS} are needed (e.g. `openssl rand -hex 32`)",
            token.chars().count()
        ));
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("the token may hold only visible ASCII characters (no spaces)".into());
    }
    Ok(())
}
