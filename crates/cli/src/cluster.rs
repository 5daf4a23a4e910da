//! `rask scheduler` and `rask worker`: the processes of a distributed cluster.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rask_runtime::{SchedulerConfig, WorkerConfig, WorkerExit, run_worker, start_scheduler};

use crate::run::{parse_resources, parse_size};

/// Arguments of `rask scheduler`.
#[derive(clap::Args)]
pub(crate) struct SchedulerArgs {
    /// Interface to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on (0: any free port).
    #[arg(long, default_value_t = 8786)]
    port: u16,
    /// Also write the address to this file (workers and clients can read it).
    #[arg(long, value_name = "FILE")]
    scheduler_file: Option<PathBuf>,
    /// Shared token every client and worker must prove they know (else the `RASK_TOKEN`
    /// environment variable; none: anyone who can reach the port may connect).
    #[arg(long, value_name = "TOKEN", value_parser = crate::run::token_arg)]
    token: Option<String>,
    /// Remove a worker not heard from for this many seconds (workers send heartbeats several
    /// times a second); its tasks move to other workers. 0: never.
    #[arg(long, value_name = "SECS", default_value_t = 30.0)]
    worker_ttl: f64,
    #[command(flatten)]
    tls: crate::security::TlsArgs,
    /// Port of the web dashboard, on the scheduler's --host [default: 8787, or any free port
    /// when that one is taken; printed]. 0 turns it off.
    #[arg(long, value_name = "PORT")]
    dashboard_port: Option<u16>,
    /// Interface of the dashboard [default: the scheduler's --host; 127.0.0.1 when the cluster
    /// uses TLS or a token, since the dashboard itself has neither].
    #[arg(long, value_name = "HOST")]
    dashboard_host: Option<String>,
    /// Write every published event (task state changes, runs, workers) to this file, one JSON
    /// object per line; `rask dashboard --replay FILE` shows it after the run.
    #[arg(long, value_name = "FILE")]
    journal: Option<PathBuf>,
}

use crate::dashboard::DASHBOARD_PORT;

/// Starts the dashboard (and journal) the scheduler arguments ask for; `None` when neither is
/// wanted. Returns the feed to attach to the scheduler.
fn start_dashboard(
    args: &SchedulerArgs,
) -> Result<Option<(rask_dashboard::Dashboard, rask_runtime::feed::FeedSender)>, String> {
    let port = args.dashboard_port.unwrap_or(DASHBOARD_PORT);
    if port == 0 && args.journal.is_none() {
        return Ok(None);
    }
    // A secured cluster keeps its dashboard (plain HTTP, no authentication) on this machine
    // unless told otherwise.
    let secured = rask_protocol::handshake::process_token().is_some()
        || rask_protocol::tls::process_tls().map_err(|e| e.to_string())?.is_some();
    let host = match (&args.dashboard_host, secured) {
        (Some(h), _) => h.as_str(),
        (None, true) => "127.0.0.1",
        (None, false) => args.host.as_str(),
    };
    let listen = if port == 0 { None } else { Some(crate::dashboard::resolve(host, port)?) };
    crate::dashboard::observe(listen, args.dashboard_port.is_none(), args.journal.clone()).map(Some)
}

/// Arguments of `rask worker`.
#[derive(clap::Args)]
pub(crate) struct WorkerArgs {
    /// Scheduler address, tcp://HOST:PORT (or tls://HOST:PORT).
    #[arg(required_unless_present = "scheduler_file")]
    address: Option<String>,
    /// Read the scheduler address from this file (waits for it to appear).
    #[arg(long, value_name = "FILE", conflicts_with = "address")]
    scheduler_file: Option<PathBuf>,
    /// Threads per worker [default: number of cores].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=4096))]
    nthreads: Option<u32>,
    /// Workers to start in this process.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=256))]
    nworkers: u32,
    /// Memory limit per worker (e.g. 4GiB); reported to the scheduler.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    memory_limit: Option<u64>,
    /// Resources each worker advertises, e.g. `GPU=1,MEM=4`.
    #[arg(long, value_name = "NAME=AMOUNT,...", value_parser = parse_resources)]
    resources: Option<BTreeMap<String, f64>>,
    /// Worker name (with --nworkers K, NAME-0 ... NAME-(K-1)).
    #[arg(long)]
    name: Option<String>,
    /// Interface for the worker's data port.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// How long to keep trying to reach the scheduler (at start and after losing it), seconds.
    #[arg(long, default_value_t = 10.0)]
    reconnect_timeout: f64,
    /// Benchmark only: finish every task instantly without running it (measures the scheduler).
    #[arg(long, hide = true)]
    zero_work: bool,
    /// Run the workers in this process instead of supervised child processes that are
    /// restarted when they crash (the default, like Dask's nanny).
    #[arg(long)]
    no_nanny: bool,
    /// Serve each worker's `/metrics` (Prometheus text: memory, CPU, spill and transfer bytes,
    /// tasks) and `/health` over HTTP on this port of --host; with --nworkers K, ports P to
    /// P+K-1. 0: any free port (printed). Off unless given.
    #[arg(long, value_name = "PORT")]
    metrics_port: Option<u16>,
    /// The cluster's shared token (else the `RASK_TOKEN` environment variable); also required
    /// from peers fetching data from this worker.
    #[arg(long, value_name = "TOKEN", value_parser = crate::run::token_arg)]
    token: Option<String>,
    #[command(flatten)]
    tls: crate::security::TlsArgs,
}

/// The scheduler and worker shells run on one async thread: their state lives in one task
/// anyway, and keeping every hand-off on the same thread saves a cross-thread wake-up per
/// message (the worker's task execution has its own threads).
fn runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| {
        eprintln!("rask: cannot start the async runtime: {e}");
        ExitCode::FAILURE
    })
}

/// Resolves on SIGINT or SIGTERM, naming the signal.
pub(crate) async fn signalled() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    match (signal(SignalKind::interrupt()), signal(SignalKind::terminate())) {
        (Ok(mut int), Ok(mut term)) => tokio::select! {
            _ = int.recv() => "SIGINT",
            _ = term.recv() => "SIGTERM",
        },
        _ => std::future::pending().await,
    }
}

pub(crate) fn scheduler(args: &SchedulerArgs) -> ExitCode {
    if let Err(code) = args.tls.apply("rask scheduler") {
        return code;
    }
    if let Some(t) = &args.token {
        rask_protocol::handshake::set_process_token(rask_protocol::handshake::Token::new(t));
    }
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let dashboard = match start_dashboard(args) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("rask scheduler: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async {
        let mut cfg = SchedulerConfig { host: args.host.clone(), port: args.port, ..SchedulerConfig::default() };
        cfg.core.worker_ttl_us = (args.worker_ttl > 0.0).then_some((args.worker_ttl * 1e6) as u64);
        cfg.feed = dashboard.as_ref().map(|(_, feed)| feed.clone());
        let handle = match start_scheduler(cfg).await {
            Ok(h) => h,
            Err(e) => {
                eprintln!("rask scheduler: {e}");
                return ExitCode::FAILURE;
            }
        };
        println!("{}", handle.address);
        use std::io::Write;
        let _ = std::io::stdout().flush();
        if let Some(f) = &args.scheduler_file {
            if let Err(e) = write_atomically(f, &format!("{}\n", handle.address)) {
                eprintln!("rask scheduler: cannot write {}: {e}", f.display());
                return ExitCode::FAILURE;
            }
        }
        eprintln!("rask scheduler: listening at {}", handle.address);
        let dashboard = dashboard.map(|(d, _)| d);
        if let Some(a) = dashboard.as_ref().and_then(|d| d.address) {
            eprintln!("rask scheduler: dashboard at http://{a}/");
        }
        let sig = signalled().await;
        eprintln!("rask scheduler: received {sig}, shutting down");
        handle.shutdown(&format!("the scheduler received {sig}")).await;
        if let Some(d) = &dashboard {
            // The feed closed with the scheduler: the journal is complete once flushed.
            if let Err(e) = d.finish(std::time::Duration::from_secs(10)) {
                eprintln!("rask scheduler: {e}");
            }
        }
        if let Some(f) = &args.scheduler_file {
            let _ = std::fs::remove_file(f);
        }
        ExitCode::SUCCESS
    })
}

fn write_atomically(path: &Path, text: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(tmp, path)
}

fn read_scheduler_file(path: &Path, deadline: Instant) -> Result<String, String> {
    loop {
        match std::fs::read_to_string(path) {
            Ok(s) if !s.trim().is_empty() => return Ok(s.trim().to_owned()),
            _ if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(100)),
            Ok(_) => return Err(format!("{} is empty", path.display())),
            Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
        }
    }
}

/// The `rask worker ... --no-nanny` arguments of each supervised worker process.
/// Starts a worker's metrics server on `host:port`: the figures it shows, and where it serves.
fn serve_metrics(
    host: &str,
    port: u16,
) -> Result<(Arc<std::sync::Mutex<rask_runtime::WorkerStats>>, std::net::SocketAddr), String> {
    let addr = crate::dashboard::resolve(host, port)?;
    let stats = Arc::new(std::sync::Mutex::new(rask_runtime::WorkerStats::default()));
    let at = rask_dashboard::worker_metrics::serve(addr, Arc::clone(&stats)).map_err(|e| e.to_string())?;
    Ok((stats, at))
}

/// The metrics port of the `i`-th worker when the first gets `base` (0: any free port for all).
fn metrics_port(base: u16, i: u32) -> u16 {
    if base == 0 { 0 } else { base.saturating_add(u16::try_from(i).unwrap_or(u16::MAX)) }
}

fn child_commands(args: &WorkerArgs, address: &str) -> Vec<(String, Vec<String>)> {
    let base = args.name.clone().unwrap_or_else(|| format!("worker-{}", std::process::id()));
    (0..args.nworkers)
        .map(|i| {
            let name = if args.nworkers == 1 { base.clone() } else { format!("{base}-{i}") };
            let mut a = vec![address.to_owned(), "--no-nanny".into(), "--name".into(), name.clone()];
            a.extend(["--host".into(), args.host.clone()]);
            a.extend(["--reconnect-timeout".into(), args.reconnect_timeout.to_string()]);
            if let Some(n) = args.nthreads {
                a.extend(["--nthreads".into(), n.to_string()]);
            }
            if let Some(m) = args.memory_limit {
                a.extend(["--memory-limit".into(), m.to_string()]);
            }
            if let Some(r) = &args.resources {
                let list: Vec<String> = r.iter().map(|(k, v)| format!("{k}={v}")).collect();
                a.extend(["--resources".into(), list.join(",")]);
            }
            if args.zero_work {
                a.push("--zero-work".into());
            }
            if let Some(p) = args.metrics_port {
                a.extend(["--metrics-port".into(), metrics_port(p, i).to_string()]);
            }
            (name, a)
        })
        .collect()
}

pub(crate) fn worker(args: &WorkerArgs) -> ExitCode {
    let patience = Duration::from_secs_f64(args.reconnect_timeout.max(0.0));
    let address = match (&args.address, &args.scheduler_file) {
        (Some(a), _) => a.clone(),
        (None, Some(f)) => match read_scheduler_file(f, Instant::now() + patience) {
            Ok(a) => a,
            Err(e) => {
                eprintln!("rask worker: {e}");
                return ExitCode::FAILURE;
            }
        },
        (None, None) => {
            eprintln!("rask worker: give the scheduler address or --scheduler-file");
            return ExitCode::from(2);
        }
    };
    if let Err(e) = rask_protocol::parse_address(&address) {
        eprintln!("rask worker: {e}");
        return ExitCode::from(2);
    }
    let tls = match args.tls.apply("rask worker") {
        Ok(files) => files,
        Err(code) => return code,
    };
    if !args.no_nanny {
        // The token and the TLS files reach the worker processes through their environment,
        // not their command line (which other users can read).
        let mut env: Vec<(&'static str, std::ffi::OsString)> = Vec::new();
        if let Some(t) = &args.token {
            env.push((rask_protocol::handshake::TOKEN_ENV, t.into()));
        }
        for (name, path) in tls.iter().flat_map(rask_protocol::tls::TlsFiles::env) {
            env.push((name, path.into()));
        }
        return crate::nanny::supervise(child_commands(args, &address), env, args.memory_limit);
    }
    if let Some(t) = &args.token {
        rask_protocol::handshake::set_process_token(rask_protocol::handshake::Token::new(t));
    }
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let nthreads = args
        .nthreads
        .map_or_else(|| std::thread::available_parallelism().map_or(1, std::num::NonZero::get), |n| n as usize);
    let base = args.name.clone().unwrap_or_else(|| format!("worker-{}", std::process::id()));
    let stop = Arc::new(AtomicBool::new(false));
    rt.block_on(async {
        let mut tasks = Vec::new();
        for i in 0..args.nworkers {
            let name = if args.nworkers == 1 { base.clone() } else { format!("{base}-{i}") };
            let stats = match args.metrics_port {
                Some(p) => match serve_metrics(&args.host, metrics_port(p, i)) {
                    Ok((stats, at)) => {
                        eprintln!("rask worker {name}: metrics at http://{at}/metrics");
                        Some(stats)
                    }
                    Err(e) => {
                        eprintln!("rask worker {name}: {e}");
                        return ExitCode::FAILURE;
                    }
                },
                None => None,
            };
            let cfg = WorkerConfig {
                scheduler: address.clone(),
                stats,
                name,
                nthreads,
                resources: args.resources.iter().flatten().map(|(k, v)| (k.clone(), *v)).collect(),
                memory_limit: args.memory_limit,
                workers_in_process: args.nworkers as usize,
                host: args.host.clone(),
                registry: rask_ops::global(),
                zero_work: args.zero_work,
                restarted_after: std::env::var(crate::nanny::RESTARTED_AFTER_ENV).ok(),
            };
            tasks.push(tokio::spawn(supervise(cfg, Arc::clone(&stop), patience)));
        }
        // Exit status: 0 stopped, 1 gave up on the scheduler, 101 a worker panicked (its
        // supervisor restarts it).
        let all = async {
            let mut code = 0u8;
            for t in tasks {
                code = code.max(match t.await {
                    Ok(true) => 0,
                    Ok(false) => 1,
                    Err(e) if e.is_panic() => 101,
                    Err(_) => 1,
                });
            }
            code
        };
        tokio::pin!(all);
        let code = tokio::select! {
            code = &mut all => code,
            sig = signalled() => {
                eprintln!("rask worker: received {sig}, stopping");
                stop.store(true, Ordering::Relaxed);
                all.await
            }
        };
        ExitCode::from(code)
    })
}

/// Runs one worker, reconnecting after losing the scheduler for up to `patience`.
async fn supervise(cfg: WorkerConfig, stop: Arc<AtomicBool>, patience: Duration) -> bool {
    let mut deadline = Instant::now() + patience;
    let mut last_error;
    loop {
        if stop.load(Ordering::Relaxed) {
            return true;
        }
        match run_worker(cfg.clone(), Arc::clone(&stop)).await {
            Ok(WorkerExit::Stopped) => return true,
            Ok(WorkerExit::SchedulerShutdown(reason)) => {
                eprintln!("rask worker {}: {reason}; exiting", cfg.name);
                return true;
            }
            Ok(WorkerExit::SchedulerLost(why)) => {
                eprintln!("rask worker {}: lost the scheduler at {} ({why}); reconnecting", cfg.name, cfg.scheduler);
                last_error = why;
                deadline = Instant::now() + patience;
            }
            Err(e) => last_error = e.to_string(),
        }
        if Instant::now() >= deadline {
            eprintln!(
                "rask worker {}: cannot reach the scheduler at {} ({last_error}); gave up after {:.0} s",
                cfg.name,
                cfg.scheduler,
                patience.as_secs_f64()
            );
            return false;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
