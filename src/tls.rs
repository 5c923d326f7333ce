//! The process's TLS crypto provider: ring, which fred and lapin already link. reqwest is built
//! without a provider of its own (its default would compile aws-lc-rs, C and cmake, for the
//! same job), so every HTTP client of the process takes this one: call [`install`] before
//! building one (it is idempotent).

/// Makes ring the process's default rustls provider, unless one is installed already.
pub fn install() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // Err only when another thread installed one first: it is installed either way.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}

/// A reqwest client builder, with the provider installed.
pub fn http_client() -> reqwest::ClientBuilder {
    install();
    reqwest::Client::builder()
}
