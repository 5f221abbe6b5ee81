//! `gantry bench chaos`: thousands of jobs over faulty simulators while the coordinator
//! process is SIGKILLed and restarted, then every promise of RELIABILITY.md checked
//! against the store.
//!
//! Each simulator gets one mix of faults (`MIXES`: stalls, hangs, crashes, slow nodes,
//! node errors, out of memory, dropped or silent sockets, lost history). A few jobs run
//! a node that always raises (`GantryFail`): they must fail, as the workflow's fault,
//! and only they may. Jobs are sent by a closed loop (`--window` outstanding at once)
//! with an idempotency key each, to whichever coordinator is up; a submit that got no
//! answer is sent again with the same key until one answers 2xx with an id.
//!
//! Kills: with the embedded store one `gantry serve` is SIGKILLed `--kills` times and
//! started again on the same data dir; with `--store postgres://...` `--coordinators`
//! share a fresh schema and at each kill one of them (chosen by the seed) is SIGKILLed
//! and started again with the same id. Kill `k` comes when the jobs seen succeeding
//! on the farm's event stream reach a count drawn from the seed, so where the kills
//! fall in the run replays with the seed; readiness is `/healthz` answering 200.
//!
//! Checked afterwards, from the store (every event, every job):
//! - every acknowledged job is there, and no other;
//! - none succeeded twice: at most one `succeeded` event and one succeeded attempt;
//! - none is stuck: each is terminal, with no attempt live, within `--settle` of the
//!   later of the last acknowledgement and the last restart; the jobs that cannot fail
//!   succeeded, the doomed ones failed with `node_error` on two backends;
//! - every stall was detected within its limit + 500 ms: for each attempt failed by a
//!   `node_stall` or `first_progress` timeout, `finished_at - details.since - limit`.
//!   `since` is when the coordinator that failed it last heard progress, or, for an
//!   attempt it adopted (after a restart or a lease takeover), when it adopted it: a
//!   coordinator that was down heard nothing, and the new one, deaf to the prompt's
//!   messages (they go to the old socket's clientId), bounds it by `first_progress`
//!   from the adoption. Such attempts (in flight at a kill) are reported apart, with
//!   their time from the kill as well;
//! - the farm's event stream, followed across every kill with `since=`, carried every
//!   stored event once and in order;
//! - on PostgreSQL, no two coordinators claimed one backend under one lease (the
//!   dispatch log);
//! - nothing is left in a simulator's queue once every job ended: each prompt gantry gave
//!   up on was stopped (a prompt left running unwatched holds its backend for good),
//!   except the known gap: one whose timeout a coordinator committed within a limit
//!   before it was killed, not yet stopped (reported as `left_at_kill`).
//!
//! Any of these broken is listed under `problems`, and `gantry bench` then exits 1.

mod check;
mod farm;
mod load;
mod plan;
mod report;
mod run;

pub use plan::Options;
pub use run::run;
