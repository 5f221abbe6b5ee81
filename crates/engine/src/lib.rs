//! gantry's engine, under any surface: the `Engine` handle (`engine`), the only writer of
//! jobs, the scheduler and the backends' drivers (`backend`), agents' links (`agents`),
//! several coordinators on PostgreSQL (`cluster`), and what they share (`config`,
//! `bus`, `outputs`, `hooks`, `clock`). It serves no HTTP: `gantry-server` puts the v1 API
//! and the monitor on top.

pub mod agents;
pub mod backend;
pub mod bus;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod engine;
pub mod hooks;
pub mod outputs;

pub use config::{BackendConfig, Config, StoreConfig};
pub use engine::Engine;
