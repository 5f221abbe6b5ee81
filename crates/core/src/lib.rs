//! gantry's domain: jobs and attempts, the one `transition` function that changes them,
//! the routing choice, the attempt watchdog, backend health, and workflow checks. No I/O
//! and no clock reads: callers pass `now`, which they take from a `clock::Clock`.

pub mod auth;
pub mod clock;
pub mod health;
pub mod job;
pub mod profile;
pub mod routing;
pub mod transition;
pub mod watchdog;
pub mod workflow;

pub use clock::{Clock, ManualClock, Millis, SystemClock};
pub use job::{
    Attachment, Attempt, AttemptStatus, Callback, CommandLog, CommandResult, CommandSpec,
    Exclusion, ExclusionReason, Job, JobError, JobId, JobSpec, JobState, Output, Timeouts,
    MAX_LIMIT_MS,
};
pub use transition::{
    transition, Applied, Effect, EventKind, Failure, FailureKind, Input, Policy, Refused,
};
pub use workflow::Workflow;
