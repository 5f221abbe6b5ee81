//! The monitor page's session: signing in with a token into a cookie, and out.

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use serde_json::json;

use gantry_api as wire;

use crate::auth::Auth;
use crate::auth::Principal;
use std::sync::Arc;

use super::error::*;

pub(crate) fn session_of(auth: &Auth, principal: Option<Principal>) -> wire::Session {
    wire::Session {
        auth: auth.required(),
        token: principal.map(|p| wire::TokenInfo {
            id: p.id,
            name: p.name,
            scope: p.scope,
        }),
    }
}

/// Whether the server asks for tokens, and the token this request carries (header or
/// cookie) when it is valid.
#[utoipa::path(get, path = "/v1/session", tag = "operations",
    responses(
        (status = 200, body = wire::Session),
        (status = 401, description = "The token sent is not valid", body = wire::ErrorBody),
    ))]
pub(crate) async fn get_session(
    State(auth): State<Arc<Auth>>,
    headers: axum::http::HeaderMap,
) -> Result<Json<wire::Session>, ApiError> {
    let principal = match crate::auth::presented(&headers) {
        Some(t) => Some(auth.check(&t).await?),
        None => None,
    };
    Ok(Json(session_of(&auth, principal)))
}

/// Sign in: a token (bearer header, or `{"token": ...}`) exchanged for the HttpOnly,
/// SameSite=Strict cookie that a browser sends with every request, EventSource too.
#[utoipa::path(post, path = "/v1/session", tag = "operations",
    request_body(content = Option<wire::SignIn>, description = "The token, when not sent as a bearer"),
    responses(
        (status = 200, description = "Signed in; the cookie is set", body = wire::Session),
        (status = 400, description = "No token was sent", body = wire::ErrorBody),
        (status = 401, description = "The token is not valid", body = wire::ErrorBody),
    ))]
pub(crate) async fn sign_in(
    State(auth): State<Arc<Auth>>,
    headers: axum::http::HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let token = match crate::auth::bearer(&headers) {
        Some(t) => t,
        None if body.is_empty() => {
            return Err(ApiError::bad(
                "missing_token",
                "send the token as Authorization: Bearer TOKEN or as {\"token\": \"...\"}",
                json!({}),
            ))
        }
        None => {
            serde_json::from_slice::<wire::SignIn>(&body)
                .map_err(|e| {
                    ApiError::bad(
                        "invalid_request",
                        format!("the body must be {{\"token\": \"...\"}}: {e}"),
                        json!({}),
                    )
                })?
                .token
        }
    };
    let principal = auth.check(&token).await?;
    let cookie = format!(
        "{}={token}; HttpOnly; SameSite=Strict; Path=/",
        crate::auth::COOKIE
    );
    Ok((
        [(header::SET_COOKIE, cookie)],
        Json(session_of(&auth, Some(principal))),
    )
        .into_response())
}

/// Sign out: the cookie is cleared.
#[utoipa::path(delete, path = "/v1/session", tag = "operations",
    responses((status = 200, description = "Signed out; the cookie is cleared", body = wire::Session)))]
pub(crate) async fn sign_out(State(auth): State<Arc<Auth>>) -> Response {
    let cookie = format!(
        "{}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0",
        crate::auth::COOKIE
    );
    (
        [(header::SET_COOKIE, cookie)],
        Json(session_of(&auth, None)),
    )
        .into_response()
}
