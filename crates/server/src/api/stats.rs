//! Node statistics and the adaptive stall limits they suggest.

use axum::extract::{Query, State};
use axum::Json;
use chrono::DateTime;
use gantry_core::Millis;
use serde::Deserialize;
use serde_json::json;

use gantry_api as wire;
use utoipa::IntoParams;

use crate::engine::Engine;

use super::error::*;

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct StatsQuery {
    /// Only this node class.
    class: Option<String>,
    /// Only this workflow shape (`workflow_hash` of a job).
    workflow: Option<String>,
    /// Only this backend.
    backend: Option<String>,
    /// From this moment: RFC 3339, or a duration ago (`24h`, `7d`).
    since: Option<String>,
    /// Group by `class` (the default) and any of `workflow`, `backend`, comma-separated.
    by: Option<String>,
}

/// Per node class (and workflow, and backend): runs, cached ratio, failures, timeouts
/// and duration quantiles, from every finished attempt's profile.
#[utoipa::path(get, path = "/v1/stats/nodes", tag = "jobs", params(StatsQuery),
    responses(
        (status = 200, body = wire::NodeStatsList),
        (status = 400, description = "A query parameter is not valid", body = wire::ErrorBody),
    ))]
pub(crate) async fn node_stats(
    State(engine): State<Engine>,
    Query(q): Query<StatsQuery>,
) -> Result<Json<wire::NodeStatsList>, ApiError> {
    let by: Vec<String> = match q.by.as_deref() {
        None | Some("") => vec!["class".into()],
        Some(list) => {
            let mut by = vec!["class".to_owned()];
            for part in list.split(',').map(str::trim) {
                match part {
                    "class" => {}
                    "workflow" | "backend" if !by.iter().any(|b| b == part) => by.push(part.into()),
                    "workflow" | "backend" => {}
                    other => {
                        return Err(ApiError::bad(
                            "invalid_query",
                            format!("by={other}: group by class, workflow or backend"),
                            json!({"field": "by"}),
                        ))
                    }
                }
            }
            by
        }
    };
    let since = stats_since(q.since.as_deref(), crate::engine::now_ms())?;
    let rows = engine
        .store()
        .node_stats(&gantry_store::stats::StatsFilter {
            class: q.class.filter(|s| !s.is_empty()),
            workflow: q.workflow.filter(|s| !s.is_empty()),
            backend: q.backend.filter(|s| !s.is_empty()),
            since,
        })
        .await?;
    let with_workflow = by.iter().any(|b| b == "workflow");
    let with_backend = by.iter().any(|b| b == "backend");
    let mut groups: Vec<gantry_store::stats::NodeStats> = Vec::new();
    for row in rows {
        let workflow = if with_workflow {
            row.workflow.as_str()
        } else {
            ""
        };
        let backend = if with_backend {
            row.backend.as_str()
        } else {
            ""
        };
        match groups
            .iter_mut()
            .find(|g| g.class == row.class && g.workflow == workflow && g.backend == backend)
        {
            Some(g) => g.merge(&row),
            None => {
                let mut g = gantry_store::stats::NodeStats::empty(&row.class, workflow, backend, 0);
                g.merge(&row);
                groups.push(g);
            }
        }
    }
    let stats = groups
        .into_iter()
        .map(|g| {
            // A sketch's quantile may overshoot the exact maximum by its relative error.
            let max = g.sketch.max();
            let q = |q: f64| g.quantile(q).map(|v| max.map_or(v, |m| v.min(m)));
            (q(0.5), q(0.95), q(0.99), max, g)
        })
        .map(|(p50, p95, p99, max, g)| wire::NodeStatsEntry {
            cached_ratio: if g.count == 0 {
                0.0
            } else {
                g.cached as f64 / g.count as f64
            },
            measured: g.sketch.count() as u64,
            p50_ms: p50,
            p95_ms: p95,
            p99_ms: p99,
            max_ms: max,
            workflow: with_workflow.then(|| g.workflow.clone()),
            backend: with_backend.then(|| g.backend.clone()),
            class: g.class,
            count: g.count,
            cached: g.cached,
            failed: g.failed,
            timed_out: g.timed_out,
        })
        .collect();
    Ok(Json(wire::NodeStatsList { by, stats }))
}

/// `since` of `/v1/stats/nodes`: an RFC 3339 time, or a duration before `now` (one
/// longer ago than the clock began means from the beginning).
pub(crate) fn stats_since(since: Option<&str>, now: Millis) -> Result<Option<Millis>, ApiError> {
    let s = match since {
        None | Some("") => return Ok(None),
        Some(s) => s,
    };
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(Some(t.timestamp_millis()));
    }
    match humantime::parse_duration(s) {
        Ok(d) => Ok(Some(
            now.saturating_sub(i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
        )),
        Err(_) => Err(ApiError::bad(
            "invalid_query",
            format!("since={s}: give an RFC 3339 time or a duration ago, like 24h"),
            json!({"field": "since"}),
        )),
    }
}

/// The node-stall limit history gives each class on each backend, and why: in force for
/// the classes `[adaptive]` names, a suggestion for the others (then with its defaults:
/// factor 3, floor 30 s, 20 samples).
#[utoipa::path(get, path = "/v1/stats/timeouts", tag = "jobs",
    responses((status = 200, body = wire::TimeoutSuggestions)))]
pub(crate) async fn timeout_suggestions(
    State(engine): State<Engine>,
) -> Json<wire::TimeoutSuggestions> {
    let configured = engine.config().adaptive.clone();
    let policy = configured.clone().unwrap_or_default();
    let suggestions = engine
        .history_keys()
        .into_iter()
        .map(|(class, backend)| {
            let s = engine.suggest(&policy, &class, &backend);
            wire::TimeoutSuggestion {
                slow: engine.is_slow(&class, &backend),
                applied: configured.as_ref().is_some_and(|p| p.applies_to(&class)),
                class: s.class,
                backend: s.backend,
                backend_samples: s.backend_samples,
                farm_samples: s.farm_samples,
                source: s.source.into(),
                p99_ms: s.p99_ms,
                node_stall_ms: s.node_stall_ms,
                reason: s.reason,
            }
        })
        .collect();
    Json(wire::TimeoutSuggestions {
        enabled: configured.is_some(),
        classes: policy.classes.clone(),
        factor: policy.factor,
        floor_ms: policy.floor.as_millis() as u64,
        min_samples: policy.min_samples,
        suggestions,
    })
}
