//! The distributed runtime with real processes on loopback: a scheduler and workers started from
//! the `rask` binary, clients from the command line and from the Rust API. Every wait is bounded
//! and every process is killed when its test ends.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use rask_graph::{Annotations, ArgSpec, GraphBuilder, TaskSpec, Value};
use rask_runtime::{BlockingClient, CallArg, ClientError};

const RASK: &str = env!("CARGO_BIN_EXE_rask");

/// A scheduler and its workers; all killed on drop.
struct Cluster {
    address: String,
    scheduler: Child,
    workers: Vec<Child>,
    /// Environment for every process of the cluster.
    env: Vec<(&'static str, &'static str)>,
}

impl Cluster {
    fn start() -> Cluster {
        Cluster::start_with(&[])
    }

    fn start_with(scheduler_args: &[&str]) -> Cluster {
        Cluster::start_env(scheduler_args, &[])
    }

    fn start_env(scheduler_args: &[&str], env: &[(&'static str, &'static str)]) -> Cluster {
        let mut scheduler = Command::new(RASK)
            .args(["scheduler", "--port", "0"])
            .args(scheduler_args)
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start scheduler");
        let mut line = String::new();
        let stdout = scheduler.stdout.take().expect("piped stdout");
        BufReader::new(stdout).read_line(&mut line).expect("scheduler prints its address");
        let address = line.trim().to_owned();
        assert!(address.starts_with("tcp://127.0.0.1:"), "{address:?}");
        Cluster { address, scheduler, workers: Vec::new(), env: env.to_vec() }
    }

    fn with_workers(n: usize, extra: &[&str]) -> Cluster {
        let mut c = Cluster::start();
        for i in 0..n {
            c.worker(&["--name", &format!("w{i}"), "--nthreads", "2"], extra);
        }
        c
    }

    /// Starts a worker process (unsupervised: the returned PID is the worker itself).
    fn worker(&mut self, args: &[&str], extra: &[&str]) -> u32 {
        self.spawn_worker(&["--no-nanny"], args, extra)
    }

    /// Starts `rask worker` with its supervisor; returns the supervisor's PID.
    fn supervised_worker(&mut self, args: &[&str]) -> u32 {
        self.spawn_worker(&[], args, &[])
    }

    fn spawn_worker(&mut self, mode: &[&str], args: &[&str], extra: &[&str]) -> u32 {
        let child = Command::new(RASK)
            .arg("worker")
            .arg(&self.address)
            .args(mode)
            .args(args)
            .envs(self.env.iter().copied())
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start worker");
        let pid = child.id();
        self.workers.push(child);
        pid
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for c in self.workers.iter_mut().chain(std::iter::once(&mut self.scheduler)) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Runs `rask` to completion within 60 s.
fn rask(args: &[&str]) -> Output {
    rask_env(args, &[])
}

/// [`rask`] with extra environment variables.
fn rask_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut child = Command::new(RASK)
        .args(args)
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start rask");
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let reader = std::thread::spawn(move || {
        let (mut o, mut e) = (Vec::new(), Vec::new());
        let _ = out.read_to_end(&mut o);
        let _ = err.read_to_end(&mut e);
        (o, e)
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = child.try_wait().expect("poll") {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("rask {args:?} did not finish within 60 s");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let (stdout, stderr) = reader.join().expect("reader");
    Output { status, stdout, stderr }
}

fn example(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples").join(name).to_string_lossy().into_owned()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn workflow_json_is_identical_on_embedded_and_on_1_2_3_workers() {
    let files = ["hello.json", "pipeline.json", "failures.json"];
    let embedded: Vec<Output> = files.iter().map(|f| rask(&["run", &example(f), "--json"])).collect();
    for n in 1..=3 {
        let cluster = Cluster::with_workers(n, &["--resources", "GPU=1"]);
        for (f, local) in files.iter().zip(&embedded) {
            let remote = rask(&["run", &example(f), "--json", "--scheduler", &cluster.address]);
            assert_eq!(remote.status.code(), local.status.code(), "{f} on {n} workers: {}", text(&remote.stderr));
            assert_eq!(text(&remote.stdout), text(&local.stdout), "{f} on {n} workers");
        }
    }
}

#[test]
fn ten_clients_at_once_all_get_their_results() {
    let cluster = Cluster::with_workers(2, &[]);
    let expected = text(&rask(&["run", &example("pipeline.json"), "--json"]).stdout);
    let handles: Vec<_> = (0..10)
        .map(|_| {
            let addr = cluster.address.clone();
            std::thread::spawn(move || rask(&["run", &example("pipeline.json"), "--json", "--scheduler", &addr]))
        })
        .collect();
    for h in handles {
        let o = h.join().expect("client thread");
        assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
        assert_eq!(text(&o.stdout), expected);
    }
}

fn one_task_graph(key: &str, op: &str, args: Vec<ArgSpec>) -> (rask_graph::Graph, Vec<rask_graph::TaskId>) {
    let mut b = GraphBuilder::new();
    b.add(TaskSpec::new(key, op, args));
    let g = b.build().expect("valid");
    let out = vec![g.id(key).expect("key")];
    (g, out)
}

#[test]
fn graph_sent_in_many_parts_gives_the_same_result() {
    // 2 000 leaves and a tree of sums over them, in parts of 150 tasks: later parts depend on
    // earlier ones, and the wanted outputs sit in different parts.
    let cluster = Cluster::with_workers(2, &[]);
    let mut c = BlockingClient::connect(&cluster.address).expect("client");
    c.set_part_size(150);
    let mut b = GraphBuilder::new();
    for i in 0..2000i64 {
        b.add(TaskSpec::new(format!("leaf-{i}"), "identity", vec![ArgSpec::Lit(Value::Int(i))]));
    }
    for j in 0..20 {
        let inputs = (0..100).map(|i| ArgSpec::Ref(format!("leaf-{}", j * 100 + i).into())).collect();
        b.add(TaskSpec::new(format!("part-{j}"), "sum", vec![ArgSpec::list(inputs)]));
    }
    let parts = (0..20).map(|j| ArgSpec::Ref(format!("part-{j}").into())).collect();
    b.add(TaskSpec::new("total", "sum", vec![ArgSpec::list(parts)]));
    let g = b.build().expect("graph");
    let outs: Vec<_> = ["total", "leaf-0", "part-19"].iter().map(|k| g.id(k).expect("key")).collect();
    let got: Vec<Value> =
        c.compute(&g, &outs).expect("computes").into_iter().collect::<Result<_, _>>().expect("no task fails");
    let part19: i64 = (1900..2000).sum();
    assert_eq!(got, [Value::Int((0..2000).sum()), Value::Int(0), Value::Int(part19)]);
}

/// Sends `sig` to one of our own child processes.
fn signal(pid: u32, sig: i32) {
    // SAFETY: plain kill(2) on a child process this test started.
    #[allow(unsafe_code)]
    unsafe {
        libc::kill(pid as i32, sig);
    }
}

#[test]
fn frozen_worker_is_dropped_after_the_ttl_and_rejoins_when_it_wakes() {
    let mut cluster = Cluster::start_with(&["--worker-ttl", "2"]);
    let frozen = cluster.worker(&["--name", "frozen", "--nthreads", "1"], &[]);
    cluster.worker(&["--name", "alive", "--nthreads", "1"], &[]);
    let c = BlockingClient::connect(&cluster.address).expect("client");
    let deadline = Instant::now() + Duration::from_secs(20);
    while c.workers().expect("workers").len() < 2 {
        assert!(Instant::now() < deadline, "workers did not join");
        std::thread::sleep(Duration::from_millis(20));
    }
    signal(frozen, libc::SIGSTOP);
    // Work submitted now may first go to the frozen worker; it must all finish on the other.
    let futures = c.map_calls(
        "shell",
        (0..6)
            .map(|i| {
                let script = format!("sleep 0.2; echo {i}");
                let argv = vec![Value::str("sh"), Value::str("-c"), Value::str(&script)];
                vec![CallArg::Value(Value::list(argv))]
            })
            .collect(),
    );
    let got = c.gather(&futures);
    let outs: Vec<String> = got
        .into_iter()
        .map(|r| match r.expect("computed elsewhere") {
            Value::Str(s) => s.trim().to_owned(),
            other => panic!("shell gives a string, not {other:?}"),
        })
        .collect();
    assert_eq!(outs, ["0", "1", "2", "3", "4", "5"]);
    let gone = c.departed_workers().expect("departures");
    let why = gone.iter().find(|d| d.name == "frozen").map(|d| d.cause.clone()).unwrap_or_default();
    assert!(why.contains("heartbeat timeout"), "{gone:?}");
    // Woken up, it finds its connection closed and joins again as a new worker.
    signal(frozen, libc::SIGCONT);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let names: Vec<String> = c.workers().expect("workers").into_iter().map(|w| w.0).collect();
        if names.iter().filter(|n| *n == "frozen").count() == 1 && names.len() == 2 {
            break;
        }
        assert!(Instant::now() < deadline, "the woken worker did not rejoin: {names:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The PID of the worker process that runs a task: the shell's parent.
fn worker_pid(c: &BlockingClient, salt: &str) -> String {
    let script = format!("echo $PPID # {salt}");
    let argv = Value::list(vec![Value::str("sh"), Value::str("-c"), Value::str(&script)]);
    let f = c.submit("shell", vec![CallArg::Value(argv)]);
    match c.gather(std::slice::from_ref(&f)).pop() {
        Some(Ok(Value::Str(s))) => s.trim().to_owned(),
        other => panic!("shell gives the PID: {other:?}"),
    }
}

#[test]
fn supervisor_restarts_a_killed_worker_and_the_scheduler_learns_why() {
    let mut cluster = Cluster::start();
    let nanny = cluster.supervised_worker(&["--name", "phoenix", "--nthreads", "1"]);
    let c = BlockingClient::connect(&cluster.address).expect("client");
    let first = worker_pid(&c, "first");
    assert_ne!(first, nanny.to_string(), "the worker runs in a child process of its supervisor");
    signal(first.parse().expect("pid"), libc::SIGKILL);
    // Restarted: a new process does the next task.
    let second = worker_pid(&c, "second");
    assert_ne!(second, first);
    let gone = c.departed_workers().expect("departures");
    let why = gone.iter().find(|d| d.name == "phoenix").map(|d| d.cause.clone()).unwrap_or_default();
    assert!(why.contains("killed by signal 9") && why.contains("restarted by its supervisor"), "{gone:?}");
    // SIGTERM to the supervisor stops its worker too.
    signal(nanny, libc::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(20);
    while c.workers().expect("workers").iter().any(|w| w.0 == "phoenix") {
        assert!(Instant::now() < deadline, "the worker outlived its supervisor");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn task_that_kills_its_worker_every_time_ends_as_killed_worker_and_the_rest_completes() {
    let dir = scratch("killer");
    let mut cluster = Cluster::start();
    cluster.supervised_worker(&["--name", "victim", "--nthreads", "1"]);
    let file = dir.join("w.json");
    std::fs::write(
        &file,
        r#"{"version": 1, "tasks": {
            "bomb": {"op": "shell", "args": [["sh", "-c", "kill -9 $PPID"]]},
            "fine": {"op": "add", "args": [2, 3]}
        }}"#,
    )
    .expect("write");
    let o = rask(&["run", &file.to_string_lossy(), "--json", "--scheduler", &cluster.address]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o.stderr));
    let out: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(out["fine"], 5);
    let message = out["bomb"]["$error"]["message"].as_str().unwrap_or_default().to_owned();
    assert!(message.contains("4 workers died while running it"), "{message}");
    assert!(message.contains("victim"), "{message}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn progress_reaches_the_client_and_is_drawn_only_on_a_terminal() {
    let dir = scratch("progress");
    let mut cluster = Cluster::start();
    cluster.worker(&["--name", "w", "--nthreads", "2"], &[]);
    // 40 tasks of 40 ms on 2 threads: about 0.8 s, several of the scheduler's 250 ms ticks.
    let n = 40;
    let mut b = GraphBuilder::new();
    for i in 0..n {
        b.add(TaskSpec::new(format!("s{i}"), "sleep", vec![ArgSpec::Lit(Value::Int(40)), ArgSpec::Lit(Value::Int(i))]));
    }
    let g = b.build().expect("valid graph");
    let outs = g.sinks();
    let c = BlockingClient::connect(&cluster.address).expect("connect");
    let futures = c.submit_graph(&g, &outs);
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !futures.iter().all(rask_runtime::RemoteFuture::done) {
        assert!(Instant::now() < deadline, "the graph did not finish");
        seen.push(c.client().progress());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(seen.iter().any(|(done, total)| *total == n as u64 && *done > 0 && *done < *total), "{seen:?}");
    assert!(seen.windows(2).all(|w| w[0].0 <= w[1].0 || w[1] == (0, 0)), "progress only grows: {seen:?}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while c.client().progress() != (n as u64, n as u64) {
        assert!(Instant::now() < deadline, "the end was not told: {:?}", c.client().progress());
        std::thread::sleep(Duration::from_millis(10));
    }
    drop(futures);

    // The same work from the command line: a bar on a terminal, none in a pipe.
    let tasks: Vec<String> = (0..n).map(|i| format!(r#""s{i}": {{"op": "sleep", "args": [40, {i}]}}"#)).collect();
    let file = dir.join("w.json");
    std::fs::write(&file, format!(r#"{{"version": 1, "tasks": {{{}}}}}"#, tasks.join(", "))).expect("write");
    let piped = rask(&["run", &file.to_string_lossy(), "--scheduler", &cluster.address]);
    assert!(piped.status.success(), "{}", text(&piped.stderr));
    assert!(!text(&piped.stderr).contains("/40 tasks"), "no bar in a pipe: {}", text(&piped.stderr));
    let command = format!("{RASK} run {} --scheduler {}", file.display(), cluster.address);
    // Bounded like every other wait here: timeout(1) ends a run that hangs.
    let tty = Command::new("timeout")
        .args(["60", "script", "-qec", &command, "/dev/null"])
        .env("TERM", "xterm")
        .stdin(Stdio::null())
        .output()
        .expect("script(1) runs the command on a pseudo-terminal");
    assert!(tty.status.success(), "{}", text(&tty.stdout));
    assert!(text(&tty.stdout).contains("/40 tasks"), "a bar on a terminal: {:?}", text(&tty.stdout));
    let _ = std::fs::remove_dir_all(dir);
}

/// A random graph with fan-in and fan-out (deterministic from `seed`): `n` additions over
/// earlier results, every sixteenth waiting 10 ms first, so a run lasts long enough to be hit
/// (`n` + `n`/8 tasks).
fn chaos_graph(seed: u64, n: usize) -> (rask_graph::Graph, Vec<rask_graph::TaskId>) {
    let mut x = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
    let mut rand = move |m: usize| {
        x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        ((x >> 33) as usize) % m.max(1)
    };
    let mut b = GraphBuilder::new();
    for i in 0..n {
        let mut args = vec![ArgSpec::Lit(Value::Int(i as i64))];
        if i > 0 {
            for _ in 0..rand(4) {
                let d = rand(i);
                let key = format!("v{seed}-{d}");
                if !args.iter().any(|a| matches!(a, ArgSpec::Ref(k) if k.as_str() == key)) {
                    args.push(ArgSpec::Ref(key.into()));
                }
            }
        }
        if i % 16 == 15 {
            let z = format!("z{seed}-{i}");
            b.add(TaskSpec::new(
                z.clone(),
                "sleep",
                vec![ArgSpec::Lit(Value::Int(10)), ArgSpec::Lit(Value::Int(i as i64))],
            ));
            let zero = ArgSpec::list(vec![ArgSpec::Ref(z.into()), ArgSpec::Lit(Value::Int(0))]);
            b.add(TaskSpec::new(format!("y{seed}-{i}"), "index", vec![zero, ArgSpec::Lit(Value::Int(1))]));
            args.push(ArgSpec::Ref(format!("y{seed}-{i}").into()));
        }
        b.add(TaskSpec::new(format!("v{seed}-{i}"), "add", args));
    }
    let g = b.build().expect("valid graph");
    let outs = g.sinks();
    (g, outs)
}

/// The PIDs of a process's children.
fn children_of(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

#[test]
fn chaos_random_graphs_give_exact_results_while_workers_are_killed() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
    let mut cluster = Cluster::start();
    let nannies: Vec<u32> =
        (0..3).map(|i| cluster.supervised_worker(&["--name", &format!("c{i}"), "--nthreads", "2"])).collect();
    let c = BlockingClient::connect(&cluster.address).expect("client");
    let deadline = Instant::now() + Duration::from_secs(20);
    while c.workers().expect("workers").len() < 3 {
        assert!(Instant::now() < deadline, "workers did not join");
        std::thread::sleep(Duration::from_millis(20));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let kills = Arc::new(AtomicU32::new(0));
    let killer = {
        let (stop, kills) = (Arc::clone(&stop), Arc::clone(&kills));
        std::thread::spawn(move || {
            let mut i = 0usize;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                std::thread::sleep(Duration::from_millis(300 + (i * 97 % 400) as u64));
                // A random supervisor's current worker process (none while it restarts).
                if let Some(pid) = children_of(nannies[i * 7 % nannies.len()]).first() {
                    signal(*pid, libc::SIGKILL);
                    kills.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    let oracle = rask_local::SyncScheduler::new(rask_local::LocalConfig::default());
    for run in 0..20u64 {
        let (g, outs) = chaos_graph(run, 2400);
        assert!(g.len() >= 2500, "a few thousand tasks per run");
        let expected = rask_graph::Executor::run(&oracle, &g, &outs).expect("sync run");
        let got = c.compute(&g, &outs).expect("the cluster answers");
        assert_eq!(got, expected, "run {run}");
    }
    stop.store(true, Ordering::Relaxed);
    killer.join().expect("killer");
    let kills = kills.load(Ordering::Relaxed);
    assert!(kills >= 20, "only {kills} workers were killed: the test did not test much");
}

#[test]
fn token_protected_cluster_refuses_peers_without_the_token_and_keeps_serving() {
    let mut cluster = Cluster::start_with(&["--token", "s3cret"]);
    cluster.worker(&["--name", "w0"], &["--token", "s3cret"]);
    let pipeline = example("pipeline.json");
    let run = |extra: &[&str]| {
        let mut a = vec!["run", pipeline.as_str(), "--json", "--scheduler", cluster.address.as_str()];
        a.extend_from_slice(extra);
        rask(&a)
    };
    let o = run(&[]);
    assert_eq!(o.status.code(), Some(3), "no token: cannot connect");
    assert!(text(&o.stderr).contains("requires a token"), "{}", text(&o.stderr));
    let o = run(&["--token", "guess"]);
    assert_eq!(o.status.code(), Some(3));
    assert!(text(&o.stderr).contains("does not know this cluster's token"), "{}", text(&o.stderr));
    let o = rask(&["worker", &cluster.address, "--no-nanny", "--reconnect-timeout", "1"]);
    assert_eq!(o.status.code(), Some(1), "a worker without the token cannot join");
    assert!(text(&o.stderr).contains("requires a token"), "{}", text(&o.stderr));
    // Garbage on the port, then the real thing.
    let host_port = cluster.address.trim_start_matches("tcp://").to_owned();
    let mut g = std::net::TcpStream::connect(&host_port).expect("connect");
    let _ = g.write_all(b"\x00\x00\x00\x05hello");
    drop(g);
    let o = run(&["--token", "s3cret"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let local = rask(&["run", &pipeline, "--json"]);
    assert_eq!(text(&o.stdout), text(&local.stdout));
}

/// The `--tls-*` flags for a certificate set written by `rask dev-certs`.
fn tls_flags(certs: &Path) -> Vec<String> {
    let f = |n: &str| certs.join(n).to_string_lossy().into_owned();
    ["--tls-ca".into(), f("ca.pem"), "--tls-cert".into(), f("node.pem"), "--tls-key".into(), f("node-key.pem")].into()
}

#[test]
fn tls_cluster_computes_identically_and_refuses_plaintext_and_foreign_peers_on_both_ends() {
    let dir = scratch("tls");
    let (certs, foreign) = (dir.join("certs"), dir.join("foreign"));
    for d in [&certs, &foreign] {
        let o = rask(&["dev-certs", &d.to_string_lossy()]);
        assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    }
    let o = rask(&["dev-certs", &certs.to_string_lossy()]);
    assert_eq!(o.status.code(), Some(1), "dev-certs must not overwrite a certificate set");
    assert!(text(&o.stderr).contains("already exists"), "{}", text(&o.stderr));
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(certs.join("node-key.pem")).expect("key").permissions().mode();
    assert_eq!(mode & 0o077, 0, "private keys are for their owner only: {mode:o}");

    let flags = tls_flags(&certs);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let log = dir.join("scheduler.log");
    let mut scheduler = Command::new(RASK)
        .args(["scheduler", "--port", "0"])
        .args(&flags)
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("start scheduler");
    let mut line = String::new();
    BufReader::new(scheduler.stdout.take().expect("stdout")).read_line(&mut line).expect("address");
    let address = line.trim().to_owned();
    assert!(address.starts_with("tls://127.0.0.1:"), "a TLS scheduler says so in its address: {address:?}");
    let mut cluster = Cluster { address: address.clone(), scheduler, workers: Vec::new(), env: Vec::new() };
    // One worker in-process, one under its supervisor (which hands the TLS files down).
    cluster.worker(&["--name", "w0", "--nthreads", "1"], &flags);
    cluster.spawn_worker(&[], &["--name", "w1", "--nthreads", "1"], &flags);
    let pipeline = example("pipeline.json");
    let run = |extra: &[&str], at: &str| {
        let mut a = vec!["run", pipeline.as_str(), "--json", "--scheduler", at];
        a.extend_from_slice(extra);
        rask(&a)
    };
    let local = rask(&["run", &pipeline, "--json"]);
    let o = run(&flags, &address);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    assert_eq!(text(&o.stdout), text(&local.stdout), "over TLS, byte for byte the embedded run");

    // A plaintext client is told TLS is required, whatever scheme it dials.
    let plain_address = address.replace("tls://", "tcp://");
    let o = run(&[], &plain_address);
    assert_eq!(o.status.code(), Some(3));
    assert!(text(&o.stderr).contains("this cluster requires TLS"), "{}", text(&o.stderr));
    let o = run(&[], &address);
    assert_eq!(o.status.code(), Some(3));
    assert!(text(&o.stderr).contains("no TLS configured"), "{}", text(&o.stderr));
    // A client of another cluster (another CA) is refused; so is a plaintext worker.
    let other = tls_flags(&foreign);
    let other: Vec<&str> = other.iter().map(String::as_str).collect();
    let o = run(&other, &address);
    assert_eq!(o.status.code(), Some(3));
    assert!(text(&o.stderr).contains("not signed by this process's CA"), "{}", text(&o.stderr));
    let o = rask(&["worker", &plain_address, "--no-nanny", "--reconnect-timeout", "1"]);
    assert_eq!(o.status.code(), Some(1), "a plaintext worker cannot join");
    assert!(text(&o.stderr).contains("requires TLS"), "{}", text(&o.stderr));
    // Garbage that looks like TLS, then the real thing.
    let host_port = address.trim_start_matches("tls://").to_owned();
    let mut g = std::net::TcpStream::connect(&host_port).expect("connect");
    let _ = g.write_all(b"\x16\x03\x01\x00\x05hello\xff\xff");
    drop(g);
    let o = run(&flags, &address);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    assert_eq!(text(&o.stdout), text(&local.stdout));

    // A TLS client at a plaintext scheduler learns that the peer does not speak TLS.
    let plain = Cluster::with_workers(1, &[]);
    let o = run(&flags, &plain.address);
    assert_eq!(o.status.code(), Some(3));
    assert!(text(&o.stderr).contains("not running with TLS"), "{}", text(&o.stderr));
    let o = run(&[], &plain.address);
    assert_eq!(o.status.code(), Some(0), "the plaintext cluster keeps serving: {}", text(&o.stderr));

    // The scheduler's side of each refusal.
    let log = std::fs::read_to_string(&log).expect("scheduler log");
    assert!(log.contains("plaintext connection refused: the scheduler requires TLS"), "{log}");
    assert!(log.contains("rejected this process's certificate"), "{log}");
    assert!(log.contains("TLS handshake failed"), "{log}");
    drop(cluster);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn sigterm_retires_a_worker_after_its_results_move_so_nothing_is_recomputed() {
    let dir = scratch("retire");
    let log = dir.join("runs");
    let mut cluster = Cluster::start();
    let leaving = cluster.worker(&["--name", "leaving", "--nthreads", "1"], &[]);
    cluster.worker(&["--name", "staying", "--nthreads", "1"], &[]);
    let c = BlockingClient::connect(&cluster.address).expect("client");
    let deadline = Instant::now() + Duration::from_secs(20);
    while c.workers().expect("workers").len() < 2 {
        assert!(Instant::now() < deadline, "workers did not join");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Four results made on `leaving` (each run logged), held by this client.
    let mut b = GraphBuilder::new();
    for i in 0..4 {
        let on = Annotations { workers: vec!["leaving".into()], allow_other_workers: true, ..Default::default() };
        let script = format!("echo ran >> {}; echo value-{i}", log.display());
        let argv = ArgSpec::Lit(Value::list(vec![Value::str("sh"), Value::str("-c"), Value::str(&script)]));
        b.add(TaskSpec::new(format!("r{i}"), "shell", vec![argv]).with_annotations(on));
    }
    let g = b.build().expect("graph");
    let futures = c.submit_graph(&g, &g.sinks());
    c.wait(&futures, Some(Duration::from_secs(30))).expect("made");
    signal(leaving, libc::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(25);
    while c.workers().expect("workers").iter().any(|w| w.0 == "leaving") {
        assert!(Instant::now() < deadline, "the worker did not retire");
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut values: Vec<String> = c
        .gather(&futures)
        .into_iter()
        .map(|r| match r.expect("still available") {
            Value::Str(s) => s.trim().to_owned(),
            other => panic!("{other:?}"),
        })
        .collect();
    values.sort();
    assert_eq!(values, ["value-0", "value-1", "value-2", "value-3"]);
    let runs = std::fs::read_to_string(&log).expect("log").lines().count();
    assert_eq!(runs, 4, "a result was recomputed instead of moved");
    let gone = c.departed_workers().expect("departures");
    assert!(gone.iter().any(|d| d.name == "leaving" && d.cause.contains("retired gracefully")), "{gone:?}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn value_too_large_to_send_fails_its_consumer_with_the_reason_instead_of_hanging() {
    // A 1 MB frame limit for every process, a 2 MB value needed on another worker, and two
    // 400 kB values fetched together.
    let env = [("RASK_MAX_FRAME_BYTES", "1000000")];
    let dir = scratch("toolarge");
    let mut cluster = Cluster::start_env(&[], &env);
    cluster.worker(&["--name", "w0"], &[]);
    cluster.worker(&["--name", "w1"], &[]);
    let file = dir.join("w.json");
    std::fs::write(
        &file,
        r#"{"version": 1, "tasks": {
            "big": {"op": "bytes", "args": [2000000], "workers": ["w0"]},
            "size": {"op": "nbytes", "args": [{"$ref": "big"}], "workers": ["w1"]},
            "ok": {"op": "add", "args": [1, 2]},
            "p1": {"op": "bytes", "args": [400000, 1], "workers": ["w0"]},
            "p2": {"op": "bytes", "args": [400000, 2], "workers": ["w0"]},
            "both": {"op": "concat", "args": [{"$ref": "p1"}, {"$ref": "p2"}], "workers": ["w1"]},
            "bothsize": {"op": "nbytes", "args": [{"$ref": "both"}]}
        }, "outputs": ["size", "ok", "bothsize"]}"#,
    )
    .expect("write");
    let o = rask_env(&["run", &file.to_string_lossy(), "--json", "--scheduler", &cluster.address], &env);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o.stderr));
    let out: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(out["ok"], 3);
    // Two values that fit a frame each but not together travel in two frames.
    assert_eq!(out["bothsize"], 800_000);
    let message = out["size"]["$error"]["message"].as_str().unwrap_or_default().to_owned();
    assert!(message.contains("cannot be sent") && message.contains("frame limit"), "{message}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn results_three_times_the_memory_limits_spill_to_disk_and_the_reduction_is_exact() {
    let mut cluster = Cluster::start();
    let pids: Vec<(u32, &str)> = ["m0", "m1"]
        .into_iter()
        .map(|name| (cluster.worker(&["--name", name, "--nthreads", "1", "--memory-limit", "20MB"], &[]), name))
        .collect();
    let c = BlockingClient::connect(&cluster.address).expect("client");
    // 60 results of 2 MB held by this client: 120 MB on two workers limited to 20 MB each.
    let mut b = GraphBuilder::new();
    for i in 0..60i64 {
        b.add(TaskSpec::new(
            format!("load-{i}"),
            "bytes",
            vec![ArgSpec::Lit(Value::Int(2_000_000)), ArgSpec::Lit(Value::Int(i))],
        ));
    }
    let g = b.build().expect("graph");
    let loads = c.submit_graph(&g, &g.sinks());
    c.wait(&loads, Some(Duration::from_secs(60))).expect("loaded");
    // The workers report their memory with their heartbeats.
    let deadline = Instant::now() + Duration::from_secs(10);
    let memory = loop {
        let m = c.worker_memory().expect("memory");
        if m.len() == 2 && m.iter().map(|w| w.managed_bytes + w.spilled_bytes).sum::<u64>() >= 120_000_000 {
            break m;
        }
        assert!(Instant::now() < deadline, "memory reports: {m:?}");
        std::thread::sleep(Duration::from_millis(100));
    };
    for w in &memory {
        assert!(w.managed_bytes <= 12_000_000, "over 60% of the limit in memory: {w:?}");
        assert!(w.spilled_bytes > 0, "nothing spilled: {w:?}");
    }
    // Reduce over everything (spilled results are read back), and fetch two of them.
    let mut b = GraphBuilder::new();
    let sizes: Vec<ArgSpec> = (0..60)
        .map(|i| {
            b.add(TaskSpec::new(
                format!("load-{i}"),
                "bytes",
                vec![ArgSpec::Lit(Value::Int(2_000_000)), ArgSpec::Lit(Value::Int(i))],
            ));
            b.add(TaskSpec::new(format!("size-{i}"), "nbytes", vec![ArgSpec::Ref(format!("load-{i}").into())]));
            ArgSpec::Ref(format!("size-{i}").into())
        })
        .collect();
    b.add(TaskSpec::new("total", "sum", vec![ArgSpec::list(sizes)]));
    let g = b.build().expect("graph");
    let total = c.submit_graph(&g, &[g.id("total").expect("total")]);
    c.wait(&total, Some(Duration::from_secs(60))).expect("reduced within a minute");
    let got = c.gather(&total).pop().expect("one result");
    assert_eq!(got.expect("no failure"), Value::Int(120_000_000));
    let two = c.gather(&loads[..2]);
    for (i, v) in two.into_iter().enumerate() {
        let Ok(Value::Bytes(bytes)) = v else { panic!("load-{i} comes back as bytes") };
        let seed = loads[i].key().as_str().trim_start_matches("load-").parse::<usize>().expect("index");
        assert!(bytes.len() == 2_000_000 && bytes.iter().enumerate().all(|(j, b)| *b as usize == (seed + j) % 256));
    }
    assert!(c.departed_workers().expect("departures").is_empty(), "no worker was lost");
    // Released results leave the disk too.
    drop(loads);
    drop(total);
    let deadline = Instant::now() + Duration::from_secs(10);
    for (pid, name) in pids {
        let dir = std::env::temp_dir().join(format!("rask-spill-{pid}-{name}"));
        while std::fs::read_dir(&dir).map(|d| d.count()).unwrap_or(0) > 0 {
            assert!(Instant::now() < deadline, "spill files left in {}", dir.display());
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

#[test]
fn task_allocating_past_the_limit_every_time_ends_as_killed_worker_for_memory() {
    let dir = scratch("memkill");
    let mut cluster = Cluster::start();
    cluster.supervised_worker(&["--name", "small", "--nthreads", "1", "--memory-limit", "100MB"]);
    let file = dir.join("w.json");
    std::fs::write(
        &file,
        r#"{"version": 1, "tasks": {
            "big": {"op": "bytes", "args": [400000000]},
            "hold": {"op": "sleep", "args": [3000, {"$ref": "big"}]},
            "ok": {"op": "add", "args": [1, 2]}
        }, "outputs": ["hold", "ok"]}"#,
    )
    .expect("write");
    let o = rask(&["run", &file.to_string_lossy(), "--json", "--scheduler", &cluster.address]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o.stderr));
    let out: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(out["ok"], 3);
    let message = out["hold"]["$error"]["message"].as_str().unwrap_or_default().to_owned();
    assert!(message.contains("4 workers died while running it"), "{message}");
    assert!(message.contains("for memory"), "{message}");
    // rask run also says which workers left during the run, and why.
    let err = text(&o.stderr);
    assert!(err.contains("worker small") && err.contains("left during the run") && err.contains("for memory"), "{err}");
    let _ = std::fs::remove_dir_all(dir);
}

/// A client speaking the protocol by hand (to send what `Client` never would): a runtime, and a
/// connection to `address` past the handshake.
fn raw_client(address: &str, name: &str) -> (tokio::runtime::Runtime, tokio::net::TcpStream) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let host_port = address.trim_start_matches("tcp://").to_owned();
    let s = rt.block_on(async {
        let mut s = tokio::net::TcpStream::connect(&host_port).await.expect("connect");
        let role = rask_protocol::handshake::Role::Client { name: name.into() };
        rask_protocol::handshake::connect(&mut s, &role).await.expect("handshake");
        s
    });
    (rt, s)
}

#[test]
fn client_leaving_halfway_through_a_graph_in_parts_leaves_nothing_behind() {
    use rask_protocol::msg::ToScheduler;
    use rask_protocol::wire::{WireArg, WireBody, WireCall, WireTask, WireValue};
    let mut cluster = Cluster::start();
    cluster.worker(&["--name", "w0", "--nthreads", "1"], &[]);
    let observer = BlockingClient::connect(&cluster.address).expect("observer");
    let held = |c: &BlockingClient| c.worker_memory().expect("memory").iter().map(|w| w.managed_bytes).sum::<u64>();
    // A raw client sends the first part of a graph (five wanted 1 MB values, which start at
    // once) and never sends the rest.
    let (rt, mut s) = raw_client(&cluster.address, "quitter");
    let stream = rt.block_on(async {
        let tasks = (0..5)
            .map(|i| WireTask {
                key: format!("half-{i}").as_str().into(),
                deps: Vec::new(),
                body: WireBody::Call(WireCall {
                    op: "bytes".into(),
                    args: vec![WireArg::Lit(WireValue::Int(1_000_000)), WireArg::Lit(WireValue::Int(i))],
                })
                .into(),
                annotations: None,
                order: i as u32,
                wanted: true,
            })
            .collect();
        rask_protocol::frame::write_frame(&mut s, &[ToScheduler::SubmitPart { tasks }], &[]).await.expect("part");
        s
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    while held(&observer) < 5_000_000 {
        assert!(Instant::now() < deadline, "the part's values were not computed");
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(stream);
    drop(rt);
    let deadline = Instant::now() + Duration::from_secs(20);
    while held(&observer) > 0 {
        assert!(Instant::now() < deadline, "values of the abandoned submission are still held");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn key_shared_by_two_clients_survives_one_closing() {
    let cluster = Cluster::with_workers(1, &[]);
    let (g, outs) =
        one_task_graph("shared", "bytes", vec![ArgSpec::Lit(Value::Int(100_000)), ArgSpec::Lit(Value::Int(3))]);
    let a = BlockingClient::connect(&cluster.address).expect("client a");
    let b = BlockingClient::connect(&cluster.address).expect("client b");
    let fa = a.submit_graph(&g, &outs);
    a.wait(&fa, Some(Duration::from_secs(30))).expect("computed");
    let fb = b.submit_graph(&g, &outs);
    drop(fa);
    drop(a); // closes its connection: its futures are released
    std::thread::sleep(Duration::from_millis(200));
    let got = b.gather(&fb).pop().expect("one result").expect("still held for b");
    let Value::Bytes(bytes) = got else { panic!("bytes expected") };
    assert_eq!(bytes.len(), 100_000);
    assert!(bytes.iter().enumerate().all(|(i, x)| usize::from(*x) == (3 + i) % 256));
}

#[test]
fn client_api_submit_map_gather_wait_and_as_completed() {
    let cluster = Cluster::with_workers(2, &[]);
    let c = BlockingClient::connect(&cluster.address).expect("client");
    let xs = c.map_calls(
        "mul",
        (0..50).map(|i| vec![CallArg::Value(Value::Int(i)), CallArg::Value(Value::Int(2))]).collect(),
    );
    let total = c.submit("sum", vec![CallArg::Value(Value::list(vec![Value::Int(1), Value::Int(2)]))]);
    let add = c.submit("add", vec![CallArg::Future(&xs[10]), CallArg::Future(&total)]);
    let values: Vec<Value> = c.gather(&xs).into_iter().map(|r| r.expect("computed")).collect();
    assert_eq!(values, (0..50).map(|i| Value::Int(i * 2)).collect::<Vec<_>>());
    assert_eq!(c.gather(std::slice::from_ref(&add)).pop().expect("one").expect("ok"), Value::Int(23));
    c.wait(&xs, Some(Duration::from_secs(10))).expect("all done");
    // as_completed yields every future exactly once.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("rt");
    let mut it =
        c.client().as_completed(c.map_calls("noop", (0..5).map(|i| vec![CallArg::Value(Value::Int(i))]).collect()));
    let mut seen = Vec::new();
    while let Some((i, _)) = rt.block_on(it.next()).expect("connection up") {
        seen.push(i);
    }
    seen.sort_unstable();
    assert_eq!(seen, [0, 1, 2, 3, 4]);
    // Remote errors carry the task's message.
    let bad = c.submit("div", vec![CallArg::Value(Value::Int(1)), CallArg::Value(Value::Int(0))]);
    match c.gather(&[bad]).pop().expect("one") {
        Err(ClientError::Task(e)) => assert_eq!(e.message, "op `div`: division by zero"),
        other => panic!("expected a task error, got {other:?}"),
    }
}

#[test]
fn unknown_function_is_a_task_error_naming_function_and_worker() {
    let cluster = Cluster::with_workers(1, &[]);
    let c = BlockingClient::connect(&cluster.address).expect("client");
    let f = c.submit("not-registered-anywhere", vec![]);
    match c.gather(&[f]).pop().expect("one") {
        Err(ClientError::Task(e)) => {
            assert!(e.message.contains("unknown op `not-registered-anywhere`"), "{}", e.message);
            assert!(e.message.contains("on worker w0"), "{}", e.message);
        }
        other => panic!("expected a task error, got {other:?}"),
    }
    // The worker is still serving.
    let ok = c.submit("add", vec![CallArg::Value(Value::Int(1)), CallArg::Value(Value::Int(1))]);
    assert_eq!(c.gather(&[ok]).pop().expect("one").expect("ok"), Value::Int(2));
}

#[test]
fn task_whose_body_does_not_decode_fails_alone_naming_the_worker() {
    use rask_protocol::msg::{FromScheduler, ToScheduler};
    use rask_protocol::wire::{TaskBody, WireArg, WireBody, WireCall, WireTask, WireValue};
    let dir = scratch("bad-body");
    let (mut cluster, web) = observed_cluster(&dir.join("journal.jsonl"));
    cluster.worker(&["--name", "w0", "--nthreads", "1"], &[]);
    // A raw client: bodies travel encoded and the scheduler forwards them unread, so one that
    // is not a body at all reaches the worker, submitted with a good one.
    let (rt, mut s) = raw_client(&cluster.address, "raw");
    let outcomes = rt.block_on(async {
        let task = |key: &str, body: TaskBody| WireTask {
            key: key.into(),
            deps: Vec::new(),
            body,
            annotations: None,
            order: 0,
            wanted: true,
        };
        let junk = TaskBody::Encoded(std::sync::Arc::from(&[0xff_u8, 0xff, 0xff, 0x07][..]));
        let add =
            WireCall { op: "add".into(), args: vec![WireArg::Lit(WireValue::Int(1)), WireArg::Lit(WireValue::Int(2))] };
        let tasks = vec![task("junk", junk), task("fine", WireBody::Call(add).into())];
        let submit = ToScheduler::SubmitGraph { tasks, wanted: Vec::new() };
        rask_protocol::frame::write_frame(&mut s, &[submit], &[]).await.expect("submit");
        let mut outcomes = std::collections::BTreeMap::new();
        while outcomes.len() < 2 {
            let frame = tokio::time::timeout(Duration::from_secs(20), rask_protocol::frame::read_frame(&mut s))
                .await
                .expect("both tasks settle within 20 s")
                .expect("reads")
                .expect("the scheduler keeps the connection");
            for m in frame.messages {
                match m {
                    FromScheduler::KeyErred { key, error } => {
                        outcomes.insert(key.as_str().to_owned(), Err(error.message))
                    }
                    FromScheduler::KeyInMemory { key, .. } => outcomes.insert(key.as_str().to_owned(), Ok(())),
                    _ => None,
                };
            }
        }
        outcomes
    });
    match &outcomes["junk"] {
        Err(message) => assert!(
            message.starts_with("worker w0 cannot run task \"junk\": its body is not an encoded function call ("),
            "{message}"
        ),
        Ok(()) => panic!("a body that is not one ran"),
    }
    assert_eq!(outcomes["fine"], Ok(()), "the good task of the same message ran");
    // The worker and the scheduler are still serving, and the failure left nothing counted as
    // running on the worker.
    let c = BlockingClient::connect(&cluster.address).expect("client");
    let calls = (0..4).map(|i| vec![CallArg::Value(Value::Int(i)), CallArg::Value(Value::Int(1))]).collect();
    let futures = c.map_calls("add", calls);
    c.wait(&futures, Some(Duration::from_secs(20))).expect("computed");
    let got: Vec<Value> = c.gather(&futures).into_iter().map(|r| r.expect("ok")).collect();
    assert_eq!(got, (1..5).map(Value::Int).collect::<Vec<_>>());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (code, body) = http_get(&web, "/api/status");
        assert_eq!(code, 200);
        let s: serde_json::Value = serde_json::from_str(&body).expect("status JSON");
        if s["workers"][0]["processing"] == 0 && s["failed"] == 1 && s["completed"] == 5 {
            break;
        }
        assert!(Instant::now() < deadline, "a slot stayed taken, or the counts are off: {s}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn cancel_of_pending_and_running_futures() {
    let cluster = Cluster::with_workers(1, &[]);
    let c = BlockingClient::connect(&cluster.address).expect("client");
    let running = c.submit("sleep", vec![CallArg::Value(Value::Int(1500))]);
    let pending = c.submit("identity", vec![CallArg::Future(&running)]);
    std::thread::sleep(Duration::from_millis(200));
    c.cancel(&[running.clone(), pending.clone()]);
    for r in c.gather(&[running, pending]) {
        assert!(matches!(r, Err(ClientError::Cancelled(_))), "{r:?}");
    }
    // The cluster keeps working.
    let ok = c.submit("mul", vec![CallArg::Value(Value::Int(6)), CallArg::Value(Value::Int(7))]);
    assert_eq!(c.gather(&[ok]).pop().expect("one").expect("ok"), Value::Int(42));
}

/// A shell step that prints the pid of the process that ran it (the worker).
fn whoami(dir: &Path, lock: bool) -> String {
    let body = if lock {
        format!("mkdir {0}/lock || exit 9; sleep 0.2; rmdir {0}/lock; echo $PPID", dir.display())
    } else {
        "echo $PPID".to_owned()
    };
    format!(r#"{{"op": "shell", "args": [["sh", "-c", "{body}"]]"#)
}

/// A fresh directory for one test, removed when the test ends, failed or not.
fn scratch(name: &str) -> Scratch {
    let d = std::env::temp_dir().join(format!("rask-dist-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("scratch");
    Scratch(d)
}

/// See [`scratch`].
struct Scratch(PathBuf);

impl std::ops::Deref for Scratch {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for Scratch {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn gpu_tasks_run_only_where_advertised_and_never_two_at_once() {
    let dir = scratch("gpu");
    let mut cluster = Cluster::start();
    let gpu_pid = cluster.worker(&["--name", "gpu", "--nthreads", "4", "--resources", "GPU=1"], &[]);
    cluster.worker(&["--name", "cpu", "--nthreads", "4"], &[]);
    let tasks: Vec<String> =
        (0..6).map(|i| format!(r#""g{i}": {}, "resources": {{"GPU": 1}}}}"#, whoami(&dir, true))).collect();
    let file = dir.join("w.json");
    std::fs::write(&file, format!(r#"{{"version": 1, "tasks": {{{}}}}}"#, tasks.join(",\n"))).expect("write");
    let o = rask(&["run", file.to_str().expect("utf-8"), "--json", "--scheduler", &cluster.address]);
    assert_eq!(o.status.code(), Some(0), "a task failed (two ran at once?): {}", text(&o.stdout));
    let out: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    for i in 0..6 {
        let pid = out[format!("g{i}")].as_str().expect("pid").trim().to_owned();
        assert_eq!(pid, gpu_pid.to_string(), "g{i} ran on a worker without a GPU");
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn task_runs_where_its_large_input_lives() {
    let dir = scratch("locality");
    let mut cluster = Cluster::start();
    let a_pid = cluster.worker(&["--name", "a", "--nthreads", "1"], &[]);
    cluster.worker(&["--name", "b", "--nthreads", "1"], &[]);
    let file = dir.join("w.json");
    std::fs::write(
        &file,
        r#"{"version": 1, "tasks": {
            "big": {"op": "bytes", "args": [67108864, 1], "workers": ["a"]},
            "use": {"op": "shell", "args": [["sh", "-c", "wc -c > /dev/null; echo $PPID"], {"stdin": {"$ref": "big"}}]}
        }}"#,
    )
    .expect("write");
    let o = rask(&["run", file.to_str().expect("utf-8"), "--json", "--scheduler", &cluster.address]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let out: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(out["use"].as_str().expect("pid").trim(), a_pid.to_string(), "the dependent moved away from its input");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn mismatched_version_is_refused_and_the_scheduler_keeps_serving() {
    let cluster = Cluster::with_workers(1, &[]);
    let host_port = cluster.address.trim_start_matches("tcp://").to_owned();
    let mut s = std::net::TcpStream::connect(&host_port).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    s.write_all(&rask_protocol::handshake::foreign_hello(99, "rask-9.9.9")).expect("hello");
    let mut len = [0u8; 4];
    s.read_exact(&mut len).expect("refusal");
    let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut body).expect("refusal body");
    let reason = text(&body);
    assert!(reason.contains("protocol 99 (build rask-9.9.9)"), "{reason}");
    assert!(reason.contains(&format!("protocol {}", rask_protocol::PROTOCOL_VERSION)), "{reason}");
    // Garbage on the port, then a normal workflow.
    let mut g = std::net::TcpStream::connect(&host_port).expect("connect");
    let _ = g.write_all(b"GET / HTTP/1.1\r\n\r\n\x00\xff\xff\xff\xff");
    drop(g);
    let o = rask(&["run", &example("pipeline.json"), "--json", "--scheduler", &cluster.address]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
}

#[test]
fn unreachable_scheduler_exits_3_and_worker_gives_up_with_a_message() {
    // A port nobody listens on: bind and close.
    let port = free_port();
    let addr = format!("tcp://127.0.0.1:{port}");
    let o = rask(&["run", &example("hello.json"), "--scheduler", &addr]);
    assert_eq!(o.status.code(), Some(3));
    assert!(text(&o.stderr).contains("cannot connect to the scheduler"), "{}", text(&o.stderr));
    let o = rask(&["worker", &addr, "--reconnect-timeout", "1"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o.stderr).contains("gave up"), "{}", text(&o.stderr));
}

#[test]
fn worker_exits_cleanly_when_the_scheduler_shuts_down() {
    let mut cluster = Cluster::start();
    let mut worker = Command::new(RASK)
        .args(["worker", &cluster.address, "--name", "lonely"])
        .stderr(Stdio::piped())
        .spawn()
        .expect("worker");
    std::thread::sleep(Duration::from_millis(500));
    // SIGTERM the scheduler: it says goodbye; the worker exits 0.
    // SAFETY: plain kill(2) on our own child.
    #[allow(unsafe_code)]
    unsafe {
        libc::kill(cluster.scheduler.id() as i32, libc::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = worker.try_wait().expect("poll") {
            break s;
        }
        assert!(Instant::now() < deadline, "worker did not exit");
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    let _ = worker.stderr.take().expect("stderr").read_to_string(&mut err);
    assert_eq!(status.code(), Some(0), "{err}");
    assert!(err.contains("received SIGTERM"), "{err}");
    let _ = cluster.scheduler.wait();
}

#[test]
fn queued_work_spreads_to_a_worker_that_joins_late() {
    // Tasks wait in the scheduler (not on the first worker), so a worker joining later takes
    // a share of the queue at once — what work stealing achieves in Dask.
    let dir = scratch("late");
    let mut cluster = Cluster::start();
    let early = cluster.worker(&["--name", "early", "--nthreads", "1"], &[]);
    let tasks: Vec<String> = (0..12)
        .map(|i| {
            format!(
                r#""s{i}": {{"op": "shell", "args": [["sh", "-c", "sleep 0.25; echo $PPID; echo {i} > /dev/null"]]}}"#
            )
        })
        .collect();
    let file = dir.join("w.json");
    std::fs::write(&file, format!(r#"{{"version": 1, "tasks": {{{}}}}}"#, tasks.join(",\n"))).expect("write");
    let addr = cluster.address.clone();
    let f = file.to_string_lossy().into_owned();
    let run = std::thread::spawn(move || rask(&["run", &f, "--json", "--scheduler", &addr]));
    std::thread::sleep(Duration::from_millis(600));
    let late = cluster.worker(&["--name", "late", "--nthreads", "1"], &[]);
    let o = run.join().expect("run");
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let out: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    let pids: Vec<String> = (0..12).map(|i| out[format!("s{i}")].as_str().expect("pid").trim().to_owned()).collect();
    let on_late = pids.iter().filter(|p| **p == late.to_string()).count();
    let on_early = pids.iter().filter(|p| **p == early.to_string()).count();
    assert_eq!(on_late + on_early, 12);
    assert!(on_late >= 3, "the late worker ran only {on_late} of 12 queued tasks");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn fire_and_forget_runs_after_the_client_is_gone() {
    // No worker yet: the task cannot have started when its only client leaves.
    let dir = scratch("faf");
    let marker = dir.join("done");
    let mut cluster = Cluster::start();
    {
        let c = BlockingClient::connect(&cluster.address).expect("client");
        let cmd = format!("touch {}", marker.display());
        let argv = Value::list(vec![Value::str("sh"), Value::str("-c"), Value::str(&cmd)]);
        let f = c.submit("shell", vec![CallArg::Value(argv)]);
        c.fire_and_forget(std::slice::from_ref(&f));
        let plain = c.submit("sleep", vec![CallArg::Value(Value::Int(1))]);
        drop(plain); // released, never wanted again: must not keep the cluster busy
    } // future dropped, client closed
    std::thread::sleep(Duration::from_millis(300));
    cluster.worker(&["--name", "late"], &[]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !marker.exists() {
        assert!(Instant::now() < deadline, "the fire-and-forget task never ran");
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn local_cluster_starts_worker_processes_and_computes() {
    use rask_runtime::{LocalCluster, LocalClusterConfig};
    let cfg = LocalClusterConfig { n_workers: 2, program: Some(PathBuf::from(RASK)), ..LocalClusterConfig::default() };
    let cluster = LocalCluster::start(&cfg).expect("cluster starts");
    let c = cluster.client().expect("client");
    let (g, outs) = one_task_graph("lc", "range", vec![ArgSpec::Lit(Value::Int(4))]);
    let r = c.compute(&g, &outs).expect("computes");
    assert_eq!(r, vec![Ok(Value::list((0..4).map(Value::Int).collect()))]);
    drop(c);
    drop(cluster); // stops the workers
}

#[test]
fn scatter_puts_data_on_workers_and_tasks_use_it() {
    let cluster = Cluster::with_workers(2, &[]);
    let c = BlockingClient::connect(&cluster.address).expect("client");
    let deadline = Instant::now() + Duration::from_secs(20);
    while c.workers().expect("connected").len() < 2 {
        assert!(Instant::now() < deadline, "workers did not join");
        std::thread::sleep(Duration::from_millis(20));
    }
    let blob = Value::Bytes(bytes::Bytes::from(vec![5u8; 1 << 20]));
    let futs = c.scatter(vec![blob.clone(), Value::Int(41)], false).expect("scattered");
    c.wait(&futs, Some(Duration::from_secs(10))).expect("registered");
    assert_ne!(futs[0].who_has(), futs[1].who_has(), "round-robin over the two workers");
    let n = c.submit("nbytes", vec![CallArg::Future(&futs[0])]);
    let plus = c.submit("add", vec![CallArg::Future(&futs[1]), CallArg::Value(Value::Int(1))]);
    let got: Vec<Value> = c.gather(&[n, plus]).into_iter().map(|r| r.expect("computed")).collect();
    assert_eq!(got, vec![Value::Int(1 << 20), Value::Int(42)]);
    assert_eq!(c.gather(&futs[..1]).pop().expect("one").expect("fetched"), blob);
    let everywhere = c.scatter(vec![Value::str("shared")], true).expect("broadcast");
    c.wait(&everywhere, Some(Duration::from_secs(10))).expect("registered");
    assert_eq!(everywhere[0].who_has().len(), 2, "broadcast puts a copy on every worker");
}

#[test]
fn result_lost_with_its_worker_is_recomputed_for_the_client() {
    let mut cluster = Cluster::start();
    let a = cluster.worker(&["--name", "a", "--nthreads", "1"], &[]);
    let b = cluster.worker(&["--name", "b", "--nthreads", "1"], &[]);
    let c = BlockingClient::connect(&cluster.address).expect("client");
    let argv = Value::list(vec![Value::str("sh"), Value::str("-c"), Value::str("echo $PPID")]);
    let f = c.submit("shell", vec![CallArg::Value(argv)]);
    let first = c.gather(std::slice::from_ref(&f)).pop().expect("one").expect("computed");
    let holder: u32 = match &first {
        Value::Str(s) => s.trim().parse().expect("a pid"),
        other => panic!("unexpected {other:?}"),
    };
    assert!(holder == a || holder == b);
    // Kill the worker holding the value; the future must still deliver (recomputed elsewhere).
    let child = cluster.workers.iter_mut().find(|w| w.id() == holder).expect("holder is ours");
    child.kill().expect("kill");
    let _ = child.wait();
    let again = c.gather(std::slice::from_ref(&f)).pop().expect("one").expect("recomputed");
    let other = if holder == a { b } else { a };
    assert_eq!(again, Value::from(format!("{other}\n")), "recomputed on the surviving worker");
}

#[test]
fn persisted_lazy_value_is_reused_not_recomputed() {
    let dir = scratch("persist");
    let log = dir.join("runs");
    let cluster = Cluster::with_workers(1, &[]);
    let c = BlockingClient::connect(&cluster.address).expect("client");
    // Builtin ops through typed handles; the shell step records each time it runs.
    let shell = rask::op::<(Vec<String>,), String>("shell");
    let len = rask::op::<(String,), i64>("len");
    let script = format!("echo ran >> {}; echo 21", log.display());
    let expensive = shell.call(vec!["sh".to_owned(), "-c".to_owned(), script]);
    let kept = expensive.persist_on(&c);
    assert_eq!(len.call(&kept).compute_with(&c).expect("computes"), 3);
    assert_eq!(len.call(&kept).compute_with(&c).expect("computes"), 3);
    let runs = std::fs::read_to_string(&log).expect("ran once").lines().count();
    assert_eq!(runs, 1, "the persisted value was recomputed");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn idle_worker_steals_a_queued_slow_task_from_a_busy_one() {
    // One 1-thread worker takes both slow tasks (saturation 1.1 → 2 in flight) and can run only
    // one; a worker joining with nothing queued steals the other, so both run at once.
    let dir = scratch("steal");
    let mut cluster = Cluster::start();
    let busy = cluster.worker(&["--name", "busy", "--nthreads", "1"], &[]);
    let file = dir.join("w.json");
    std::fs::write(
        &file,
        r#"{"version": 1, "tasks": {
            "s1": {"op": "shell", "args": [["sh", "-c", "sleep 1.5; echo $PPID"]]},
            "s2": {"op": "shell", "args": [["sh", "-c", "sleep 1.5; echo $PPID"]]}
        }}"#,
    )
    .expect("write");
    let addr = cluster.address.clone();
    let f = file.to_string_lossy().into_owned();
    let t0 = Instant::now();
    let run = std::thread::spawn(move || rask(&["run", &f, "--json", "--scheduler", &addr]));
    std::thread::sleep(Duration::from_millis(400));
    let thief = cluster.worker(&["--name", "thief", "--nthreads", "1"], &[]);
    let o = run.join().expect("run");
    let elapsed = t0.elapsed();
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let out: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    let mut pids: Vec<String> = ["s1", "s2"].iter().map(|k| out[*k].as_str().expect("pid").trim().to_owned()).collect();
    pids.sort();
    let mut expected = vec![busy.to_string(), thief.to_string()];
    expected.sort();
    assert_eq!(pids, expected, "one task should have been stolen by the idle worker");
    // Both ran at once; the bound is loose because test binaries share 2 cores.
    assert!(elapsed < Duration::from_secs(20), "took {elapsed:?}");
    let _ = std::fs::remove_dir_all(dir);
}

/// A GET with the test's own HTTP client ([`http`]): status and body.
fn http_get(addr: &str, path: &str) -> (u16, String) {
    http(addr, "GET", path, None)
}

/// A free port on loopback (bound, then released for the process under test).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

/// A scheduler with its dashboard on a free port and a journal in `journal`; its standard error
/// is read up to the line announcing the dashboard. The cluster (no workers yet) and the
/// dashboard's `HOST:PORT`.
fn observed_cluster(journal: &Path) -> (Cluster, String) {
    let port = free_port();
    let mut scheduler = Command::new(RASK)
        .args(["scheduler", "--port", "0", "--dashboard-port", &port.to_string()])
        .arg("--journal")
        .arg(journal)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start scheduler");
    let mut line = String::new();
    BufReader::new(scheduler.stdout.take().expect("stdout")).read_line(&mut line).expect("address");
    let url = wait_for_line(&mut scheduler, "dashboard at http://");
    let web = url.trim_end_matches('/').to_owned();
    assert_eq!(web, format!("127.0.0.1:{port}"));
    (Cluster { address: line.trim().to_owned(), scheduler, workers: Vec::new(), env: Vec::new() }, web)
}

/// Reads a child's standard error until a line contains `marker`; returns the text after it.
fn wait_for_line(child: &mut Child, marker: &str) -> String {
    let err = child.stderr.take().expect("piped stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    let marker = marker.to_owned();
    std::thread::spawn(move || {
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            if let Some((_, rest)) = line.split_once(marker.as_str()) {
                let _ = tx.send(rest.trim().to_owned());
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(20)).expect("the line appears")
}

/// Stops the cluster's scheduler with SIGTERM (which completes its journal) and serves the
/// journal with `rask dashboard --replay`: the replay process and its URL.
fn stop_and_replay(cluster: &mut Cluster, journal: &Path) -> (Child, String) {
    signal(cluster.scheduler.id(), libc::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(20);
    while cluster.scheduler.try_wait().expect("poll").is_none() {
        assert!(Instant::now() < deadline, "the scheduler did not stop");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut replay = Command::new(RASK)
        .args(["dashboard", "--port", "0", "--replay"])
        .arg(journal)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start replay");
    let mut url = String::new();
    BufReader::new(replay.stdout.take().expect("stdout")).read_line(&mut url).expect("replay URL");
    (replay, url.trim().to_owned())
}

#[test]
fn dashboard_serves_live_state_and_metrics_and_its_journal_replays_to_the_same_counts() {
    let dir = scratch("dashboard");
    let journal = dir.join("run.jsonl");
    let (mut cluster, web) = observed_cluster(&journal);
    cluster.worker(&["--name", "dash-a", "--nthreads", "2"], &[]);
    cluster.worker(&["--name", "dash-b", "--nthreads", "1"], &[]);
    let o = rask(&["run", &example("pipeline.json"), "--json", "--scheduler", &cluster.address]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));

    assert_eq!(http_get(&web, "/health"), (200, "ok\n".to_owned()));
    // The run is over once its results are back; the feed may lag by a turn.
    let deadline = Instant::now() + Duration::from_secs(10);
    let status: serde_json::Value = loop {
        let (code, body) = http_get(&web, "/api/status");
        assert_eq!(code, 200);
        let s: serde_json::Value = serde_json::from_str(&body).expect("status JSON");
        let live: u64 = s["counts"].as_object().expect("counts").values().map(|v| v.as_u64().expect("n")).sum();
        if live == 0 && s["completed"].as_u64() >= Some(17) {
            break s;
        }
        assert!(Instant::now() < deadline, "the dashboard never showed the finished run: {s}");
        std::thread::sleep(Duration::from_millis(50));
    };
    let names: Vec<&str> =
        status["workers"].as_array().expect("workers").iter().map(|w| w["name"].as_str().expect("name")).collect();
    let mut names = names;
    names.sort_unstable();
    assert_eq!(names, ["dash-a", "dash-b"], "the workers table lists every worker");
    let raw = status["prefixes"].as_array().expect("prefixes").iter().find(|p| p["name"] == "raw").expect("prefix raw");
    assert_eq!(raw["done"], 1, "{raw}");

    // /metrics, read by a Prometheus text-format parser.
    let (code, metrics) = http_get(&web, "/metrics");
    assert_eq!(code, 200);
    let scrape = prometheus_parse::Scrape::parse(metrics.lines().map(|l| Ok(l.to_owned()))).expect("Prometheus text");
    let value = |name: &str, label: Option<(&str, &str)>| {
        scrape
            .samples
            .iter()
            .find(|s| s.metric == name && label.is_none_or(|(k, v)| s.labels.get(k) == Some(v)))
            .map(|s| match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                _ => f64::NAN,
            })
            .unwrap_or_else(|| panic!("no sample {name} {label:?} in\n{metrics}"))
    };
    assert_eq!(value("rask_tasks_completed_total", None), status["completed"].as_f64().expect("completed"));
    assert_eq!(value("rask_workers", None), 2.0);
    assert_eq!(value("rask_tasks", Some(("state", "processing"))), 0.0);
    assert!(value("rask_worker_cpu_percent", Some(("worker", "dash-a"))) >= 0.0);
    assert!(value("rask_worker_memory_unmanaged_bytes", Some(("worker", "dash-b"))) > 0.0, "memory reports arrive");

    // A task's story, a worker's page, the graph, the stream, live events and the page itself.
    let (code, body) = http_get(&web, "/api/task?key=raw");
    assert_eq!(code, 200, "{body}");
    let story: serde_json::Value = serde_json::from_str(&body).expect("story JSON");
    // Every state it went through, those passed through within one event listed in `via`.
    let phases: Vec<String> = story["story"]
        .as_array()
        .expect("story")
        .iter()
        .flat_map(|e| {
            let via = e["via"].as_array().cloned().unwrap_or_default();
            via.into_iter().chain([e["phase"].clone()])
        })
        .map(|p| p.as_str().map(str::to_owned).expect("phase"))
        .collect::<Vec<String>>();
    let phases: Vec<&str> = phases.iter().map(String::as_str).collect();
    assert!(
        phases.starts_with(&["released", "waiting"]) && phases.contains(&"processing") && phases.contains(&"memory"),
        "{phases:?}"
    );
    assert_eq!(story["story"][0]["cause"]["by"], "submitted");
    assert_eq!(http_get(&web, "/api/task?key=nonesuch").0, 404);
    let (code, body) = http_get(&web, "/api/worker?name=dash-b");
    assert_eq!(code, 200);
    assert!(body.contains("\"nthreads\":1"), "{body}");
    let (_, body) = http_get(&web, "/api/graph");
    let graph: serde_json::Value = serde_json::from_str(&body).expect("graph JSON");
    assert!(graph["nodes"].as_array().expect("nodes").iter().any(|n| n["key"] == "count" && n["deps"][0] == "raw"));
    let (_, body) = http_get(&web, "/api/stream?after=0");
    let runs: serde_json::Value = serde_json::from_str(&body).expect("stream JSON");
    assert!(runs["items"].as_array().expect("items").len() >= 17);
    let (code, page) = http_get(&web, "/");
    assert!(code == 200 && page.contains("<canvas") && page.contains("EventSource"), "the page is served");
    {
        let mut s = std::net::TcpStream::connect(&web).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        write!(s, "GET /api/events HTTP/1.1\r\nHost: x\r\n\r\n").expect("request");
        let mut got = String::new();
        let mut buf = [0u8; 4096];
        while !got.contains("event: update") {
            let n = s.read(&mut buf).expect("server-sent events");
            assert!(n > 0, "the event stream closed: {got}");
            got.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
        assert!(got.contains("text/event-stream"), "{got}");
    }

    // Stop the scheduler: the journal is complete, and replaying it shows the same run.
    let (mut replay, url) = stop_and_replay(&mut cluster, &journal);
    let replay_web = url.trim_start_matches("http://").trim_end_matches('/').to_owned();
    let (code, body) = http_get(&replay_web, "/api/status");
    let _ = replay.kill();
    let _ = replay.wait();
    assert_eq!(code, 200);
    let replayed: serde_json::Value = serde_json::from_str(&body).expect("status JSON");
    for field in ["counts", "completed", "failed", "prefixes"] {
        assert_eq!(replayed[field], status[field], "replayed {field}");
    }
    let report = dir.join("report.html");
    let o = rask(&["dashboard", "--replay", &journal.to_string_lossy(), "--report", &report.to_string_lossy()]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let html = std::fs::read_to_string(&report).expect("report");
    assert!(
        html.contains("\"completed\":") && !html.contains("/*REPORT_DATA*/null"),
        "the report has its data built in"
    );
    // `rask run --report`: the embedded run, identical results, and a report of it.
    let run_report = dir.join("run-report.html");
    let o = rask(&[
        "run",
        &example("pipeline.json"),
        "--json",
        "--workers",
        "2",
        "--report",
        &run_report.to_string_lossy(),
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let local = rask(&["run", &example("pipeline.json"), "--json"]);
    assert_eq!(text(&o.stdout), text(&local.stdout), "observed or not, the same results");
    let html = std::fs::read_to_string(&run_report).expect("run report");
    assert!(
        html.contains("\"name\":\"raw\"") && html.contains("\"memory\":{\""),
        "the report has the run's prefixes and memory"
    );
    let o = rask(&["dashboard", "--replay", &example("pipeline.json")]);
    assert_eq!(o.status.code(), Some(2), "a file that is not a journal is refused");
    assert!(text(&o.stderr).contains("line 1"), "{}", text(&o.stderr));
    drop(cluster);
    let _ = std::fs::remove_dir_all(dir);
}

/// One HTTP/1.1 request with an optional JSON body (the test's own client): status and body
/// (chunked bodies are reassembled).
fn http(addr: &str, method: &str, path: &str, body: Option<&serde_json::Value>) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(60))).expect("timeout");
    let payload = body.map(ToString::to_string).unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{payload}",
        payload.len()
    )
    .expect("request");
    // Read the head, then exactly the body it announces (servers may keep the connection open).
    let mut reader = BufReader::new(s);
    let mut head = String::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).expect("response head") == 0 || line == "\r\n" {
            break;
        }
        head.push_str(&line);
    }
    let code = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).expect("status code");
    let lower = head.to_ascii_lowercase();
    let length =
        lower.lines().find_map(|l| l.strip_prefix("content-length:")).and_then(|v| v.trim().parse::<usize>().ok());
    let mut body = Vec::new();
    if let Some(n) = length {
        body.resize(n, 0);
        reader.read_exact(&mut body).expect("response body");
    } else if lower.contains("transfer-encoding: chunked") {
        loop {
            let mut size = String::new();
            reader.read_line(&mut size).expect("chunk size");
            let n = usize::from_str_radix(size.trim(), 16).expect("chunk size");
            let mut chunk = vec![0u8; n + 2];
            reader.read_exact(&mut chunk).expect("chunk");
            if n == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..n]);
        }
    } else {
        let _ = reader.read_to_end(&mut body);
    }
    (code, String::from_utf8_lossy(&body).into_owned())
}

/// A WebDriver session on a headless Chromium, through `chromedriver`; ended on drop.
struct Browser {
    driver: Child,
    addr: String,
    session: String,
}

impl Browser {
    /// `None` when Chromium is not installed, unless `.ci/run` (which installs it and sets
    /// `RASK_REQUIRE_BROWSER`) or CI runs the test: there, its absence is a failure.
    fn start() -> Option<Browser> {
        let found = Command::new("chromedriver").arg("--version").output().is_ok_and(|o| o.status.success());
        if !found {
            let required = std::env::var_os("RASK_REQUIRE_BROWSER").is_some() || std::env::var_os("CI").is_some();
            assert!(!required, "chromium and chromedriver are missing (.ci/run installs them)");
            eprintln!(
                "SKIPPED: no chromedriver on this machine (install chromium and chromium-driver to run this test)"
            );
            return None;
        }
        let port = free_port();
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let addr = format!("127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(&addr).is_err() {
            assert!(Instant::now() < deadline, "chromedriver did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        let caps = serde_json::json!({ "capabilities": { "alwaysMatch": { "goog:chromeOptions": {
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,900"]
        } } } });
        let mut b = Browser { driver, addr, session: String::new() };
        let (code, body) = http(&b.addr, "POST", "/session", Some(&caps));
        assert_eq!(code, 200, "new session: {body}");
        let v: serde_json::Value = serde_json::from_str(&body).expect("session JSON");
        b.session = v["value"]["sessionId"].as_str().expect("session id").to_owned();
        Some(b)
    }

    fn call(&self, method: &str, what: &str, body: Option<serde_json::Value>) -> serde_json::Value {
        let path = format!("/session/{}/{what}", self.session);
        let (code, text) = http(&self.addr, method, &path, body.as_ref());
        assert_eq!(code, 200, "{method} {what}: {text}");
        serde_json::from_str::<serde_json::Value>(&text).expect("WebDriver JSON")["value"].take()
    }

    fn open(&self, url: &str) {
        self.call("POST", "url", Some(serde_json::json!({ "url": url })));
    }

    /// Runs `script` (a function body) in the page and returns its result.
    fn eval(&self, script: &str) -> serde_json::Value {
        self.call("POST", "execute/sync", Some(serde_json::json!({ "script": script, "args": [] })))
    }

    /// Polls `script` until `ok` accepts its result (bounded).
    fn until(&self, script: &str, ok: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let v = self.eval(script);
            if ok(&v) {
                return v;
            }
            assert!(Instant::now() < deadline, "the page never showed what was expected; last: {v}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = http(&self.addr, "DELETE", &format!("/session/{}", self.session), None);
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

#[test]
fn dashboard_in_a_headless_browser_updates_live_and_its_replay_shows_the_same_counts() {
    let Some(browser) = Browser::start() else { return };
    let dir = scratch("browser");
    let journal = dir.join("run.jsonl");
    let (mut cluster, web) = observed_cluster(&journal);
    cluster.worker(&["--name", "page-a", "--nthreads", "1"], &[]);
    cluster.worker(&["--name", "page-b", "--nthreads", "1"], &[]);
    browser.open(&format!("http://{web}/"));
    // The workers table lists every worker.
    browser.open(&format!("http://{web}/#/workers"));
    browser.until("return document.querySelectorAll('tr.worker').length", |v| v == 2);
    browser.open(&format!("http://{web}/"));

    // 60 tasks of 100 ms on two one-thread workers: about 3 s to watch.
    let address = cluster.address.clone();
    let run = std::thread::spawn(move || {
        let c = BlockingClient::connect(&address).expect("client");
        let mut b = GraphBuilder::new();
        for i in 0..60 {
            b.add(TaskSpec::new(
                format!("nap-{i}"),
                "sleep",
                vec![ArgSpec::Lit(Value::Int(100)), ArgSpec::Lit(Value::Int(i))],
            ));
        }
        let g = b.build().expect("graph");
        let outs = g.sinks();
        c.compute(&g, &outs).expect("run").len()
    });
    let probe = "return { completed: Number((document.getElementById('completed') || {}).textContent || 0), \
                 runs: runs.length, prefixes: document.querySelectorAll('tr.prefix').length, \
                 processing: Number(((document.getElementById('count-processing') || {}).textContent || '0').replace(/\\D/g, '')) }";
    let early = browser.until(probe, |v| v["completed"].as_u64().is_some_and(|n| (1..40).contains(&n)));
    assert_eq!(early["prefixes"], 1, "one task prefix, with its progress bar: {early}");
    let later = browser.until(probe, |v| v["completed"].as_u64() > early["completed"].as_u64());
    assert!(later["runs"].as_u64() > early["runs"].as_u64(), "the task stream grows live: {early} then {later}");

    // A screenshot of the status page during the run, inspected for content.
    let shot = browser.call("GET", "screenshot", None);
    use base64::Engine;
    let png_bytes = base64::engine::general_purpose::STANDARD.decode(shot.as_str().expect("base64")).expect("PNG data");
    std::fs::write(dir.join("dashboard.png"), &png_bytes).expect("save the screenshot");
    // RASK_SCREENSHOT=FILE keeps a copy (the README's picture comes from here).
    if let Some(keep) = std::env::var_os("RASK_SCREENSHOT") {
        std::fs::write(keep, &png_bytes).expect("copy the screenshot");
    }
    let decoder = png::Decoder::new(std::io::Cursor::new(&png_bytes));
    let mut reader = decoder.read_info().expect("PNG header");
    let mut pixels = vec![0u8; reader.output_buffer_size().expect("size")];
    let info = reader.next_frame(&mut pixels).expect("PNG frame");
    let channels = info.color_type.samples();
    let mut colors = std::collections::HashSet::new();
    for px in pixels[..info.buffer_size()].chunks(channels) {
        colors.insert(px[..3.min(channels)].to_vec());
    }
    assert!(colors.len() > 20, "the screenshot is not blank: {} colours", colors.len());

    assert_eq!(run.join().expect("run thread"), 60);
    let done = browser.until(probe, |v| v["completed"] == 60);

    // The replayed journal shows the same final counts.
    let (_, live) = http(&web, "GET", "/api/status", None);
    let live: serde_json::Value = serde_json::from_str(&live).expect("status");
    let (mut replay, url) = stop_and_replay(&mut cluster, &journal);
    browser.open(&url);
    let replayed = browser.until(probe, |v| v["completed"] == done["completed"]);
    let _ = replay.kill();
    let _ = replay.wait();
    assert_eq!(replayed["prefixes"], done["prefixes"]);
    let counts = browser.eval("return status.counts");
    assert_eq!(counts, live["counts"], "the replay's counts by state are the live run's");
    drop(cluster);
    let _ = std::fs::remove_dir_all(dir);
}

/// A worker with its metrics on a free port, named `name`, joined to `cluster`: its
/// metrics' `HOST:PORT`.
fn metered_worker(cluster: &mut Cluster, name: &str) -> String {
    let mut worker = Command::new(RASK)
        .args(["worker", &cluster.address, "--no-nanny", "--name", name, "--nthreads", "1", "--metrics-port", "0"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start worker");
    let url = wait_for_line(&mut worker, "metrics at http://");
    cluster.workers.push(worker);
    url.trim_end_matches("/metrics").to_owned()
}

/// Waits (bounded) until worker `name`'s metrics at `web` satisfy `done` (they follow its
/// heartbeats, a few a second); returns the metric reader that did.
fn worker_metrics_until(web: &str, name: &str, done: impl Fn(&dyn Fn(&str) -> f64) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (code, metrics) = http_get(web, "/metrics");
        assert_eq!(code, 200);
        let scrape =
            prometheus_parse::Scrape::parse(metrics.lines().map(|l| Ok(l.to_owned()))).expect("Prometheus text");
        let value = |metric: &str| {
            scrape
                .samples
                .iter()
                .find(|s| s.metric == metric && s.labels.get("worker") == Some(name))
                .map(|s| match s.value {
                    prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Gauge(v) => v,
                    _ => f64::NAN,
                })
                .unwrap_or_else(|| panic!("no {metric} in\n{metrics}"))
        };
        if done(&value) {
            return;
        }
        assert!(Instant::now() < deadline, "worker {name}'s metrics never got there:\n{metrics}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn worker_serves_its_own_metrics_and_health() {
    let mut cluster = Cluster::start();
    let web = metered_worker(&mut cluster, "metered");
    assert_eq!(http_get(&web, "/health"), (200, "ok\n".to_owned()));
    let o = rask(&["run", &example("pipeline.json"), "--json", "--scheduler", &cluster.address]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    worker_metrics_until(&web, "metered", |value| {
        if value("rask_worker_tasks_finished_total") < 17.0 {
            return false;
        }
        assert!(value("rask_worker_memory_rss_bytes") > 0.0);
        assert!(value("rask_worker_cpu_seconds_total") > 0.0);
        assert_eq!(value("rask_worker_paused"), 0.0);
        assert_eq!(value("rask_worker_tasks_failed_total"), 0.0);
        // Nine of the pipeline's tasks call only quick builtins; `shell`, `bytes` and `range`
        // always run on the task thread.
        assert!(value("rask_worker_tasks_inline_total") <= 9.0);
        true
    });
}

#[test]
fn quick_tasks_run_on_the_workers_event_loop_and_slow_ones_on_its_thread() {
    let mut cluster = Cluster::start();
    let web = metered_worker(&mut cluster, "inline");
    let c = BlockingClient::connect(&cluster.address).expect("client");
    let graph = |op: &str, n: i64| {
        let mut b = GraphBuilder::new();
        for i in 0..n {
            b.add(TaskSpec::new(format!("{op}-{i}"), op, vec![ArgSpec::Lit(Value::Int(i))]));
        }
        let g = b.build().expect("graph");
        let outs: Vec<_> = g.ids().collect();
        (g, outs)
    };
    // Sleeping is not quick, however short: on the thread, every time.
    let (g, outs) = graph("sleep", 10);
    for r in c.compute(&g, &outs).expect("computes") {
        assert_eq!(r.expect("ok"), Value::Null);
    }
    // Then additions, the task thread idle again: each runs in place.
    let (g, outs) = graph("add", 40);
    let got: Vec<Value> = c.compute(&g, &outs).expect("computes").into_iter().map(|r| r.expect("ok")).collect();
    assert_eq!(got, (0..40).map(Value::Int).collect::<Vec<_>>());
    worker_metrics_until(&web, "inline", |value| {
        value("rask_worker_tasks_finished_total") >= 50.0 && {
            assert_eq!(value("rask_worker_tasks_inline_total"), 40.0);
            true
        }
    });
}
