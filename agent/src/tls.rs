//! TLS set-up shared by every TLS connection of the agent.

/// Installs rustls' `ring` crypto provider as the process default. rustls
/// panics at the first handshake when no provider, or more than one, is
/// available; we link exactly one and install it before any TLS use.
/// Calling it again is harmless.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
