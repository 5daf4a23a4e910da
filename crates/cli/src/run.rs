//! `rask run` and `rask graph`: workflow files on the embedded local cluster.
//!
//! Exit statuses follow the workflow specification: 0 every output computed, 1 some output
//! failed (the others are still reported), 2 the file or command line is invalid (nothing ran),
//! 3 the cluster could not be used.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use rask_graph::workflow::{self, Workflow};
use rask_graph::{Executor, TaskResult, Value};
use rask_local::{LocalConfig, Progress, SyncScheduler, ThreadedScheduler};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// Arguments of `rask run`.
#[derive(clap::Args)]
pub(crate) struct RunArgs {
    /// Workflow file, or `-` for standard input.
    file: PathBuf,
    /// Print exactly one JSON object mapping each output key to its value.
    #[arg(long)]
    json: bool,
    /// Run on this cluster (tcp://HOST:PORT or tls://HOST:PORT) instead of an embedded one.
    #[arg(long, value_name = "ADDRESS")]
    scheduler: Option<String>,
    /// The cluster's shared token (else the `RASK_TOKEN` environment variable), with
    /// `--scheduler`.
    #[arg(long, value_name = "TOKEN", requires = "scheduler", value_parser = token_arg)]
    token: Option<String>,
    /// TLS for `--scheduler` (all three flags, or the `RASK_TLS_*` variables).
    #[command(flatten)]
    tls: crate::security::TlsArgs,
    /// Show the run in the web dashboard (URL printed; port 8787, or any free port when taken).
    /// The embedded cluster is then a scheduler in this process with worker processes, like
    /// `LocalCluster`, so that it has the scheduler's feed.
    #[arg(long, conflicts_with = "scheduler")]
    dashboard: bool,
    /// Port for `--dashboard`.
    #[arg(long, value_name = "PORT", requires = "dashboard")]
    dashboard_port: Option<u16>,
    /// Write a standalone HTML performance report of the run to FILE (task stream, per-prefix
    /// timings, worker memory over time; it opens offline). Runs like `--dashboard`.
    #[arg(long, value_name = "FILE", conflicts_with = "scheduler")]
    report: Option<PathBuf>,
    /// Workers of the embedded cluster (named local-0, local-1, ...).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=4096))]
    workers: u32,
    /// Threads per worker of the embedded cluster [default: number of cores].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=4096))]
    threads_per_worker: Option<u32>,
    /// Memory limit per worker (e.g. 4GiB, 512MB); must parse, enforced once memory management lands.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    memory_limit: Option<u64>,
    /// Resources each embedded worker advertises, e.g. `GPU=1,MEM=4`. Without it, each worker
    /// advertises the largest amount any single task asks for.
    #[arg(long, value_name = "NAME=AMOUNT,...", value_parser = parse_resources)]
    resources: Option<BTreeMap<String, f64>>,
    /// Use the single-threaded, deterministic scheduler (for debugging).
    #[arg(long)]
    sync: bool,
}

/// Arguments of `rask graph`.
#[derive(clap::Args)]
pub(crate) struct GraphArgs {
    /// Workflow file, or `-` for standard input.
    file: PathBuf,
}

/// Parses `4GiB`, `512MB`, `1000000`, `1.5G` into bytes.
pub(crate) fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().map_err(|_| format!("invalid size {s:?}: expected a number with an optional unit"))?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "t" | "tb" => 1e12,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        "tib" => 1024.0f64.powi(4),
        other => return Err(format!("invalid size {s:?}: unknown unit {other:?}")),
    };
    Ok((n * mult) as u64)
}

/// A `--token` value: refused when empty (an unset variable in `--token "$T"` must not
/// silently turn authentication off).
pub(crate) fn token_arg(s: &str) -> Result<String, String> {
    if s.is_empty() {
        Err("the token is empty (is the variable you meant to use set?)".into())
    } else {
        Ok(s.to_owned())
    }
}

pub(crate) fn parse_resources(s: &str) -> Result<BTreeMap<String, f64>, String> {
    let mut m = BTreeMap::new();
    for part in s.split(',').filter(|p| !p.trim().is_empty()) {
        let (name, amount) =
            part.split_once('=').ok_or_else(|| format!("invalid resource {part:?}: expected NAME=AMOUNT"))?;
        let amount: f64 = amount.trim().parse().map_err(|_| format!("invalid amount in {part:?}"))?;
        if !amount.is_finite() || amount <= 0.0 {
            return Err(format!("invalid resource {part:?}: the amount must be > 0"));
        }
        m.insert(name.trim().to_owned(), amount);
    }
    Ok(m)
}

/// Reads and validates a workflow; on failure prints the problem and returns exit status 2.
fn load(file: &PathBuf) -> Result<Workflow, ExitCode> {
    let name = file.display().to_string();
    let mut text = String::new();
    let read = if name == "-" {
        std::io::stdin().read_to_string(&mut text).map(|_| ())
    } else {
        std::fs::File::open(file).and_then(|mut f| f.read_to_string(&mut text)).map(|_| ())
    };
    if let Err(e) = read {
        eprintln!("rask: cannot read {name}: {e}");
        return Err(ExitCode::from(2));
    }
    let registry = rask_ops::global();
    workflow::parse(&text, &*registry).map_err(|e| {
        match e {
            workflow::WorkflowError::Syntax { .. } => eprintln!("rask: {name}: {e}"),
            workflow::WorkflowError::Invalid(problems) => {
                eprintln!("rask: {name}: invalid workflow:");
                for p in problems {
                    eprintln!("  {p}");
                }
            }
        }
        ExitCode::from(2)
    })
}

pub(crate) fn graph(args: &GraphArgs) -> ExitCode {
    match load(&args.file) {
        Ok(w) => {
            print!("{}", rask_graph::to_dot(&w.graph));
            ExitCode::SUCCESS
        }
        Err(code) => code,
    }
}

pub(crate) fn run(args: &RunArgs) -> ExitCode {
    let w = match load(&args.file) {
        Ok(w) => w,
        Err(code) => return code,
    };
    if let Some(t) = &args.token {
        rask_protocol::handshake::set_process_token(rask_protocol::handshake::Token::new(t));
    }
    if let Some(addr) = &args.scheduler {
        if let Err(code) = args.tls.apply("rask") {
            return code;
        }
        return run_on_cluster(addr, &w, args.json);
    }
    if args.dashboard || args.report.is_some() {
        return run_observed(args, &w);
    }
    if args.tls.given() {
        eprintln!("rask: --tls-cert, --tls-key and --tls-ca are for a cluster: give --scheduler too");
        return ExitCode::from(2);
    }
    let mut cfg =
        LocalConfig { workers: args.workers as usize, resources: args.resources.clone(), ..LocalConfig::default() };
    if let Some(t) = args.threads_per_worker {
        cfg.threads_per_worker = t as usize;
    }
    let bar = std::io::stderr().is_terminal().then(|| ProgressBar::start(&mut cfg));
    let start = Instant::now();
    let results = if args.sync {
        SyncScheduler::new(cfg).run(&w.graph, &w.outputs)
    } else {
        ThreadedScheduler::new(cfg).run(&w.graph, &w.outputs)
    };
    drop(bar);
    let results = match results {
        Ok(r) => r,
        Err(e) => {
            eprintln!("rask: {e}");
            return ExitCode::from(2);
        }
    };
    report(&w, &results, args.json, start.elapsed())
}

/// Runs a workflow on an embedded cluster with the scheduler's feed attached: a live dashboard
/// and/or a report written after the run. Exit 3 when the cluster cannot start.
fn run_observed(args: &RunArgs, w: &Workflow) -> ExitCode {
    let port = args.dashboard_port.unwrap_or(crate::dashboard::DASHBOARD_PORT);
    let listen =
        (args.dashboard && port != 0).then(|| std::net::SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, port)));
    let (dashboard, feed) = match crate::dashboard::observe(listen, args.dashboard_port.is_none(), None) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("rask: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(a) = dashboard.address {
        eprintln!("rask: dashboard at http://{a}/");
    }
    let threads = args
        .threads_per_worker
        .map_or_else(|| std::thread::available_parallelism().map_or(1, std::num::NonZero::get), |n| n as usize);
    let cfg = rask_runtime::LocalClusterConfig {
        n_workers: args.workers as usize,
        threads_per_worker: threads,
        resources: args.resources.iter().flatten().map(|(k, v)| (k.clone(), *v)).collect(),
        feed: Some(feed),
        ..rask_runtime::LocalClusterConfig::default()
    };
    let start = Instant::now();
    let results = match rask_runtime::LocalCluster::start(&cfg) {
        Ok(cluster) => match cluster.client().and_then(|c| c.run(&w.graph, &w.outputs)) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("rask: the embedded cluster could not be used: {e}");
                return ExitCode::from(3);
            }
        },
        Err(e) => {
            eprintln!("rask: {e}");
            return ExitCode::from(3);
        }
    };
    let elapsed = start.elapsed();
    // The cluster is gone (its scheduler stopped): the feed is complete once drained.
    drop(cfg);
    if let Err(e) = dashboard.finish(std::time::Duration::from_secs(10)) {
        eprintln!("rask: {e}");
    }
    if let Some(path) = &args.report {
        let html = {
            let model = dashboard.model();
            let mut model = model.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            rask_dashboard::report(&mut model)
        };
        if let Err(e) = std::fs::write(path, html) {
            eprintln!("rask: cannot write the report {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
        eprintln!("rask: report written to {}", path.display());
    }
    report(w, &results, args.json, elapsed)
}

/// Runs a workflow on a running cluster; exit 3 when the cluster cannot be used.
fn run_on_cluster(addr: &str, w: &Workflow, json: bool) -> ExitCode {
    let start = Instant::now();
    let client = match rask_runtime::BlockingClient::connect(addr) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("rask: {e}");
            return ExitCode::from(3);
        }
    };
    // Workers that leave during the run are reported with why (the scheduler keeps the list).
    let gone_before = client.departed_workers().map_or(0, |d| d.len());
    let results = match client.run(&w.graph, &w.outputs) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("rask: the cluster at {addr} could not be used: {e}");
            return ExitCode::from(3);
        }
    };
    if let Ok(gone) = client.departed_workers() {
        for d in gone.iter().skip(gone_before) {
            eprintln!("rask: worker {} ({}) left during the run: {}", d.name, d.address, d.cause);
        }
    }
    report(w, &results, json, start.elapsed())
}

/// Prints results and returns the exit status (0 all computed, 1 some failed).
fn report(w: &Workflow, results: &[TaskResult], json: bool, elapsed: std::time::Duration) -> ExitCode {
    let failed = results.iter().filter(|r| r.is_err()).count();
    let keys: Vec<&str> = w.outputs.iter().map(|o| w.graph.key(*o).as_str()).collect();
    let written = if json { print_json(&keys, results) } else { print_summary(&keys, results) };
    if let Err(e) = written {
        // A closed pipe (e.g. `| head`) is not worth a panic.
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            eprintln!("rask: cannot write results: {e}");
        }
    }
    eprintln!(
        "rask: {} tasks, {} outputs, {} failed, {:.3} s",
        w.graph.len(),
        results.len(),
        failed,
        elapsed.as_secs_f64()
    );
    if failed > 0 { ExitCode::from(1) } else { ExitCode::SUCCESS }
}

/// A progress bar on standard error, redrawn from the run's [`Progress`] by a helper thread.
/// Only used when standard error is a terminal; dropping it stops and clears the bar.
struct ProgressBar {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ProgressBar {
    fn start(cfg: &mut LocalConfig) -> Self {
        let progress = Arc::new(Progress::default());
        cfg.progress = Some(Arc::clone(&progress));
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("rask-progress".into())
            .spawn(move || {
                let bar = rask_runtime::task_progress_bar();
                while !stop2.load(Ordering::Relaxed) {
                    bar.set_length(progress.total() as u64);
                    bar.set_position(progress.done() as u64);
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
                bar.finish_and_clear();
            })
            .ok();
        ProgressBar { stop, thread }
    }
}

impl Drop for ProgressBar {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The `--json` form: one object, outputs in the file's order, errors as `{"$error": ...}`.
fn json_of(r: &TaskResult) -> serde_json::Value {
    match r {
        Ok(v) => v.to_json(),
        Err(e) => serde_json::json!({"$error": {"key": e.key.as_str(), "message": e.message}}),
    }
}

fn print_json(keys: &[&str], results: &[TaskResult]) -> std::io::Result<()> {
    let out = std::io::stdout().lock();
    let mut out = std::io::BufWriter::with_capacity(1 << 16, out);
    out.write_all(b"{")?;
    for (i, (k, r)) in keys.iter().zip(results).enumerate() {
        if i > 0 {
            out.write_all(b",")?;
        }
        serde_json::to_writer(&mut out, k)?;
        out.write_all(b":")?;
        serde_json::to_writer(&mut out, &json_of(r))?;
    }
    out.write_all(b"}\n")?;
    out.flush()
}

fn print_summary(keys: &[&str], results: &[TaskResult]) -> std::io::Result<()> {
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let width = keys.iter().map(|k| k.chars().count()).max().unwrap_or(0).min(40);
    let indent = |text: &str| text.replace('\n', &format!("\n{:width$}    ", ""));
    for (k, r) in keys.iter().zip(results) {
        match r {
            Ok(Value::Str(s)) if s.trim_end_matches('\n').contains('\n') => {
                let lines = s.lines().count();
                writeln!(out, "{k:<width$}  = ({lines} lines, {} bytes)", s.len())?;
                for line in s.lines().take(5) {
                    writeln!(out, "{:width$}    | {}", "", short(line))?;
                }
                if lines > 5 {
                    writeln!(out, "{:width$}    | ...", "")?;
                }
            }
            Ok(v) => writeln!(out, "{k:<width$}  = {}", short(&v.to_json().to_string()))?,
            Err(e) if e.key.as_str() == *k => writeln!(out, "{k:<width$}  FAILED: {}", indent(&e.message))?,
            Err(e) => writeln!(out, "{k:<width$}  FAILED: upstream task {} failed: {}", e.key, indent(&e.message))?,
        }
    }
    out.flush()
}

fn short(s: &str) -> String {
    const MAX: usize = 200;
    if s.len() <= MAX {
        return s.to_owned();
    }
    let cut = (0..=MAX).rev().find(|i| s.is_char_boundary(*i)).unwrap_or(0);
    format!("{}... ({} bytes)", &s[..cut], s.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_decimal_and_binary_units() {
        assert_eq!(parse_size("4GiB"), Ok(4 << 30));
        assert_eq!(parse_size("512MB"), Ok(512_000_000));
        assert_eq!(parse_size("1.5k"), Ok(1500));
        assert_eq!(parse_size("100"), Ok(100));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("3 parsecs").is_err());
    }

    #[test]
    fn resources_parse_and_reject_non_positive_amounts() {
        let r = parse_resources("GPU=1, MEM=2.5").expect("valid");
        assert_eq!(r.get("GPU"), Some(&1.0));
        assert_eq!(r.get("MEM"), Some(&2.5));
        assert!(parse_resources("GPU=0").is_err());
        assert!(parse_resources("GPU").is_err());
    }
}
