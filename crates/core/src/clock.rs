//! Where time comes from: the `Clock` a running component holds and reads, and the
//! `ManualClock` tests move by hand.
//!
//! Core's own logic never reads a clock: every function takes `now` from its caller, so
//! a test chooses the time. The caller gets `now` from a `Clock`, and holding one (an
//! `Arc<dyn Clock>`) instead of calling the system clock directly is what lets a test
//! of the whole engine put a `ManualClock` there. `SystemClock` is the only code in this
//! crate that reads the real clock (clippy's `disallowed-methods`, in this crate's
//! `clippy.toml`, keeps it so).
//!
//! A clock gives two readings. The wall clock (`now_ms`) is what gantry stores and shows;
//! it can jump, backwards too, when the host's time is set. The monotonic one (`mono_ms`)
//! never goes back and measures durations: the watchdog's timers run on it.

use std::fmt;
use std::sync::{Arc, Mutex};

/// Wall-clock milliseconds since the Unix epoch, or milliseconds on a monotonic clock
/// where a name says so (`mono`). Core never reads a clock: callers pass `now` in, so
/// tests choose the time.
pub type Millis = i64;

/// A source of time, shared by everything that needs one (`Arc<dyn Clock>`).
pub trait Clock: Send + Sync + fmt::Debug {
    /// Wall-clock now, in milliseconds since the Unix epoch: for timestamps that are
    /// stored and shown. Never measure a duration with it, as it can jump.
    fn now_ms(&self) -> Millis;

    /// Milliseconds since this clock's own origin, never decreasing: for timers and
    /// durations. Readings of two clocks cannot be compared.
    fn mono_ms(&self) -> Millis;

    /// The wall-clock moment of the monotonic reading `mono` (a timer's start, shown in
    /// an error), as far as the wall clock has not jumped since.
    fn wall_of(&self, mono: Millis) -> Millis {
        self.now_ms()
            .saturating_sub(self.mono_ms().saturating_sub(mono))
    }
}

/// The host's clocks: `SystemTime` for the wall, `Instant` (from when the clock was made)
/// for the monotonic reading.
#[derive(Clone, Copy, Debug)]
pub struct SystemClock {
    origin: std::time::Instant,
}

impl SystemClock {
    #[allow(clippy::disallowed_methods)] // The one clock read in core: this is the real clock.
    pub fn new() -> SystemClock {
        SystemClock {
            origin: std::time::Instant::now(),
        }
    }
}

impl Default for SystemClock {
    fn default() -> SystemClock {
        SystemClock::new()
    }
}

impl Clock for SystemClock {
    #[allow(clippy::disallowed_methods)] // The one clock read in core: this is the real clock.
    fn now_ms(&self) -> Millis {
        // A host clock set before 1970 reads as the epoch rather than failing: a
        // timestamp is never worth stopping the engine for.
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| {
                Millis::try_from(d.as_millis()).unwrap_or(Millis::MAX)
            })
    }

    #[allow(clippy::disallowed_methods)] // The one clock read in core: this is the real clock.
    fn mono_ms(&self) -> Millis {
        Millis::try_from(self.origin.elapsed().as_millis()).unwrap_or(Millis::MAX)
    }
}

/// A clock that moves only when told: give one clone to the code under test and keep
/// another to move time. `advance_ms` moves both readings; `set_wall` moves only the wall
/// clock, as when the host's time is set, so a test can show that nothing measures a
/// duration on it.
#[derive(Clone, Debug)]
pub struct ManualClock {
    /// (wall, mono) together, so a reader never sees one moved and not the other.
    time: Arc<Mutex<(Millis, Millis)>>,
}

impl ManualClock {
    /// A clock whose wall reads `wall` and whose monotonic reading starts at 0.
    pub fn new(wall: Millis) -> ManualClock {
        ManualClock {
            time: Arc::new(Mutex::new((wall, 0))),
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut (Millis, Millis)) -> T) -> T {
        // A panic elsewhere while holding the lock leaves two plain numbers behind, still
        // valid: take them over rather than spread the panic.
        let mut time = self.time.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut time)
    }

    /// Time passes: both readings move `ms` on.
    pub fn advance_ms(&self, ms: u64) {
        let ms = Millis::try_from(ms).unwrap_or(Millis::MAX);
        self.with(|(wall, mono)| {
            *wall = wall.saturating_add(ms);
            *mono = mono.saturating_add(ms);
        });
    }

    /// The wall clock is set to `wall` (forwards or back); the monotonic one does not move.
    pub fn set_wall(&self, wall: Millis) {
        self.with(|time| time.0 = wall);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> Millis {
        self.with(|time| time.0)
    }

    fn mono_ms(&self) -> Millis {
        self.with(|time| time.1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manual_clock_moves_only_when_told_and_its_clones_share_it() {
        let clock = ManualClock::new(1_000);
        let held: Arc<dyn Clock> = Arc::new(clock.clone());
        assert_eq!((held.now_ms(), held.mono_ms()), (1_000, 0));
        clock.advance_ms(250);
        assert_eq!((held.now_ms(), held.mono_ms()), (1_250, 250));
        assert_eq!(held.wall_of(100), 1_100, "100 ms after the origin");
    }

    #[test]
    fn setting_the_wall_clock_back_leaves_the_monotonic_one_alone() {
        let clock = ManualClock::new(50_000);
        clock.advance_ms(10);
        clock.set_wall(20_000);
        assert_eq!((clock.now_ms(), clock.mono_ms()), (20_000, 10));
        clock.advance_ms(5);
        assert_eq!((clock.now_ms(), clock.mono_ms()), (20_005, 15));
    }

    #[test]
    fn a_manual_clock_saturates_instead_of_overflowing() {
        let clock = ManualClock::new(Millis::MAX - 1);
        clock.advance_ms(u64::MAX);
        assert_eq!(
            (clock.now_ms(), clock.mono_ms()),
            (Millis::MAX, Millis::MAX)
        );
    }

    #[test]
    fn the_system_clock_reads_the_host_time_and_never_goes_back() {
        let clock = SystemClock::new();
        // 2020-01-01T00:00:00Z: any host running this is later.
        assert!(clock.now_ms() > 1_577_836_800_000, "{}", clock.now_ms());
        let first = clock.mono_ms();
        assert!(
            (0..60_000).contains(&first),
            "counted from its making: {first}"
        );
        let mut last = first;
        for _ in 0..1_000 {
            let now = clock.mono_ms();
            assert!(now >= last, "{now} after {last}");
            last = now;
        }
    }
}
