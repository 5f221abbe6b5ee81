//! `gantry serve`: the orchestrator, configured from flags, variables and its TOML file
//! (flags and variables win), until Ctrl+C.

use anyhow::Context;
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct ServeArgs {
    /// Address to serve the API on.
    #[arg(long, env = "GANTRY_LISTEN", default_value = gantry_server::config::DEFAULT_LISTEN)]
    listen: SocketAddr,
    /// Folder for the embedded store and the jobs' output files.
    #[arg(long, env = "GANTRY_DATA_DIR", default_value = "gantry-data")]
    data_dir: PathBuf,
    /// A ComfyUI server, as [NAME=]URL (the name defaults to host:port); repeatable.
    #[arg(long = "backend", value_name = "[NAME=]URL")]
    backends: Vec<String>,
    /// A TOML file with backends (tags, priority), timeouts and limits.
    #[arg(long, env = "GANTRY_CONFIG")]
    config: Option<PathBuf>,
    /// Where jobs are kept: `embedded` (SQLite in the data dir) or
    /// postgres://USER@HOST/DB, shared by several coordinators.
    #[arg(long, env = "GANTRY_STORE", value_name = "URL")]
    store: Option<String>,
    /// A folder for output files that every coordinator shares (needed with postgres).
    #[arg(long, env = "GANTRY_ARTIFACTS", value_name = "DIR")]
    artifacts: Option<PathBuf>,
    /// This coordinator's id among those sharing a postgres store (random by default).
    #[arg(long, env = "GANTRY_COORDINATOR", value_name = "ID")]
    coordinator: Option<String>,
    /// How long a backend lease lasts without renewal (postgres store), e.g. 10s.
    #[arg(long, value_name = "DURATION", value_parser = parse_lease)]
    lease: Option<std::time::Duration>,
    /// Serve on a non-loopback address even though no API token exists (see `gantry
    /// token create`): anyone who reaches it may submit, cancel and drain.
    #[arg(long, env = "GANTRY_INSECURE")]
    insecure: bool,
}

/// `--lease`, bounded as the config file's durations are (timers add it to the clock).
fn parse_lease(s: &str) -> Result<std::time::Duration, String> {
    gantry_server::config::parse_duration("--lease", s).map_err(|e| e.to_string())
}

pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let mut config = gantry_server::Config::new(args.listen, args.data_dir);
    for spec in &args.backends {
        config
            .backends
            .push(gantry_server::BackendConfig::parse(spec)?);
    }
    if let Some(path) = &args.config {
        config.apply_file(path)?;
    }
    // Flags and environment win over the file.
    if let Some(store) = &args.store {
        config.store = gantry_server::StoreConfig::parse(store)?;
    }
    if let Some(dir) = args.artifacts {
        config.artifacts = Some(dir);
    }
    if let Some(id) = args.coordinator {
        config.coordinator = Some(id);
    }
    if let Some(lease) = args.lease {
        config.lease = lease;
    }
    if args.insecure {
        config.insecure = true;
    }
    let configured = !config.backends.is_empty();
    let server = gantry_server::Server::start(config)
        .await
        .context("cannot start gantry")?;
    // None configured is a farm of agents (or of backends added at run time): say how
    // one joins, since jobs wait until then.
    if !configured && server.engine.backends().is_empty() {
        tracing::warn!(
            "no backends yet: jobs wait for one. Give --backend [NAME=]URL (a ComfyUI server) or [[backends]] in --config, add one with `gantry backends add URL`, or link a GPU machine with `gantry agent --server {}`",
            server.url()
        );
    }
    println!("gantry: serving on {}", server.url());
    tokio::signal::ctrl_c()
        .await
        .context("waiting for Ctrl+C")?;
    server.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `Instant + lease` panicked for a lease past what the clock holds.
    #[test]
    fn a_lease_over_ten_years_is_refused() {
        assert_eq!(parse_lease("10s"), Ok(std::time::Duration::from_secs(10)));
        assert!(parse_lease("500000000000y")
            .unwrap_err()
            .contains("longer than the longest limit, 10 years"));
    }
}
