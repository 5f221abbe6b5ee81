//! The farm as a whole: its state snapshot, metrics, the cluster's leases, health.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use std::sync::Arc;

use gantry_api as wire;

use crate::engine::{Connection, Engine};

use super::error::*;

/// The farm now, for the monitor: backends, queue depth by priority, running and
/// recently ended jobs, counts, and the `seq` of the last event it includes, from which
/// `GET /v1/events?since=SEQ` goes on.
#[utoipa::path(get, path = "/v1/state", tag = "events",
    responses(
        (status = 200, body = wire::FarmState),
        (status = 503, description = "The store cannot be reached", body = wire::ErrorBody),
    ))]
pub(crate) async fn farm_state(
    State(engine): State<Engine>,
) -> Result<Json<wire::FarmState>, ApiError> {
    Ok(Json(crate::monitor::farm_state(&engine).await?))
}

/// Counters, gauges and histograms in the OpenMetrics text format.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses(
        (status = 200, description = "OpenMetrics text", content_type = "application/openmetrics-text", body = String),
        (status = 503, description = "The store cannot be reached", body = wire::ErrorBody),
    ))]
pub(crate) async fn metrics(
    State(engine): State<Engine>,
    State(metrics): State<Arc<crate::metrics::Metrics>>,
) -> Result<Response, ApiError> {
    let text = crate::metrics::render(&engine, &metrics).await?;
    Ok((
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response())
}

/// This coordinator's place in the farm: its id, the leases it holds, the writes its
/// fences refused, and every lease as the database has it.
#[utoipa::path(get, path = "/v1/cluster", tag = "operations",
    responses(
        (status = 200, body = wire::Cluster),
        (status = 503, description = "The store cannot be reached", body = wire::ErrorBody),
    ))]
pub(crate) async fn cluster(State(engine): State<Engine>) -> Result<Json<wire::Cluster>, ApiError> {
    let Some(cluster) = engine.cluster() else {
        return Ok(Json(wire::Cluster {
            store: "embedded".into(),
            coordinator: None,
            lease_ms: None,
            held: None,
            fenced_writes: None,
            leases: None,
        }));
    };
    let held = engine
        .owned_leases()
        .into_iter()
        .map(|(backend, token)| wire::HeldLease { backend, token })
        .collect();
    let all = cluster
        .leases
        .leases()
        .await?
        .into_iter()
        .map(|l| wire::Lease {
            backend: l.backend,
            owner: l.owner,
            token: l.token,
            remaining_ms: l.remaining_ms,
        })
        .collect();
    Ok(Json(wire::Cluster {
        store: "postgres".into(),
        coordinator: Some(cluster.id.clone()),
        lease_ms: Some(cluster.lease.as_millis() as u64),
        held: Some(held),
        fenced_writes: Some(
            cluster
                .fenced_writes
                .load(std::sync::atomic::Ordering::Relaxed),
        ),
        leases: Some(all),
    }))
}

/// Whether this coordinator can serve: 503 when its store cannot be reached.
#[utoipa::path(get, path = "/healthz", tag = "operations",
    responses(
        (status = 200, body = wire::Health),
        (status = 503, description = "The store cannot be reached", body = wire::Health),
    ))]
pub(crate) async fn healthz(State(engine): State<Engine>) -> Response {
    let store_ok = engine.store().events_since(i64::MAX, 1).await.is_ok();
    let (n, connected) = {
        let b = engine.backends();
        (
            b.len(),
            b.values()
                .filter(|b| b.connection == Connection::Connected)
                .count(),
        )
    };
    let status = if store_ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(wire::Health {
            status: if store_ok { "ok" } else { "store_unavailable" }.into(),
            backends: n,
            connected,
        }),
    )
        .into_response()
}
