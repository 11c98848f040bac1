//! Certificates from an ACME CA (Let's Encrypt by default), through `rustls-acme`.
//!
//! `rustls-acme` orders the certificate, answers the CA's TLS-ALPN-01 challenge, caches
//! the account key and the certificate in `acme_cache`, and renews before expiry. Its state
//! is a stream that must be polled to make progress: one task drives it and logs what it
//! reports. The challenge arrives as an ordinary TLS connection asking for the
//! `acme-tls/1` protocol on port 443, so the listener hands those handshakes to
//! `rustls-acme`'s challenge configuration (see [`super::listener::Handshakes`]).

use std::path::Path;
use std::sync::Arc;

use futures_util::StreamExt;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use rustls_acme::caches::DirCache;
use rustls_acme::{AcmeConfig, EventOk};

use super::listener::Handshakes;
use super::{TlsConfig, TlsError, provider};
use crate::telemetry;

/// Starts ordering (or loading from the cache) the certificate; returns the handshake
/// configurations and the task that keeps the certificate current.
pub(crate) fn start(
    config: &TlsConfig,
) -> Result<(Handshakes, tokio::task::JoinHandle<()>), TlsError> {
    let cache = config
        .acme_cache
        .clone()
        .ok_or_else(|| TlsError::Acme("no cache directory".to_owned()))?;
    std::fs::create_dir_all(&cache).map_err(|source| TlsError::Write {
        path: cache.clone(),
        source,
    })?;
    let mut acme = AcmeConfig::new_with_provider(&config.acme_domains, provider())
        .contact(&config.acme_contact)
        .directory(&config.acme_directory);
    if let Some(ca) = &config.acme_directory_ca {
        acme = acme.client_tls_config(Arc::new(client_trusting(ca)?));
    }
    let state = acme.cache(DirCache::new(cache.clone())).state();
    let handshakes = Handshakes::with_acme_challenge(
        Arc::new(super::server_config(state.resolver())?),
        state.challenge_rustls_config_with_provider(provider()),
    );
    tracing::info!(
        "ACME: certificate for {} from {} (cache {}); TLS handshakes fail until it is issued",
        config.acme_domains.join(", "),
        config.acme_directory,
        cache.display()
    );
    let upkeep = tokio::spawn(async move {
        let mut state = std::pin::pin!(state);
        while let Some(event) = state.next().await {
            match event {
                Ok(EventOk::DeployedNewCert) => {
                    tracing::info!("ACME: new certificate issued and in use");
                    telemetry::tls_reload(true);
                }
                Ok(EventOk::DeployedCachedCert) => {
                    tracing::info!("ACME: certificate loaded from the cache and in use");
                    telemetry::tls_reload(true);
                }
                Ok(other) => tracing::debug!("ACME: {other:?}"),
                Err(e) => {
                    // rustls-acme retries on its own, with a growing delay.
                    tracing::error!("ACME: {e}");
                    telemetry::tls_reload(false);
                }
            }
        }
    });
    Ok((handshakes, upkeep))
}

/// A client configuration for the ACME directory that trusts only the CA in `file` (a
/// private ACME server's).
fn client_trusting(file: &Path) -> Result<rustls::ClientConfig, TlsError> {
    let bad = |reason: String| TlsError::Certificate {
        path: file.to_owned(),
        reason,
    };
    let pem = std::fs::read(file).map_err(|source| TlsError::Read {
        path: file.to_owned(),
        source,
    })?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        roots
            .add(cert.map_err(|e| bad(e.to_string()))?)
            .map_err(|e| bad(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(bad("no BEGIN CERTIFICATE block".to_owned()));
    }
    Ok(rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth())
}
