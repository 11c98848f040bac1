//! Serving `https://` and `wss://` directly, without a reverse proxy.
//!
//! Three ways to get a certificate, chosen in the `[tls]` section of [`crate::Config`]
//! (or the binary's `--tls-*` and `--acme-*` flags), at most one at a time:
//!
//! - **Files** (`cert`, `key`): PEM files written by someone else (certbot, an internal CA).
//! - **Self-signed** (`self_signed`): for a LAN. A certificate for every address of this
//!   machine is generated once into `dir` and reused, so its fingerprint stays the same
//!   across restarts; it is regenerated when the machine's addresses are no longer covered.
//! - **ACME** (`acme_domains`): a certificate from Let's Encrypt or another ACME CA,
//!   renewed automatically; see [`acme`](self::acme).
//!
//! For files and self-signed certificates, one [`CertStore`] holds the current certificate
//! and answers every handshake with it. A reload task re-reads the files when their
//! modification time changes (checked every `reload_interval`) or when [`TlsReload`] is
//! triggered (the binary does that on SIGHUP). A reload only swaps what *new* handshakes
//! get: established TLS sessions, and the WebSockets inside them, are untouched. A reload
//! that fails keeps the old certificate, logs why and counts
//! `treecast_tls_reloads_total{outcome="failed"}`.
//!
//! Handshakes run in their own tasks ([`listener`](self::listener)), so a slow or silent
//! client never holds up the others; axum then serves the decrypted streams exactly as it
//! serves plain TCP.

pub(crate) mod acme;
pub(crate) mod listener;
pub(crate) mod self_signed;

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, SystemTime};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use serde::Deserialize;
use tokio::sync::Notify;

use crate::config::ConfigError;
use crate::telemetry;

/// The `[tls]` section of the configuration. Empty (the default): plain HTTP.
///
/// ```toml
/// [tls]
/// cert = "/etc/treecast/fullchain.pem"
/// key = "/etc/treecast/privkey.pem"
/// reload_interval = 2000   # milliseconds between checks of the files' modification time
/// ```
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain, leaf first. Needs `key`.
    pub cert: Option<PathBuf>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) of `cert`'s leaf.
    pub key: Option<PathBuf>,
    /// Generate (once) and serve a self-signed certificate for this machine's addresses.
    pub self_signed: bool,
    /// Where the self-signed certificate and its key are kept between runs.
    pub dir: PathBuf,
    /// How often the certificate files' modification times are checked (milliseconds).
    #[serde(with = "crate::config::millis")]
    pub reload_interval: Duration,
    /// Domains to get a certificate for from an ACME CA (Let's Encrypt by default).
    pub acme_domains: Vec<String>,
    /// Where the ACME account key and certificates are cached; required with ACME, since
    /// Let's Encrypt limits how often the same certificate may be issued.
    pub acme_cache: Option<PathBuf>,
    /// Contact addresses for the ACME account, e.g. `mailto:ops@example.org`.
    pub acme_contact: Vec<String>,
    /// The ACME directory URL.
    pub acme_directory: String,
    /// PEM file of the CA behind the ACME directory's own HTTPS certificate, trusted
    /// instead of the public roots: for a private ACME server (step-ca, pebble).
    pub acme_directory_ca: Option<PathBuf>,
}

/// Let's Encrypt's production ACME directory, the default.
pub const LETS_ENCRYPT_PRODUCTION: &str = "https://acme-v02.api.letsencrypt.org/directory";
/// Let's Encrypt's staging directory: untrusted certificates, generous rate limits.
pub const LETS_ENCRYPT_STAGING: &str = "https://acme-staging-v02.api.letsencrypt.org/directory";

impl Default for TlsConfig {
    fn default() -> Self {
        Self {
            cert: None,
            key: None,
            self_signed: false,
            dir: PathBuf::from("treecast-tls"),
            reload_interval: Duration::from_secs(2),
            acme_domains: Vec::new(),
            acme_cache: None,
            acme_contact: Vec::new(),
            acme_directory: LETS_ENCRYPT_PRODUCTION.to_owned(),
            acme_directory_ca: None,
        }
    }
}

/// Where the certificate comes from, once the configuration is checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum TlsMode {
    /// PEM files.
    Files(CertFiles),
    /// A self-signed certificate kept in this directory.
    SelfSigned(PathBuf),
    /// An ACME CA.
    Acme,
}

/// A certificate chain file and its key file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CertFiles {
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
}

impl TlsConfig {
    /// Plain HTTP (`None`) or where the certificate comes from; refuses conflicting settings.
    pub(crate) fn mode(&self) -> Result<Option<TlsMode>, ConfigError> {
        let files = self.cert.is_some() || self.key.is_some();
        let acme = !self.acme_domains.is_empty();
        let chosen = [files, self.self_signed, acme]
            .iter()
            .filter(|on| **on)
            .count();
        if chosen > 1 {
            return Err(ConfigError::Invalid(
                "choose one source of TLS certificates: tls.cert and tls.key (--tls-cert, \
                 --tls-key), tls.self_signed (--tls-self-signed) or tls.acme_domains \
                 (--acme-domain), not several"
                    .to_owned(),
            ));
        }
        if self.reload_interval.is_zero() {
            return Err(ConfigError::Invalid(
                "tls.reload_interval must be above zero".to_owned(),
            ));
        }
        if !acme
            && (self.acme_cache.is_some()
                || !self.acme_contact.is_empty()
                || self.acme_directory_ca.is_some())
        {
            return Err(ConfigError::Invalid(
                "tls.acme_cache, tls.acme_contact and tls.acme_directory_ca need \
                 tls.acme_domains (--acme-domain)"
                    .to_owned(),
            ));
        }
        if files {
            return match (&self.cert, &self.key) {
                (Some(cert), Some(key)) => Ok(Some(TlsMode::Files(CertFiles {
                    cert: cert.clone(),
                    key: key.clone(),
                }))),
                _ => Err(ConfigError::Invalid(
                    "tls.cert (--tls-cert) and tls.key (--tls-key) go together: give both"
                        .to_owned(),
                )),
            };
        }
        if self.self_signed {
            return Ok(Some(TlsMode::SelfSigned(self.dir.clone())));
        }
        if acme {
            if self.acme_cache.is_none() {
                return Err(ConfigError::Invalid(
                    "ACME needs a cache directory (tls.acme_cache, --acme-cache): without it \
                     every restart orders a new certificate and soon hits the CA's rate limits"
                        .to_owned(),
                ));
            }
            if let Some(bad) = self.acme_domains.iter().find(|d| !is_domain_name(d)) {
                return Err(ConfigError::Invalid(format!(
                    "tls.acme_domains: {bad:?} is not a DNS name"
                )));
            }
            return Ok(Some(TlsMode::Acme));
        }
        Ok(None)
    }
}

/// Loose check that ACME can order a certificate for `name` (no IPs, no wildcards).
fn is_domain_name(name: &str) -> bool {
    name.contains('.')
        && name.parse::<std::net::IpAddr>().is_err()
        && name
            .split('.')
            .all(|l| !l.is_empty() && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'))
}

/// Why TLS could not be set up or a certificate could not be loaded. The messages name the
/// file; they never include key material.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O failure.
        source: std::io::Error,
    },
    /// The certificate file holds no PEM certificate, or a broken one.
    #[error("{path} holds no usable PEM certificate ({reason})")]
    Certificate {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
    /// The key file holds no PEM private key, or one rustls cannot use.
    #[error("{path} holds no usable PEM private key ({reason})")]
    Key {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
    /// The key is not the certificate's.
    #[error("the private key {key} does not belong to the certificate {cert}")]
    Mismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
    },
    /// A file could not be written (self-signed certificate, ACME cache).
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file or directory.
        path: PathBuf,
        /// The I/O failure.
        source: std::io::Error,
    },
    /// The self-signed certificate could not be generated.
    #[error("cannot generate a self-signed certificate: {0}")]
    Generate(#[from] rcgen::Error),
    /// rustls refused the server configuration.
    #[error("cannot set up TLS: {0}")]
    Rustls(#[from] rustls::Error),
    /// ACME could not be set up.
    #[error("ACME: {0}")]
    Acme(String),
}

/// Asks a running server to re-read its certificate files now (the binary triggers it on
/// SIGHUP). Clones trigger the same server.
#[derive(Debug, Clone, Default)]
pub struct TlsReload(Arc<Notify>);

impl TlsReload {
    /// A trigger for one server; pass it to [`crate::serve_with`] in [`crate::Extras`].
    pub fn new() -> Self {
        Self::default()
    }

    /// Re-reads the certificate and key. A trigger while no server listens is kept for
    /// the next one.
    pub fn trigger(&self) {
        self.0.notify_one();
    }

    async fn triggered(&self) {
        self.0.notified().await;
    }
}

/// The ring crypto provider, the only one this crate builds with.
pub(crate) fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads a certificate chain and its key and checks that they belong together.
pub(crate) fn load(files: &CertFiles) -> Result<Arc<CertifiedKey>, TlsError> {
    let read = |path: &Path| {
        std::fs::read(path).map_err(|source| TlsError::Read {
            path: path.to_owned(),
            source,
        })
    };
    let cert_pem = read(&files.cert)?;
    let key_pem = read(&files.key)?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Certificate {
            path: files.cert.clone(),
            reason: e.to_string(),
        })?;
    if chain.is_empty() {
        return Err(TlsError::Certificate {
            path: files.cert.clone(),
            reason: "no BEGIN CERTIFICATE block".to_owned(),
        });
    }
    // The key's PEM error never quotes the key itself, so it is safe to log.
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| TlsError::Key {
        path: files.key.clone(),
        reason: match e {
            pem::Error::NoItemsFound => "no BEGIN PRIVATE KEY block".to_owned(),
            e => e.to_string(),
        },
    })?;
    match CertifiedKey::from_der(chain, key, &provider()) {
        Ok(certified) => Ok(Arc::new(certified)),
        Err(rustls::Error::InconsistentKeys(_)) => Err(TlsError::Mismatch {
            cert: files.cert.clone(),
            key: files.key.clone(),
        }),
        // Anything else comes from parsing the key (unsupported algorithm, broken DER).
        Err(e) => Err(TlsError::Key {
            path: files.key.clone(),
            reason: e.to_string(),
        }),
    }
}

/// The SHA-256 fingerprint of a DER certificate as browsers show it: `AB:CD:…`.
pub fn fingerprint(der: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, der);
    let mut out = String::with_capacity(95);
    for (i, byte) in digest.as_ref().iter().enumerate() {
        if i > 0 {
            out.push(':');
        }
        let _ = write!(out, "{byte:02X}");
    }
    out
}

/// The certificate every new handshake gets; swapped in place on reload.
#[derive(Debug)]
pub(crate) struct CertStore {
    current: RwLock<Arc<CertifiedKey>>,
}

impl CertStore {
    pub(crate) fn new(first: Arc<CertifiedKey>) -> Self {
        Self {
            current: RwLock::new(first),
        }
    }

    fn replace(&self, next: Arc<CertifiedKey>) {
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = next;
    }

    fn current(&self) -> Arc<CertifiedKey> {
        Arc::clone(&self.current.read().unwrap_or_else(PoisonError::into_inner))
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

/// The fingerprint of a loaded certificate's leaf.
pub(crate) fn leaf_fingerprint(key: &CertifiedKey) -> String {
    key.cert
        .first()
        .map_or_else(String::new, |c| fingerprint(c))
}

/// A rustls server configuration answering with `resolver`'s certificates, HTTP/1.1 only
/// (the server speaks nothing else).
pub(crate) fn server_config(
    resolver: Arc<dyn ResolvesServerCert>,
) -> Result<rustls::ServerConfig, TlsError> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// TLS for one running server: the acceptor for new connections, and the task that keeps
/// the certificate current (aborted when the server stops).
pub(crate) struct Serving {
    /// Handshakes with the current certificate.
    pub handshakes: listener::Handshakes,
    /// Reloads or renews the certificate.
    pub upkeep: tokio::task::JoinHandle<()>,
}

/// Loads or makes the certificate, logs what clients need to know about it and starts
/// keeping it current. `local` is the address the server listens on.
pub(crate) fn start(
    mode: TlsMode,
    config: &TlsConfig,
    local: Option<SocketAddr>,
    reload: TlsReload,
) -> Result<Serving, TlsError> {
    // LAN links are logged after the fingerprint, so people read them in that order.
    let mut announce = None;
    let files = match mode {
        TlsMode::Files(files) => files,
        TlsMode::SelfSigned(dir) => {
            let lan = self_signed::lan_addresses();
            let made = self_signed::ensure(&dir, &self_signed::names_for(&lan))?;
            let verb = if made.generated {
                "generated"
            } else {
                "reusing"
            };
            tracing::info!(
                "TLS: {verb} the self-signed certificate {} (key {})",
                made.files.cert.display(),
                made.files.key.display()
            );
            announce = Some(lan);
            made.files
        }
        TlsMode::Acme => {
            let (handshakes, upkeep) = acme::start(config)?;
            return Ok(Serving { handshakes, upkeep });
        }
    };
    let first = load(&files)?;
    tracing::info!(
        "TLS certificate {}: SHA-256 fingerprint {}",
        files.cert.display(),
        leaf_fingerprint(&first)
    );
    if let Some(lan) = announce {
        announce_lan_links(local, &lan);
    }
    let store = Arc::new(CertStore::new(first));
    let handshakes = listener::Handshakes::new(Arc::new(server_config(store.clone())?));
    let upkeep = tokio::spawn(watch_files(files, store, config.reload_interval, reload));
    Ok(Serving { handshakes, upkeep })
}

/// Logs the links people on the LAN can open, or warns that nobody else can connect.
fn announce_lan_links(local: Option<SocketAddr>, lan: &[IpAddr]) {
    let Some(local) = local else { return };
    let port = local.port();
    let ips: Vec<IpAddr> = if local.ip().is_unspecified() {
        // An IPv4 wildcard accepts IPv4 only; an IPv6 one usually both.
        lan.iter()
            .copied()
            .filter(|ip| local.is_ipv6() || ip.is_ipv4())
            .collect()
    } else if local.ip().is_loopback() {
        tracing::warn!(
            "TLS with a self-signed certificate on {local}: only this machine can connect. \
             To let others on your network in, listen on every interface, e.g. --bind 0.0.0.0:{port}"
        );
        return;
    } else {
        vec![local.ip()]
    };
    if ips.is_empty() {
        tracing::warn!("no network address found to announce; is this machine on a network?");
    }
    for ip in ips {
        tracing::info!(
            "on your network, open {} (the browser warns about the certificate once: check that it shows the fingerprint above, then accept)",
            https_link(SocketAddr::new(ip, port))
        );
    }
}

/// `https://ip:port/`, with IPv6 addresses in brackets.
fn https_link(addr: SocketAddr) -> String {
    format!("https://{addr}/")
}

/// What identifies one version of the files: modification time and length, of both.
type Stamp = [Option<(SystemTime, u64)>; 2];

fn stamp(files: &CertFiles) -> Stamp {
    let of = |p: &Path| {
        std::fs::metadata(p)
            .ok()
            .and_then(|m| Some((m.modified().ok()?, m.len())))
    };
    [of(&files.cert), of(&files.key)]
}

/// Re-reads `files` into `store` when they change or `reload` is triggered; runs until
/// aborted.
pub(crate) async fn watch_files(
    files: CertFiles,
    store: Arc<CertStore>,
    every: Duration,
    reload: TlsReload,
) {
    let mut loaded = stamp(&files);
    let mut seen = loaded;
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let forced = tokio::select! {
            _ = ticks.tick() => false,
            () = reload.triggered() => true,
        };
        let now = stamp(&files);
        // Certificate and key are rarely replaced in one atomic step: wait until a change
        // has held still for one whole interval, so a half-written pair is not reported
        // as a failed reload.
        let settled = now == seen && now != loaded;
        seen = now;
        if !(forced || settled) {
            continue;
        }
        loaded = now;
        let why = if forced {
            "on request"
        } else {
            "files changed"
        };
        match load(&files) {
            Ok(next) => {
                tracing::info!(
                    "TLS certificate reloaded ({why}) from {}: SHA-256 {}",
                    files.cert.display(),
                    leaf_fingerprint(&next)
                );
                store.replace(next);
                telemetry::tls_reload(true);
            }
            Err(e) => {
                tracing::error!("TLS certificate reload failed ({why}), keeping the old one: {e}");
                telemetry::tls_reload(false);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(toml: &str) -> Result<Option<TlsMode>, ConfigError> {
        let c: TlsConfig = toml::from_str(toml).unwrap();
        c.mode()
    }

    #[test]
    fn one_source_of_certificates_at_a_time() {
        assert_eq!(config("").unwrap(), None);
        assert!(matches!(
            config("cert = \"c.pem\"\nkey = \"k.pem\"").unwrap(),
            Some(TlsMode::Files(_))
        ));
        assert_eq!(
            config("self_signed = true").unwrap(),
            Some(TlsMode::SelfSigned(PathBuf::from("treecast-tls")))
        );
        for bad in [
            "cert = \"c.pem\"",
            "cert = \"c.pem\"\nkey = \"k.pem\"\nself_signed = true",
            "self_signed = true\nacme_domains = [\"a.example.org\"]\nacme_cache = \"x\"",
            "acme_domains = [\"a.example.org\"]",
            "acme_domains = [\"10.0.0.1\"]\nacme_cache = \"x\"",
            "acme_contact = [\"mailto:a@example.org\"]",
            "reload_interval = 0",
        ] {
            let e = config(bad).unwrap_err().to_string();
            assert!(e.contains("tls."), "{bad}: {e}");
        }
    }

    #[test]
    fn fingerprints_read_like_browsers_show_them() {
        let f = fingerprint(b"");
        assert_eq!(f.len(), 32 * 3 - 1);
        assert!(f.starts_with("E3:B0:C4:42:"), "{f}");
    }
}
