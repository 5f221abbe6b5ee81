//! Wall-clock time as gantry stores and shows it: milliseconds since the Unix epoch, read
//! here, and RFC 3339 with milliseconds for people and JSON. Timers use tokio's clock
//! instead; this is only for timestamps. A leaf module, so every other one may use it.

use chrono::{DateTime, SecondsFormat, Utc};
use gantry_core::Millis;

/// Wall-clock now, for timestamps that are stored and shown.
#[allow(clippy::disallowed_methods)] // The engine's one read of the host's wall clock.
pub fn now_ms() -> Millis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as Millis)
        .unwrap_or_default()
}

/// `ms` as RFC 3339 with milliseconds, in UTC.
pub fn rfc3339(ms: Millis) -> String {
    DateTime::<Utc>::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(SecondsFormat::Millis, true)
}
