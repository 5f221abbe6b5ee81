//! The loops of a coordinator in a farm: `lease_loop` (its share of the backends' leases,
//! a driver for each lease gained) and `tail_loop` (every coordinator's events onto the
//! local bus, and what another coordinator's change asks of this one).

use gantry_core::{EventKind, JobState};
use gantry_store::{Event, Store};
use std::time::Duration;

use super::Cluster;
use crate::bus::BusEvent;
use crate::engine::Engine;

/// The backends this coordinator should drive: its share, rounded up.
fn fair_share(n_backends: usize, n_live: usize) -> usize {
    n_backends.div_ceil(n_live.max(1))
}

/// Keep this coordinator's leases: renew, take its share, give back extras.
pub async fn lease_loop(engine: Engine) {
    let Some(cluster) = engine.cluster() else {
        return;
    };
    let every = cluster.lease / 3;
    loop {
        // Backends another coordinator added at run time join the ones to lease.
        match cluster.store.added_backends().await {
            Ok(added) => {
                for b in added {
                    let Some(mut config) = crate::config::BackendConfig::added(&b) else {
                        continue;
                    };
                    if config.url.starts_with(crate::config::AGENT_SCHEME) {
                        if engine.backends().contains_key(&config.name) {
                            continue;
                        }
                        // An agent another coordinator registered: this one gets a
                        // listener too, in case the agent links here later.
                        let id = crate::agents::stored_id(&config.url);
                        match engine
                            .agents()
                            .reserve(&config.name, id, engine.shutdown_token())
                            .await
                        {
                            Ok(url) => config.url = url,
                            Err(e) => {
                                tracing::warn!(agent = %config.name, error = %e, "no listener for an agent");
                                continue;
                            }
                        }
                    }
                    engine.add_backend(config);
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot read the backends added at run time"),
        }
        let names: Vec<String> = engine.backends().keys().cloned().collect();
        let wake = match lease_pass(&engine, cluster, &names).await {
            Ok(wake) => wake,
            Err(e) => {
                tracing::warn!(error = %e, "lease pass failed: the store is unreachable");
                every
            }
        };
        tokio::select! {
            _ = engine.shutdown_token().cancelled() => break,
            _ = cluster.check.notified() => {}
            _ = tokio::time::sleep(wake.min(every)) => {}
        }
    }
    // Leaving: stop every driver and hand the backends over at once.
    let owned: Vec<(String, i64)> = engine.owned_leases();
    for (name, token) in owned {
        lose(&engine, &name).await;
        if let Err(e) = cluster
            .leases
            .release_lease(&name, &cluster.id, token)
            .await
        {
            tracing::warn!(backend = %name, token, error = %e, "lease not given back: another coordinator takes the backend once it expires");
        }
    }
    if let Err(e) = cluster.leases.leave(&cluster.id).await {
        tracing::warn!(error = %e, "leaving not recorded: the others rebalance once this coordinator's heartbeat expires");
    }
}

/// One pass; answers how soon the next is worth making (a lease this coordinator wants
/// expires then).
async fn lease_pass(
    engine: &Engine,
    cluster: &Cluster,
    names: &[String],
) -> gantry_store::Result<Duration> {
    let live = cluster.leases.heartbeat(&cluster.id, cluster.lease).await?;
    // Agents' backends are not shared out: each is leased by the coordinator it links to.
    let (agents, names): (Vec<String>, Vec<String>) = {
        let backends = engine.backends();
        names
            .iter()
            .cloned()
            .partition(|n| backends.get(n).is_some_and(|b| b.agent))
    };
    let share = fair_share(names.len(), live.len());
    for (name, token) in engine.owned_leases() {
        if !cluster
            .leases
            .renew_lease(&name, &cluster.id, token, cluster.lease)
            .await?
        {
            tracing::warn!(backend = %name, token, "lease lost: this coordinator stops driving it");
            lose(engine, &name).await;
        }
    }
    for name in &agents {
        let linked = engine.agents().is_linked(name);
        if engine.leases_backend(name) {
            // Unlinked here and idle: free for the coordinator the agent links to now.
            // While an attempt is on it, its driver stays to see it through.
            let idle_lease = engine
                .backends()
                .get(name)
                .filter(|b| b.current.is_none() && b.next.is_none())
                .and_then(|b| b.lease);
            if !linked {
                if let Some(token) = idle_lease {
                    tracing::info!(agent = %name, "agent not linked here: its lease goes back");
                    lose(engine, name).await;
                    cluster
                        .leases
                        .release_lease(name, &cluster.id, token)
                        .await?;
                }
            }
        } else if linked {
            // Refused while another coordinator still sees an attempt through there;
            // the next pass asks again.
            if let Some(token) = cluster
                .leases
                .acquire_lease(name, &cluster.id, cluster.lease)
                .await?
            {
                tracing::info!(agent = %name, token, "agent linked here: driving it");
                gain(engine, name, token).await?;
            }
        }
    }
    let mut owned = {
        let backends = engine.backends();
        names
            .iter()
            .filter(|n| backends.get(*n).is_some_and(|b| b.lease.is_some()))
            .count()
    };
    // Extras go back, idle backends first, so a newcomer gets its share.
    while owned > share {
        let Some((name, token)) = engine.lease_to_give_back() else {
            break;
        };
        tracing::info!(backend = %name, share, "giving a lease back to rebalance");
        lose(engine, &name).await;
        cluster
            .leases
            .release_lease(&name, &cluster.id, token)
            .await?;
        owned -= 1;
    }
    let mut wake = cluster.lease / 3;
    if owned < share {
        // Start from a place that differs per coordinator, so several starting together
        // do not all race for the same backends.
        let me = live.iter().position(|c| *c == cluster.id).unwrap_or(0);
        let start = (me * names.len()) / live.len().max(1);
        for i in 0..names.len() {
            if owned >= share {
                break;
            }
            let name = &names[(start + i) % names.len()];
            if engine.leases_backend(name) {
                continue;
            }
            if let Some(token) = cluster
                .leases
                .acquire_lease(name, &cluster.id, cluster.lease)
                .await?
            {
                tracing::info!(backend = %name, token, "lease taken: driving this backend");
                gain(engine, name, token).await?;
                owned += 1;
            }
        }
        if owned < share {
            // Try again the moment the first lease held elsewhere expires.
            let soonest = cluster
                .leases
                .leases()
                .await?
                .iter()
                .filter(|l| l.owner.as_deref() != Some(cluster.id.as_str()))
                .map(|l| l.remaining_ms.max(0) as u64)
                .min();
            if let Some(ms) = soonest {
                wake = wake.min(Duration::from_millis(ms + 1));
            }
        }
    }
    Ok(wake)
}

/// Start driving `name` under lease `token`: the attempts the store says run there are
/// handed to a new driver before it connects.
async fn gain(engine: &Engine, name: &str, token: i64) -> gantry_store::Result<()> {
    let Some(cluster) = engine.cluster() else {
        return Ok(());
    };
    let rx = engine.take_backend(name, token);
    let running = engine.store().running_jobs().await?;
    engine.recover_on(name, running).await;
    let Some(kind) = engine.kind_of(name) else {
        return Ok(());
    };
    let stop = engine.shutdown_token().child_token();
    let handle = crate::backend::spawn(engine.clone(), name.to_owned(), kind, rx, stop.clone());
    cluster
        .drivers
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(name.to_owned(), (stop, handle));
    engine.wake_scheduler();
    Ok(())
}

/// Stop driving `name`: its driver ends without touching the backend, whose prompts the
/// next owner adopts.
async fn lose(engine: &Engine, name: &str) {
    let Some(cluster) = engine.cluster() else {
        return;
    };
    // The driver first: a write it has in flight still carries the lease's token (and
    // lands if the lease still holds), then the backend is forgotten here.
    let driver = cluster
        .drivers
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(name);
    if let Some((stop, handle)) = driver {
        stop.cancel();
        if let Err(e) = handle.await {
            tracing::error!(backend = %name, error = %e, "the backend's driver ended abnormally");
        }
    }
    engine.drop_backend(name);
}

/// Publish every committed event in sequence, and act on those of other coordinators.
pub async fn tail_loop(engine: Engine) {
    let Some(cluster) = engine.cluster() else {
        return;
    };
    let mut last = loop {
        match cluster.store.last_seq().await {
            Ok(seq) => break seq,
            Err(e) => {
                tracing::warn!(error = %e, "event tail: cannot read the store");
                tokio::select! {
                    _ = engine.shutdown_token().cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    };
    let mut listener = None;
    loop {
        if listener.is_none() {
            listener = cluster.store.listen().await.ok();
        }
        loop {
            let page = match cluster.store.events_since(last, 1000).await {
                Ok(page) => page,
                Err(e) => {
                    tracing::warn!(error = %e, "event tail: cannot read the store");
                    break;
                }
            };
            for event in &page {
                last = event.seq;
                engine.bus().publish(BusEvent::persisted(event.clone()));
                if !cluster.was_local(event.seq) {
                    remote(&engine, event).await;
                }
            }
            if page.len() < 1000 {
                break;
            }
        }
        let woken = async {
            match listener.as_mut() {
                Some(l) => l.recv().await.map(|_| ()),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = engine.shutdown_token().cancelled() => return,
            r = woken => if r.is_err() { listener = None },
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// What another coordinator's event asks of this one.
async fn remote(engine: &Engine, event: &Event) {
    let affects_queue = event.state == JobState::Queued || engine.is_queued_here(&event.job_id);
    let stops =
        event.state.is_terminal() || matches!(event.kind, EventKind::CancelRequested { .. });
    let stops_here = stops && engine.runs_here(&event.job_id);
    if !affects_queue && !stops_here {
        return;
    }
    let job = match engine.store().job(&event.job_id).await {
        Ok(Some(job)) => job,
        Ok(None) => return,
        Err(e) => {
            tracing::warn!(job_id = %event.job_id, error = %e, "event tail: cannot read a job");
            return;
        }
    };
    engine.note_queued(&job);
    if stops {
        engine.stop_here(&job);
    }
}

#[cfg(test)]
mod tests {
    use super::fair_share;

    #[test]
    fn shares_round_up_so_every_backend_has_a_taker() {
        assert_eq!(fair_share(8, 3), 3);
        assert_eq!(fair_share(8, 1), 8);
        assert_eq!(fair_share(8, 0), 8);
        assert_eq!(fair_share(2, 3), 1);
        assert_eq!(fair_share(0, 3), 0);
    }
}
