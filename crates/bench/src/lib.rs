//! The benchmarks of `gantry bench`: scenarios that start their own simulators and server
//! (each in its own process, so the server's cost is measured alone), drive them, and
//! print a result table and JSON. BENCHMARKS.md reports their numbers.
//!
//! The cli parses the flags into each scenario's `Options` and calls [`run`]. Errors are
//! `anyhow`'s: a scenario is the body of a command whose every error goes to the person
//! who ran it, with its context, and nothing matches on them.

// Benchmarks measure real elapsed time on the host's clocks, which the workspace's
// clippy.toml keeps out of every other crate.
#![allow(clippy::disallowed_methods)]

pub mod chaos;
mod client;
pub mod cluster;
pub mod engine;
pub mod failover;
pub mod overhead;
mod process;
pub mod profile;
mod report;
pub mod restart;
pub mod routing;
pub mod scale;
mod server;
mod sims;
mod stats;
mod stream;
pub mod throughput;
mod time;

pub use process::Binary;
use std::path::Path;

/// A scenario and what it runs with.
pub enum Scenario {
    Overhead(overhead::Options),
    Throughput(throughput::Options),
    Engine(engine::Options),
    Failover(failover::Options),
    Scale(scale::Options),
    Restart(restart::Options),
    Cluster(cluster::Options),
    Profile(profile::Options),
    Routing(routing::Options),
    Chaos(chaos::Options),
}

/// Run `scenario`, print its table and its JSON report on stdout, write the report to
/// `json` too when given; an error when it could not run or found `problems`.
pub async fn run(gantry: &Binary, scenario: Scenario, json: Option<&Path>) -> anyhow::Result<()> {
    let (name, results) = match scenario {
        Scenario::Overhead(a) => ("overhead", overhead::run(a, gantry).await?),
        Scenario::Throughput(a) => ("throughput", throughput::run(a, gantry).await?),
        Scenario::Engine(a) => ("engine", engine::run(a).await?),
        Scenario::Failover(a) => ("failover", failover::run(a, gantry).await?),
        Scenario::Scale(a) => ("scale", scale::run(a, gantry).await?),
        Scenario::Restart(a) => ("restart", restart::run(a, gantry).await?),
        Scenario::Cluster(a) => ("cluster", cluster::run(a, gantry).await?),
        Scenario::Profile(a) => ("profile", profile::run(a).await?),
        Scenario::Routing(a) => ("routing", routing::run(a, gantry).await?),
        Scenario::Chaos(a) => ("chaos", chaos::run(a, gantry).await?),
    };
    report::publish(name, results, json)
}
