//! gantry's server: the v1 HTTP API, the monitor page and the engine's followers
//! (webhooks, metrics, the backends' feed) on top of `gantry-engine`. `Server::start`
//! opens the store, starts the engine and serves it all on one listener until the
//! shutdown token fires.

pub mod api;
pub mod auth;
pub mod callbacks;
pub mod metrics;
pub mod monitor;
pub mod ui;

// The engine's modules, under the names the server's code and its tests have used.
pub use gantry_engine::{agents, backend, bus, clock, cluster, config, engine, hooks, outputs};

use gantry_store::{PgStore, SqliteStore, Store};
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

pub use config::{BackendConfig, Config, StoreConfig};
pub use engine::Engine;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot create the data dir {path}: {source}")]
    DataDir {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] gantry_store::Error),
    #[error(transparent)]
    Engine(#[from] engine::Error),
    #[error(transparent)]
    Config(#[from] config::Error),
    #[error(
        "refusing to serve on {addr}, which is not a loopback address, while no API token exists: anyone who reaches it could submit, cancel and drain. Create one first (gantry token create --scope admin, with this server's --data-dir or --store), or pass --insecure to serve it open"
    )]
    Insecure { addr: SocketAddr },
}

/// A running server.
pub struct Server {
    pub addr: SocketAddr,
    pub engine: Engine,
    /// The API's tokens (whether it asks for one, and checking them).
    pub auth: Arc<auth::Auth>,
    shutdown: CancellationToken,
    tasks: JoinSet<()>,
}

impl Server {
    /// Open the store in the data dir, start the engine and serve the API on
    /// `config.listen` (port 0 picks a free port; see `addr`).
    pub async fn start(config: Config) -> Result<Server, Error> {
        config.validate()?;
        std::fs::create_dir_all(&config.data_dir).map_err(|source| Error::DataDir {
            path: config.data_dir.clone(),
            source,
        })?;
        let (store, cluster): (Arc<dyn Store>, _) = match &config.store {
            config::StoreConfig::Embedded => {
                (Arc::new(SqliteStore::open(&config.data_dir).await?), None)
            }
            config::StoreConfig::Postgres(url) => {
                let pg = Arc::new(PgStore::open(url).await?);
                let id = config.coordinator.clone().unwrap_or_else(|| {
                    format!(
                        "gantry-{}",
                        &uuid::Uuid::new_v4().simple().to_string()[..12]
                    )
                });
                let cluster = cluster::Cluster::new(pg.clone(), id, config.lease);
                (pg as Arc<dyn Store>, Some(cluster))
            }
        };
        if !config.listen.ip().is_loopback()
            && !config.insecure
            && store.active_tokens().await? == 0
        {
            return Err(Error::Insecure {
                addr: config.listen,
            });
        }
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|source| Error::Listen {
                addr: config.listen,
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| Error::Listen {
            addr: config.listen,
            source,
        })?;
        // Backends added at run time before (a name in the config wins).
        let mut config = config;
        // Callbacks name outputs by absolute URL: this server's, unless told otherwise.
        if config.public_url.is_none() {
            config.public_url = Some(format!("http://{addr}"));
        }
        for b in store.added_backends().await? {
            if config.backends.iter().any(|c| c.name == b.name) {
                tracing::warn!(backend = %b.name, "a backend added at run time has the name of a configured one; the configured one is used");
                continue;
            }
            config.backends.extend(BackendConfig::added(&b));
        }
        let shutdown = CancellationToken::new();
        let mut tasks = JoinSet::new();
        let auth = Arc::new(auth::Auth::new(store.clone()).await?);
        let engine =
            Engine::start_with(config, store, cluster, shutdown.clone(), &mut tasks).await?;
        let metrics = Arc::new(metrics::Metrics::default());
        {
            let (a, stop) = (auth.clone(), shutdown.clone());
            tasks.spawn(async move { a.refresh_loop(stop).await });
            let (e, m) = (engine.clone(), metrics.clone());
            tasks.spawn(async move { metrics::follow(e, m).await });
            let e = engine.clone();
            tasks.spawn(async move { monitor::backend_feed(e).await });
            if let Some(notices) = engine.take_notices() {
                let e = engine.clone();
                let base_url = e.config().public_url.clone().unwrap_or_default();
                tasks.spawn(async move { callbacks::run(e, notices, base_url).await });
            }
        }
        let app = api::router(api::App {
            engine: engine.clone(),
            auth: auth.clone(),
            metrics,
        });
        let stop = shutdown.clone();
        tasks.spawn(async move {
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "http server failed");
            }
        });
        tracing::info!(%addr, "gantry serving");
        Ok(Server {
            addr,
            engine,
            auth,
            shutdown,
            tasks,
        })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stop accepting work, close backend sockets and wait for every task.
    pub async fn shutdown(mut self) {
        self.shutdown.cancel();
        while self.tasks.join_next().await.is_some() {}
        self.engine.join_late().await;
    }
}
