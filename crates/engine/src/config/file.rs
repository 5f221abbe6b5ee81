//! The TOML file's shape as serde reads it (unknown keys refused by name), before
//! `Config::apply_toml` checks each value and takes it.

use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct FileConfig {
    pub(super) listen: Option<SocketAddr>,
    pub(super) data_dir: Option<PathBuf>,
    pub(super) store: Option<String>,
    pub(super) artifacts: Option<PathBuf>,
    pub(super) retention: Option<String>,
    pub(super) stats_retention: Option<String>,
    pub(super) coordinator: Option<String>,
    pub(super) lease: Option<String>,
    pub(super) max_body_bytes: Option<usize>,
    pub(super) max_attachment_bytes: Option<u64>,
    pub(super) public_url: Option<String>,
    pub(super) callback: Option<FileCallback>,
    pub(super) max_attempts: Option<u32>,
    pub(super) cancel_grace: Option<String>,
    pub(super) liveness: Option<String>,
    pub(super) agent_heartbeat: Option<String>,
    pub(super) resync_gap: Option<std::num::NonZeroU32>,
    pub(super) block_cooldown: Option<String>,
    pub(super) circuit_cooldown: Option<String>,
    pub(super) circuit_threshold: Option<u32>,
    pub(super) backoff_base: Option<String>,
    pub(super) backoff_max: Option<String>,
    pub(super) pipeline: Option<bool>,
    pub(super) insecure: Option<bool>,
    pub(super) adaptive: Option<FileAdaptive>,
    pub(super) routing: Option<String>,
    #[serde(default)]
    pub(super) timeouts: FileTimeouts,
    #[serde(default)]
    pub(super) backends: Vec<FileBackend>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileAdaptive {
    pub(super) classes: Vec<String>,
    pub(super) factor: Option<f64>,
    pub(super) floor: Option<String>,
    pub(super) min_samples: Option<u64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct FileCallback {
    pub(super) url: Option<String>,
    pub(super) events: Option<Vec<String>>,
    pub(super) secret: Option<String>,
    pub(super) allow_hosts: Option<Vec<String>>,
    pub(super) retry_for: Option<String>,
    pub(super) backoff: Option<String>,
    pub(super) timeout: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct FileTimeouts {
    pub(super) submit: Option<String>,
    pub(super) start: Option<String>,
    pub(super) first_progress: Option<String>,
    pub(super) node_stall: Option<String>,
    pub(super) deadline: Option<String>,
    pub(super) queue: Option<String>,
    #[serde(default)]
    pub(super) node_class: BTreeMap<String, FileClassTimeout>,
    /// Operation name -> duration.
    #[serde(default)]
    pub(super) command: BTreeMap<String, String>,
}

/// `KSampler = "2m"` (both limits) or `KSampler = { first_progress = "20m", node_stall = "2m" }`.
#[derive(Deserialize)]
#[serde(untagged)]
pub(super) enum FileClassTimeout {
    Both(String),
    Each {
        first_progress: Option<String>,
        node_stall: Option<String>,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileBackend {
    pub(super) name: String,
    pub(super) url: Option<String>,
    #[serde(default)]
    pub(super) tags: Vec<String>,
    #[serde(default)]
    pub(super) priority: i32,
    pub(super) timeouts: Option<FileTimeouts>,
}
