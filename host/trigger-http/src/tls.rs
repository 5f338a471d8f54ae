//! TLS for the HTTP listener: rustls with the ring provider, a default
//! certificate plus more chosen by SNI, optional client-certificate
//! verification (mutual TLS), ALPN for HTTP/2 and HTTP/1.1.

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use std::path::PathBuf;
use std::sync::Arc;
use toml::Spanned;
use wasmgate_manifest::{Manifest, ManifestError, TlsConfig};

/// The crypto provider every TLS use in the host shares.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Builds the server configuration from `[http.tls]`, reading every file.
/// Errors name the key and the file.
pub fn server_config(
    manifest: &Manifest,
    tls: &TlsConfig,
) -> Result<Arc<rustls::ServerConfig>, ManifestError> {
    server_config_at(manifest, tls, "http.tls", &[b"h2", b"http/1.1"])
}

/// Builds a server configuration from the TLS table at manifest key `at`
/// (`http.tls`, `admin.tls`), offering the `alpn` protocols.
pub fn server_config_at(
    manifest: &Manifest,
    tls: &TlsConfig,
    at: &str,
    alpn: &[&[u8]],
) -> Result<Arc<rustls::ServerConfig>, ManifestError> {
    let provider = provider();
    let default = certified_key(manifest, &provider, at, &tls.cert, &tls.key)?;
    let mut by_name = Vec::new();
    for (i, files) in tls.sni.iter().enumerate() {
        let key = format!("{at}.sni[{i}]");
        let ck = certified_key(manifest, &provider, &key, &files.cert, &files.key)?;
        by_name.push(ck);
    }
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions");
    let builder = match &tls.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let path = manifest.resolve(ca.get_ref());
            let client_ca = format!("{at}.client_ca");
            let certs = read_certs(manifest, ca, &path, &client_ca)?;
            let mut roots = rustls::RootCertStore::empty();
            for cert in certs {
                roots.add(cert).map_err(|e| {
                    manifest.invalid(
                        ca.span(),
                        &client_ca,
                        format!("{}: not a usable CA certificate: {e}", path.display()),
                    )
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| {
                    manifest.invalid(ca.span(), &client_ca, format!("{}: {e}", path.display()))
                })?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_cert_resolver(Arc::new(SniResolver { default, by_name }));
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// Picks the first SNI certificate valid for the requested name, else the
/// default one.
#[derive(Debug)]
struct SniResolver {
    default: Arc<CertifiedKey>,
    by_name: Vec<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let chosen = hello
            .server_name()
            .and_then(|name| ServerName::try_from(name).ok())
            .and_then(|name| {
                self.by_name.iter().find(|ck| {
                    ck.end_entity_cert().is_ok_and(|der| {
                        webpki::EndEntityCert::try_from(der)
                            .is_ok_and(|ee| ee.verify_is_valid_for_subject_name(&name).is_ok())
                    })
                })
            });
        Some(chosen.unwrap_or(&self.default).clone())
    }
}

fn certified_key(
    manifest: &Manifest,
    provider: &CryptoProvider,
    key_name: &str,
    cert: &Spanned<PathBuf>,
    key: &Spanned<PathBuf>,
) -> Result<Arc<CertifiedKey>, ManifestError> {
    let cert_path = manifest.resolve(cert.get_ref());
    let certs = read_certs(manifest, cert, &cert_path, &format!("{key_name}.cert"))?;
    let key_path = manifest.resolve(key.get_ref());
    let key_err = |message: String| {
        manifest.invalid(
            key.span(),
            &format!("{key_name}.key"),
            format!("{}: {message}", key_path.display()),
        )
    };
    let private = PrivateKeyDer::from_pem_file(&key_path).map_err(|e| {
        key_err(match e {
            rustls::pki_types::pem::Error::Io(io) => format!("cannot read the key: {io}"),
            rustls::pki_types::pem::Error::NoItemsFound => {
                "no PEM private key (PKCS#8, PKCS#1 or SEC1) in the file".into()
            }
            other => format!("not a PEM private key: {other}"),
        })
    })?;
    let signing = provider
        .key_provider
        .load_private_key(private)
        .map_err(|e| key_err(format!("unusable private key: {e}")))?;
    let ck = CertifiedKey::new(certs, signing);
    ck.keys_match().map_err(|_| {
        key_err(format!(
            "the key does not belong to the certificate {}",
            cert_path.display()
        ))
    })?;
    Ok(Arc::new(ck))
}

fn read_certs(
    manifest: &Manifest,
    value: &Spanned<PathBuf>,
    path: &std::path::Path,
    key: &str,
) -> Result<Vec<CertificateDer<'static>>, ManifestError> {
    let err = |message: String| {
        manifest.invalid(value.span(), key, format!("{}: {message}", path.display()))
    };
    let iter = CertificateDer::pem_file_iter(path).map_err(|e| match e {
        rustls::pki_types::pem::Error::Io(io) => err(format!("cannot read: {io}")),
        other => err(format!("not PEM: {other}")),
    })?;
    let certs: Vec<CertificateDer<'static>> = iter
        .collect::<Result<_, _>>()
        .map_err(|e| err(format!("not a PEM certificate: {e}")))?;
    if certs.is_empty() {
        return Err(err("contains no PEM certificate".into()));
    }
    Ok(certs)
}
