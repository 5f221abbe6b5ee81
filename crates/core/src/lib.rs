//! gantry's domain: jobs and attempts, the one `transition` function that changes them,
//! the routing choice, and workflow checks. No I/O and no clock: callers pass `now`.

pub mod job;
pub mod routing;
pub mod transition;
pub mod workflow;

pub use job::{
    Attempt, AttemptStatus, Exclusion, ExclusionReason, Job, JobError, JobId, JobSpec, JobState,
    Millis, Output, Timeouts,
};
pub use transition::{
    transition, Applied, Effect, EventKind, Failure, FailureKind, Input, Policy, Refused,
};
pub use workflow::Workflow;
