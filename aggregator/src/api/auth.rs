//! Bearer-token check for `/api/`. The decision ([`check`]) is a pure
//! function of the headers, tested alone; [`require_token`] is the thin
//! middleware around it.
//!
//! The comparison runs in time that depends on the lengths only, never on
//! where the first differing byte is. The token is never logged; failures
//! log the path and the kind of failure at DEBUG.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tracing::debug;

use super::ApiError;

/// The configured token. `Debug` does not show it.
#[derive(Clone)]
pub(super) struct Token(Arc<str>);

impl Token {
    pub(super) fn new(token: String) -> Self {
        Token(Arc::from(token))
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum AuthFailure {
    /// No `Authorization` header.
    Missing,
    /// A header that is not `Bearer <token>`.
    Malformed,
    /// A bearer token that is not the configured one.
    Invalid,
}

impl AuthFailure {
    fn as_str(self) -> &'static str {
        match self {
            AuthFailure::Missing => "missing",
            AuthFailure::Malformed => "malformed",
            AuthFailure::Invalid => "invalid",
        }
    }

    /// The `WWW-Authenticate` challenge (RFC 6750 section 3: no error code
    /// when the client sent no credentials).
    fn challenge(self) -> &'static str {
        match self {
            AuthFailure::Missing => "Bearer realm=\"outpost\"",
            AuthFailure::Malformed => "Bearer realm=\"outpost\", error=\"invalid_request\"",
            AuthFailure::Invalid => "Bearer realm=\"outpost\", error=\"invalid_token\"",
        }
    }

    fn message(self) -> &'static str {
        match self {
            AuthFailure::Missing => "missing bearer token",
            AuthFailure::Malformed => "malformed Authorization header (expected `Bearer <token>`)",
            AuthFailure::Invalid => "invalid bearer token",
        }
    }
}

/// Whether `path` needs the token: `/api` and everything under `/api/`,
/// routed or not.
pub(super) fn is_protected(path: &str) -> bool {
    path == "/api" || path.starts_with("/api/")
}

/// Checks the `Authorization` header against `expected`. The scheme is
/// case-insensitive (RFC 7235); the token is compared in constant time.
pub(super) fn check(headers: &HeaderMap, expected: &str) -> Result<(), AuthFailure> {
    let value = headers
        .get(header::AUTHORIZATION)
        .ok_or(AuthFailure::Missing)?;
    let value = value.to_str().map_err(|_| AuthFailure::Malformed)?;
    let (scheme, token) = value.split_once(' ').ok_or(AuthFailure::Malformed)?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(AuthFailure::Malformed);
    }
    let token = token.trim_matches(' ');
    if token.is_empty() {
        return Err(AuthFailure::Malformed);
    }
    if constant_time_eq(token.as_bytes(), expected.as_bytes()) {
        Ok(())
    } else {
        Err(AuthFailure::Invalid)
    }
}

/// `a == b` in time that depends on the lengths only. Every byte position
/// up to the longer length is visited and folded into one accumulator
/// (through `black_box`, so the optimiser cannot turn it into an early exit).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff = std::hint::black_box(diff | usize::from(x ^ y));
    }
    diff == 0
}

/// Middleware: lets a request through when its path is not protected or it
/// carries the token; answers 401 with a `WWW-Authenticate` challenge
/// otherwise.
pub(super) async fn require_token(
    State(token): State<Token>,
    req: Request,
    next: Next,
) -> Response {
    if !is_protected(req.uri().path()) {
        return next.run(req).await;
    }
    match check(req.headers(), &token.0) {
        Ok(()) => next.run(req).await,
        Err(failure) => {
            debug!(
                method = %req.method(),
                path = req.uri().path(),
                failure = failure.as_str(),
                "API request refused: bearer token"
            );
            let mut res =
                ApiError::new(StatusCode::UNAUTHORIZED, failure.message()).into_response();
            res.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(failure.challenge()),
            );
            res
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(auth: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(a) = auth {
            h.insert(header::AUTHORIZATION, HeaderValue::from_str(a).unwrap());
        }
        h
    }

    const T: &str = "0123456789abcdef";

    #[test]
    fn accepts_the_right_token_with_any_scheme_case() {
        assert_eq!(check(&headers(Some("Bearer 0123456789abcdef")), T), Ok(()));
        assert_eq!(check(&headers(Some("bearer 0123456789abcdef")), T), Ok(()));
        assert_eq!(
            check(&headers(Some("BEARER  0123456789abcdef ")), T),
            Ok(())
        );
    }

    #[test]
    fn refuses_missing_malformed_and_wrong_tokens() {
        assert_eq!(check(&headers(None), T), Err(AuthFailure::Missing));
        for bad in [
            "Bearer",
            "Bearer ",
            "Basic 0123456789abcdef",
            "0123456789abcdef",
        ] {
            assert_eq!(
                check(&headers(Some(bad)), T),
                Err(AuthFailure::Malformed),
                "{bad}"
            );
        }
        for wrong in [
            "Bearer 0123456789abcdeF",
            "Bearer 0123456789abcde",
            "Bearer 0123456789abcdef0",
            "Bearer x",
        ] {
            assert_eq!(
                check(&headers(Some(wrong)), T),
                Err(AuthFailure::Invalid),
                "{wrong}"
            );
        }
    }

    #[test]
    fn constant_time_eq_is_equality() {
        assert!(constant_time_eq(b"", b""));
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
        assert!(!constant_time_eq(b"ab", b"abc"));
        assert!(!constant_time_eq(b"", b"a"));
        // A prefix padded with the zero the loop substitutes is still unequal.
        assert!(!constant_time_eq(b"ab\0", b"ab"));
    }

    #[test]
    fn protects_api_paths_only() {
        for p in ["/api", "/api/", "/api/v1/devices", "/api/nope"] {
            assert!(is_protected(p), "{p}");
        }
        for p in ["/healthz", "/metrics", "/apix", "/", "/v1/api/"] {
            assert!(!is_protected(p), "{p}");
        }
    }

    #[test]
    fn token_debug_is_redacted() {
        assert_eq!(format!("{:?}", Token::new(T.into())), "Token(<redacted>)");
    }
}
