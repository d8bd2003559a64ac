//! TLS for the webhook (the API server only calls webhooks over HTTPS), with rustls and ring.
//! The certificate is re-read when its file changes: cert-manager renews the Secret long before
//! it expires, and a webhook still serving the old one would fail every call once it lapses.

use anyhow::Context;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

fn load(cert: &Path, key: &Path) -> anyhow::Result<Arc<CertifiedKey>> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("cannot read the certificate {}", cert.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("{} is not a PEM certificate chain", cert.display()))?;
    if certs.is_empty() {
        anyhow::bail!("{} holds no certificate", cert.display());
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("cannot read a PEM private key from {}", key.display()))?;
    let signer = rustls::crypto::ring::sign::any_supported_type(&key)
        .context("the private key is of a kind rustls cannot sign with")?;
    let ck = CertifiedKey::new(certs, signer);
    ck.keys_match()
        .context("the certificate and key do not form a pair")?;
    Ok(Arc::new(ck))
}

fn modified(p: &Path) -> Option<SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

struct Current {
    key: Arc<CertifiedKey>,
    /// Modification times of the two files when `key` was read.
    stamps: (Option<SystemTime>, Option<SystemTime>),
    checked: Instant,
}

/// Serves the certificate from disk, looking for a newer one at most every `every`.
pub struct ReloadingCert {
    cert: PathBuf,
    key: PathBuf,
    every: Duration,
    current: Mutex<Current>,
}

impl std::fmt::Debug for ReloadingCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReloadingCert")
            .field("cert", &self.cert)
            .field("key", &self.key)
            .finish()
    }
}

impl ReloadingCert {
    pub fn new(cert: &Path, key: &Path, every: Duration) -> anyhow::Result<Self> {
        let stamps = (modified(cert), modified(key));
        let current = Current {
            key: load(cert, key)?,
            stamps,
            checked: Instant::now(),
        };
        Ok(ReloadingCert {
            cert: cert.into(),
            key: key.into(),
            every,
            current: Mutex::new(current),
        })
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let mut cur = self.current.lock().unwrap();
        if cur.checked.elapsed() >= self.every {
            cur.checked = Instant::now();
            let stamps = (modified(&self.cert), modified(&self.key));
            if stamps != cur.stamps {
                // A half-written pair fails to load: keep the old one and try again next time.
                match load(&self.cert, &self.key) {
                    Ok(k) => {
                        tracing::info!(cert = %self.cert.display(), "webhook certificate reloaded");
                        cur.key = k;
                        cur.stamps = stamps;
                    }
                    Err(e) => tracing::warn!("keeping the previous webhook certificate: {e:#}"),
                }
            }
        }
        Some(cur.key.clone())
    }
}

/// A server configuration whose certificate follows the files, checked every `every`.
pub fn server_config_reloading(
    cert: &Path,
    key: &Path,
    every: Duration,
) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let resolver = Arc::new(ReloadingCert::new(cert, key, every)?);
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .context("TLS protocol versions")?
    .with_no_client_auth()
    .with_cert_resolver(resolver);
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// The usual configuration: the files are looked at again every 30 seconds.
pub fn server_config(cert: &Path, key: &Path) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    server_config_reloading(cert, key, Duration::from_secs(30))
}
