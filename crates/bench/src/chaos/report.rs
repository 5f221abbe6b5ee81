//! The report of a chaos run: the problems found (any makes `gantry bench` exit 1), a
//! table for people and the JSON document.

use super::check::{Verdict, LISTED};
use super::farm::Kill;
use super::load::Progress;
use super::plan::{Options, Plan, MIXES};
use crate::report::Results;
use serde_json::json;

/// What the run did, reported beside the store's verdict.
pub(super) struct Ran<'a> {
    pub options: &'a Options,
    pub seed: u64,
    /// Coordinators the run started.
    pub n_coord: usize,
    pub limit_ms: i64,
    pub plans: &'a [Plan],
    pub kills: &'a [Kill],
    pub progress: &'a Progress,
    /// Why the run stopped before its end, if it did.
    pub gave_up: Option<String>,
    /// The dispatch log's claims checked (Postgres only).
    pub claims: Option<Result<usize, String>>,
    /// When every job was terminal, from the later of the last acknowledgement and the
    /// last restart.
    pub settled_ms: Option<i64>,
    pub last_ack_ms: Option<i64>,
    pub wall_s: f64,
    /// Times the operator mended a hanging worker.
    pub mends: u64,
}

pub(super) fn results(ran: Ran, verdict: Verdict) -> Results {
    let Ran {
        options: a,
        seed,
        n_coord,
        limit_ms,
        plans,
        kills,
        progress,
        gave_up,
        claims,
        settled_ms,
        last_ack_ms,
        wall_s,
        mends,
    } = ran;
    let mut problems = verdict.problems.clone();
    if let Some(why) = &gave_up {
        problems.insert(0, why.clone());
    }
    if let Some(Err(why)) = &claims {
        problems.push(format!("two coordinators drove one backend: {why}"));
    }
    if gave_up.is_none() && settled_ms.is_none() {
        problems.insert(
            0,
            format!(
                "not every job was terminal {:?} after the last acknowledgement and the last restart",
                a.settle
            ),
        );
    }
    let store_name = if a.store.is_some() {
        "postgres"
    } else {
        "embedded"
    };
    let mut table = vec![
        format!(
            "{} jobs ({} doomed) over {} faulty simulators at speed {}, limits {limit_ms} ms, window {}; {} coordinator(s) on the {store_name} store; seed {seed}",
            a.jobs,
            plans.iter().filter(|p| **p == Plan::Doomed).count(),
            a.sims,
            a.speed,
            a.window,
            n_coord
        ),
        format!(
            "{} kills, {} restarts: {}",
            kills.len(),
            kills.len(),
            kills
                .iter()
                .map(|k| format!(
                    "{} at {} succeeded (serving {:.0} ms, healthy {:.0} ms after the spawn)",
                    k.coordinator, k.succeeded, k.serving_ms, k.healthy_ms
                ))
                .collect::<Vec<_>>()
                .join("; ")
        ),
        format!(
            "acknowledged {}, found {}; succeeded {}, failed {} {:?}, cancelled {}",
            progress.n_acked,
            verdict.found,
            verdict.states.get("succeeded").unwrap_or(&0),
            verdict.states.get("failed").unwrap_or(&0),
            verdict.failed_by_code,
            verdict.states.get("cancelled").unwrap_or(&0),
        ),
        format!(
            "attempts {}, failed by code {:?}, timeouts by phase {:?}; in flight at the kills {:?}",
            verdict.attempts, verdict.attempt_codes, verdict.phases, verdict.in_flight
        ),
        format!(
            "stall detection past the limit, ms: {}",
            verdict.lag.line("ms")
        ),
        format!(
            "  of attempts in flight at a kill (from the adoption): {}; from the kill: max {:.0} ms",
            verdict.lag_adopted.line("ms"),
            verdict.from_kill_max_ms
        ),
        format!(
            "all terminal {} after the later of the last acknowledgement and the last restart; wall {wall_s:.1} s; the hang was mended {mends} times; the event stream resumed {} times",
            settled_ms.map_or("never".to_owned(), |ms| format!("{ms} ms")),
            progress.resumes
        ),
    ];
    if !verdict.left_at_kill.is_empty() {
        table.push(format!(
            "left on a backend by a coordinator killed just after failing it (the known gap): {:?}",
            verdict.left_at_kill
        ));
    }
    table.push(if problems.is_empty() {
        "verdict: every acknowledged job there, none succeeded twice, none stuck, every stall detected within its limit + 500 ms".to_owned()
    } else {
        format!("verdict: {} PROBLEMS:", problems.len())
    });
    for p in problems.iter().take(LISTED * 4) {
        table.push(format!("  {p}"));
    }

    Results {
        table,
        json: json!({
            "seed": seed,
            "store": store_name,
            "coordinators": n_coord,
            "jobs": a.jobs,
            "doomed": plans.iter().filter(|p| **p == Plan::Doomed).count(),
            "sims": a.sims,
            "speed": a.speed,
            "limit_ms": limit_ms,
            "window": a.window,
            "faults": (0..a.sims).map(|i| MIXES[i % MIXES.len()]).collect::<Vec<_>>(),
            "kills": kills.iter().map(|k| json!({
                "coordinator": k.coordinator,
                "succeeded": k.succeeded,
                "acknowledged": k.acked,
                "serving_ms": k.serving_ms,
                "healthy_ms": k.healthy_ms,
            })).collect::<Vec<_>>(),
            "restarts": kills.len(),
            "acknowledged": progress.n_acked,
            "found": verdict.found,
            "states": verdict.states,
            "failed_by_code": verdict.failed_by_code,
            "attempts": verdict.attempts,
            "attempts_failed_by_code": verdict.attempt_codes,
            "timeouts_by_phase": verdict.phases,
            "in_flight_at_kills": verdict.in_flight,
            "attempts_by_backend": verdict.by_backend,
            "left_at_kill": verdict.left_at_kill,
            "stall_lag_ms": verdict.lag,
            "stall_lag_adopted_ms": verdict.lag_adopted,
            "stall_from_kill_max_ms": verdict.from_kill_max_ms,
            "settled_ms": settled_ms,
            "last_ack_ms": last_ack_ms,
            "wall_s": wall_s,
            "hang_mended": mends,
            "stream_resumes": progress.resumes,
            "events": verdict.events,
            "dispatch_claims": claims.and_then(Result::ok),
            "problems": problems,
        }),
    }
}
