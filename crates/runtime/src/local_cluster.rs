//! A cluster on this machine, started from a program: an in-process scheduler and worker
//! *processes* — like Dask's `LocalCluster`.
//!
//! Workers are started from a program that knows the functions the graphs call: by default the
//! current executable. Such a program calls [`run_worker_if_requested`] at the start of `main`
//! (after registering its functions): in a process started as a worker it runs the worker and
//! exits; otherwise it returns at once. That is also how a user's own binary becomes a worker
//! for `rask scheduler` (set `RASK_WORKER_SCHEDULER`), with its registered functions available.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use crate::{BlockingClient, ClientError, SchedulerConfig, SchedulerHandle, WorkerConfig, start_scheduler};

/// Environment variable naming the scheduler a process started as a worker connects to.
pub const ENV_SCHEDULER: &str = "RASK_WORKER_SCHEDULER";
/// Environment variable with the worker's name.
pub const ENV_NAME: &str = "RASK_WORKER_NAME";
/// Environment variable with the worker's thread count.
pub const ENV_NTHREADS: &str = "RASK_WORKER_NTHREADS";
/// Environment variable with the worker's resources (`NAME=AMOUNT,...`).
pub const ENV_RESOURCES: &str = "RASK_WORKER_RESOURCES";

/// If this process was started as a worker (the [`ENV_SCHEDULER`] variable is set), runs a
/// worker with the process-wide function registry until the scheduler goes away, then exits
/// the process. Otherwise returns immediately. Call it at the start of `main`, after
/// registering functions.
pub fn run_worker_if_requested() {
    let Ok(scheduler) = std::env::var(ENV_SCHEDULER) else { return };
    let name = std::env::var(ENV_NAME).unwrap_or_else(|_| format!("worker-{}", std::process::id()));
    let nthreads = std::env::var(ENV_NTHREADS)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, std::num::NonZero::get));
    let resources = std::env::var(ENV_RESOURCES)
        .unwrap_or_default()
        .split(',')
        .filter_map(|p| {
            let (n, a) = p.split_once('=')?;
            Some((n.trim().to_owned(), a.trim().parse().ok()?))
        })
        .collect();
    let cfg = WorkerConfig {
        scheduler,
        name: name.clone(),
        nthreads,
        resources,
        memory_limit: None,
        workers_in_process: 1,
        host: "127.0.0.1".into(),
        registry: rask_ops::global(),
        zero_work: false,
        restarted_after: None,
        stats: None,
    };
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("rask worker {name}: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    let code = match rt.block_on(crate::run_worker(cfg, Arc::new(AtomicBool::new(false)))) {
        Ok(_) => 0,
        Err(e) => {
            eprintln!("rask worker {name}: {e}");
            1
        }
    };
    std::process::exit(code);
}

/// Shape of a [`LocalCluster`].
#[derive(Clone, Debug)]
pub struct LocalClusterConfig {
    /// Worker processes.
    pub n_workers: usize,
    /// Threads per worker.
    pub threads_per_worker: usize,
    /// Resources each worker advertises.
    pub resources: Vec<(String, f64)>,
    /// Program to start workers from (default: the current executable, which must call
    /// [`run_worker_if_requested`]).
    pub program: Option<PathBuf>,
    /// How long to wait for every worker to join.
    pub startup_timeout: Duration,
    /// Where the scheduler publishes what happens (for a dashboard or a journal), if anywhere.
    pub feed: Option<crate::feed::FeedSender>,
}

impl Default for LocalClusterConfig {
    fn default() -> Self {
        LocalClusterConfig {
            n_workers: 2,
            threads_per_worker: 1,
            resources: Vec::new(),
            program: None,
            startup_timeout: Duration::from_secs(30),
            feed: None,
        }
    }
}

/// Why a local cluster could not start.
#[derive(Debug, thiserror::Error)]
pub enum LocalClusterError {
    /// The scheduler could not start.
    #[error("cannot start the scheduler: {0}")]
    Scheduler(String),
    /// A worker process could not be started.
    #[error("cannot start worker process {program}: {error}")]
    Spawn {
        /// The program.
        program: String,
        /// The OS error.
        error: String,
    },
    /// Workers did not join in time.
    #[error(
        "only {joined} of {wanted} workers joined within {secs} s (does the worker program call run_worker_if_requested?)"
    )]
    Startup {
        /// Joined.
        joined: usize,
        /// Started.
        wanted: usize,
        /// Waited.
        secs: u64,
    },
}

/// A scheduler in this process and worker processes on this machine; stopped on drop.
pub struct LocalCluster {
    address: String,
    rt: tokio::runtime::Runtime,
    scheduler: Option<SchedulerHandle>,
    workers: Vec<Child>,
}

impl LocalCluster {
    /// Starts the scheduler and workers and waits until every worker has joined.
    ///
    /// # Errors
    /// See [`LocalClusterError`].
    pub fn start(cfg: &LocalClusterConfig) -> Result<Self, LocalClusterError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("rask-local-cluster")
            .enable_all()
            .build()
            .map_err(|e| LocalClusterError::Scheduler(e.to_string()))?;
        let sched_cfg = SchedulerConfig { port: 0, feed: cfg.feed.clone(), ..SchedulerConfig::default() };
        let handle =
            rt.block_on(start_scheduler(sched_cfg)).map_err(|e| LocalClusterError::Scheduler(e.to_string()))?;
        let address = handle.address.clone();
        let program = match &cfg.program {
            Some(p) => p.clone(),
            None => std::env::current_exe()
                .map_err(|e| LocalClusterError::Spawn { program: "current executable".into(), error: e.to_string() })?,
        };
        let resources = cfg.resources.iter().map(|(n, a)| format!("{n}={a}")).collect::<Vec<_>>().join(",");
        let mut cluster = LocalCluster { address, rt, scheduler: Some(handle), workers: Vec::new() };
        // The workers use this process's TLS files (the scheduler here already does).
        let tls = rask_protocol::tls::process_tls().map_err(|e| LocalClusterError::Scheduler(e.to_string()))?;
        let tls_env: Vec<(&str, std::path::PathBuf)> =
            tls.iter().flat_map(|t| t.files().env()).map(|(k, v)| (k, v.to_path_buf())).collect();
        for i in 0..cfg.n_workers {
            let child = Command::new(&program)
                .envs(tls_env.iter().map(|(k, v)| (k, v)))
                .env(ENV_SCHEDULER, &cluster.address)
                .env(ENV_NAME, format!("local-{i}"))
                .env(ENV_NTHREADS, cfg.threads_per_worker.to_string())
                .env(ENV_RESOURCES, &resources)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .spawn()
                .map_err(|e| LocalClusterError::Spawn {
                    program: program.display().to_string(),
                    error: e.to_string(),
                })?;
            cluster.workers.push(child);
        }
        let deadline = Instant::now() + cfg.startup_timeout;
        loop {
            let joined = cluster.scheduler.as_ref().map_or(0, SchedulerHandle::workers);
            if joined >= cfg.n_workers {
                return Ok(cluster);
            }
            if Instant::now() > deadline {
                return Err(LocalClusterError::Startup {
                    joined,
                    wanted: cfg.n_workers,
                    secs: cfg.startup_timeout.as_secs(),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The scheduler's address.
    #[must_use]
    pub fn address(&self) -> &str {
        &self.address
    }

    /// A blocking client connected to this cluster.
    ///
    /// # Errors
    /// See [`BlockingClient::connect`].
    pub fn client(&self) -> Result<BlockingClient, ClientError> {
        BlockingClient::connect(&self.address)
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        if let Some(h) = self.scheduler.take() {
            self.rt.block_on(h.shutdown("the local cluster is closing"));
        }
        for w in &mut self.workers {
            // Workers exit on the scheduler's goodbye; make sure of it.
            let deadline = Instant::now() + Duration::from_secs(2);
            while w.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = w.kill();
            let _ = w.wait();
        }
    }
}
