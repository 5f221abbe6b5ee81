//! The chaos run itself: the farm started, the load sent, the coordinators killed and
//! restarted at their points, every job waited for, then the store checked.

use super::check::check;
use super::farm::{healthy, left_on, set_faults, wait_connected, Coordinator, Kill};
use super::load::{follow, operate, submit_loop, Progress, Shared};
use super::plan::{self, body, Options, HANG_MIX, MIXES};
use super::report::{self, Ran};
use crate::client::http;
use crate::process::Binary;
use crate::report::Results;
use crate::server::{backends_toml, ServerProc};
use crate::sims::Sims;
use crate::time::now_us;
use anyhow::{bail, Context};
use gantry_store::{Leases, Store};
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde_json::Value;
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

/// Run the chaos scenario (see the module's doc): its problems are in the results'
/// `problems`, which make `gantry bench` exit 1.
pub async fn run(a: Options, gantry: &Binary) -> anyhow::Result<Results> {
    if a.jobs == 0 || a.sims == 0 || a.window == 0 {
        bail!("--jobs, --sims and --window must be at least 1");
    }
    let limit_ms = a.limit.as_millis() as i64;
    if limit_ms == 0 {
        bail!("--limit must be above 0 (0 turns the timers off)");
    }
    let n_coord = if a.store.is_some() { a.coordinators } else { 1 };
    if n_coord == 0 {
        bail!("--coordinators must be at least 1");
    }
    let seed = a.seed.unwrap_or_else(rand::random);
    eprintln!(
        "chaos: seed {seed} (GANTRY_CHAOS_SEED={seed} or --seed {seed} replays the load, the faults and the kill points)"
    );
    let mut rng = StdRng::seed_from_u64(seed);
    let plans = plan::plans(a.jobs);
    let bodies: Vec<Value> = plans
        .iter()
        .enumerate()
        .map(|(i, plan)| body(*plan, i, seed, &mut rng))
        .collect();
    let kill_points = plan::kill_points(&a, n_coord, &mut rng);

    let http = http()?;
    let started = Instant::now();
    let sims = Sims::spawn_args(
        gantry,
        a.sims,
        a.speed,
        &["--seed".into(), seed.to_string()],
    )
    .await?;
    for (i, url) in sims.urls.iter().enumerate() {
        set_faults(&http, url, MIXES[i % MIXES.len()]).await?;
    }
    let dir = tempfile::tempdir()?;
    let schema = match &a.store {
        Some(url) => Some(gantry_store::testing::FreshSchema::create_on(url).await),
        None => None,
    };
    let limit = format!("{limit_ms}ms");
    let common = format!(
        "max_attempts = 16\nbackoff_base = \"20ms\"\nbackoff_max = \"500ms\"\n\
         block_cooldown = \"2s\"\ncircuit_cooldown = \"1s\"\nliveness = \"1s\"\n\
         cancel_grace = \"1s\"\nresync_gap = 1000000000\n\
         [timeouts]\nstart = \"{limit}\"\nfirst_progress = \"{limit}\"\nnode_stall = \"{limit}\"\n"
    );
    let mut coords: Vec<Coordinator> = (0..n_coord)
        .map(|i| Coordinator {
            id: format!("c{i}"),
            data: dir.path().join(format!("c{i}")),
            proc: None,
        })
        .collect();
    let config_of = |c: &Coordinator| {
        let top = match &schema {
            Some(s) => format!(
                "store = {:?}\nartifacts = {:?}\ncoordinator = {:?}\nlease = \"{}ms\"\n",
                s.url,
                dir.path().join("artifacts").display().to_string(),
                c.id,
                a.lease.as_millis()
            ),
            None => String::new(),
        };
        // Top-level keys first: the backends' tables close the top level.
        backends_toml(&sims.urls, &format!("{top}{common}"))
    };
    for c in &mut coords {
        let proc = ServerProc::spawn(gantry, &c.data, &config_of(c)).await?;
        healthy(&http, &proc.url).await?;
        c.proc = Some(proc);
    }
    wait_connected(&http, &coords, a.sims).await?;
    let shared = Arc::new(Shared {
        urls: Mutex::new(
            coords
                .iter()
                .map(|c| c.proc.as_ref().map(|p| p.url.clone()))
                .collect(),
        ),
        progress: Mutex::new(Progress {
            acked: vec![None; a.jobs],
            ..Progress::default()
        }),
        changed: watch::channel(0).0,
    });
    eprintln!(
        "chaos: {} jobs over {} simulators, {} coordinator(s) on the {} store, {} kills at {:?} succeeded",
        a.jobs,
        a.sims,
        n_coord,
        if a.store.is_some() { "postgres" } else { "embedded" },
        a.kills,
        kill_points.iter().map(|(n, _)| n).collect::<Vec<_>>()
    );

    let stop = CancellationToken::new();
    let (hang_tx, hang_rx) = mpsc::unbounded_channel();
    let hang_backends: HashSet<String> = (0..a.sims)
        .filter(|i| i % MIXES.len() == HANG_MIX)
        .map(|i| format!("b{i}"))
        .collect();
    let follower = tokio::spawn(follow(
        http.clone(),
        shared.clone(),
        hang_backends,
        hang_tx,
        stop.clone(),
    ));
    let operator = tokio::spawn(operate(http.clone(), sims.urls.clone(), hang_rx));
    let bodies = Arc::new(bodies);
    let mut submitters = tokio::task::JoinSet::new();
    for _ in 0..4 {
        submitters.spawn(submit_loop(
            shared.clone(),
            bodies.clone(),
            seed,
            a.window,
            stop.clone(),
        ));
    }

    // The kills, each when its point is reached.
    let mut kills: Vec<Kill> = Vec::new();
    let mut gave_up: Option<String> = None;
    for (k, &(point, victim)) in kill_points.iter().enumerate() {
        let reached = shared
            .wait_moving(a.settle, |p| {
                p.succeeded >= point || p.terminal.len() >= a.jobs
            })
            .await;
        if !reached || shared.read(|p| p.succeeded < point) {
            gave_up = Some(format!(
                "kill {} never came: {} jobs succeeded, not {point}, and none ended for {:?}",
                k + 1,
                shared.read(|p| p.succeeded),
                a.settle
            ));
            break;
        }
        let c = &mut coords[victim];
        let (succeeded, acked) = shared.read(|p| (p.succeeded, p.n_acked));
        shared.set_url(victim, None);
        let at_ms = now_us() / 1000;
        if let Some(mut proc) = c.proc.take() {
            proc.child
                .kill()
                .await
                .context("cannot SIGKILL gantry serve")?;
        }
        let spawned = Instant::now();
        let proc = ServerProc::spawn(gantry, &c.data, &config_of(c)).await?;
        let serving_ms = spawned.elapsed().as_secs_f64() * 1000.0;
        healthy(&http, &proc.url).await?;
        let healthy_ms = spawned.elapsed().as_secs_f64() * 1000.0;
        shared.set_url(victim, Some(proc.url.clone()));
        c.proc = Some(proc);
        eprintln!(
            "chaos: kill {} of {}: {succeeded} succeeded, {acked} acknowledged; serving again in {healthy_ms:.0} ms",
            k + 1,
            c.id
        );
        kills.push(Kill {
            coordinator: c.id.clone(),
            at_ms,
            succeeded,
            acked,
            serving_ms,
            healthy_ms,
            ready_ms: now_us() / 1000,
        });
    }

    // Then every job acknowledged, and every one terminal within the bound.
    let mut last_ack_ms = None;
    let mut settled_ms = None;
    if gave_up.is_none() {
        let all_acked = shared.wait_moving(a.settle, |p| p.n_acked >= a.jobs).await;
        if !all_acked {
            gave_up = Some(format!(
                "only {} of {} jobs acknowledged: the run stopped moving for {:?}",
                shared.read(|p| p.n_acked),
                a.jobs,
                a.settle
            ));
        }
    }
    while !submitters.is_empty() {
        if gave_up.is_some() {
            stop.cancel();
        }
        match submitters.join_next().await {
            Some(Ok(Ok(()))) | None => {}
            Some(Ok(Err(e))) => return Err(e),
            Some(Err(e)) => bail!("a submitter panicked: {e}"),
        }
    }
    if gave_up.is_none() {
        let last_ack = shared.read(|p| {
            p.acked
                .iter()
                .flatten()
                .map(|a| a.at_us / 1000)
                .max()
                .unwrap_or(0)
        });
        let from = kills.iter().map(|k| k.ready_ms).fold(last_ack, i64::max);
        last_ack_ms = Some(last_ack);
        let left = Duration::from_millis(
            (a.settle.as_millis() as i64 - (now_us() / 1000 - from)).max(0) as u64,
        );
        if shared
            .wait_until(Instant::now() + left, |p| p.terminal.len() >= a.jobs)
            .await
        {
            settled_ms = Some(now_us() / 1000 - from);
        }
    }
    let wall_s = started.elapsed().as_secs_f64();
    // Nothing of gantry's is left on a backend once every job ended: each prompt it gave
    // up on is stopped and drained (no fault here ignores an interrupt).
    let left_on_backends = if settled_ms.is_some() {
        left_on(&http, &sims.urls).await
    } else {
        Vec::new()
    };

    // The follower reads on to the last event any coordinator reports, so its record
    // can be compared with the store's.
    let mut last_seq = 0;
    for url in shared.live_urls() {
        let state: Value = http
            .get(format!("{url}/v1/state"))
            .send()
            .await?
            .json()
            .await?;
        last_seq = last_seq.max(state["seq"].as_i64().unwrap_or(0));
    }
    let caught_up = shared
        .wait_until(Instant::now() + Duration::from_secs(60), |p| {
            p.seqs.last().copied().unwrap_or(0) >= last_seq
        })
        .await;
    stop.cancel();
    follower.await.context("the follower panicked")?;
    // The follower held the operator's only sender: it ends with it.
    let mends = operator.await.context("the operator panicked")?;
    for c in &mut coords {
        if let Some(proc) = c.proc.take() {
            proc.interrupt().await?;
        }
    }
    drop(sims);

    // With several coordinators, no two ever drove one backend under one lease.
    let mut claims = None;
    let store: Arc<dyn Store> = match &schema {
        Some(s) => {
            let pg = gantry_store::PgStore::open(&s.url).await?;
            claims = Some(gantry_store::testing::check_dispatch_log(
                &pg.dispatch_log().await?,
            ));
            Arc::new(pg)
        }
        None => Arc::new(gantry_store::SqliteStore::open(&coords[0].data).await?),
    };
    let progress = std::mem::take(&mut *shared.progress.lock().unwrap_or_else(|e| e.into_inner()));
    let verdict = check(
        store.as_ref(),
        &plans,
        &progress,
        &kills,
        limit_ms,
        last_seq,
        caught_up,
        &left_on_backends,
    )
    .await?;
    drop(store);
    drop(schema);

    Ok(report::results(
        Ran {
            options: &a,
            seed,
            n_coord,
            limit_ms,
            plans: &plans,
            kills: &kills,
            progress: &progress,
            gave_up,
            claims,
            settled_ms,
            last_ack_ms,
            wall_s,
            mends,
        },
        verdict,
    ))
}
