//! The worker process: runs tasks on a thread pool, holds their values, serves them to peers.
//!
//! - One async task owns the worker's bookkeeping (tasks waiting for inputs, fetches in flight,
//!   values held) and talks to the scheduler.
//! - A data port serves `GetData` requests from peers and clients, straight from the store.
//! - Inputs held elsewhere are fetched **directly from the peer worker** that holds them (never
//!   through the scheduler), all keys for one peer in one request, with a bound on concurrent
//!   fetches. Fetched copies are dropped once no local task needs them.
//! - Tasks run on `nthreads` OS threads in scheduler priority order, through the same
//!   `rask_ops::run_call` as the local schedulers; an unknown function is a task error naming
//!   the function and this worker. A task of quick functions on small inputs, all of them here
//!   when it arrives, runs on the event loop itself while those threads are idle (see
//!   `Inline`): the hand-off would cost more than the task. (One whose inputs had to be fetched
//!   goes to the threads.)

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rask_graph::{FailureKind, FxHashMap, FxHashSet, Key, TaskError, Value};
use rask_ops::{CallPolicy, Registry};
use rask_protocol::frame::{read_frame, write_frame};
use rask_protocol::handshake::{self, Role, WorkerInfo};
use rask_protocol::msg::{FromScheduler, MemoryReport, PeerMsg, ToScheduler};
use rask_protocol::wire::{WireArg, WireBody, WireCall, WireError, WireTicket, WireValue, resolve_arg, value_to_wire};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};

use crate::RuntimeError;
use crate::conn::{Fetched, Outbox, PeerPool, SPIN_BEFORE_SLEEP, Turns, dial, read_loop, recv_spinning};
use crate::store::{DataStore, Store, lock, process_cpu_us, process_rss, remove_stale_spill_dirs};

/// An executor thread reports results in batches while it runs short jobs back to back (each
/// report may wake the event loop, which costs more than a tiny task): it holds at most this
/// many, ...
const OUTCOME_BATCH: usize = 32;
/// ... for at most this long, ...
const OUTCOME_HOLD: Duration = Duration::from_micros(100);
/// ... and only while the next job's function has recently always taken less than this
/// (unknown functions never qualify). A function that was always quick and suddenly is not
/// delays the results held before it by that one run, a few dozen at most.
const SHORT_JOB: Duration = Duration::from_micros(20);

/// A peer that does not deliver within this time is treated as not holding the data (the
/// scheduler is told, and looks elsewhere or recomputes), so one hung peer cannot stall fetches.
const FETCH_TIMEOUT: Duration = Duration::from_secs(60);

/// Concurrent fetches from peers.
const FETCH_CONCURRENCY: usize = 8;

/// How to start a worker.
#[derive(Clone, Debug)]
pub struct WorkerConfig {
    /// Scheduler address, `tcp://HOST:PORT`.
    pub scheduler: String,
    /// Worker name (restrictions may use it).
    pub name: String,
    /// Threads running tasks.
    pub nthreads: usize,
    /// Resources advertised.
    pub resources: Vec<(String, f64)>,
    /// Memory limit in bytes: results are spilled and the worker paused to stay under it (see
    /// the memory policy).
    pub memory_limit: Option<u64>,
    /// Workers sharing this process (at least 1). Process memory is theirs together, so each
    /// compares its share of it (resident bytes divided by this) with its limit: the process as
    /// a whole is held to the sum of their limits.
    pub workers_in_process: usize,
    /// Interface for the data port.
    pub host: String,
    /// The functions tasks may call.
    pub registry: Arc<Registry>,
    /// Benchmark mode: report every task finished at once without running it (value `null`),
    /// to measure the scheduler alone (the "zero worker" of the RSDS paper).
    pub zero_work: bool,
    /// How this worker's previous process ended, when a supervisor restarted it.
    pub restarted_after: Option<String>,
    /// Where to keep this worker's figures up to date (a few times a second), for a metrics
    /// endpoint; `None`: nowhere.
    pub stats: Option<Arc<Mutex<WorkerStats>>>,
}

/// A worker's figures, as its metrics endpoint shows them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct WorkerStats {
    /// Its name.
    pub name: String,
    /// The latest memory report (also its heartbeat).
    pub memory: MemoryReport,
    /// Tasks it finished.
    pub tasks_finished: u64,
    /// Tasks that failed on it.
    pub tasks_failed: u64,
    /// Tasks (finished or failed) it ran on its event loop, being quick ones on small inputs,
    /// instead of on a task thread.
    pub tasks_inline: u64,
    /// Tasks assigned to it and not finished yet (running, queued or waiting for inputs).
    pub tasks_assigned: u64,
    /// Whether it is paused for memory.
    pub paused: bool,
}

/// How a worker's run ended.
#[derive(Debug, PartialEq, Eq)]
pub enum WorkerExit {
    /// The scheduler asked it to stop.
    SchedulerShutdown(String),
    /// The connection to the scheduler was lost.
    SchedulerLost(String),
    /// Stopped from this side.
    Stopped,
}

/// A task ready to run, with its inputs.
struct Job {
    key: Key,
    body: Arc<WireBody>,
    /// The inputs, in the order they arrived; found by a scan (a task has a handful).
    inputs: Vec<(Key, Value)>,
    retries: u32,
    timeout: Option<Duration>,
    /// Fetched copies this job uses (released when it is done).
    replicas: Vec<Key>,
    /// Echoed to the scheduler with the result.
    ticket: WireTicket,
}

/// Scheduler priority of a task (smaller first), as sent in `Compute`.
type Prio = (i64, u64, u32);

/// Jobs ready to run, shared by the event loop and the executor threads.
struct JobQueue {
    q: Mutex<Queue>,
    cv: Condvar,
    /// Entries in the heap, readable without the lock (spinning threads poll it).
    ready: AtomicUsize,
    /// Jobs the executor threads are running (taken from the heap, not finished yet).
    running: AtomicUsize,
}

impl Default for JobQueue {
    fn default() -> Self {
        JobQueue {
            q: Mutex::new(Queue {
                heap: BinaryHeap::new(),
                jobs: FxHashMap::default(),
                closed: false,
                paused: false,
                sleeping: 0,
            }),
            cv: Condvar::new(),
            ready: AtomicUsize::new(0),
            running: AtomicUsize::new(0),
        }
    }
}

struct Queue {
    heap: BinaryHeap<Reverse<(Prio, u64)>>,
    jobs: FxHashMap<u64, Job>,
    closed: bool,
    /// Paused for memory: executor threads start no job.
    paused: bool,
    /// Executor threads blocked on the condition variable: only then does a new job need a
    /// wake-up (a futex system call), not while they are busy or briefly spinning.
    sleeping: usize,
}

/// Results from the executor threads.
struct Outcome {
    key: Key,
    ticket: WireTicket,
    replicas: Vec<Key>,
    result: Result<Value, TaskError>,
    duration: Duration,
}

enum Inbox {
    Scheduler(Vec<FromScheduler>),
    SchedulerClosed(String),
    Done(Vec<Outcome>),
    Fetched {
        from: Arc<str>,
        keys: Vec<Key>,
        result: Result<Vec<(Key, Fetched)>, String>,
    },
    /// Copies fetched for the scheduler (a retiring worker's results).
    Acquired {
        from: Arc<str>,
        keys: Vec<Key>,
        result: Result<Vec<(Key, Fetched)>, String>,
    },
}

/// How long a retiring worker waits for the scheduler to move its results before it leaves
/// anyway (they are then recomputed where needed).
const RETIRE_PATIENCE: Duration = Duration::from_secs(30);

/// A task waiting for inputs to arrive.
struct Waiting {
    job: Job,
    prio: (i64, u64, u32),
    missing: usize,
}

/// Connects to the scheduler and runs until it stops, is lost, or `stop` is set.
///
/// # Errors
/// When the scheduler cannot be reached or refuses this worker.
pub async fn run_worker(cfg: WorkerConfig, stop: Arc<AtomicBool>) -> Result<WorkerExit, RuntimeError> {
    let listener = TcpListener::bind((cfg.host.as_str(), 0))
        .await
        .map_err(|e| RuntimeError::Bind(format!("{}:0", cfg.host), e.to_string()))?;
    let local = listener.local_addr().map_err(|e| RuntimeError::Bind(cfg.host.clone(), e.to_string()))?;
    let data_address = format!("{}://{local}", rask_protocol::tls::scheme()?);
    remove_stale_spill_dirs();
    let store: Store = DataStore::start(&cfg.name, cfg.memory_limit);
    let server = tokio::spawn(data_server(listener, Arc::clone(&store)));
    let info = WorkerInfo {
        name: cfg.name.clone(),
        nthreads: cfg.nthreads as u32,
        resources: cfg.resources.clone(),
        memory_limit: cfg.memory_limit,
        data_address: data_address.clone(),
        restarted_after: cfg.restarted_after.clone(),
    };
    let (stream, _) = match dial(&cfg.scheduler, &Role::Worker(info)).await {
        Ok(x) => x,
        Err(e) => {
            server.abort();
            return Err(RuntimeError::Connect(cfg.scheduler.clone(), e.to_string()));
        }
    };
    let (r, w) = stream.into_split();
    let to_scheduler: Outbox<ToScheduler> = Outbox::spawn(w);
    let (tx, mut rx) = mpsc::unbounded_channel::<Inbox>();
    let reader_tx = tx.clone();
    tokio::spawn(async move {
        let r = read_loop::<FromScheduler>(r, |f| reader_tx.send(Inbox::Scheduler(f.messages)).is_ok()).await;
        let why = match r {
            Ok(()) => "the scheduler closed the connection".to_owned(),
            Err(e) => e.to_string(),
        };
        let _ = reader_tx.send(Inbox::SchedulerClosed(why));
    });

    // Executor threads.
    let queue = Arc::new(JobQueue::default());
    let location: Arc<str> = Arc::from(format!("on worker {} ({data_address})", cfg.name));
    let own_address: Arc<str> = Arc::from(data_address.as_str());
    let mut threads = Vec::new();
    for i in 0..cfg.nthreads.max(1) {
        let (queue, tx, registry, location) =
            (Arc::clone(&queue), tx.clone(), Arc::clone(&cfg.registry), Arc::clone(&location));
        let spawned = std::thread::Builder::new()
            .name(format!("rask-worker-{i}"))
            .spawn(move || executor_thread(&queue, &tx, &registry, &location));
        match spawned {
            Ok(t) => threads.push(t),
            Err(e) => return Err(RuntimeError::Bind("executor thread".into(), e.to_string())),
        }
    }

    let peers = PeerPool::default();
    let fetch_limit = Arc::new(Semaphore::new(FETCH_CONCURRENCY));
    // Whether the worker is paused for memory: fetches wait (a fetched input is more memory).
    let (paused_tx, paused_rx) = tokio::sync::watch::channel(false);
    // Bytes of inputs fetched from peers so far (reported with the heartbeats).
    let mut fetched_bytes = 0u64;
    let mut tally = Tally::default();
    let mut waiting: FxHashMap<Key, Waiting> = FxHashMap::default();
    // input key -> tasks waiting for it
    let mut fetching: FxHashMap<Key, Vec<Key>> = FxHashMap::default();
    // fetched copies -> number of local tasks still needing them
    let mut replicas: FxHashMap<Key, (Value, usize)> = FxHashMap::default();
    let mut seq = 0u64;
    // tasks handed to the executor queue and not yet reported: key -> queue sequence number
    let mut queued: FxHashMap<Key, u64> = FxHashMap::default();
    // Jobs ready to hand to the executor threads, queued together at the end of each message.
    let mut ready: Vec<(Job, Prio, u64)> = Vec::new();
    let mut ticker = tokio::time::interval(Duration::from_millis(200));
    // After a stall, one heartbeat rather than every one missed.
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Since when this worker has been retiring (SIGTERM): it leaves when the scheduler says so.
    let mut retiring: Option<Instant> = None;

    let mut turns = Turns::default();
    let mut inline = Inline { registry: &cfg.registry, queue: &queue, overran: FxHashSet::default() };
    // Tasks run on the event loop (see `Inline`): argument scratch, and reports not sent yet.
    let mut inline_buf: Vec<Value> = Vec::new();
    let mut inline_reports: Vec<ToScheduler> = Vec::new();
    let exit = loop {
        // Under load, let the writer send the results reported so far (see `Turns`).
        turns.pause().await;
        let msg = tokio::select! {
            // The heartbeat first: messages arriving back to back must not starve it.
            biased;
            _ = ticker.tick() => {
                if stop.load(Ordering::Relaxed) {
                    match retiring {
                        None => {
                            // Leave gracefully: the scheduler moves our results, then says go.
                            retiring = Some(Instant::now());
                            to_scheduler.send(ToScheduler::Retire, Vec::new());
                        }
                        Some(since) if since.elapsed() > RETIRE_PATIENCE => break WorkerExit::Stopped,
                        Some(_) => {}
                    }
                }
                // Alive, whatever the executor threads are doing, and how its memory is used: the
                // memory report is the heartbeat (the scheduler drops a worker it has not heard
                // from within its TTL; any message counts).
                // Process memory (what tasks allocate counts too): spill more above 70% of
                // the limit, pause above 80%.
                let process_memory = process_rss();
                if let Some(rss) = cfg.memory_limit.and(process_memory) {
                    let rss = rss / cfg.workers_in_process.max(1) as u64;
                    let mut held = lock(&store);
                    // Results whose files are being written are as good as gone.
                    let in_flight = held.writing_bytes();
                    let out = held.policy.spill_for_rss(rss.saturating_sub(in_flight));
                    held.spill(out);
                    let pause = held.policy.should_pause(rss, held.writing_bytes());
                    drop(held);
                    let (m, cv) = (&queue.q, &queue.cv);
                    let mut q = lock(m);
                    if q.paused != pause {
                        q.paused = pause;
                        drop(q);
                        paused_tx.send_replace(pause);
                        cv.notify_all();
                        if pause {
                            eprintln!("rask worker {}: paused: process memory {rss} bytes is over 80% of its limit", cfg.name);
                        }
                        to_scheduler.send(ToScheduler::Paused { paused: pause }, Vec::new());
                    }
                }
                let (managed, spilled, io) = lock(&store).usage();
                let report = MemoryReport {
                    managed,
                    spilled,
                    written: io.written,
                    write_us: io.write_time.as_micros() as u64,
                    read: io.read,
                    read_us: io.read_time.as_micros() as u64,
                    rss: process_memory.unwrap_or(0),
                    cpu_us: process_cpu_us(),
                    fetched: fetched_bytes,
                };
                if let Some(stats) = &cfg.stats {
                    let paused = lock(&queue.q).paused;
                    let mut s = lock(stats);
                    s.name.clone_from(&cfg.name);
                    s.memory = report;
                    s.tasks_finished = tally.finished;
                    s.tasks_failed = tally.failed;
                    s.tasks_inline = tally.inline;
                    s.tasks_assigned = (queued.len() + waiting.len()) as u64;
                    s.paused = paused;
                }
                to_scheduler.send(ToScheduler::Memory { report }, Vec::new());
                continue;
            }
            // The next message usually comes within a round-trip (the next task of a chain):
            // poll for it briefly before sleeping, as the executor threads do — waking a
            // sleeping thread (on a VM, a halted CPU) costs tens of µs a hop.
            m = recv_spinning(&mut rx, SPIN_BEFORE_SLEEP) => m,
        };
        let Some(msg) = msg else { break WorkerExit::Stopped };
        match msg {
            Inbox::SchedulerClosed(why) => break WorkerExit::SchedulerLost(why),
            Inbox::Scheduler(messages) => {
                let mut shutdown = None;
                for m in messages {
                    match m {
                        FromScheduler::Compute { key, ticket, .. } if cfg.zero_work => {
                            lock(&store).insert(key.clone(), Value::Null);
                            let done = ToScheduler::TaskFinished { key, ticket, nbytes: 0, duration_us: 0 };
                            to_scheduler.send(done, Vec::new());
                        }
                        FromScheduler::Compute { key, body, inputs, retries, timeout_us, priority, ticket } => {
                            // Bodies travel encoded (see `TaskBody`): one that does not decode
                            // fails its task, and only it.
                            let body = match body.decode() {
                                Ok(body) => body,
                                Err(e) => {
                                    let error = WireError {
                                        key: key.clone(),
                                        message: format!("worker {} cannot run task {key}: {e}", cfg.name),
                                        kind: rask_protocol::wire::WireFailure::Unrunnable,
                                        attempts: 0,
                                    };
                                    tally.failed += 1;
                                    to_scheduler.send(ToScheduler::TaskFailed { key, ticket, error }, Vec::new());
                                    continue;
                                }
                            };
                            let mut job = Job {
                                key: key.clone(),
                                body,
                                inputs: Vec::with_capacity(inputs.len()),
                                retries,
                                timeout: timeout_us.map(Duration::from_micros),
                                replicas: Vec::new(),
                                ticket,
                            };
                            let mut to_fetch: FxHashMap<Arc<str>, Vec<Key>> = FxHashMap::default();
                            let mut missing = 0;
                            {
                                let mut held = lock(&store);
                                for (k, holders) in inputs {
                                    if let Some(v) = held.get(&k) {
                                        job.inputs.push((k, v));
                                        continue;
                                    }
                                    if let Some((v, users)) = replicas.get_mut(&k) {
                                        *users += 1;
                                        job.inputs.push((k.clone(), v.clone()));
                                        job.replicas.push(k);
                                        continue;
                                    }
                                    missing += 1;
                                    let already = fetching.contains_key(&k);
                                    fetching.entry(k.clone()).or_default().push(key.clone());
                                    if !already {
                                        // No other holder named: the scheduler believes this
                                        // worker has it. It does not (any more); asking itself
                                        // tells the scheduler so.
                                        let from = holders.first().unwrap_or(&own_address);
                                        to_fetch.entry(Arc::clone(from)).or_default().push(k);
                                    }
                                }
                            }
                            if missing == 0 && inline.allows(&job, ready.is_empty(), *paused_rx.borrow()) {
                                let start = Instant::now();
                                let result = run_job(&job, &cfg.registry, &location, &mut inline_buf);
                                inline_buf.clear();
                                let duration = start.elapsed();
                                inline.ran(&job, duration, &cfg.name);
                                tally.inline += 1;
                                let Job { key, ticket, replicas: used, .. } = job;
                                let outcome = Outcome { key, ticket, replicas: used, result, duration };
                                inline_reports.push(conclude(outcome, &mut lock(&store), &mut replicas, &mut tally));
                                // A long frame of them: the results go back in batches as they
                                // come, and the writer gets to send them.
                                if inline_reports.len() >= OUTCOME_BATCH {
                                    to_scheduler.send_many(std::mem::take(&mut inline_reports));
                                    turns.pause().await;
                                }
                            } else if missing == 0 {
                                seq += 1;
                                queued.insert(key, seq);
                                ready.push((job, priority, seq));
                            } else {
                                if let Some(old) = waiting.insert(key, Waiting { job, prio: priority, missing }) {
                                    release_replicas(&mut replicas, old.job.replicas);
                                }
                                for (addr, keys) in to_fetch {
                                    let (tx, peers, limit) = (tx.clone(), peers.clone(), Arc::clone(&fetch_limit));
                                    let mut paused = paused_rx.clone();
                                    tokio::spawn(async move {
                                        let result = if addr.is_empty() {
                                            Err("no worker holds it".to_owned())
                                        } else {
                                            // Nothing is fetched while paused (the sender lives
                                            // as long as the worker, so this only ends unpaused).
                                            let _ = paused.wait_for(|p| !*p).await;
                                            let _permit = limit.acquire().await;
                                            match tokio::time::timeout(
                                                FETCH_TIMEOUT,
                                                peers.get_data(&addr, keys.clone()),
                                            )
                                            .await
                                            {
                                                Ok(r) => r.map_err(|e| format!("{addr}: {e}")),
                                                Err(_) => Err(format!("{addr}: no answer within {FETCH_TIMEOUT:?}")),
                                            }
                                        };
                                        let _ = tx.send(Inbox::Fetched { from: addr, keys, result });
                                    });
                                }
                            }
                        }
                        FromScheduler::Free { keys } => {
                            // Jobs from earlier in this frame are queued first, so they can be
                            // taken back.
                            enqueue(&queue, &mut ready);
                            for k in keys {
                                lock(&store).remove(&k);
                                // A task not started yet is dropped, and the scheduler told so
                                // (it keeps the slot reserved until it hears back). So is one
                                // run inline earlier in this frame whose report has not gone:
                                // its result was just deleted.
                                let ticket = unstart(
                                    k.as_str(),
                                    &mut waiting,
                                    &mut fetching,
                                    &mut queued,
                                    &mut replicas,
                                    &queue,
                                )
                                .or_else(|| take_report(&mut inline_reports, &k));
                                if let Some(ticket) = ticket {
                                    to_scheduler.send(ToScheduler::TaskDropped { key: k, ticket }, Vec::new());
                                }
                            }
                        }
                        FromScheduler::Steal { keys } => {
                            enqueue(&queue, &mut ready);
                            for k in keys {
                                if let Some(ticket) =
                                    unstart(k.as_str(), &mut waiting, &mut fetching, &mut queued, &mut replicas, &queue)
                                {
                                    to_scheduler.send(ToScheduler::TaskDropped { key: k, ticket }, Vec::new());
                                }
                            }
                        }
                        FromScheduler::Acquire { keys } => {
                            let mut by_holder: FxHashMap<Arc<str>, Vec<Key>> = FxHashMap::default();
                            for (k, holder) in keys {
                                by_holder.entry(holder).or_default().push(k);
                            }
                            for (from, keys) in by_holder {
                                let (tx, peers) = (tx.clone(), peers.clone());
                                tokio::spawn(async move {
                                    let result =
                                        match tokio::time::timeout(FETCH_TIMEOUT, peers.get_data(&from, keys.clone()))
                                            .await
                                        {
                                            Ok(r) => r.map_err(|e| format!("{from}: {e}")),
                                            Err(_) => Err(format!("{from}: no answer within {FETCH_TIMEOUT:?}")),
                                        };
                                    let _ = tx.send(Inbox::Acquired { from, keys, result });
                                });
                            }
                        }
                        FromScheduler::Shutdown { reason } => shutdown = Some(reason),
                        other => eprintln!("rask worker {}: unexpected message {other:?}", cfg.name),
                    }
                }
                enqueue(&queue, &mut ready);
                to_scheduler.send_many(std::mem::take(&mut inline_reports));
                if let Some(reason) = shutdown {
                    break WorkerExit::SchedulerShutdown(reason);
                }
            }
            Inbox::Fetched { from, keys, result } => {
                let got: FxHashMap<Key, Fetched> = match result {
                    Ok(values) => {
                        fetched_bytes += values
                            .iter()
                            .map(|(_, v)| v.as_ref().ok().and_then(Option::as_ref).map_or(0, |v| v.nbytes() as u64))
                            .sum::<u64>();
                        values.into_iter().collect()
                    }
                    Err(e) => {
                        eprintln!("rask worker {}: fetching {} inputs failed: {e}", cfg.name, keys.len());
                        FxHashMap::default()
                    }
                };
                for k in keys {
                    let tasks = fetching.remove(&k).unwrap_or_default();
                    match got.get(&k).cloned().unwrap_or(Ok(None)) {
                        // Held there but too large to send: the tasks needing it fail with why
                        // (asking again would fail again).
                        Err(why) => {
                            for t in tasks {
                                if let Some(w) = waiting.remove(&t) {
                                    release_replicas(&mut replicas, w.job.replicas);
                                    let error = WireError {
                                        key: t.clone(),
                                        message: format!("input {k} cannot be sent from worker {from}: {why}"),
                                        kind: rask_protocol::wire::WireFailure::Error,
                                        attempts: 1,
                                    };
                                    let ticket = w.job.ticket;
                                    to_scheduler.send(ToScheduler::TaskFailed { key: t, ticket, error }, Vec::new());
                                }
                            }
                        }
                        Ok(Some(v)) => {
                            let mut tasks = tasks;
                            tasks.sort_unstable();
                            tasks.dedup();
                            let users = tasks.iter().filter(|t| waiting.contains_key(*t)).count();
                            for t in &tasks {
                                let Some(w) = waiting.get_mut(t) else { continue };
                                w.job.inputs.push((k.clone(), v.clone()));
                                w.job.replicas.push(k.clone());
                                w.missing -= 1;
                                if w.missing == 0 {
                                    if let Some(w) = waiting.remove(t) {
                                        seq += 1;
                                        queued.insert(t.clone(), seq);
                                        ready.push((w.job, w.prio, seq));
                                    }
                                }
                            }
                            // Keep a copy while queued tasks of this worker may still ask for it.
                            if users > 0 {
                                replicas.insert(k.clone(), (v, users));
                            }
                        }
                        Ok(None) => {
                            for t in tasks {
                                if let Some(w) = waiting.remove(&t) {
                                    release_replicas(&mut replicas, w.job.replicas);
                                    let missing = vec![(k.clone(), from.to_string())];
                                    let ticket = w.job.ticket;
                                    to_scheduler
                                        .send(ToScheduler::MissingInputs { key: t, ticket, missing }, Vec::new());
                                }
                            }
                        }
                    }
                }
                enqueue(&queue, &mut ready);
            }
            Inbox::Acquired { from, keys, result } => {
                // Every key is answered: copied, or failed (so the retirement does not wait).
                let mut got: FxHashMap<Key, Fetched> = match result {
                    Ok(values) => values.into_iter().collect(),
                    Err(e) => {
                        eprintln!("rask worker {}: could not copy results from {from}: {e}", cfg.name);
                        FxHashMap::default()
                    }
                };
                for key in keys {
                    match got.remove(&key).unwrap_or(Ok(None)) {
                        Ok(Some(v)) => {
                            let nbytes = v.nbytes() as u64;
                            lock(&store).insert(key.clone(), v);
                            to_scheduler.send(ToScheduler::Acquired { key, nbytes }, Vec::new());
                        }
                        other => {
                            if let Err(why) = other {
                                eprintln!("rask worker {}: cannot copy {key} from {from}: {why}", cfg.name);
                            }
                            to_scheduler.send(ToScheduler::AcquireFailed { key }, Vec::new());
                        }
                    }
                }
            }
            Inbox::Done(outcomes) => {
                let mut reports = Vec::with_capacity(outcomes.len());
                let mut held = lock(&store);
                for o in outcomes {
                    queued.remove(&o.key);
                    reports.push(conclude(o, &mut held, &mut replicas, &mut tally));
                }
                drop(held);
                to_scheduler.send_many(reports);
            }
        }
    };
    lock(&queue.q).closed = true;
    queue.cv.notify_all();
    server.abort();
    if matches!(exit, WorkerExit::Stopped) {
        // Leaving on purpose: say so, so the scheduler records why rather than a lost
        // connection. Bounded: a scheduler that stopped reading must not keep us here.
        let reason = format!("worker {} stopped (SIGTERM/SIGINT or its program)", cfg.name);
        to_scheduler.send(ToScheduler::Goodbye { reason }, Vec::new());
        let _ = tokio::time::timeout(Duration::from_secs(2), to_scheduler.flushed()).await;
    }
    drop(to_scheduler);
    for t in threads {
        // Threads finish their current task; a task that never returns is left behind.
        if !t.is_finished() {
            continue;
        }
        let _ = t.join();
    }
    Ok(exit)
}

/// Takes back task `k` if it has not started (waiting for inputs, or queued for a thread).
/// Returns the ticket of the assignment it took back; a running task is left alone.
fn unstart(
    k: &str,
    waiting: &mut FxHashMap<Key, Waiting>,
    fetching: &mut FxHashMap<Key, Vec<Key>>,
    queued: &mut FxHashMap<Key, u64>,
    replicas: &mut FxHashMap<Key, (Value, usize)>,
    queue: &JobQueue,
) -> Option<WireTicket> {
    if let Some(w) = waiting.remove(k) {
        release_replicas(replicas, w.job.replicas);
        for list in fetching.values_mut() {
            list.retain(|t| t.as_str() != k);
        }
        return Some(w.job.ticket);
    }
    if let Some(seq) = queued.get(k).copied() {
        if let Some(job) = lock(&queue.q).jobs.remove(&seq) {
            queued.remove(k);
            release_replicas(replicas, job.replicas);
            return Some(job.ticket);
        }
    }
    None
}

/// Removes the report on `key` from `reports` (not sent yet), returning its ticket.
fn take_report(reports: &mut Vec<ToScheduler>, key: &Key) -> Option<WireTicket> {
    let i = reports.iter().position(|r| match r {
        ToScheduler::TaskFinished { key: k, .. } | ToScheduler::TaskFailed { key: k, .. } => k == key,
        _ => false,
    })?;
    match reports.swap_remove(i) {
        ToScheduler::TaskFinished { ticket, .. } | ToScheduler::TaskFailed { ticket, .. } => Some(ticket),
        _ => None,
    }
}

/// A local task no longer needs these fetched copies; drop the ones nobody needs.
fn release_replicas(replicas: &mut FxHashMap<Key, (Value, usize)>, used: Vec<Key>) {
    for k in used {
        if let Some((_, users)) = replicas.get_mut(&k) {
            *users -= 1;
            if *users == 0 {
                replicas.remove(&k);
            }
        }
    }
}

/// Tasks this worker ended, for its metrics.
#[derive(Default)]
struct Tally {
    finished: u64,
    failed: u64,
    /// Of those, run on the event loop (see `Inline`).
    inline: u64,
}

/// The end of a job, run by an executor thread or inline: the fetched copies it used are
/// released, its result goes into the store, and the report for the scheduler is returned.
fn conclude(
    o: Outcome,
    held: &mut DataStore,
    replicas: &mut FxHashMap<Key, (Value, usize)>,
    tally: &mut Tally,
) -> ToScheduler {
    let Outcome { key, ticket, replicas: used, result, duration } = o;
    release_replicas(replicas, used);
    let duration_us = duration.as_micros().min(u128::from(u64::MAX)) as u64;
    match result {
        Ok(v) => {
            tally.finished += 1;
            let nbytes = v.nbytes() as u64;
            held.insert(key.clone(), v);
            ToScheduler::TaskFinished { key, ticket, nbytes, duration_us }
        }
        Err(e) => {
            tally.failed += 1;
            ToScheduler::TaskFailed { key, ticket, error: WireError::from(&e) }
        }
    }
}

/// Inputs a task run on the event loop may have (see [`Inline::allows`]).
const INLINE_INPUTS: usize = 16;
/// Fused calls a task run on the event loop may chain.
const INLINE_LINKS: usize = 8;
/// What the literal arguments of a task run on the event loop may add up to: one per value,
/// one per 64 bytes of text or binary data.
const INLINE_BUDGET: usize = 256;
/// A quick function that takes longer than this on the event loop broke its promise (or the
/// machine stalled): it runs on the task threads from then on.
const INLINE_OVERRUN: Duration = Duration::from_millis(5);

/// Which tasks run on the event loop itself rather than on an executor thread. The hand-off
/// (queue, wake-up, result sent back) costs several microseconds, more than a quick function on
/// small inputs, and a stream of such tasks keeps the threads waking and sleeping.
struct Inline<'a> {
    registry: &'a Registry,
    queue: &'a JobQueue,
    /// Functions that overran ([`INLINE_OVERRUN`]) on this worker.
    overran: FxHashSet<String>,
}

impl Inline<'_> {
    /// Whether `job`, its inputs all here, runs on the event loop now. It does when:
    /// - every function it calls is quick ([`rask_ops::OpEntry::quick`]: time bounded by the size
    ///   of its arguments) and none overran here;
    /// - its arguments are few and small: at most [`INLINE_INPUTS`] inputs, each [`small`],
    ///   literals within [`INLINE_BUDGET`], at most [`INLINE_LINKS`] fused calls, no retries — so
    ///   the loop is held up for microseconds;
    /// - it has no timeout (one is enforced on a thread of its own);
    /// - the worker is not paused for memory;
    /// - the executor threads have nothing running or queued, and nothing earlier in this frame
    ///   waits to be queued (`frame_idle`): it overtakes no work of higher priority, and the
    ///   worker never runs more tasks at once than it has threads.
    fn allows(&self, job: &Job, frame_idle: bool, paused: bool) -> bool {
        if !frame_idle
            || paused
            || job.timeout.is_some()
            || job.retries != 0
            || job.inputs.len() > INLINE_INPUTS
            || self.queue.ready.load(Ordering::Acquire) != 0
            || self.queue.running.load(Ordering::Acquire) != 0
        {
            return false;
        }
        let mut budget = INLINE_BUDGET;
        let mut quick = |c: &WireCall| {
            self.registry.is_quick(&c.op)
                && (self.overran.is_empty() || !self.overran.contains(c.op.as_str()))
                && c.args.iter().all(|a| spend_arg(a, &mut budget))
        };
        let calls = match &*job.body {
            WireBody::Call(c) => quick(c),
            WireBody::Chain(links) => links.len() <= INLINE_LINKS && links.iter().all(|(_, c)| quick(c)),
        };
        calls && job.inputs.iter().all(|(_, v)| small(v))
    }

    /// Notes an inline run of `job` that took `took`: functions that overran are not run inline
    /// again on this worker.
    fn ran(&mut self, job: &Job, took: Duration, worker: &str) {
        if took <= INLINE_OVERRUN {
            return;
        }
        let ops: Vec<&str> = match &*job.body {
            WireBody::Call(c) => vec![c.op.as_str()],
            WireBody::Chain(links) => links.iter().map(|(_, c)| c.op.as_str()).collect(),
        };
        eprintln!(
            "rask worker {worker}: {} ran {took:?} for {}, though registered as quick; it runs on task threads from now on",
            ops.join(" → "),
            job.key
        );
        self.overran.extend(ops.into_iter().map(str::to_owned));
    }
}

/// Takes `n` from `budget`; false (and `budget` unchanged) when it has less.
fn take(budget: &mut usize, n: usize) -> bool {
    let ok = *budget >= n;
    if ok {
        *budget -= n;
    }
    ok
}

/// Charges an argument to a literal budget (see [`INLINE_BUDGET`]); false when it does not fit.
/// References cost one: the values they name are checked as inputs.
fn spend_arg(a: &WireArg, budget: &mut usize) -> bool {
    take(budget, 1)
        && match a {
            WireArg::Lit(v) => spend_value(v, budget),
            WireArg::Ref(_) | WireArg::Link(_) => true,
            WireArg::List(items) => items.iter().all(|x| spend_arg(x, budget)),
            WireArg::Map(items) => items.iter().all(|(_, x)| spend_arg(x, budget)),
        }
}

fn spend_value(v: &WireValue, budget: &mut usize) -> bool {
    match v {
        WireValue::Str(s) => take(budget, s.len() / 64),
        WireValue::Bytes(b) => take(budget, b.len() / 64),
        // Large by definition.
        WireValue::Blob(_) => false,
        WireValue::List(items) => items.iter().all(|x| take(budget, 1) && spend_value(x, budget)),
        WireValue::Map(items) => items.iter().all(|(_, x)| take(budget, 1) && spend_value(x, budget)),
        WireValue::Null | WireValue::Bool(_) | WireValue::Int(_) | WireValue::Float(_) => true,
    }
}

/// Whether a quick function's input is small enough to keep it a matter of microseconds: a
/// scalar, a string or blob of up to 4 KiB, or up to 64 scalars in a list or map (checked
/// without walking anything larger).
fn small(v: &Value) -> bool {
    let scalar = |x: &Value| matches!(x, Value::Null | Value::Bool(_) | Value::Int(_) | Value::Float(_));
    match v {
        Value::Str(s) => s.len() <= 4096,
        Value::Bytes(b) => b.len() <= 4096,
        Value::List(l) => l.len() <= 64 && l.iter().all(scalar),
        Value::Map(m) => m.len() <= 64 && m.values().all(scalar),
        scalar_value => scalar(scalar_value),
    }
}

/// Hands jobs (with their priority and sequence number) to the executor threads, under one
/// lock for a whole frame's worth.
fn enqueue(queue: &JobQueue, jobs: &mut Vec<(Job, Prio, u64)>) {
    if jobs.is_empty() {
        return;
    }
    let mut q = lock(&queue.q);
    let n = jobs.len();
    for (job, prio, seq) in jobs.drain(..) {
        q.heap.push(Reverse((prio, seq)));
        q.jobs.insert(seq, job);
    }
    queue.ready.store(q.heap.len(), Ordering::Release);
    match q.sleeping {
        0 => {}
        1 if n == 1 => queue.cv.notify_one(),
        _ => queue.cv.notify_all(),
    }
}

/// Run times of the functions an executor thread has run, to tell whether the next job is
/// short enough to hold finished results back for: per op name, the longest recent run (a
/// maximum that decays by 1/16 a run, so one slow call stops the holding for a few dozen runs
/// rather than averaging away).
#[derive(Default)]
struct RunTimes(FxHashMap<String, Duration>);

impl RunTimes {
    fn record(&mut self, body: &WireBody, took: Duration) {
        // A chain's time is charged to its first function (what a chain is named by).
        let op = match body {
            WireBody::Call(c) => &c.op,
            WireBody::Chain(links) => match links.first() {
                Some((_, c)) => &c.op,
                None => return,
            },
        };
        match self.0.get_mut(op.as_str()) {
            Some(longest) => *longest = took.max(*longest - *longest / 16),
            None => {
                self.0.insert(op.clone(), took);
            }
        }
    }

    /// Whether `body` ran briefly so far (unknown functions are not short).
    fn short(&self, body: &WireBody) -> bool {
        let op = match body {
            WireBody::Call(c) => &c.op,
            WireBody::Chain(links) if links.len() == 1 => &links[0].1.op,
            WireBody::Chain(_) => return false,
        };
        self.0.get(op.as_str()).is_some_and(|longest| *longest < SHORT_JOB)
    }
}

fn executor_thread(queue: &JobQueue, tx: &mpsc::UnboundedSender<Inbox>, registry: &Registry, location: &str) {
    let (m, cv) = (&queue.q, &queue.cv);
    let mut buf = Vec::new();
    let mut times = RunTimes::default();
    // Results not reported yet, and since when the oldest waits.
    let mut done: Vec<Outcome> = Vec::new();
    let mut held_since = Instant::now();
    let report = |done: &mut Vec<Outcome>| done.is_empty() || tx.send(Inbox::Done(std::mem::take(done))).is_ok();
    loop {
        let job = {
            let mut q = lock(m);
            let mut spun = false;
            loop {
                if q.closed {
                    drop(q);
                    report(&mut done);
                    return;
                }
                if !done.is_empty() && (q.paused || q.heap.is_empty()) {
                    // No job to follow at once: report before waiting.
                    drop(q);
                    if !report(&mut done) {
                        return;
                    }
                    q = lock(m);
                    continue;
                }
                if q.paused {
                    q.sleeping += 1;
                    q = cv.wait(q).unwrap_or_else(PoisonError::into_inner);
                    q.sleeping -= 1;
                    continue;
                }
                if let Some(Reverse((_, seq))) = q.heap.pop() {
                    let job = q.jobs.remove(&seq);
                    // Counted as running before it stops counting as queued: the event loop,
                    // reading `ready` then `running`, never sees it as neither.
                    if job.is_some() {
                        queue.running.fetch_add(1, Ordering::AcqRel);
                    }
                    queue.ready.store(q.heap.len(), Ordering::Release);
                    match job {
                        Some(job) => break job,
                        None => continue,
                    }
                }
                if !spun {
                    // Dependent tasks usually arrive within a round-trip: wait for them briefly
                    // without sleeping, since waking a sleeping thread costs tens of µs.
                    drop(q);
                    spun = true;
                    let until = Instant::now() + SPIN_BEFORE_SLEEP;
                    // Yield rather than spin hard: on a busy machine the scheduler and the other
                    // workers need the core more than this thread does.
                    while Instant::now() < until {
                        std::thread::yield_now();
                        if queue.ready.load(Ordering::Acquire) > 0 {
                            break;
                        }
                    }
                    q = lock(m);
                    continue;
                }
                q.sleeping += 1;
                q = cv.wait(q).unwrap_or_else(PoisonError::into_inner);
                q.sleeping -= 1;
            }
        };
        // Results are held back only while short jobs follow (see `OUTCOME_BATCH`).
        let hold = times.short(&job.body) && done.len() < OUTCOME_BATCH && held_since.elapsed() < OUTCOME_HOLD;
        if !hold && !report(&mut done) {
            return;
        }
        let start = Instant::now();
        let result = run_job(&job, registry, location, &mut buf);
        buf.clear();
        let duration = start.elapsed();
        times.record(&job.body, duration);
        if done.is_empty() {
            held_since = Instant::now();
        }
        queue.running.fetch_sub(1, Ordering::Release);
        done.push(Outcome { key: job.key, ticket: job.ticket, replicas: job.replicas, result, duration });
    }
}

fn run_job(job: &Job, registry: &Registry, location: &str, buf: &mut Vec<Value>) -> Result<Value, TaskError> {
    // A scan for the usual handful of inputs; a map for a large reduction's.
    let index: Option<FxHashMap<&str, &Value>> =
        (job.inputs.len() > 16).then(|| job.inputs.iter().map(|(k, v)| (k.as_str(), v)).collect());
    let lookup = |k: &str| match &index {
        Some(index) => index.get(k).map(|v| (*v).clone()),
        None => job.inputs.iter().find(|(ik, _)| ik.as_str() == k).map(|(_, v)| v.clone()),
    };
    let run =
        |link_key: &Key, op: &str, args: &[WireArg], links: &[Value], retries, timeout, buf: &mut Vec<Value>| {
            let resolved: Vec<Value> =
                args.iter().map(|a| resolve_arg(a, &lookup, links)).collect::<Result<_, _>>().map_err(|e| {
                    TaskError { key: link_key.clone(), message: e.to_string(), kind: FailureKind::Error, attempts: 0 }
                })?;
            let policy = CallPolicy { op, key: link_key, retries, timeout, location };
            rask_ops::run_call(registry.get(op), &policy, buf, |b| b.extend(resolved.iter().cloned()))
        };
    match &*job.body {
        WireBody::Call(c) => run(&job.key, &c.op, &c.args, &[], job.retries, job.timeout, buf),
        WireBody::Chain(links) => {
            let mut values = Vec::with_capacity(links.len());
            for (k, c) in links {
                let v = run(k, &c.op, &c.args, &values, 0, None, buf)?;
                values.push(v);
            }
            Ok(values.pop().unwrap_or_default())
        }
    }
}

/// One `Data` frame being filled: values, their out-of-band blobs, and about how many bytes.
#[derive(Default)]
struct DataFrame {
    values: Vec<(Key, Option<WireValue>)>,
    blobs: Vec<Bytes>,
    used: usize,
}

/// Serves `GetData` requests from peers and clients.
async fn data_server(listener: TcpListener, store: Store) {
    // Connections live in this set, so stopping the server (aborting this task) closes them
    // and releases the store.
    let mut conns = tokio::task::JoinSet::new();
    loop {
        let Ok((stream, peer)) = listener.accept().await else { continue };
        while conns.try_join_next().is_some() {}
        let store = Arc::clone(&store);
        conns.spawn(async move {
            if let Err(e) = serve_peer(stream, &store).await {
                eprintln!("rask worker: data connection from {peer} closed: {e}");
            }
        });
    }
}

async fn serve_peer(stream: TcpStream, store: &Store) -> Result<(), RuntimeError> {
    let mut stream = rask_protocol::tls::accept(stream, "a worker's data port").await?;
    let role = handshake::accept(&mut stream, "a worker's data port").await?;
    if role != Role::Peer {
        handshake::refuse(&mut stream, "this is a worker's data port, not a scheduler").await?;
        return Ok(());
    }
    handshake::welcome(&mut stream, &handshake::Welcome { id: 0 }).await?;
    while let Some(frame) = read_frame::<_, PeerMsg>(&mut stream).await? {
        for m in frame.messages {
            if let PeerMsg::PutData { values } = m {
                let mut keys = Vec::with_capacity(values.len());
                let mut decoded = Vec::with_capacity(values.len());
                for (k, v) in values {
                    decoded.push((k.clone(), rask_protocol::wire::value_from_wire(v, &frame.blobs)?));
                    keys.push(k);
                }
                {
                    let mut held = lock(store);
                    for (k, v) in decoded {
                        held.insert(k, v);
                    }
                }
                write_frame(&mut stream, &[PeerMsg::Stored { keys }], &[]).await?;
                flush(&mut stream).await?;
                continue;
            }
            let PeerMsg::GetData { keys } = m else { continue };
            // Values go in frames of at most half the frame limit each; one too large for any
            // frame is reported as unsendable (the asking task fails with that reason) rather
            // than breaking the connection and being asked for again forever.
            let limit = rask_protocol::max_frame();
            let (budget, too_big) = (limit / 2, limit.saturating_sub(1 << 16));
            let found: Vec<(Key, Option<Value>)> = {
                let mut held = lock(store);
                keys.into_iter()
                    .map(|k| {
                        let v = held.get(&k);
                        (k, v)
                    })
                    .collect()
            };
            let mut frames = vec![DataFrame::default()];
            let mut unsendable = Vec::new();
            for (k, v) in found {
                let size = v.as_ref().map_or(0, Value::nbytes) + 64;
                if size > too_big {
                    let why = format!("its {size} bytes exceed the {limit}-byte frame limit");
                    unsendable.push((k, why));
                    continue;
                }
                if frames.last().is_some_and(|f| !f.values.is_empty() && f.used + size > budget) {
                    frames.push(DataFrame::default());
                }
                if let Some(f) = frames.last_mut() {
                    f.values.push((k, v.as_ref().map(|v| value_to_wire(v, &mut f.blobs))));
                    f.used += size;
                }
            }
            let last = frames.len() - 1;
            for (i, f) in frames.into_iter().enumerate() {
                let more = i < last;
                let unsendable = if more { Vec::new() } else { std::mem::take(&mut unsendable) };
                write_frame(&mut stream, &[PeerMsg::Data { values: f.values, unsendable, more }], &f.blobs).await?;
                flush(&mut stream).await?;
            }
        }
    }
    Ok(())
}

/// Flushes a peer connection: TLS holds the end of a write in its session buffer until then.
async fn flush(stream: &mut rask_protocol::tls::Stream) -> Result<(), RuntimeError> {
    tokio::io::AsyncWriteExt::flush(stream).await.map_err(|e| RuntimeError::Protocol(e.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(ops: &[&str], inputs: Vec<Value>) -> Job {
        let call = |op: &str| WireCall { op: op.to_owned(), args: Vec::new() };
        let body = match ops {
            [op] => WireBody::Call(call(op)),
            _ => WireBody::Chain(
                ops.iter().enumerate().map(|(i, op)| (Key::new(&format!("link-{i}")), call(op))).collect(),
            ),
        };
        Job {
            key: Key::new("t"),
            body: Arc::new(body),
            inputs: inputs.into_iter().enumerate().map(|(i, v)| (Key::new(&format!("in-{i}")), v)).collect(),
            retries: 0,
            timeout: None,
            replicas: Vec::new(),
            ticket: WireTicket { slot: 0, serial: 0 },
        }
    }

    #[test]
    fn small_inputs_are_scalars_short_texts_and_short_flat_collections() {
        let ints = |n: i64| Value::List(Arc::new((0..n).map(Value::Int).collect()));
        assert!(small(&Value::Float(1.5)) && small(&Value::Null));
        assert!(small(&Value::Str("x".repeat(4096).into())));
        assert!(!small(&Value::Str("x".repeat(4097).into())));
        assert!(!small(&Value::Bytes(Bytes::from(vec![0u8; 4097]))));
        assert!(small(&ints(64)) && !small(&ints(65)));
        assert!(!small(&Value::List(Arc::new(vec![ints(1)]))), "nested: not walked");
        let map = |n: i64| Value::Map(Arc::new((0..n).map(|i| (i.to_string(), Value::Int(i))).collect()));
        assert!(small(&map(64)) && !small(&map(65)));
    }

    #[test]
    fn only_quick_small_untimed_tasks_run_inline_and_only_while_the_threads_are_idle() {
        let registry = Registry::with_builtins();
        let queue = JobQueue::default();
        let mut gate = Inline { registry: &registry, queue: &queue, overran: FxHashSet::default() };
        let quick = job(&["add"], vec![Value::Int(1), Value::Int(2)]);
        assert!(gate.allows(&quick, true, false));
        assert!(gate.allows(&job(&["identity", "sum"], vec![]), true, false), "a chain of quick functions");
        assert!(!gate.allows(&job(&["identity", "sleep"], vec![]), true, false), "a chain with a slow link");
        assert!(!gate.allows(&job(&["identity"; INLINE_LINKS + 1], vec![]), true, false), "a long chain");
        assert!(!gate.allows(&job(&["sleep"], vec![]), true, false));
        assert!(!gate.allows(&job(&["no-such-op"], vec![]), true, false), "unknown: the thread reports it");
        let big = Value::List(Arc::new(vec![Value::Int(1); 100]));
        assert!(!gate.allows(&job(&["sum"], vec![big]), true, false), "a large input");
        let many = job(&["add"], vec![Value::Int(1); INLINE_INPUTS + 1]);
        assert!(!gate.allows(&many, true, false), "many inputs");
        let literal = |args: Vec<WireArg>| Job {
            body: Arc::new(WireBody::Call(WireCall { op: "sum".into(), args })),
            ..job(&["sum"], vec![])
        };
        let ints = |n: i64| WireArg::Lit(WireValue::List((0..n).map(WireValue::Int).collect()));
        assert!(gate.allows(&literal(vec![ints(100)]), true, false));
        assert!(!gate.allows(&literal(vec![ints(1000)]), true, false), "a large literal");
        assert!(!gate.allows(&literal(vec![WireArg::Lit(WireValue::Blob(0))]), true, false));
        assert!(!gate.allows(&Job { timeout: Some(Duration::from_secs(1)), ..job(&["add"], vec![]) }, true, false));
        assert!(!gate.allows(&Job { retries: 2, ..job(&["add"], vec![]) }, true, false));
        assert!(!gate.allows(&quick, true, true), "paused for memory");
        assert!(!gate.allows(&quick, false, false), "earlier tasks of the frame go first");
        queue.ready.store(1, Ordering::Release);
        assert!(!gate.allows(&quick, true, false), "jobs queued for the threads go first");
        queue.ready.store(0, Ordering::Release);
        queue.running.store(1, Ordering::Release);
        assert!(!gate.allows(&quick, true, false), "no more tasks at once than threads");
        queue.running.store(0, Ordering::Release);
        // A quick function that overran is not run inline again here.
        gate.ran(&quick, Duration::from_micros(50), "w");
        assert!(gate.allows(&quick, true, false));
        gate.ran(&quick, INLINE_OVERRUN * 2, "w");
        assert!(!gate.allows(&quick, true, false));
        assert!(gate.allows(&job(&["mul"], vec![]), true, false), "other functions still do");
    }

    #[test]
    fn a_report_not_sent_yet_is_taken_back_with_its_ticket() {
        let ticket = |serial| WireTicket { slot: 1, serial };
        let finished = |k: &str, serial| ToScheduler::TaskFinished {
            key: Key::new(k),
            ticket: ticket(serial),
            nbytes: 8,
            duration_us: 1,
        };
        let mut reports = vec![finished("a", 1), finished("b", 2), finished("c", 3)];
        assert_eq!(take_report(&mut reports, &Key::new("b")), Some(ticket(2)));
        assert_eq!(reports.len(), 2);
        assert_eq!(take_report(&mut reports, &Key::new("b")), None, "taken once");
        assert_eq!(take_report(&mut reports, &Key::new("z")), None);
        assert_eq!(reports, [finished("a", 1), finished("c", 3)]);
    }
}
