//! `rask bench local`: rask's embedded schedulers against Dask's, on the same graphs, in one run.
//!
//! Every measurement runs in a fresh child process (rask: this binary in a hidden mode; Dask:
//! `benches/dask_local.py`, embedded here) so that each reports its own peak RSS. rask runs each
//! graph several times and keeps the fastest run; Dask runs once (its runs take seconds, so its
//! noise is relatively small). The figures that matter are the ratios, measured side by side.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::Instant;

use rask_graph::{ArgSpec, Executor, Graph, GraphBuilder, Key, TaskId, TaskSpec, Value};
use rask_local::{LocalConfig, SyncScheduler, ThreadedScheduler};

/// The Dask sides of the benchmarks, written to a temporary file when needed.
const DASK_SCRIPT: &str = include_str!("../../../benches/dask_local.py");
pub(crate) const DASK_DISTRIBUTED_SCRIPT: &str = include_str!("../../../benches/dask_distributed.py");

/// Arguments of `rask bench`.
#[derive(clap::Args)]
pub(crate) struct BenchArgs {
    #[command(subcommand)]
    which: Which,
}

#[derive(clap::Subcommand)]
enum Which {
    /// Embedded schedulers: merge, tree, chain and independent tasks, plus a 1M-task workflow file.
    Local(LocalArgs),
    /// A scheduler and two 1-thread worker processes on loopback, against Dask's LocalCluster.
    Distributed(crate::bench_dist::DistArgs),
}

/// Options every benchmark shares: size, and where Dask comes from.
#[derive(clap::Args)]
pub(crate) struct Common {
    /// Smaller graphs (for a quick look; the README's figures use the default sizes).
    #[arg(long)]
    pub(crate) quick: bool,
    /// Do not run Dask.
    #[arg(long)]
    pub(crate) no_dask: bool,
    /// Python interpreter that has Dask (and distributed) installed (skips the venv).
    #[arg(long)]
    pub(crate) python: Option<PathBuf>,
    /// Virtual environment to create or reuse for Dask.
    #[arg(long, default_value = "target/dask-venv")]
    pub(crate) venv: PathBuf,
}

impl Common {
    /// A Python with Dask, unless Dask is switched off or unavailable.
    pub(crate) fn dask_python(&self) -> Option<PathBuf> {
        if self.no_dask { None } else { dask_python(self.python.as_ref(), &self.venv) }
    }
}

#[derive(clap::Args)]
struct LocalArgs {
    #[command(flatten)]
    common: Common,
    /// Runs per rask measurement (the fastest is kept).
    #[arg(long, default_value_t = 3)]
    repeat: u32,
    /// Tasks in the workflow-file benchmark (0 skips it).
    #[arg(long, default_value_t = 1_000_000)]
    workflow_tasks: u64,
    /// Internal: measure one rask workload in this process and print one JSON line.
    #[arg(long, hide = true, num_args = 3, value_names = ["WORKLOAD", "N", "SCHEDULER"])]
    one: Option<Vec<String>>,
}

pub(crate) fn bench(args: &BenchArgs) -> ExitCode {
    let result = match &args.which {
        Which::Local(a) => match &a.one {
            Some(one) => measure_one(one, a.repeat),
            None => local(a),
        },
        Which::Distributed(a) => crate::bench_dist::distributed(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rask bench: {e}");
            ExitCode::FAILURE
        }
    }
}

/// One measurement, as printed by either side.
#[derive(serde::Deserialize, Clone, Debug)]
struct Sample {
    tasks: u64,
    secs: f64,
    baseline_rss_bytes: u64,
    peak_rss_bytes: u64,
}

impl Sample {
    fn rate(&self) -> f64 {
        self.tasks as f64 / self.secs
    }
    fn rss_per_task(&self) -> f64 {
        self.peak_rss_bytes.saturating_sub(self.baseline_rss_bytes) as f64 / self.tasks as f64
    }
}

pub(crate) fn status_kib(field: &str) -> u64 {
    proc_status_kib("self", field)
}

/// A field of `/proc/PID/status` in bytes (0 when unreadable).
pub(crate) fn proc_status_kib(pid: &str, field: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    text.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0)
        * 1024
}

/// Builds a benchmark graph with builtin ops; returns it, its outputs and the expected values.
pub(crate) fn workload(name: &str, n: u64) -> Result<(Graph, Vec<TaskId>, Vec<Value>), String> {
    let r = |k: String| ArgSpec::Ref(Key::from(k));
    let one = || vec![ArgSpec::Lit(Value::Int(1))];
    let mut b = GraphBuilder::with_capacity(n as usize + 1);
    let (out_keys, expected): (Vec<String>, Vec<Value>) = match name {
        "merge" => {
            for i in 0..n {
                b.add(TaskSpec::new(format!("leaf-{i}"), "identity", one()));
            }
            let leaves = (0..n).map(|i| r(format!("leaf-{i}"))).collect();
            b.add(TaskSpec::new("merge", "sum", vec![ArgSpec::list(leaves)]));
            (vec!["merge".into()], vec![Value::Int(n as i64)])
        }
        "tree" => {
            let depth = n as u32;
            for i in 0..(1u64 << depth) {
                b.add(TaskSpec::new(format!("t-{depth}-{i}"), "identity", one()));
            }
            for level in (0..depth).rev() {
                for i in 0..(1u64 << level) {
                    let args =
                        vec![r(format!("t-{}-{}", level + 1, 2 * i)), r(format!("t-{}-{}", level + 1, 2 * i + 1))];
                    b.add(TaskSpec::new(format!("t-{level}-{i}"), "add", args));
                }
            }
            (vec!["t-0-0".into()], vec![Value::Int(1 << depth)])
        }
        "chain" => {
            b.add(TaskSpec::new("c-0", "identity", one()));
            for i in 1..n {
                b.add(TaskSpec::new(
                    format!("c-{i}"),
                    "add",
                    vec![r(format!("c-{}", i - 1)), ArgSpec::Lit(Value::Int(1))],
                ));
            }
            (vec![format!("c-{}", n - 1)], vec![Value::Int(n as i64)])
        }
        "independent" => {
            for i in 0..n {
                b.add(TaskSpec::new(format!("t-{i}"), "noop", vec![]));
            }
            ((0..n).map(|i| format!("t-{i}")).collect(), vec![Value::Null; n as usize])
        }
        other => return Err(format!("unknown workload {other:?}")),
    };
    let g = b.build().map_err(|e| e.to_string())?;
    let outs = out_keys.iter().map(|k| g.id(k).ok_or("output missing")).collect::<Result<_, _>>()?;
    Ok((g, outs, expected))
}

fn measure_one(one: &[String], repeat: u32) -> Result<(), String> {
    let [name, n, sched] = one else { return Err("--one takes WORKLOAD N SCHEDULER".into()) };
    let n: u64 = n.parse().map_err(|_| "N must be an integer")?;
    let (g, outs, expected) = workload(name, n)?;
    // Measure the schedulers, not fusion: run the same unoptimised graph Dask runs.
    let cfg = LocalConfig { fuse: false, ..LocalConfig::default() };
    let exec: Box<dyn Fn() -> Result<Vec<rask_graph::TaskResult>, rask_local::LocalError>> = match sched.as_str() {
        "threaded" => {
            let s = ThreadedScheduler::new(cfg);
            Box::new(move || s.run(&g, &outs))
        }
        "sync" => {
            let s = SyncScheduler::new(cfg);
            Box::new(move || s.run(&g, &outs))
        }
        other => return Err(format!("unknown scheduler {other:?}")),
    };
    // Reset the peak-RSS counter so building the graph does not count (best effort).
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let baseline = status_kib("VmRSS:");
    let mut best = f64::INFINITY;
    for _ in 0..repeat.max(1) {
        let t0 = Instant::now();
        let results = exec().map_err(|e| e.to_string())?;
        let secs = t0.elapsed().as_secs_f64();
        let got: Vec<Value> = results.into_iter().map(|r| r.map_err(|e| e.to_string())).collect::<Result<_, _>>()?;
        if got != expected {
            return Err(format!("{name} {n} on {sched}: wrong result"));
        }
        best = best.min(secs);
    }
    let tasks = match name.as_str() {
        "merge" => n + 1,
        "tree" => (1u64 << (n + 1)) - 1,
        _ => n,
    };
    println!(
        "{}",
        serde_json::json!({"workload": name, "scheduler": sched, "n": n, "tasks": tasks, "secs": best,
            "baseline_rss_bytes": baseline, "peak_rss_bytes": status_kib("VmHWM:")})
    );
    Ok(())
}

pub(crate) fn run_json<T: serde::de::DeserializeOwned>(cmd: &mut Command) -> Result<T, String> {
    let out = cmd.stderr(Stdio::inherit()).output().map_err(|e| format!("cannot start {cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!("{cmd:?} failed with {}", out.status));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().last().unwrap_or_default();
    serde_json::from_str(line).map_err(|e| format!("unexpected output {line:?}: {e}"))
}

/// Finds or prepares a Python with Dask; `None` (with a message) when there is none.
fn dask_python(python: Option<&PathBuf>, venv: &Path) -> Option<PathBuf> {
    let works = |py: &Path| {
        Command::new(py)
            .args(["-c", "import dask"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if let Some(py) = python {
        if works(py) {
            return Some(py.clone());
        }
        eprintln!("rask bench: {} cannot import dask; skipping Dask", py.display());
        return None;
    }
    let py = venv.join("bin/python");
    if works(&py) {
        return Some(py);
    }
    eprintln!("rask bench: creating {} with Dask (python3 -m venv; pip install dask) ...", venv.display());
    let created = Command::new("python3").arg("-m").arg("venv").arg(venv).status().is_ok_and(|s| s.success())
        && Command::new(venv.join("bin/pip"))
            .args(["install", "--quiet", "dask[distributed]"])
            .status()
            .is_ok_and(|s| s.success());
    if created && works(&py) {
        Some(py)
    } else {
        eprintln!("rask bench: no Python with Dask available (python3 -m venv / pip install failed); skipping Dask");
        None
    }
}

fn local(a: &LocalArgs) -> Result<(), String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let workloads: &[(&str, u64)] = if a.common.quick {
        &[("merge", 10_000), ("tree", 13), ("chain", 10_000), ("independent", 10_000)]
    } else {
        &[("merge", 100_000), ("tree", 17), ("chain", 100_000), ("independent", 100_000)]
    };
    let python = a.common.dask_python();
    let script = match &python {
        Some(_) => {
            let path = std::env::temp_dir().join(format!("rask-dask-local-{}.py", std::process::id()));
            std::fs::write(&path, DASK_SCRIPT).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
            Some(path)
        }
        None => None,
    };
    let threads = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    println!(
        "rask bench local: {threads} threads; rask best of {} runs, Dask 1 run; fusion off (pure scheduling)",
        a.repeat
    );
    println!(
        "{:<16} {:<9} {:>8} | {:>8} {:>11} {:>8} {:>9} | {:>8} {:>10} {:>9} | {:>8}",
        "workload",
        "scheduler",
        "tasks",
        "rask s",
        "tasks/s",
        "µs/task",
        "B/task",
        "dask s",
        "tasks/s",
        "B/task",
        "ratio"
    );
    let mut failures = Vec::new();
    for (name, n) in workloads {
        for sched in ["threaded", "sync"] {
            let rask: Result<Sample, String> = run_json(Command::new(&exe).args([
                "bench",
                "local",
                "--repeat",
                &a.repeat.to_string(),
                "--one",
                name,
                &n.to_string(),
                sched,
            ]));
            let dask = match (&python, &script) {
                (Some(py), Some(script)) => {
                    Some(run_json::<Sample>(Command::new(py).arg(script).args([name, &n.to_string()[..], sched])))
                }
                _ => None,
            };
            let label = if *name == "tree" { format!("tree-{n}") } else { format!("{name}-{}", human(*n)) };
            match rask {
                Ok(r) => {
                    let dask_cols = match &dask {
                        Some(Ok(d)) => format!(
                            "{:>8.3} {:>10.0} {:>9.0} | {:>7.0}×",
                            d.secs,
                            d.rate(),
                            d.rss_per_task(),
                            r.rate() / d.rate()
                        ),
                        Some(Err(e)) => {
                            failures.push(format!("dask {label} {sched}: {e}"));
                            format!("{:>30} | {:>8}", "(failed)", "-")
                        }
                        None => format!("{:>30} | {:>8}", "(skipped)", "-"),
                    };
                    println!(
                        "{label:<16} {sched:<9} {:>8} | {:>8.4} {:>11.0} {:>8.3} {:>9.0} | {dask_cols}",
                        r.tasks,
                        r.secs,
                        r.rate(),
                        r.secs * 1e6 / r.tasks as f64,
                        r.rss_per_task()
                    );
                }
                Err(e) => failures.push(format!("rask {label} {sched}: {e}")),
            }
            let _ = std::io::stdout().flush();
        }
    }
    if let Some(script) = script {
        let _ = std::fs::remove_file(script);
    }
    if a.workflow_tasks > 0 {
        match workflow_file(&exe, a.workflow_tasks) {
            Ok(line) => println!("{line}"),
            Err(e) => failures.push(format!("workflow file: {e}")),
        }
    }
    if failures.is_empty() { Ok(()) } else { Err(failures.join("\n")) }
}

pub(crate) fn human(n: u64) -> String {
    match n {
        n if n >= 1_000_000 && n % 1_000_000 == 0 => format!("{}M", n / 1_000_000),
        n if n >= 1000 && n % 1000 == 0 => format!("{}k", n / 1000),
        n => n.to_string(),
    }
}

/// End to end: write an N-task workflow file, `rask run --json` it in a child process, report
/// wall time and the child's peak RSS.
fn workflow_file(exe: &Path, n: u64) -> Result<String, String> {
    let dir = std::env::temp_dir().join(format!("rask-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let file = dir.join("independent.json");
    {
        let mut w = std::io::BufWriter::new(std::fs::File::create(&file).map_err(|e| e.to_string())?);
        let mut write = || -> std::io::Result<()> {
            w.write_all(b"{\"version\": 1, \"tasks\": {\n")?;
            for i in 0..n {
                let sep = if i + 1 == n { "" } else { "," };
                writeln!(w, "  \"t{i}\": {{\"op\": \"noop\"}}{sep}")?;
            }
            w.write_all(b"}}\n")?;
            w.flush()
        };
        write().map_err(|e| e.to_string())?;
    }
    let size = std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0);
    let out = std::fs::File::create(dir.join("out.json")).map_err(|e| e.to_string())?;
    let t0 = Instant::now();
    let child = Command::new(exe)
        .arg("run")
        .arg(&file)
        .arg("--json")
        .stdout(out)
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| e.to_string())?;
    let (status, maxrss_kib) = wait_with_rusage(child.id() as i32)?;
    let secs = t0.elapsed().as_secs_f64();
    let _ = std::fs::remove_dir_all(&dir);
    if status != 0 {
        return Err(format!("rask run exited with status {status}"));
    }
    let peak = maxrss_kib * 1024;
    Ok(format!(
        "workflow file: {} independent tasks ({:.1} MB of JSON) parsed, validated, run and printed by `rask run --json` in {:.3} s end to end; peak RSS {:.1} MB = {:.0} B/task",
        n,
        size as f64 / 1e6,
        secs,
        peak as f64 / 1e6,
        peak as f64 / n as f64
    ))
}

/// Waits for a child and returns its exit status and peak RSS (KiB), from `wait4(2)`.
#[allow(unsafe_code)]
pub(crate) fn wait_with_rusage(pid: i32) -> Result<(i32, u64), String> {
    let mut status = 0i32;
    // SAFETY: rusage is plain old data, so all-zero is a valid value.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: pid is our own child; both pointers refer to live, writable locals.
    let rc = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error().to_string());
    }
    let code = if libc::WIFEXITED(status) { libc::WEXITSTATUS(status) } else { 128 + libc::WTERMSIG(status) };
    Ok((code, u64::try_from(usage.ru_maxrss).unwrap_or(0)))
}
