//! Wall-clock time as gantry stores and shows it: milliseconds since the Unix epoch, read
//! here, and RFC 3339 with milliseconds for people and JSON. Timers use tokio's clock
//! instead; this is only for timestamps. A leaf module, so every other one may use it.

use chrono::{DateTime, SecondsFormat, Utc};
use gantry_core::Millis;

/// Wall-clock now, for timestamps that are stored and shown.
pub fn now_ms() -> Millis {
    match FOLLOWED.get() {
        Some((wall, at)) => {
            wall + tokio::time::Instant::now()
                .saturating_duration_since(*at)
                .as_millis() as Millis
        }
        None => host_now_ms(),
    }
}

#[allow(clippy::disallowed_methods)] // The engine's one read of the host's wall clock.
fn host_now_ms() -> Millis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as Millis)
        .unwrap_or_default()
}

/// A moment as the host's wall clock and tokio's clock both have it (`follow_tokio_clock`).
static FOLLOWED: std::sync::OnceLock<(Millis, tokio::time::Instant)> = std::sync::OnceLock::new();

/// From now on, in this process, wall time moves with tokio's clock: for tests that run
/// the whole engine on a paused clock (`#[tokio::test(start_paused = true)]`), where a
/// deadline stored as a wall-clock moment must come when the test advances time, and the
/// timestamps of an attempt differ by exactly the time the test let pass. A server never
/// calls it (wall time would then drift with the monotonic clock).
pub fn follow_tokio_clock() {
    // Anchored an hour back: each test's runtime has a paused clock of its own, started
    // when the runtime was made, perhaps just before the test that called this first;
    // its instants must all come after the anchor, or `now_ms` would stand still at the
    // anchor for a moment and a deadline computed then would come late.
    const BACK: std::time::Duration = std::time::Duration::from_secs(3600);
    FOLLOWED.get_or_init(|| {
        let now = tokio::time::Instant::now();
        match now.checked_sub(BACK) {
            Some(anchor) => (host_now_ms() - BACK.as_millis() as Millis, anchor),
            None => (host_now_ms(), now),
        }
    });
}

/// `ms` as RFC 3339 with milliseconds, in UTC.
pub fn rfc3339(ms: Millis) -> String {
    DateTime::<Utc>::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(SecondsFormat::Millis, true)
}
