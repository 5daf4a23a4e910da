//! `rask bench distributed`: a rask scheduler and two 1-thread worker processes on loopback,
//! against Dask's `LocalCluster(n_workers=2, threads_per_worker=1)` on the same graphs, in one
//! run. Also: data transfer between workers (compared with `iperf3` on loopback when installed)
//! and a zero-work mode that measures the scheduler alone.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rask_graph::{Annotations, ArgSpec, GraphBuilder, Key, TaskSpec, Value};
use rask_runtime::{BlockingClient, CallArg};

use crate::bench::{human, proc_status_kib, run_json, workload};

/// Arguments of `rask bench distributed`.
#[derive(clap::Args)]
pub(crate) struct DistArgs {
    #[command(flatten)]
    common: crate::bench::Common,
    /// Tasks in the zero-work intake measurement.
    #[arg(long, default_value_t = 1_000_000)]
    intake_tasks: u64,
    /// Runs of each rask measurement, the fastest reported: runs of a fraction of a second are
    /// at the mercy of the shared machine (and of memory first touched after an idle spell).
    /// The dashboard's cost is measured over `6 × repeat + 1` rounds, and medians reported.
    #[arg(long, default_value_t = 3)]
    repeat: u32,
    /// Run only these parts (for profiling one of them); all by default.
    #[arg(long, value_delimiter = ',', value_parser = ["merge", "tree", "chain", "map", "transfer", "loss", "spill", "zero", "intake", "dashboard"])]
    only: Vec<String>,
}

#[derive(serde::Deserialize)]
struct DaskSample {
    tasks: u64,
    secs: f64,
    #[serde(default)]
    bytes: u64,
    /// The undisturbed run of the worker-loss workload.
    #[serde(default)]
    base_secs: f64,
    /// The spill workload's disk traffic.
    #[serde(default)]
    spill: Option<DaskSpill>,
}

/// What Dask's worker reported spilling (its metric digests), and how often its nanny
/// restarted it for memory.
#[derive(serde::Deserialize)]
struct DaskSpill {
    write_bytes: f64,
    write_secs: f64,
    read_bytes: f64,
    read_secs: f64,
    restarts: u64,
}

/// A scheduler and workers started from this binary; killed on drop.
struct BenchCluster {
    address: String,
    scheduler: Child,
    workers: Vec<Child>,
}

impl BenchCluster {
    fn start(exe: &std::path::Path, workers: usize, zero_work: bool) -> Result<Self, String> {
        Self::start_with(exe, workers, if zero_work { &["--no-nanny", "--zero-work"] } else { &["--no-nanny"] })
    }

    /// Workers under their supervisor (`workers` holds the supervisors).
    fn start_supervised(exe: &std::path::Path, workers: usize) -> Result<Self, String> {
        Self::start_with(exe, workers, &[])
    }

    fn start_with(exe: &std::path::Path, workers: usize, extra: &[&str]) -> Result<Self, String> {
        Self::start_full(exe, &["--dashboard-port", "0"], workers, extra)
    }

    /// `scheduler_args`: e.g. the dashboard's port (off unless given).
    fn start_full(
        exe: &std::path::Path,
        scheduler_args: &[&str],
        workers: usize,
        extra: &[&str],
    ) -> Result<Self, String> {
        let mut scheduler = Command::new(exe)
            .args(["scheduler", "--port", "0"])
            .args(scheduler_args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start the scheduler: {e}"))?;
        let mut line = String::new();
        let out = scheduler.stdout.take().ok_or("no scheduler stdout")?;
        BufReader::new(out).read_line(&mut line).map_err(|e| e.to_string())?;
        let address = line.trim().to_owned();
        let mut c = BenchCluster { address, scheduler, workers: Vec::new() };
        for i in 0..workers {
            let mut cmd = Command::new(exe);
            // Unsupervised (`--no-nanny`), the PID is the worker's: its CPU time is measured.
            let name = format!("bench-{i}");
            cmd.args(["worker", &c.address, "--nthreads", "1", "--name", &name]).args(extra);
            let w = cmd
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .map_err(|e| format!("cannot start a worker: {e}"))?;
            c.workers.push(w);
        }
        Ok(c)
    }

    /// CPU time the scheduler process, and all worker processes together, have used so far
    /// (from `/proc`, Linux only): the cost per task that wall-clock figures on a shared, noisy
    /// machine hide, and which side is the bottleneck.
    fn scheduler_cpu(&self) -> Option<(Duration, Duration)> {
        let workers = self.workers.iter().map(|w| cpu_of(w.id())).sum::<Option<Duration>>()?;
        Some((cpu_of(self.scheduler.id())?, workers))
    }

    /// Scheduler and workers' CPU time used since `before` (a [`Self::scheduler_cpu`] reading).
    fn cpu_since(&self, before: Option<(Duration, Duration)>) -> Option<(Duration, Duration)> {
        let (s0, w0) = before?;
        let (s1, w1) = self.scheduler_cpu()?;
        Some((s1.saturating_sub(s0), w1.saturating_sub(w0)))
    }

    fn client(&self) -> Result<BlockingClient, String> {
        let mut client = BlockingClient::connect(&self.address).map_err(|e| e.to_string())?;
        client.set_fuse(false); // measure the graph as given, as Dask runs it
        client.set_progress_bar(false); // the table is the output
        // Wait until every worker has joined: one tiny task pinned to each.
        let mut b = GraphBuilder::new();
        for i in 0..self.workers.len() {
            let ann = Annotations { workers: vec![format!("bench-{i}").into()], ..Default::default() };
            b.add(
                TaskSpec::new(format!("warmup-{i}"), "noop", vec![ArgSpec::Lit(Value::Int(i as i64))])
                    .with_annotations(ann),
            );
        }
        let g = b.build().map_err(|e| e.to_string())?;
        let outs = g.sinks();
        let f = client.submit_graph(&g, &outs);
        client.wait(&f, Some(Duration::from_secs(30))).map_err(|e| format!("workers did not join: {e}"))?;
        Ok(client)
    }
}

/// The on-CPU time in a thread's `schedstat` file under `/proc` (Linux only).
fn on_cpu(schedstat: &std::path::Path) -> Option<Duration> {
    let s = std::fs::read_to_string(schedstat).ok()?;
    s.split_whitespace().next().and_then(|v| v.parse().ok()).map(Duration::from_nanos)
}

/// CPU time one thread of a process has used.
fn thread_cpu(pid: u32, tid: u32) -> Option<Duration> {
    on_cpu(std::path::Path::new(&format!("/proc/{pid}/task/{tid}/schedstat")))
}

/// CPU time a process has used, all its threads together (threads that already exited are not
/// counted).
fn cpu_of(pid: u32) -> Option<Duration> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    Some(tasks.flatten().filter_map(|t| on_cpu(&t.path().join("schedstat"))).sum())
}

impl Drop for BenchCluster {
    fn drop(&mut self) {
        for c in self.workers.iter_mut().chain(std::iter::once(&mut self.scheduler)) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

struct Row {
    label: String,
    tasks: u64,
    secs: f64,
    /// Scheduler and workers' CPU time used during the run.
    sched_cpu: Option<(Duration, Duration)>,
    dask: Option<Result<DaskSample, String>>,
}

impl Row {
    fn print(&self) {
        let rate = self.tasks as f64 / self.secs;
        let dask = match &self.dask {
            Some(Ok(d)) => {
                let dr = d.tasks as f64 / d.secs;
                format!("{:>8.3} {:>10.0} | {:>7.0}×", d.secs, dr, rate / dr)
            }
            Some(Err(e)) => format!("{:>19} | {:>8}  ({e})", "(failed)", "-"),
            None => format!("{:>19} | {:>8}", "(skipped)", "-"),
        };
        let per_task = |d: Duration| d.as_secs_f64() * 1e6 / self.tasks as f64;
        let cpu = match self.sched_cpu {
            Some((s, w)) => format!("{:>9.2} {:>9.2}", per_task(s), per_task(w)),
            None => format!("{:>9} {:>9}", "-", "-"),
        };
        println!(
            "{:<18} {:>8} | {:>8.4} {:>11.0} {:>9.2} {cpu} | {dask}",
            self.label,
            self.tasks,
            self.secs,
            rate,
            self.secs * 1e6 / self.tasks as f64
        );
        let _ = std::io::stdout().flush();
    }
}

pub(crate) fn distributed(a: &DistArgs) -> Result<(), String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let python = a.common.dask_python();
    let script = match &python {
        Some(_) => {
            let path = std::env::temp_dir().join(format!("rask-dask-distributed-{}.py", std::process::id()));
            std::fs::write(&path, crate::bench::DASK_DISTRIBUTED_SCRIPT).map_err(|e| e.to_string())?;
            Some(path)
        }
        None => None,
    };
    let dask = |workload: &str, n: u64| -> Option<Result<DaskSample, String>> {
        match (&python, &script) {
            (Some(py), Some(s)) => Some(run_json(Command::new(py).arg(s).args([workload, &n.to_string()]))),
            _ => None,
        }
    };
    let (merge_n, tree_d, map_n, chain_n, transfer_mib) =
        if a.common.quick { (2_000, 11, 2_000, 1_000, 256) } else { (20_000, 15, 20_000, 10_000, 1024) };

    println!(
        "rask bench distributed: scheduler + 2 worker processes × 1 thread on loopback; Dask LocalCluster(2 workers × 1 thread)"
    );
    println!(
        "{:<18} {:>8} | {:>8} {:>11} {:>9} {:>9} {:>9} | {:>8} {:>10} | {:>8}",
        "workload", "tasks", "rask s", "tasks/s", "µs/task", "sched µs", "wrk µs", "dask s", "tasks/s", "ratio"
    );
    let want = |part: &str| a.only.is_empty() || a.only.iter().any(|o| o == part);
    let mut failures = Vec::new();
    // rask's workloads run back to back on one warmed-up cluster, then Dask's (each on a fresh
    // LocalCluster with its own untimed warm-up, as the script does): interleaving them would
    // leave rask's processes idle for minutes between workloads while Dask runs.
    let mut rows: Vec<(Row, &str, u64)> = Vec::new();
    let mut moved: Option<f64> = None;
    if ["merge", "tree", "chain", "map", "transfer"].iter().any(|p| want(p)) {
        let cluster = BenchCluster::start(&exe, 2, false)?;
        let client = cluster.client()?;
        // Untimed warm-up: a small graph of each shape, so the first measured one does not
        // pay for the processes' first memory growth.
        for (name, n) in [("merge", 2_000), ("tree", 11)] {
            let (g, outs, _) = workload(name, n)?;
            client.compute(&g, &outs).map_err(|e| e.to_string())?;
        }
        for (name, n) in [("merge", merge_n), ("tree", tree_d), ("chain", chain_n)] {
            if !want(name) {
                continue;
            }
            let (g, outs, expected) = workload(name, n)?;
            let label = if name == "tree" { format!("tree-{n}") } else { format!("{name}-{}", human(n)) };
            let mut best: Option<Row> = None;
            for _ in 0..a.repeat.max(1) {
                let cpu0 = cluster.scheduler_cpu();
                let t0 = Instant::now();
                let got = client.compute(&g, &outs).map_err(|e| e.to_string())?;
                let secs = t0.elapsed().as_secs_f64();
                let sched_cpu = cluster.cpu_since(cpu0);
                let got: Vec<Value> = got.into_iter().collect::<Result<_, _>>().map_err(|e| e.to_string())?;
                if got != expected {
                    failures.push(format!("{name}: wrong result"));
                }
                let row = Row { label: label.clone(), tasks: g.len() as u64, secs, sched_cpu, dask: None };
                best = Some(faster(best, row));
            }
            if let Some(row) = best {
                rows.push((row, name, n));
            }
        }
        if want("map") {
            let mut best = None;
            for _ in 0..a.repeat.max(1) {
                best = Some(faster(best, map_gather(&cluster, &client, map_n, &mut failures)));
            }
            rows.extend(best.map(|row| (row, "mapgather", map_n)));
        }
        if want("transfer") {
            for _ in 0..a.repeat.max(1) {
                let gbs = transfer(&client, transfer_mib, &mut failures)?;
                moved = Some(moved.map_or(gbs, |m: f64| m.max(gbs)));
            }
        }
        drop(client);
        drop(cluster);
    }
    if python.is_some() && (!rows.is_empty() || moved.is_some()) {
        eprintln!("rask done; now Dask on the same workloads (a few minutes)...");
    }
    for (row, name, n) in &mut rows {
        row.dask = dask(name, *n);
        row.print();
    }
    if let Some(rask_gbs) = moved {
        let dask_txt = match dask("transfer", transfer_mib) {
            Some(Ok(d)) if d.secs > 0.0 => {
                let g = d.bytes as f64 / d.secs / 1e9;
                format!("Dask {g:.2} GB/s ({:.0}×)", rask_gbs / g)
            }
            Some(Ok(_)) => "Dask reported no time".into(),
            Some(Err(e)) => format!("Dask failed: {e}"),
            None => "Dask skipped".into(),
        };
        let iperf_txt = match iperf3_gbs() {
            Some(g) => format!("iperf3 loopback {g:.2} GB/s (rask at {:.0}% of it)", rask_gbs / g * 100.0),
            None => "iperf3 not installed".into(),
        };
        println!(
            "transfer: {transfer_mib} MiB in 64 MiB pieces between two workers: rask {rask_gbs:.2} GB/s; {dask_txt}; {iperf_txt}"
        );
    }
    if want("spill") {
        spill(&exe, if a.common.quick { 256 } else { 1024 }, &dask)?;
    }
    if want("loss") {
        let n = if a.common.quick { 50 } else { 200 };
        worker_loss(&exe, n, &dask)?;
    }
    if want("zero") || want("intake") {
        zero_work(&exe, a, &want)?;
    }
    if want("dashboard") {
        dashboard_cost(&exe, tree_d, a.repeat.max(1), false)?;
        dashboard_cost(&exe, tree_d, a.repeat.max(1), true)?;
    }
    if let Some(s) = script {
        let _ = std::fs::remove_file(s);
    }
    if failures.is_empty() { Ok(()) } else { Err(failures.join("\n")) }
}

fn map_gather(cluster: &BenchCluster, client: &BlockingClient, map_n: u64, failures: &mut Vec<String>) -> Row {
    let cpu0 = cluster.scheduler_cpu();
    let t0 = Instant::now();
    let futures = client.map_calls(
        "add",
        (0..map_n as i64).map(|i| vec![CallArg::Value(Value::Int(i)), CallArg::Value(Value::Int(1))]).collect(),
    );
    let values = client.gather(&futures);
    let secs = t0.elapsed().as_secs_f64();
    let sched_cpu = cluster.cpu_since(cpu0);
    let sum = sum_ints(values.iter().map(|r| r.as_ref().ok()));
    let n = map_n as i64;
    if sum != n * (n + 1) / 2 {
        failures.push("map+gather: wrong result".into());
    }
    drop(futures);
    let label = format!("map+gather-{}", human(map_n));
    Row { label, tasks: map_n, secs, sched_cpu, dask: None }
}

/// `mib` MiB of results in 64 MiB pieces through one worker limited to a quarter of that:
/// most go to its spill files and are read back by gathering the pieces one by one. Prints the
/// time and the spill throughput the worker measured, next to `dd` writing and reading the same
/// amount in the same directory and Dask doing the same scenario.
fn spill(exe: &std::path::Path, mib: u64, dask: &DaskRun<'_>) -> Result<(), String> {
    let limit = format!("{}MiB", mib / 4);
    let cluster = BenchCluster::start_with(exe, 1, &["--no-nanny", "--memory-limit", &limit])?;
    let client = cluster.client()?;
    let mut b = GraphBuilder::new();
    for i in 0..mib / 64 {
        b.add(TaskSpec::new(
            format!("spill-{i}"),
            "bytes",
            vec![ArgSpec::Lit(Value::Int(64 << 20)), ArgSpec::Lit(Value::Int(i as i64))],
        ));
    }
    let g = b.build().map_err(|e| e.to_string())?;
    let t0 = Instant::now();
    let pieces = client.submit_graph(&g, &g.sinks());
    client.wait(&pieces, Some(Duration::from_secs(300))).map_err(|e| e.to_string())?;
    // One at a time, as the Dask side must (see the script).
    let total: u64 = pieces
        .iter()
        .map(|p| match client.gather(std::slice::from_ref(p)).first() {
            Some(Ok(Value::Bytes(b))) => b.len() as u64,
            _ => 0,
        })
        .sum();
    let secs = t0.elapsed().as_secs_f64();
    if total != mib << 20 {
        return Err(format!("spill: got {total} bytes back, expected {}", mib << 20));
    }
    // The worker reports its spill traffic with its heartbeats.
    std::thread::sleep(Duration::from_millis(500));
    let m = client.worker_memory().map_err(|e| e.to_string())?;
    let w = m.first().ok_or("spill: no worker memory report")?;
    let gbs = |bytes: u64, t: Duration| bytes as f64 / t.as_secs_f64().max(1e-9) / 1e9;
    let dd = dd_gbs(mib).map_or_else(
        || "dd not available".to_owned(),
        |(wr, rd)| format!("dd in the same directory: write {wr:.2} GB/s, read {rd:.2} GB/s"),
    );
    let killed = client.departed_workers().map_err(|e| e.to_string())?.len();
    let dask_txt = match dask("spill", mib) {
        Some(Ok(d)) => match d.spill {
            Some(s) => format!(
                "Dask {:.2} s ({:.1}× rask's time), its worker restarted {} times for memory, wrote {} MiB at {:.2} GB/s, read {} MiB at {:.2} GB/s",
                d.secs,
                d.secs / secs,
                s.restarts,
                (s.write_bytes as u64) >> 20,
                s.write_bytes / s.write_secs.max(1e-9) / 1e9,
                (s.read_bytes as u64) >> 20,
                s.read_bytes / s.read_secs.max(1e-9) / 1e9,
            ),
            None => "Dask reported no spill figures".into(),
        },
        Some(Err(e)) => format!("Dask failed: {e}"),
        None => "Dask skipped".into(),
    };
    println!(
        "spill: {mib} MiB through a worker limited to {limit}, gathered piece by piece: rask {secs:.2} s, worker lost {killed} times; wrote {} MiB to disk at {:.2} GB/s, read back {} MiB at {:.2} GB/s (encoding included); {dd}; {dask_txt}",
        w.bytes_written >> 20,
        gbs(w.bytes_written, w.write_time),
        w.bytes_read >> 20,
        gbs(w.bytes_read, w.read_time),
    );
    Ok(())
}

/// `dd` writing then reading `mib` MiB in 64 MiB blocks in the temporary directory (buffered,
/// like the worker's spill files): (write GB/s, read GB/s).
fn dd_gbs(mib: u64) -> Option<(f64, f64)> {
    let path = std::env::temp_dir().join(format!("rask-dd-{}", std::process::id()));
    let of = format!("of={}", path.display());
    let inf = format!("if={}", path.display());
    let count = format!("count={}", mib / 64);
    let run = |args: &[&str]| -> Option<f64> {
        let t0 = Instant::now();
        let ok = Command::new("dd").args(args).stdout(Stdio::null()).stderr(Stdio::null()).status().ok()?.success();
        ok.then(|| (mib << 20) as f64 / t0.elapsed().as_secs_f64() / 1e9)
    };
    let w = run(&["if=/dev/zero", &of, "bs=64M", &count]);
    let r = run(&[&inf, "of=/dev/null", "bs=64M"]);
    let _ = std::fs::remove_file(&path);
    Some((w?, r?))
}

/// Runs one Dask workload (`None` when Dask is not available).
type DaskRun<'a> = dyn Fn(&str, u64) -> Option<Result<DaskSample, String>> + 'a;

/// `n` tasks sleeping 20 ms and their sum, on two supervised workers: undisturbed, then with
/// one worker process SIGKILLed halfway (its supervisor restarts it; its results are
/// recomputed). Prints the extra time the loss cost, next to Dask doing the same.
fn worker_loss(exe: &std::path::Path, n: u64, dask: &DaskRun<'_>) -> Result<(), String> {
    let cluster = BenchCluster::start_supervised(exe, 2)?;
    let client = cluster.client()?;
    let graph = |tag: &str| -> Result<(rask_graph::Graph, Vec<rask_graph::TaskId>), String> {
        let mut b = GraphBuilder::new();
        let mut items = Vec::new();
        for i in 0..n as i64 {
            let s = format!("{tag}-sleep-{i}");
            b.add(TaskSpec::new(s.clone(), "sleep", vec![ArgSpec::Lit(Value::Int(20)), ArgSpec::Lit(Value::Int(i))]));
            let pair = ArgSpec::list(vec![ArgSpec::Ref(s.into()), ArgSpec::Lit(Value::Int(i))]);
            let v = format!("{tag}-{i}");
            b.add(TaskSpec::new(v.clone(), "index", vec![pair, ArgSpec::Lit(Value::Int(1))]));
            items.push(ArgSpec::Ref(v.into()));
        }
        b.add(TaskSpec::new(format!("{tag}-total"), "sum", vec![ArgSpec::list(items)]));
        let g = b.build().map_err(|e| e.to_string())?;
        let outs = g.sinks();
        Ok((g, outs))
    };
    let expected = Value::Int((n * (n - 1) / 2) as i64);
    let run = |tag: &str| -> Result<f64, String> {
        let (g, outs) = graph(tag)?;
        let t0 = Instant::now();
        let got = client.compute(&g, &outs).map_err(|e| e.to_string())?;
        let secs = t0.elapsed().as_secs_f64();
        match got.first() {
            Some(Ok(v)) if *v == expected => Ok(secs),
            other => Err(format!("worker loss: wrong result {other:?}")),
        }
    };
    let base = run("calm")?;
    let nanny = cluster.workers.first().map(Child::id).ok_or("no worker")?;
    let killer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs_f64(base / 2.0));
        let children = std::fs::read_to_string(format!("/proc/{nanny}/task/{nanny}/children")).unwrap_or_default();
        let victim: Option<i32> = children.split_whitespace().next().and_then(|p| p.parse().ok());
        if let Some(pid) = victim {
            // SAFETY: kill(2) on the worker process our own supervisor child started.
            #[allow(unsafe_code)]
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
        victim.is_some()
    });
    let hit = run("storm")?;
    let killed = killer.join().unwrap_or(false);
    if !killed {
        return Err("worker loss: found no worker process to kill".into());
    }
    let dask_txt = match dask("workerloss", n) {
        Some(Ok(d)) => format!(
            "Dask {:.2} s undisturbed, {:.2} s with the kill (+{:.2} s)",
            d.base_secs,
            d.secs,
            d.secs - d.base_secs
        ),
        Some(Err(e)) => format!("Dask failed: {e}"),
        None => "Dask skipped".into(),
    };
    println!(
        "worker loss: {n} tasks of 20 ms and their sum on 2 supervised workers: rask {base:.2} s undisturbed, {hit:.2} s with one worker SIGKILLed halfway (+{:.2} s); {dask_txt}",
        hit - base
    );
    Ok(())
}

/// What the dashboard costs the scheduler: tree-`depth` on a cluster without a dashboard, one
/// with the dashboard, and one with the dashboard and a journal, in rounds that run each once
/// (in a rotating order, so none always follows another), `6 × repeat + 1` rounds: the cost is a
/// few per cent, and one round's pair of runs differs by several per cent on a shared machine.
///
/// Every round starts its three clusters afresh and warms each with one untimed run of the
/// same workload (which doubles a round's time): a cluster's own luck (where its processes'
/// memory landed, which cores its threads settled on) lasts as long as it does and shifts its
/// runs by several per cent, as much as the cost measured; over fresh clusters it averages out
/// instead of biasing a whole measurement.
///
/// After every run the cluster is left to settle (its scheduler process's CPU use stops
/// growing): a dashboard that fell behind catches up then, on its own clock, instead of
/// during the next cluster's run; its CPU time until then counts as the run's.
///
/// Prints the median over rounds of each configuration's throughput relative to the
/// dashboard-less run of the same round (pairs from one round saw the same machine), and the
/// best of each; and the scheduler process's CPU per task, and its main thread's (what the
/// dashboard costs the thread that schedules: recording and publishing changes).
///
/// `zero_work`: the workers finish every task at once (the scheduler alone, as in the zero-work
/// measurement); otherwise the whole cluster works, and the dashboard's thread competes with
/// the workers for the machine's cores too.
fn dashboard_cost(exe: &std::path::Path, depth: u64, repeat: u32, zero_work: bool) -> Result<(), String> {
    let journal = std::env::temp_dir().join(format!("rask-bench-journal-{}.jsonl", std::process::id()));
    let journal_arg = journal.to_string_lossy().into_owned();
    let workers: &[&str] = if zero_work { &["--no-nanny", "--zero-work"] } else { &["--no-nanny"] };
    // Dashboards on their default port, or any free one when it is taken (the scheduler picks
    // it: no port chosen here that another process could take first).
    let start = |i: usize| -> Result<(BenchCluster, BlockingClient), String> {
        let args: Vec<&str> = match i {
            0 => vec!["--dashboard-port", "0"],
            1 => vec![],
            _ => vec!["--journal", &journal_arg],
        };
        let c = BenchCluster::start_full(exe, &args, 2, workers)?;
        let client = c.client()?;
        Ok((c, client))
    };
    let (g, outs, expected) = workload("tree", depth)?;
    // Wall time of the computation, and the scheduler process's CPU time until it has settled:
    // all its threads (the dashboard's too), and its main thread alone.
    let run = |cluster: &BenchCluster, c: &BlockingClient| -> Result<(f64, f64, f64, f64), String> {
        let cpu0 = cluster.scheduler_cpu();
        let pid = cluster.scheduler.id();
        let main0 = thread_cpu(pid, pid);
        let t0 = Instant::now();
        let got = c.compute(&g, &outs).map_err(|e| e.to_string())?;
        let secs = t0.elapsed().as_secs_f64();
        let busy = settle(cluster).as_secs_f64();
        let cpu = cluster.cpu_since(cpu0).map_or(f64::NAN, |(s, _)| s.as_secs_f64());
        let main = match (main0, thread_cpu(pid, pid)) {
            (Some(a), Some(b)) => b.saturating_sub(a).as_secs_f64(),
            _ => f64::NAN,
        };
        let got: Vec<Value> = got.into_iter().collect::<Result<_, _>>().map_err(|e| e.to_string())?;
        // Zero-work workers compute nothing (every result is null).
        if !zero_work && got != expected {
            return Err("dashboard: wrong result".into());
        }
        Ok((secs, cpu, busy, main))
    };
    let rounds = 6 * repeat.max(1) + 1;
    let mut secs: [Vec<f64>; 3] = Default::default();
    let mut cpu: [Vec<f64>; 3] = Default::default();
    let mut busy: [Vec<f64>; 3] = Default::default();
    let mut main: [Vec<f64>; 3] = Default::default();
    // Journal bytes per journalled task (warm-ups included: the journal holds them too).
    let (mut journal_bytes, mut journalled) = (0u64, 0usize);
    for round in 0..rounds as usize {
        let order = [round % 3, (round + 1) % 3, (round + 2) % 3];
        let mut clusters: [Option<(BenchCluster, BlockingClient)>; 3] = Default::default();
        for &i in &order {
            let (cluster, c) = start(i)?;
            // The warm-up, checked like the measured runs.
            run(&cluster, &c)?;
            clusters[i] = Some((cluster, c));
        }
        for &i in &order {
            let (cluster, c) = clusters[i].as_ref().ok_or("dashboard: a cluster is missing")?;
            let (s, used, after, core) = run(cluster, c)?;
            secs[i].push(s);
            cpu[i].push(used);
            busy[i].push(after);
            main[i].push(core);
        }
        drop(clusters);
        journal_bytes += std::fs::metadata(&journal).map_or(0, |m| m.len());
        journalled += 2 * g.len();
        let _ = std::fs::remove_file(&journal);
    }
    let tasks = g.len() as f64;
    // Throughput relative to the same round's run without the dashboard, as a change in %:
    // the median, and the middle half of the rounds (how far one can trust it).
    let changes = |i: usize| secs[0].iter().zip(&secs[i]).map(|(off, on)| (off / on - 1.0) * 100.0);
    let change = |i: usize| {
        let (q1, q2, q3) = quartiles(changes(i));
        format!("{q2:+.1}% (middle half {q1:+.1} to {q3:+.1})")
    };
    let best = |i: usize| tasks / secs[i].iter().copied().fold(f64::MAX, f64::min);
    let what = if zero_work { "scheduler alone (zero-work workers)" } else { "whole cluster" };
    println!(
        "dashboard, {what}: tree-{depth}, median of {rounds} rounds: throughput {} with the dashboard, {} with it and a journal ({:.0} journal bytes per task); best runs {:.0} / {:.0} / {:.0} tasks/s without / with / with a journal",
        change(1),
        change(2),
        journal_bytes as f64 / journalled.max(1) as f64,
        best(0),
        best(1),
        best(2),
    );
    // CPU seconds per run, as µs per task in each configuration, and the change from the first.
    let per_task = |label: &str, samples: &[Vec<f64>; 3]| {
        let us = |i: usize| median(samples[i].iter().copied()) * 1e6 / tasks;
        println!(
            "dashboard, {what}: {label}, median: {:.2} µs without the dashboard, {:.2} µs with it ({:+.1}%), {:.2} µs with it and a journal ({:+.1}%)",
            us(0),
            us(1),
            (us(1) / us(0) - 1.0) * 100.0,
            us(2),
            (us(2) / us(0) - 1.0) * 100.0,
        );
    };
    per_task("scheduler process CPU per task (its dashboard thread included, until it caught up)", &cpu);
    per_task(
        "of which the scheduler's main thread (everything but the dashboard's thread: the core, its connections, and recording and publishing changes)",
        &main,
    );
    let after = |i: usize| median(busy[i].iter().copied()) * 1e3;
    println!(
        "dashboard, {what}: the scheduler process stayed busy after the run for (median, in steps of 50 ms; releasing results, and a dashboard catching up) {:.0} ms without the dashboard, {:.0} ms with it, {:.0} ms with it and a journal",
        after(0),
        after(1),
        after(2),
    );
    Ok(())
}

/// Waits (up to 10 s) until the cluster's scheduler process stops using CPU time: under 1 ms
/// in 50 ms, i.e. only its periodic work is left. Returns about how long it was busy before
/// that (in steps of 50 ms); says so when it never settled.
fn settle(cluster: &BenchCluster) -> Duration {
    let started = Instant::now();
    let deadline = started + Duration::from_secs(10);
    let mut last = cluster.scheduler_cpu();
    loop {
        if Instant::now() >= deadline {
            eprintln!("rask bench: the scheduler was still busy 10 s after the run; measuring on");
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
        let now = cluster.scheduler_cpu();
        match (last, now) {
            (Some((a, _)), Some((b, _))) if b.saturating_sub(a) < Duration::from_millis(1) => break,
            (None, _) | (_, None) => break,
            _ => last = now,
        }
    }
    started.elapsed().saturating_sub(Duration::from_millis(50))
}

/// The first quartile, the median and the third quartile (by the nearest rank).
fn quartiles(values: impl Iterator<Item = f64>) -> (f64, f64, f64) {
    let mut v: Vec<f64> = values.collect();
    v.sort_by(f64::total_cmp);
    let at = |q: f64| v.get(((v.len() as f64 - 1.0) * q).round() as usize).copied().unwrap_or(f64::NAN);
    (at(0.25), median(v.iter().copied()), at(0.75))
}

/// The median of some numbers (NaN for none).
fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.collect();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// The faster of two runs of the same workload.
fn faster(best: Option<Row>, row: Row) -> Row {
    match best {
        Some(b) if b.secs <= row.secs => b,
        _ => row,
    }
}

/// Moves `transfer_mib` MiB from one worker to the other; returns GB/s.
fn transfer(client: &BlockingClient, transfer_mib: u64, failures: &mut Vec<String>) -> Result<f64, String> {
    // Transfer: pieces made on bench-0, consumed on bench-1.
    let pieces = transfer_mib / 64;
    let piece = |i: u64| Key::from(format!("piece-{i}"));
    let add_pieces = |b: &mut GraphBuilder| {
        for i in 0..pieces {
            let on0 = Annotations { workers: vec!["bench-0".into()], ..Default::default() };
            let args = vec![ArgSpec::Lit(Value::Int(64 << 20)), ArgSpec::Lit(Value::Int(i as i64))];
            b.add(TaskSpec::new(piece(i), "bytes", args).with_annotations(on0));
        }
    };
    let mut b = GraphBuilder::new();
    add_pieces(&mut b);
    let g = b.build().map_err(|e| e.to_string())?;
    let made = client.submit_graph(&g, &g.sinks());
    client.wait(&made, Some(Duration::from_secs(120))).map_err(|e| e.to_string())?;
    // The same piece tasks (same keys: reused, not recomputed) plus consumers on bench-1.
    let mut b = GraphBuilder::new();
    add_pieces(&mut b);
    for i in 0..pieces {
        let on1 = Annotations { workers: vec!["bench-1".into()], ..Default::default() };
        b.add(TaskSpec::new(format!("size-{i}"), "nbytes", vec![ArgSpec::Ref(piece(i))]).with_annotations(on1));
    }
    let g = b.build().map_err(|e| e.to_string())?;
    let outs: Vec<_> = (0..pieces).filter_map(|i| g.id(&format!("size-{i}"))).collect();
    let t0 = Instant::now();
    let sizes = client.compute(&g, &outs).map_err(|e| e.to_string())?;
    let secs = t0.elapsed().as_secs_f64();
    drop(made);
    let moved = sum_ints(sizes.iter().map(|r| r.as_ref().ok()));
    let bytes = transfer_mib << 20;
    if moved as u64 != bytes {
        failures.push(format!("transfer: moved {moved} bytes, expected {bytes}"));
    }
    Ok(bytes as f64 / secs / 1e9)
}

fn zero_work(exe: &std::path::Path, a: &DistArgs, want: &dyn Fn(&str) -> bool) -> Result<(), String> {
    // The scheduler alone: workers finish every task instantly.
    let zero = BenchCluster::start(exe, 2, true)?;
    let zclient = zero.client()?;
    let zn = if a.common.quick { 10_000 } else { 100_000 };
    if want("zero") {
        let (g, outs, _) = workload("merge", zn)?;
        let mut best: Option<(f64, Option<(Duration, Duration)>)> = None;
        for _ in 0..a.repeat.max(1) {
            let cpu0 = zero.scheduler_cpu();
            let t0 = Instant::now();
            zclient.compute(&g, &outs).map_err(|e| e.to_string())?;
            let secs = t0.elapsed().as_secs_f64();
            if best.is_none_or(|(b, _)| secs < b) {
                best = Some((secs, zero.cpu_since(cpu0)));
            }
        }
        let (secs, cpu) = best.unwrap_or_default();
        let cpu = cpu.map_or(String::new(), |(c, _)| {
            format!(" (scheduler CPU {:.2} µs/task)", c.as_secs_f64() * 1e6 / g.len() as f64)
        });
        println!(
            "zero-work workers (scheduler alone): merge-{}: {} tasks in {secs:.3} s = {:.0} tasks/s{cpu}",
            human(zn),
            g.len(),
            g.len() as f64 / secs
        );
    }
    if a.intake_tasks > 0 && want("intake") {
        let n = if a.common.quick { a.intake_tasks.min(100_000) } else { a.intake_tasks };
        let (g, outs, _) = workload("independent", n)?;
        let spid = zero.scheduler.id().to_string();
        let us = |d: Option<Duration>| d.map_or("-".to_owned(), |d| format!("{:.2}", d.as_secs_f64() * 1e6 / n as f64));
        // Memory is measured on the first run (later ones reuse what it left allocated).
        let mut growth = None;
        let mut best: Option<(f64, f64, Option<Duration>, Option<Duration>)> = None;
        for _ in 0..a.repeat.max(1) {
            let _ = std::fs::write(format!("/proc/{spid}/clear_refs"), "5");
            let base = proc_status_kib(&spid, "VmRSS:");
            let cpu0 = zero.scheduler_cpu();
            let client0 = cpu_of(std::process::id());
            let t0 = Instant::now();
            let futures = zclient.submit_graph(&g, &outs);
            let client_cpu = cpu_of(std::process::id()).zip(client0).map(|(a, b)| a.saturating_sub(b));
            zclient.accepted().map_err(|e| e.to_string())?;
            let intake = t0.elapsed().as_secs_f64();
            let sched_cpu = zero.cpu_since(cpu0).map(|(s, _)| s);
            zclient.wait(&futures, Some(Duration::from_secs(300))).map_err(|e| e.to_string())?;
            let secs = t0.elapsed().as_secs_f64();
            growth.get_or_insert(proc_status_kib(&spid, "VmHWM:").saturating_sub(base) as f64 / n as f64);
            drop(futures);
            // A round-trip: the scheduler has handled the releases (and forgotten the graph)
            // before the next run starts its clock.
            zclient.workers().map_err(|e| e.to_string())?;
            if best.is_none_or(|(b, ..)| intake < b) {
                best = Some((intake, secs, client_cpu, sched_cpu));
            }
        }
        let (intake, secs, client_cpu, sched_cpu) = best.unwrap_or_default();
        println!(
            "zero-work intake: {n} independent tasks taken in by the scheduler in {intake:.3} s = {:.0} tasks/s (client encoding and transfer included; CPU µs/task: client submit {}, scheduler {}); all done in {secs:.3} s = {:.0} tasks/s; scheduler peak RSS growth {:.0} B/task",
            n as f64 / intake,
            us(client_cpu),
            us(sched_cpu),
            n as f64 / secs,
            growth.unwrap_or_default()
        );
    }
    drop(zclient);
    drop(zero);
    Ok(())
}

/// Sum of the integer results (anything else counts 0, so a wrong result shows as a wrong sum).
fn sum_ints<'a>(values: impl Iterator<Item = Option<&'a Value>>) -> i64 {
    values
        .map(|v| match v {
            Some(Value::Int(i)) => *i,
            _ => 0,
        })
        .sum()
}

/// Loopback bandwidth measured by `iperf3` (GB/s), when it is installed.
fn iperf3_gbs() -> Option<f64> {
    let mut server = Command::new("iperf3")
        .args(["-s", "-1", "-B", "127.0.0.1", "-p", "5299"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    std::thread::sleep(Duration::from_millis(300));
    let out = Command::new("iperf3").args(["-c", "127.0.0.1", "-p", "5299", "-t", "3", "-J"]).output().ok();
    let _ = server.kill();
    let _ = server.wait();
    let json: serde_json::Value = serde_json::from_slice(&out?.stdout).ok()?;
    let bps = json["end"]["sum_received"]["bits_per_second"].as_f64()?;
    Some(bps / 8.0 / 1e9)
}
