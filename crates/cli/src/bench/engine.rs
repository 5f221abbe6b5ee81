//! TODO
use super::Results;

#[derive(clap::Args)]
pub struct Args {}

pub async fn run(_a: Args) -> anyhow::Result<Results> {
    anyhow::bail!("not yet")
}
