//! API tokens: made by `gantry token create` (the store keeps only their SHA-256), sent
//! as `Authorization: Bearer` or, for a browser's EventSource that cannot send headers,
//! as the HttpOnly cookie `POST /v1/session` sets. The API asks for a token once any
//! unrevoked one exists; each route needs a scope (`required`), checked here before its
//! handler runs.

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use gantry_core::auth::Scope;
use gantry_core::Millis;
use gantry_store::{Store, TokenRecord};
use rand::RngCore;
use sha2::{Digest, Sha256};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::api::error::ApiError;

/// The cookie `POST /v1/session` sets.
pub const COOKIE: &str = "gantry_token";

/// Whom a request comes from, once its token checked out.
#[derive(Clone, Debug)]
pub struct Principal {
    pub id: String,
    pub name: String,
    pub scope: Scope,
}

/// Whether the API asks for tokens: once any unrevoked token exists. Tokens are made
/// and revoked by `gantry token` straight in the store, so this is read again every
/// `REFRESH`; a revoked token is refused at once, since each request reads its row.
pub struct Auth {
    store: Arc<dyn Store>,
    required: AtomicBool,
}

pub const REFRESH: Duration = Duration::from_secs(1);

impl Auth {
    pub async fn new(store: Arc<dyn Store>) -> Result<Auth, gantry_store::Error> {
        let n = store.active_tokens().await?;
        Ok(Auth {
            store,
            required: AtomicBool::new(n > 0),
        })
    }

    pub fn required(&self) -> bool {
        self.required.load(Ordering::Relaxed)
    }

    /// Re-read whether any token exists, every `REFRESH`, until `stop`.
    pub async fn refresh_loop(&self, stop: tokio_util::sync::CancellationToken) {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(REFRESH) => {}
            }
            self.refresh().await;
        }
    }

    /// Read now whether any token exists.
    pub async fn refresh(&self) {
        match self.store.active_tokens().await {
            Ok(n) => self.required.store(n > 0, Ordering::Relaxed),
            // Unknown is not "none": keep asking as before.
            Err(e) => tracing::debug!(error = %e, "cannot re-read the tokens"),
        }
    }

    /// The principal of `token`, or why it is refused.
    pub async fn check(&self, token: &str) -> Result<Principal, ApiError> {
        let found = self.store.token_by_hash(&hash(token)).await?;
        match found {
            Some(t) if t.revoked_at.is_none() => Ok(Principal {
                id: t.id,
                name: t.name,
                scope: t.scope,
            }),
            Some(t) => Err(ApiError::Unauthorized {
                code: "token_revoked",
                message: format!("token {} ({}) was revoked", t.id, t.name),
            }),
            None => Err(ApiError::Unauthorized {
                code: "invalid_token",
                message: "the token is not one this server issued".into(),
            }),
        }
    }
}

/// SHA-256 of a token, hex: what the store keeps.
pub fn hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// Make a token of `scope`: its record (to store) and the token itself (to show once).
pub fn issue(scope: Scope, name: &str, now: Millis) -> (String, TokenRecord) {
    let mut id = [0u8; 5];
    let mut secret = [0u8; 32];
    rand::rng().fill_bytes(&mut id);
    rand::rng().fill_bytes(&mut secret);
    let id = format!("t{}", hex::encode(id));
    let token = format!("gantry_{id}_{}", hex::encode(secret));
    let record = TokenRecord {
        id,
        name: name.to_owned(),
        scope,
        hash: hash(&token),
        created_at: now,
        revoked_at: None,
    };
    (token, record)
}

/// The scope a request needs, or `None` for the routes anyone may call (health, the
/// API document, signing in). What is not a read, a submit or a cancel is
/// administration, so a new route is closed until placed.
pub fn required(method: &Method, path: &str) -> Option<Scope> {
    // The monitor's page and assets are public (they hold no data; what they show comes
    // from the API, behind its tokens).
    if matches!(path, "/healthz" | "/v1/openapi.json" | "/v1/session" | "/")
        || path.starts_with("/ui/")
    {
        return None;
    }
    // An agent's link: an agent token (or an admin one); an agent token does nothing else.
    if path == "/v1/agents/connect" {
        return Some(Scope::Agent);
    }
    match *method {
        Method::GET | Method::HEAD => Some(Scope::Read),
        // Input files are part of submitting.
        Method::POST if path == "/v1/jobs" || path == "/v1/files" => Some(Scope::Submit),
        Method::DELETE if path.starts_with("/v1/jobs/") => Some(Scope::Submit),
        _ => Some(Scope::Admin),
    }
}

/// The token of a request's `Authorization: Bearer` header.
pub fn bearer(headers: &HeaderMap) -> Option<String> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|t| t.trim().to_owned())
}

/// The token a request carries: its bearer header, else its session cookie.
pub fn presented(headers: &HeaderMap) -> Option<String> {
    if let Some(t) = bearer(headers) {
        return Some(t);
    }
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v.to_owned())
}

/// The middleware: let the request through with its principal, or refuse it (401
/// without a valid token, 403 when its scope is too small).
pub async fn guard(State(auth): State<Arc<Auth>>, mut req: Request, next: Next) -> Response {
    let Some(need) = required(req.method(), req.uri().path()) else {
        return next.run(req).await;
    };
    if !auth.required() {
        return next.run(req).await;
    }
    let Some(token) = presented(req.headers()) else {
        return ApiError::Unauthorized {
            code: "unauthenticated",
            message: format!(
                "this server asks for a token: {} {} needs scope {need} (send Authorization: Bearer TOKEN; the CLI takes --token or GANTRY_TOKEN)",
                req.method(),
                req.uri().path()
            ),
        }
        .into_response();
    };
    let principal = match auth.check(&token).await {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    if !principal.scope.allows(need) {
        return ApiError::Forbidden(format!(
            "token {} ({}) has scope {}; {} {} needs scope {need}",
            principal.id,
            principal.name,
            principal.scope,
            req.method(),
            req.uri().path()
        ))
        .into_response();
    }
    req.extensions_mut().insert(principal);
    next.run(req).await
}
