//! The simulator's integration tests: one binary, so the build stays fast.

mod faults;
mod inputs;
mod parity;
mod smoke;
mod support;
