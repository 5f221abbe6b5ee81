//! `gantry sim`: ComfyUI simulators speaking the real protocol, with injectable faults,
//! one or many in this process, until Ctrl+C.

use anyhow::Context;
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct SimArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8188")]
    listen: SocketAddr,
    /// Run every timed phase this many times faster (100 for tests).
    #[arg(long, default_value_t = 1.0)]
    speed: f64,
    /// A fault to inject, e.g. `stall:at=50,every=3`; repeatable. Also settable at run
    /// time with POST /sim/faults.
    #[arg(long = "fault", value_name = "SPEC")]
    faults: Vec<String>,
    /// Seed for faults with a probability (`p=0.25`), for a reproducible sequence.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Model files the loaders list and accept, comma-separated.
    #[arg(long, value_delimiter = ',')]
    models: Option<Vec<String>>,
    /// Folder for output, input and temp files (a temporary one by default).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Run this many simulators in this process, on consecutive ports from --listen's
    /// (or each on a free port when that is 0); one line with its URL each.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=10000))]
    count: u32,
    /// What every model loader costs, cold and warm (its file was the previous prompt's),
    /// e.g. 3000,0 (milliseconds at speed 1).
    #[arg(long, value_name = "COLD,WARM", value_parser = parse_loader_ms)]
    loader_ms: Option<(std::time::Duration, std::time::Duration)>,
}

fn parse_loader_ms(s: &str) -> Result<(std::time::Duration, std::time::Duration), String> {
    let (cold, warm) = s
        .split_once(',')
        .ok_or_else(|| format!("{s:?}: write COLD,WARM in milliseconds, e.g. 3000,0"))?;
    let ms = |v: &str| {
        v.trim()
            .parse::<u64>()
            .map(std::time::Duration::from_millis)
            .map_err(|e| format!("{v:?} in --loader-ms: {e}"))
    };
    Ok((ms(cold)?, ms(warm)?))
}

pub async fn run(args: SimArgs) -> anyhow::Result<()> {
    let mut handles = Vec::new();
    for i in 0..args.count {
        let mut listen = args.listen;
        if listen.port() != 0 {
            let port = u16::try_from(u32::from(listen.port()) + i)
                .context("--count runs past the last port")?;
            listen.set_port(port);
        }
        let config = gantry_sim::SimConfig {
            loader: args.loader_ms,
            listen,
            speed: args.speed,
            faults: args.faults.clone(),
            seed: args.seed.wrapping_add(u64::from(i)),
            models: args
                .models
                .clone()
                .unwrap_or_else(gantry_sim::default_models),
            data_dir: args.data_dir.as_ref().map(|d| {
                if args.count == 1 {
                    d.clone()
                } else {
                    d.join(format!("sim-{i}"))
                }
            }),
        };
        let handle = gantry_sim::spawn(config)
            .await
            .with_context(|| format!("cannot start simulator {}", i + 1))?;
        println!("gantry sim: a ComfyUI server on {}", handle.url());
        handles.push(handle);
    }
    if let [handle] = handles.as_slice() {
        println!(
            "  try: curl {}/system_stats    (Ctrl+C stops it)",
            handle.url()
        );
    }
    tokio::signal::ctrl_c()
        .await
        .context("waiting for Ctrl+C")?;
    for handle in handles {
        handle.shutdown().await;
    }
    Ok(())
}
