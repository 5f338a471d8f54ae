//! `wasmgate keygen`, `sign` and `verify`: Ed25519 signatures of
//! components (the format and the check at load are
//! `wasmgate_runtime::signature`).

use crate::cli::Fatal;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use ring::rand::SystemRandom;
use ring::signature::{Ed25519KeyPair, KeyPair};
use rustls::pki_types::PrivatePkcs8KeyDer;
use rustls::pki_types::pem::PemObject;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use wasmgate_manifest::signing::PublicKey;
use wasmgate_runtime::signature::{self, SignatureError};

/// The largest key file read.
const MAX_KEY_FILE: u64 = 64 * 1024;

/// `PATH.pub`.
fn pub_path(key: &Path) -> PathBuf {
    let mut name = key.as_os_str().to_os_string();
    name.push(".pub");
    PathBuf::from(name)
}

/// Writes a new private key to `out` (PEM PKCS#8, mode 0600; an existing
/// file is never replaced) and its public key to `out.pub`.
pub fn keygen(out: &Path) -> Result<ExitCode, Fatal> {
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
        .map_err(|_| Fatal("cannot generate a key: no system randomness".into()))?;
    let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref())
        .map_err(|e| Fatal(format!("cannot read the generated key: {e}")))?;
    let public = PublicKey(
        pair.public_key()
            .as_ref()
            .try_into()
            .map_err(|_| Fatal("an Ed25519 public key has 32 bytes".into()))?,
    );
    let mut pem = String::from("-----BEGIN PRIVATE KEY-----\n");
    let b64 = STANDARD.encode(pkcs8_v1(pkcs8.as_ref())?);
    for line in b64.as_bytes().chunks(64) {
        pem.push_str(std::str::from_utf8(line).unwrap_or_default());
        pem.push('\n');
    }
    pem.push_str("-----END PRIVATE KEY-----\n");
    let public_path = pub_path(out);
    for path in [out, public_path.as_path()] {
        if path.exists() {
            return Err(Fatal(format!(
                "{} exists: keygen never replaces a key (choose another --out)",
                path.display()
            )));
        }
    }
    {
        use std::os::unix::fs::OpenOptionsExt;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(out)
            .map_err(|e| Fatal(format!("cannot create {}: {e}", out.display())))?;
        file.write_all(pem.as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(|e| Fatal(format!("cannot write {}: {e}", out.display())))?;
    }
    std::fs::write(&public_path, format!("{public}\n"))
        .map_err(|e| Fatal(format!("cannot write {}: {e}", public_path.display())))?;
    println!(
        "wrote {} (the private key: keep it where components are signed, not on gateways) and {}.\nTrust it in a gateway's wasmgate.toml:\n\n[gateway]\ntrusted_keys = [\"{public}\"]\nrequire_signature = true",
        out.display(),
        public_path.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// RFC 8410's PKCS#8 v1 form of an Ed25519 key (what OpenSSL reads and
/// writes), from ring's v2 document (which adds the public key).
fn pkcs8_v1(v2: &[u8]) -> Result<Vec<u8>, Fatal> {
    const V2_PREFIX: [u8; 16] = [
        0x30, 0x51, 0x02, 0x01, 0x01, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04,
        0x20,
    ];
    const V1_PREFIX: [u8; 16] = [
        0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04,
        0x20,
    ];
    match v2.get(..48) {
        Some(head) if head[..16] == V2_PREFIX => Ok([&V1_PREFIX[..], &head[16..48]].concat()),
        _ => Err(Fatal("unexpected form of a generated Ed25519 key".into())),
    }
}

/// Reads at most `max` bytes of `path`, or fails naming it.
fn read_bounded(path: &Path, max: u64, what: &str) -> Result<Vec<u8>, Fatal> {
    use std::io::Read;
    if std::fs::metadata(path).is_ok_and(|m| !m.is_file()) {
        return Err(Fatal(format!(
            "{} is not a regular file: not {what}",
            path.display()
        )));
    }
    let file = std::fs::File::open(path)
        .map_err(|e| Fatal(format!("cannot read {what} {}: {e}", path.display())))?;
    let mut bytes = Vec::new();
    file.take(max + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| Fatal(format!("cannot read {what} {}: {e}", path.display())))?;
    if bytes.len() as u64 > max {
        return Err(Fatal(format!(
            "{} is larger than {max} bytes: not {what}",
            path.display()
        )));
    }
    Ok(bytes)
}

/// Signs `file` with the private key in `key`, writing `file.sig`.
pub fn sign(file: &Path, key: &Path) -> Result<ExitCode, Fatal> {
    let pem = read_bounded(key, MAX_KEY_FILE, "a private key")?;
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(m) = std::fs::metadata(key)
            && m.permissions().mode() & 0o077 != 0
        {
            eprintln!(
                "warning: {} can be read by others (mode {:o}): `chmod 600 {}`",
                key.display(),
                m.permissions().mode() & 0o777,
                key.display()
            );
        }
    }
    let der = PrivatePkcs8KeyDer::from_pem_slice(&pem).map_err(|e| {
        Fatal(format!(
            "{} is not a PEM private key (PKCS#8, as `wasmgate keygen` writes): {e}",
            key.display()
        ))
    })?;
    let bytes = wasmgate_runtime::component::read(file).map_err(|e| Fatal(e.to_string()))?;
    let sig = signature::sign(der.secret_pkcs8_der(), &bytes)
        .map_err(|e| Fatal(format!("{}: {e}", key.display())))?;
    let sig_path = signature::signature_path(file);
    let text = serde_json::to_string_pretty(&sig).map_err(|e| Fatal(e.to_string()))? + "\n";
    // Written whole to a new file (never through a link that is there), then
    // renamed: a reader never sees half a signature.
    let mut tmp_name = sig_path.as_os_str().to_os_string();
    tmp_name.push(format!(".{}.tmp", std::process::id()));
    let tmp = PathBuf::from(tmp_name);
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .and_then(|mut f| f.write_all(text.as_bytes()).and_then(|()| f.sync_all()))
        .and_then(|()| std::fs::rename(&tmp, &sig_path));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(Fatal(format!("cannot write {}: {e}", sig_path.display())));
    }
    println!(
        "signed {} (sha256 {}) with {}: {}",
        file.display(),
        sig.sha256,
        sig.key,
        sig_path.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// A trusted key given on the command line: the key itself or a `.pub`
/// file holding it.
fn trusted_key(arg: &str) -> Result<PublicKey, Fatal> {
    if arg.starts_with("ed25519:") {
        return arg.parse().map_err(Fatal);
    }
    let path = Path::new(arg);
    let text = read_bounded(path, MAX_KEY_FILE, "a public key")?;
    String::from_utf8_lossy(&text)
        .lines()
        .next()
        .unwrap_or_default()
        .parse()
        .map_err(|e| Fatal(format!("{}: {e}", path.display())))
}

/// Checks `file.sig` against `file` and the trusted `keys`: exit 0 when it
/// verifies, 1 when it does not (or there is none).
pub fn verify(file: &Path, keys: &[String]) -> Result<ExitCode, Fatal> {
    let trusted = keys
        .iter()
        .map(|k| trusted_key(k))
        .collect::<Result<Vec<_>, _>>()?;
    let bytes = wasmgate_runtime::component::read(file).map_err(|e| Fatal(e.to_string()))?;
    let sig_path = signature::signature_path(file);
    let result = match signature::read_signature(&sig_path) {
        Ok(Some(sig)) => signature::verify(file, &sig_path, &sig, &bytes, &trusted),
        Ok(None) => Err(SignatureError::Missing {
            path: file.to_path_buf(),
            sig: sig_path,
        }),
        Err(e) => Err(e),
    };
    match result {
        Ok(signer) => {
            println!("ok: {} is signed by {signer}", file.display());
            Ok(ExitCode::SUCCESS)
        }
        Err(SignatureError::Missing { sig, .. }) => {
            eprintln!(
                "error: {} is not signed: {} does not exist",
                file.display(),
                sig.display()
            );
            Ok(ExitCode::from(1))
        }
        Err(e) => {
            eprintln!("error: {e}");
            Ok(ExitCode::from(1))
        }
    }
}
