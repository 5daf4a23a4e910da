//! The client: submit graphs or calls to a cluster, hold futures, gather results.
//!
//! A [`Client`] keeps one connection to the scheduler (submissions, status updates) and fetches
//! results **directly from the workers** that hold them. Every [`RemoteFuture`] is a reference:
//! the scheduler keeps a key's value while some future of some client refers to it, and the
//! client tells it when the last one is dropped. [`BlockingClient`] wraps the async client in its
//! own runtime and implements [`rask_graph::Executor`], so anything that runs on the local
//! schedulers runs on a cluster unchanged.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use rask_graph::{ArgSpec, Executor, FxHashMap, Graph, Key, TaskError, TaskId, TaskResult, TaskSpec, Value};
use rask_protocol::handshake::Role;
use rask_protocol::msg::{FromScheduler, ToScheduler};
use rask_protocol::wire::{WireTask, tasks_to_wire};
use tokio::sync::watch;

use crate::conn::{Outbox, PeerPool, dial, read_loop};

/// Default tasks per part when a large graph is submitted in parts (see
/// `ToScheduler::SubmitPart` and [`Client::set_part_size`]).
const SUBMIT_PART: usize = 1 << 16;

/// How long `gather` waits for one worker to deliver results before trying again.
const FETCH_TIMEOUT: Duration = Duration::from_secs(60);

/// Attempts `gather` makes for a value whose holder disappears while it is fetched.
const GATHER_ROUNDS: usize = 5;

/// Scatter calls made by this process (part of each scattered key).
static SCATTERS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Why a client operation failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    /// The scheduler could not be reached or refused the connection.
    #[error("cannot connect to the scheduler at {0}: {1}")]
    Connect(String, String),
    /// The connection to the scheduler was lost.
    #[error("lost the scheduler: {0}")]
    Lost(String),
    /// The task (or one it depends on) failed.
    #[error(transparent)]
    Task(Arc<TaskError>),
    /// The key was cancelled.
    #[error("task {0} was cancelled")]
    Cancelled(Key),
    /// A worker holding the result could not deliver it.
    #[error("cannot fetch the result of {0} from the workers: {1}")]
    Fetch(Key, String),
    /// A wait ran out of time.
    #[error("timed out waiting for results")]
    Timeout,
    /// The graph to submit is not valid.
    #[error("invalid graph: {0}")]
    Graph(String),
}

#[derive(Clone, Debug)]
enum Status {
    Pending,
    Memory { workers: Vec<String> },
    Erred(Arc<TaskError>),
    Cancelled,
}

struct Entry {
    refs: usize,
    status: Status,
}

struct State {
    keys: FxHashMap<Key, Entry>,
    closed: Option<String>,
    /// Submissions the scheduler has acknowledged.
    accepted: u64,
    /// Submissions sent.
    submitted: u64,
    /// The last answer to `WhoIsThere`, and how many answers came.
    workers: Vec<(String, String, u32)>,
    /// From the same answer: workers that left, with why.
    departed: Vec<(String, String, String)>,
    /// From the same answer: each worker's memory report.
    memory: Vec<(String, rask_protocol::msg::MemoryReport)>,
    worker_answers: u64,
    /// The scheduler's latest word on this client's tasks: (finished, registered).
    progress: (u64, u64),
}

struct Inner {
    outbox: Outbox<ToScheduler>,
    state: Mutex<State>,
    changed: watch::Sender<u64>,
    peers: PeerPool,
    /// Held while a graph's parts are queued, so two threads submitting large graphs at once
    /// do not interleave their parts (the scheduler keeps one open submission per client).
    submitting: Mutex<()>,
}

impl Inner {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// An async connection to a rask cluster.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
    fuse: bool,
    part_size: usize,
}

/// A handle to a key being computed (or computed) on the cluster. Dropping the last handle to
/// a key releases it.
pub struct RemoteFuture {
    key: Key,
    inner: Arc<Inner>,
}

impl std::fmt::Debug for RemoteFuture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RemoteFuture({})", self.key)
    }
}

impl Clone for RemoteFuture {
    fn clone(&self) -> Self {
        if let Some(e) = self.inner.state().keys.get_mut(self.key.as_str()) {
            e.refs += 1;
        }
        RemoteFuture { key: self.key.clone(), inner: Arc::clone(&self.inner) }
    }
}

impl Drop for RemoteFuture {
    fn drop(&mut self) {
        let mut st = self.inner.state();
        let last = match st.keys.get_mut(self.key.as_str()) {
            Some(e) => {
                e.refs -= 1;
                e.refs == 0
            }
            None => false,
        };
        if last {
            st.keys.remove(self.key.as_str());
            self.inner.outbox.send(ToScheduler::Release { keys: vec![self.key.clone()] }, Vec::new());
        }
    }
}

impl RemoteFuture {
    /// The key.
    #[must_use]
    pub fn key(&self) -> &Key {
        &self.key
    }

    /// Whether the key has finished (in memory, failed or cancelled).
    #[must_use]
    pub fn done(&self) -> bool {
        !matches!(self.inner.state().keys.get(self.key.as_str()).map(|e| &e.status), Some(Status::Pending) | None)
    }

    /// The data addresses of the workers holding the value, once in memory.
    #[must_use]
    pub fn who_has(&self) -> Vec<String> {
        match self.inner.state().keys.get(self.key.as_str()).map(|e| &e.status) {
            Some(Status::Memory { workers }) => workers.clone(),
            _ => Vec::new(),
        }
    }

    /// Waits for the value and fetches it.
    ///
    /// # Errors
    /// The task's failure, a cancellation, or a lost connection.
    pub async fn result(&self) -> Result<Value, ClientError> {
        let client = Client { inner: Arc::clone(&self.inner), fuse: true, part_size: SUBMIT_PART };
        client.gather(std::slice::from_ref(self)).await.pop().unwrap_or(Err(ClientError::Timeout))
    }
}

/// How a worker's memory is used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkerMemory {
    /// The worker.
    pub name: String,
    /// Bytes of results it holds in memory.
    pub managed_bytes: u64,
    /// Bytes of results it spilled to disk (above 60% of its `--memory-limit`).
    pub spilled_bytes: u64,
    /// Bytes it has written to its spill files since it started.
    pub bytes_written: u64,
    /// Time spent encoding and writing them.
    pub write_time: Duration,
    /// Bytes it has read back from its spill files.
    pub bytes_read: u64,
    /// Time spent reading and decoding them.
    pub read_time: Duration,
}

/// A worker that left the cluster, as the scheduler recorded it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Departed {
    /// Its name.
    pub name: String,
    /// Its data address.
    pub address: String,
    /// Why it left, in words.
    pub cause: String,
}

/// An argument of [`Client::submit`]: a value or another future.
#[derive(Debug)]
pub enum CallArg<'a> {
    /// A literal.
    Value(Value),
    /// The value of a future (a dependency).
    Future(&'a RemoteFuture),
}

impl From<Value> for CallArg<'_> {
    fn from(v: Value) -> Self {
        CallArg::Value(v)
    }
}

impl<'a> From<&'a RemoteFuture> for CallArg<'a> {
    fn from(f: &'a RemoteFuture) -> Self {
        CallArg::Future(f)
    }
}

impl Client {
    /// Connects to the scheduler at `address` (`tcp://HOST:PORT` or `tls://HOST:PORT`), over TLS
    /// when this process has it ([`rask_protocol::tls::set_process_tls`] or the `RASK_TLS_*`
    /// variables).
    ///
    /// # Errors
    /// When the scheduler cannot be reached or refuses the connection (e.g. version mismatch).
    pub async fn connect(address: &str) -> Result<Client, ClientError> {
        let name = format!("client-{}", std::process::id());
        let (stream, _) = dial(address, &Role::Client { name })
            .await
            .map_err(|e| ClientError::Connect(address.to_owned(), e.to_string()))?;
        let (r, w) = stream.into_split();
        let (changed, _) = watch::channel(0u64);
        let inner = Arc::new(Inner {
            outbox: Outbox::spawn(w),
            state: Mutex::new(State {
                keys: FxHashMap::default(),
                closed: None,
                accepted: 0,
                submitted: 0,
                workers: Vec::new(),
                departed: Vec::new(),
                memory: Vec::new(),
                worker_answers: 0,
                progress: (0, 0),
            }),
            changed,
            peers: PeerPool::default(),
            submitting: Mutex::new(()),
        });
        // The reader holds only a weak reference: when the last handle of the client is
        // dropped, its outbox goes, the connection closes, and the scheduler releases its keys.
        let reader = Arc::downgrade(&inner);
        tokio::spawn(async move {
            let result = read_loop::<FromScheduler>(r, |frame| {
                let Some(inner) = reader.upgrade() else { return false };
                {
                    let mut st = inner.state();
                    for m in frame.messages {
                        apply(&mut st, m);
                    }
                }
                inner.changed.send_modify(|v| *v += 1);
                true
            })
            .await;
            let why = match result {
                Ok(()) => "the scheduler closed the connection".to_owned(),
                Err(e) => e.to_string(),
            };
            if let Some(inner) = reader.upgrade() {
                inner.state().closed.get_or_insert(why);
                inner.changed.send_modify(|v| *v += 1);
            }
        });
        Ok(Client { inner, fuse: true, part_size: SUBMIT_PART })
    }

    /// Whether [`Client::submit_graph`] fuses linear chains first (on by default; benchmarks
    /// turn it off to measure scheduling of the graph as given).
    pub fn set_fuse(&mut self, fuse: bool) {
        self.fuse = fuse;
    }

    /// Tasks per part when [`Client::submit_graph`] sends a large graph in parts (65 536 by
    /// default). Parts let the scheduler take a graph in while the client still encodes it;
    /// smaller parts start work sooner, larger ones cost fewer messages.
    pub fn set_part_size(&mut self, tasks: usize) {
        self.part_size = tasks.max(1);
    }

    fn track(&self, key: &Key) -> RemoteFuture {
        Self::track_in(&mut self.inner.state(), key);
        RemoteFuture { key: key.clone(), inner: Arc::clone(&self.inner) }
    }

    /// Counts one more future for `key` (under the state lock the caller holds, so a large
    /// submission takes the lock once, not once per key).
    fn track_in(st: &mut State, key: &Key) {
        st.keys.entry(key.clone()).or_insert(Entry { refs: 0, status: Status::Pending }).refs += 1;
    }

    /// Submits the part of `graph` needed for `outputs` (fusing linear chains) and returns a
    /// future per output.
    #[must_use]
    pub fn submit_graph(&self, graph: &Graph, outputs: &[TaskId]) -> Vec<RemoteFuture> {
        {
            // Work that was all done is not this submission's: count from zero until the
            // scheduler speaks.
            let mut st = self.inner.state();
            if st.progress.0 >= st.progress.1 {
                st.progress = (0, 0);
            }
        }
        let (culled, outs) = match graph.cull(outputs) {
            Some((g, o)) => (std::borrow::Cow::Owned(g), o),
            None => (std::borrow::Cow::Borrowed(graph), outputs.to_vec()),
        };
        // Keys this client already holds futures for (e.g. persisted values) must stay tasks
        // of their own, so the scheduler reuses them instead of a fused chain recomputing them.
        let mut keep = outs.clone();
        {
            let st = self.inner.state();
            keep.extend(culled.ids().filter(|t| st.keys.contains_key(culled.key(*t).as_str())));
        }
        let fused = if self.fuse { rask_graph::fuse(&culled, &keep) } else { None };
        let (g, outs) = match fused {
            Some((g, mut o)) => {
                o.truncate(outs.len());
                (std::borrow::Cow::Owned(g), o)
            }
            None => (culled, outs),
        };
        let rank = rask_graph::execution_ranks(&g, &outs);
        let futures: Vec<RemoteFuture> = {
            let mut st = self.inner.state();
            outs.iter()
                .map(|o| {
                    Self::track_in(&mut st, g.key(*o));
                    RemoteFuture { key: g.key(*o).clone(), inner: Arc::clone(&self.inner) }
                })
                .collect()
        };
        // Wanted tasks are flagged in place (no second list of keys to send and look up).
        let mut flags = vec![false; g.len()];
        for o in &outs {
            flags[o.idx()] = true;
        }
        let wanted = Vec::new();
        self.inner.state().submitted += 1;
        // One submission at a time on this connection, so parts of two graphs never interleave.
        let _one_at_a_time = self.inner.submitting.lock().unwrap_or_else(PoisonError::into_inner);
        if g.len() <= self.part_size {
            let tasks = tasks_to_wire(&g, &rank, g.ids(), &flags);
            self.inner.outbox.send(ToScheduler::SubmitGraph { tasks, wanted }, Vec::new());
            return futures;
        }
        // A large graph goes in parts, inputs before their users: the scheduler takes each
        // part in while this thread converts the next and the writer task encodes it.
        let order = g.topo_order();
        let mut parts = order.chunks(self.part_size).peekable();
        while let Some(part) = parts.next() {
            let tasks = tasks_to_wire(&g, &rank, part.iter().copied(), &flags);
            if parts.peek().is_some() {
                self.inner.outbox.send_alone(ToScheduler::SubmitPart { tasks });
            } else {
                self.inner.outbox.send_alone(ToScheduler::SubmitGraph { tasks, wanted });
                break;
            }
        }
        futures
    }

    /// Waits until the scheduler has taken in every graph submitted so far (all their tasks
    /// known and scheduled), e.g. to measure intake.
    ///
    /// # Errors
    /// [`ClientError::Lost`] when the connection drops.
    pub async fn accepted(&self) -> Result<(), ClientError> {
        let target = self.inner.state().submitted;
        self.wait_until(|st| st.accepted >= target).await
    }

    /// Submits one call of a registered function (like `Client.submit`); futures among the
    /// arguments become dependencies. The key is a content hash, so equal calls share a task.
    #[must_use]
    pub fn submit(&self, op: &str, args: Vec<CallArg<'_>>) -> RemoteFuture {
        self.map_calls(op, vec![args]).pop().unwrap_or_else(|| self.track(&Key::new("")))
    }

    /// Submits `op` once per argument list (like `Client.map`), as one batch.
    #[must_use]
    pub fn map_calls(&self, op: &str, calls: Vec<Vec<CallArg<'_>>>) -> Vec<RemoteFuture> {
        let mut b = rask_graph::GraphBuilder::new();
        let mut keys = Vec::with_capacity(calls.len());
        let mut external: Vec<Key> = Vec::new();
        for args in calls {
            let specs: Vec<ArgSpec> = args
                .into_iter()
                .map(|a| match a {
                    CallArg::Value(v) => ArgSpec::Lit(v),
                    CallArg::Future(f) => {
                        external.push(f.key.clone());
                        ArgSpec::Ref(f.key.clone())
                    }
                })
                .collect();
            let key = rask_graph::tokenize(op, &specs);
            if !b.contains(key.as_str()) {
                b.add(TaskSpec::new(key.clone(), op, specs));
            }
            keys.push(key);
        }
        // Futures passed as arguments are known to the scheduler: declare them as no-op
        // placeholders so the graph validates; the scheduler reuses the existing keys.
        for k in external {
            if !b.contains(k.as_str()) {
                b.add(TaskSpec::new(k, "identity", vec![ArgSpec::Lit(Value::Null)]));
            }
        }
        let graph = match b.build() {
            Ok(g) => g,
            Err(e) => {
                // Cannot happen for content-hash keys; report as failed futures rather than panic.
                let err = Arc::new(TaskError {
                    key: Key::new(op),
                    message: e.to_string(),
                    kind: rask_graph::FailureKind::Unrunnable,
                    attempts: 0,
                });
                let mut st = self.inner.state();
                for k in &keys {
                    st.keys.insert(k.clone(), Entry { refs: 0, status: Status::Erred(Arc::clone(&err)) });
                }
                drop(st);
                return keys.iter().map(|k| self.track(k)).collect();
            }
        };
        let futures: Vec<RemoteFuture> = keys.iter().map(|k| self.track(k)).collect();
        let rank = rask_graph::order(&graph, &[]);
        let called: std::collections::HashSet<&str> = keys.iter().map(Key::as_str).collect();
        let placeholders: std::collections::HashSet<&str> =
            graph.ids().map(|t| graph.key(t).as_str()).filter(|k| !called.contains(k)).collect();
        // Every task left is one of the calls, and wanted (flagged, not listed again); the
        // placeholders are left out before conversion, so inputs are named by their position
        // among the tasks actually sent.
        let ids = graph.ids().filter(|t| !placeholders.contains(graph.key(*t).as_str()));
        let tasks =
            tasks_to_wire(&graph, &rank, ids, &[]).into_iter().map(|t| WireTask { wanted: true, ..t }).collect();
        let wanted = Vec::new();
        self.inner.state().submitted += 1;
        let _one_at_a_time = self.inner.submitting.lock().unwrap_or_else(PoisonError::into_inner);
        self.inner.outbox.send(ToScheduler::SubmitGraph { tasks, wanted }, Vec::new());
        futures
    }

    /// Waits until every message queued so far has been sent (call before dropping the last
    /// handle of a client whose runtime is about to stop).
    pub async fn flush(&self) {
        self.inner.outbox.flushed().await;
    }

    /// Cancels futures: the scheduler stops their tasks unless another client wants them.
    pub fn cancel(&self, futures: &[RemoteFuture]) {
        let keys = futures.iter().map(|f| f.key.clone()).collect();
        self.inner.outbox.send(ToScheduler::Cancel { keys }, Vec::new());
    }

    /// The connected workers: (name, data address, threads).
    ///
    /// # Errors
    /// [`ClientError::Lost`] when the connection drops.
    pub async fn workers(&self) -> Result<Vec<(String, String, u32)>, ClientError> {
        self.ask_workers().await?;
        Ok(self.inner.state().workers.clone())
    }

    /// Workers that have left the cluster, oldest first, with why each left ("connection
    /// closed...", "heartbeat timeout...", or the reason the worker gave): the scheduler keeps
    /// the last 256.
    ///
    /// # Errors
    /// [`ClientError::Lost`] when the connection drops.
    pub async fn departed_workers(&self) -> Result<Vec<Departed>, ClientError> {
        self.ask_workers().await?;
        let st = self.inner.state();
        Ok(st
            .departed
            .iter()
            .map(|(name, address, cause)| Departed {
                name: name.clone(),
                address: address.clone(),
                cause: cause.clone(),
            })
            .collect())
    }

    /// How each connected worker's memory is used, as it last reported (a few times a
    /// second): results in memory and results spilled to disk.
    ///
    /// # Errors
    /// [`ClientError::Lost`] when the connection drops.
    pub async fn worker_memory(&self) -> Result<Vec<WorkerMemory>, ClientError> {
        self.ask_workers().await?;
        let st = self.inner.state();
        Ok(st
            .memory
            .iter()
            .map(|(name, r)| WorkerMemory {
                name: name.clone(),
                managed_bytes: r.managed,
                spilled_bytes: r.spilled,
                bytes_written: r.written,
                write_time: Duration::from_micros(r.write_us),
                bytes_read: r.read,
                read_time: Duration::from_micros(r.read_us),
            })
            .collect())
    }

    /// One `WhoIsThere` round-trip (which also means every earlier message was handled).
    async fn ask_workers(&self) -> Result<(), ClientError> {
        let before = self.inner.state().worker_answers;
        self.inner.outbox.send(ToScheduler::WhoIsThere, Vec::new());
        self.wait_until(|st| st.worker_answers > before).await
    }

    /// Puts values directly into workers' memory (like Dask's `scatter`) and returns futures
    /// for them, usable as arguments of later tasks. Values go round-robin to the workers, or to
    /// every worker with `broadcast`. Each scatter gets fresh keys (content hash plus a unique
    /// suffix). Scattered data cannot be recomputed: if every worker holding it is lost, its
    /// futures fail with a "lost" error.
    ///
    /// # Errors
    /// When no worker is connected or a worker cannot store the data.
    pub async fn scatter(&self, values: Vec<Value>, broadcast: bool) -> Result<Vec<RemoteFuture>, ClientError> {
        let workers = self.workers().await?;
        if workers.is_empty() {
            return Err(ClientError::Fetch(Key::new("scatter"), "no worker is connected".into()));
        }
        let mut per_worker: HashMap<String, Vec<(Key, Value)>> = HashMap::new();
        let mut items = Vec::with_capacity(values.len());
        let mut keys = Vec::with_capacity(values.len());
        for (i, v) in values.into_iter().enumerate() {
            // Unique per scatter call: a content-only key could meet a late `Free` of an
            // earlier scatter of the same value on the same worker and lose the new copy.
            let n = SCATTERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let token = rask_graph::tokenize("scatter", &[ArgSpec::Lit(v.clone())]);
            let key = Key::from(format!("{token}-{}-{n}", std::process::id()));
            let targets: Vec<String> = if broadcast {
                workers.iter().map(|w| w.1.clone()).collect()
            } else {
                vec![workers[i % workers.len()].1.clone()]
            };
            for t in &targets {
                per_worker.entry(t.clone()).or_default().push((key.clone(), v.clone()));
            }
            items.push((key.clone(), v.nbytes() as u64, targets));
            keys.push(key);
        }
        for (addr, batch) in per_worker {
            self.inner
                .peers
                .put_data(&addr, batch)
                .await
                .map_err(|e| ClientError::Fetch(Key::new("scatter"), e.to_string()))?;
        }
        let futures = keys.iter().map(|k| self.track(k)).collect();
        self.inner.outbox.send(ToScheduler::Scattered { items }, Vec::new());
        Ok(futures)
    }

    /// Lets these futures' tasks run to completion even after every future is dropped (like
    /// Dask's `fire_and_forget`): for side effects whose results nobody gathers.
    pub fn fire_and_forget(&self, futures: &[RemoteFuture]) {
        let keys = futures.iter().map(|f| f.key.clone()).collect();
        self.inner.outbox.send(ToScheduler::FireAndForget { keys }, Vec::new());
    }

    /// Waits until every future is done, or `timeout` passes.
    ///
    /// # Errors
    /// [`ClientError::Timeout`], or [`ClientError::Lost`] when the connection drops.
    pub async fn wait(&self, futures: &[RemoteFuture], timeout: Option<Duration>) -> Result<(), ClientError> {
        // Keys only ever become done, so a cursor makes waiting for n futures O(n) overall
        // rather than O(n) per status update.
        let mut next = 0;
        let all = self.wait_until(move |st| {
            while next < futures.len() && is_done(st, futures[next].key.as_str()) {
                next += 1;
            }
            next == futures.len()
        });
        match timeout {
            Some(t) => tokio::time::timeout(t, all).await.map_err(|_| ClientError::Timeout)?,
            None => all.await,
        }
    }

    /// Waits until at least one future is done; returns the index of the first done one.
    ///
    /// # Errors
    /// [`ClientError::Timeout`], or [`ClientError::Lost`] when the connection drops.
    pub async fn wait_first(&self, futures: &[RemoteFuture], timeout: Option<Duration>) -> Result<usize, ClientError> {
        let any = self.wait_until(|st| futures.iter().any(|f| is_done(st, f.key.as_str())));
        match timeout {
            Some(t) => tokio::time::timeout(t, any).await.map_err(|_| ClientError::Timeout)??,
            None => any.await?,
        }
        let st = self.inner.state();
        Ok(futures.iter().position(|f| is_done(&st, f.key.as_str())).unwrap_or(0))
    }

    /// Yields futures in the order they finish (like `as_completed`): each call returns the
    /// index (into `futures`) of the next one to finish, `None` when all have been returned.
    pub fn as_completed(&self, futures: Vec<RemoteFuture>) -> AsCompleted {
        AsCompleted { client: self.clone(), remaining: futures.into_iter().enumerate().collect() }
    }

    async fn wait_until(&self, mut ready: impl FnMut(&State) -> bool) -> Result<(), ClientError> {
        let mut rx = self.inner.changed.subscribe();
        loop {
            {
                let st = self.inner.state();
                if ready(&st) {
                    return Ok(());
                }
                if let Some(why) = &st.closed {
                    return Err(ClientError::Lost(why.clone()));
                }
            }
            if rx.changed().await.is_err() {
                return Err(ClientError::Lost("client shut down".into()));
            }
        }
    }

    /// Waits for every future and fetches the values from the workers (one request per worker).
    /// Each result is the value or the reason there is none. A value lost with its worker
    /// while being fetched is waited for again (the scheduler recomputes it).
    pub async fn gather(&self, futures: &[RemoteFuture]) -> Vec<Result<Value, ClientError>> {
        let mut out: Vec<Option<Result<Value, ClientError>>> = (0..futures.len()).map(|_| None).collect();
        for round in 0..GATHER_ROUNDS {
            let todo: Vec<usize> = (0..futures.len()).filter(|i| out[*i].is_none()).collect();
            if todo.is_empty() {
                break;
            }
            let pending: Vec<RemoteFuture> = todo.iter().map(|i| futures[*i].clone()).collect();
            if let Err(e) = self.wait(&pending, None).await {
                for i in todo {
                    out[i] = Some(Err(e.clone()));
                }
                break;
            }
            let mut by_worker: HashMap<String, Vec<(usize, Key)>> = HashMap::new();
            {
                let st = self.inner.state();
                for i in todo {
                    let f = &futures[i];
                    match st.keys.get(f.key.as_str()).map(|e| &e.status) {
                        Some(Status::Memory { workers }) => {
                            let w = workers.first().cloned().unwrap_or_default();
                            by_worker.entry(w).or_default().push((i, f.key.clone()));
                        }
                        Some(Status::Erred(e)) => out[i] = Some(Err(ClientError::Task(Arc::clone(e)))),
                        Some(Status::Cancelled) => out[i] = Some(Err(ClientError::Cancelled(f.key.clone()))),
                        Some(Status::Pending) => {} // lost meanwhile: next round
                        None => out[i] = Some(Err(ClientError::Lost("key unknown to this client".into()))),
                    }
                }
            }
            let last = round + 1 == GATHER_ROUNDS;
            let mut failed_fetch = false;
            let mut fetches = Vec::new();
            for (addr, items) in by_worker {
                let peers = self.inner.peers.clone();
                fetches.push(tokio::spawn(async move {
                    let keys: Vec<Key> = items.iter().map(|(_, k)| k.clone()).collect();
                    let got = match tokio::time::timeout(FETCH_TIMEOUT, peers.get_data(&addr, keys)).await {
                        Ok(r) => r.map_err(|e| format!("{addr}: {e}")),
                        Err(_) => Err(format!("{addr}: no answer within {FETCH_TIMEOUT:?}")),
                    };
                    (items, got)
                }));
            }
            for f in fetches {
                let Ok((items, got)) = f.await else { continue };
                let mut map: HashMap<Key, crate::conn::Fetched> = match &got {
                    Ok(values) => values.iter().cloned().collect(),
                    Err(_) => HashMap::new(),
                };
                for (i, k) in items {
                    match map.remove(&k).unwrap_or(Ok(None)) {
                        Ok(Some(v)) => out[i] = Some(Ok(v)),
                        // Held but too large to send: asking again would not help.
                        Err(why) => out[i] = Some(Err(ClientError::Fetch(k, why))),
                        Ok(None) if last => {
                            let why =
                                got.as_ref().err().cloned().unwrap_or_else(|| "the worker no longer holds it".into());
                            out[i] = Some(Err(ClientError::Fetch(k, why)));
                        }
                        Ok(None) => failed_fetch = true,
                    }
                }
            }
            if failed_fetch {
                // The holder is gone or freed it; give the scheduler a moment to notice and
                // reschedule before waiting for the key again.
                tokio::time::sleep(Duration::from_millis(200 * (round as u64 + 1))).await;
            }
        }
        out.into_iter().map(|r| r.unwrap_or(Err(ClientError::Timeout))).collect()
    }

    /// How far this client's work has come, as the scheduler last said (a few times a second,
    /// and at once when all is done): (finished, registered) tasks of its submissions so far.
    /// Both restart from zero once everything registered has finished.
    #[must_use]
    pub fn progress(&self) -> (u64, u64) {
        self.inner.state().progress
    }

    /// Runs `graph` for `outputs` on the cluster and returns each output's result.
    ///
    /// # Errors
    /// When the cluster cannot be used (connection lost, results not fetchable); task failures
    /// are results.
    pub async fn compute(&self, graph: &Graph, outputs: &[TaskId]) -> Result<Vec<TaskResult>, ClientError> {
        let futures = self.submit_graph(graph, outputs);
        let mut results = Vec::with_capacity(futures.len());
        for r in self.gather(&futures).await {
            results.push(match r {
                Ok(v) => Ok(v),
                Err(ClientError::Task(e)) => Err(e),
                Err(other) => return Err(other),
            });
        }
        Ok(results)
    }
}

fn is_done(st: &State, key: &str) -> bool {
    !matches!(st.keys.get(key).map(|e| &e.status), Some(Status::Pending))
}

fn apply(st: &mut State, m: FromScheduler) {
    let set = |st: &mut State, key: &str, status: Status| {
        if let Some(e) = st.keys.get_mut(key) {
            e.status = status;
        }
    };
    match m {
        FromScheduler::KeyInMemory { key, workers, .. } => set(st, key.as_str(), Status::Memory { workers }),
        FromScheduler::KeyErred { key, error } => {
            set(st, key.as_str(), Status::Erred(Arc::new(TaskError::from(error))));
        }
        FromScheduler::KeyCancelled { key } => set(st, key.as_str(), Status::Cancelled),
        FromScheduler::KeyLost { key } => set(st, key.as_str(), Status::Pending),
        FromScheduler::GraphAccepted { .. } => st.accepted += 1,
        FromScheduler::Progress { done, total } => st.progress = (done, total),
        FromScheduler::Workers { workers, departed, memory } => {
            st.workers = workers;
            st.departed = departed;
            st.memory = memory;
            st.worker_answers += 1;
        }
        FromScheduler::Shutdown { reason } => {
            st.closed.get_or_insert(format!("the scheduler shut down: {reason}"));
        }
        FromScheduler::Compute { .. }
        | FromScheduler::Free { .. }
        | FromScheduler::Steal { .. }
        | FromScheduler::Acquire { .. } => {}
    }
}

/// Futures in completion order; see [`Client::as_completed`].
pub struct AsCompleted {
    client: Client,
    remaining: Vec<(usize, RemoteFuture)>,
}

impl AsCompleted {
    /// The next finished future (with its index in the original list), `None` when done.
    ///
    /// # Errors
    /// When the connection is lost.
    pub async fn next(&mut self) -> Result<Option<(usize, RemoteFuture)>, ClientError> {
        if self.remaining.is_empty() {
            return Ok(None);
        }
        let futs: Vec<&RemoteFuture> = self.remaining.iter().map(|(_, f)| f).collect();
        self.client.wait_until(|st| futs.iter().any(|f| is_done(st, f.key.as_str()))).await?;
        let pos = {
            let st = self.client.inner.state();
            self.remaining.iter().position(|(_, f)| is_done(&st, f.key.as_str())).unwrap_or(0)
        };
        Ok(Some(self.remaining.remove(pos)))
    }
}

/// The progress bar rask draws on standard error for a computation's tasks (finished of
/// total), so that `rask run` and the blocking client look alike. Hidden when standard error
/// is not a terminal.
#[must_use]
pub fn task_progress_bar() -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{elapsed:>4} [{bar:40}] {pos}/{len} tasks")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar
}

/// A [`Client`] with its own runtime, for synchronous code; implements [`Executor`].
pub struct BlockingClient {
    rt: tokio::runtime::Runtime,
    client: Client,
    /// Draw a progress bar on standard error during [`BlockingClient::compute`].
    progress_bar: bool,
}

impl BlockingClient {
    /// Connects (blocking).
    ///
    /// # Errors
    /// See [`Client::connect`].
    pub fn connect(address: &str) -> Result<Self, ClientError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("rask-client")
            .enable_all()
            .build()
            .map_err(|e| ClientError::Connect(address.to_owned(), e.to_string()))?;
        let client = rt.block_on(Client::connect(address))?;
        let progress_bar = std::io::IsTerminal::is_terminal(&std::io::stderr());
        Ok(BlockingClient { rt, client, progress_bar })
    }

    /// Whether [`BlockingClient::compute`] draws a progress bar on standard error: by default
    /// only when standard error is a terminal (never into a log or a pipe).
    pub fn set_progress_bar(&mut self, on: bool) {
        self.progress_bar = on;
    }

    /// The async client (to use from async code running elsewhere).
    #[must_use]
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// See [`Client::set_fuse`].
    pub fn set_fuse(&mut self, fuse: bool) {
        self.client.set_fuse(fuse);
    }

    /// See [`Client::set_part_size`].
    pub fn set_part_size(&mut self, tasks: usize) {
        self.client.set_part_size(tasks);
    }

    /// Runs a future on this client's runtime (e.g. [`AsCompleted::next`]).
    pub fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }

    /// Blocking [`Client::submit_graph`].
    #[must_use]
    pub fn submit_graph(&self, graph: &Graph, outputs: &[TaskId]) -> Vec<RemoteFuture> {
        let _guard = self.rt.enter();
        self.client.submit_graph(graph, outputs)
    }

    /// Blocking [`Client::submit`].
    #[must_use]
    pub fn submit(&self, op: &str, args: Vec<CallArg<'_>>) -> RemoteFuture {
        let _guard = self.rt.enter();
        self.client.submit(op, args)
    }

    /// Blocking [`Client::map_calls`].
    #[must_use]
    pub fn map_calls(&self, op: &str, calls: Vec<Vec<CallArg<'_>>>) -> Vec<RemoteFuture> {
        let _guard = self.rt.enter();
        self.client.map_calls(op, calls)
    }

    /// Blocking [`Client::accepted`].
    ///
    /// # Errors
    /// See [`Client::accepted`].
    pub fn accepted(&self) -> Result<(), ClientError> {
        self.rt.block_on(self.client.accepted())
    }

    /// Blocking [`Client::gather`].
    pub fn gather(&self, futures: &[RemoteFuture]) -> Vec<Result<Value, ClientError>> {
        self.rt.block_on(self.client.gather(futures))
    }

    /// Blocking [`Client::wait`].
    ///
    /// # Errors
    /// See [`Client::wait`].
    pub fn wait(&self, futures: &[RemoteFuture], timeout: Option<Duration>) -> Result<(), ClientError> {
        self.rt.block_on(self.client.wait(futures, timeout))
    }

    /// Blocking [`Client::workers`].
    ///
    /// # Errors
    /// See [`Client::workers`].
    pub fn workers(&self) -> Result<Vec<(String, String, u32)>, ClientError> {
        self.rt.block_on(self.client.workers())
    }

    /// Blocking [`Client::worker_memory`].
    ///
    /// # Errors
    /// See [`Client::worker_memory`].
    pub fn worker_memory(&self) -> Result<Vec<WorkerMemory>, ClientError> {
        self.rt.block_on(self.client.worker_memory())
    }

    /// Blocking [`Client::departed_workers`].
    ///
    /// # Errors
    /// See [`Client::departed_workers`].
    pub fn departed_workers(&self) -> Result<Vec<Departed>, ClientError> {
        self.rt.block_on(self.client.departed_workers())
    }

    /// Blocking [`Client::scatter`].
    ///
    /// # Errors
    /// See [`Client::scatter`].
    pub fn scatter(&self, values: Vec<Value>, broadcast: bool) -> Result<Vec<RemoteFuture>, ClientError> {
        self.rt.block_on(self.client.scatter(values, broadcast))
    }

    /// See [`Client::fire_and_forget`].
    pub fn fire_and_forget(&self, futures: &[RemoteFuture]) {
        self.client.fire_and_forget(futures);
    }

    /// Blocking [`Client::cancel`].
    pub fn cancel(&self, futures: &[RemoteFuture]) {
        self.client.cancel(futures);
    }

    /// Blocking [`Client::compute`].
    ///
    /// # Errors
    /// See [`Client::compute`].
    pub fn compute(&self, graph: &Graph, outputs: &[TaskId]) -> Result<Vec<TaskResult>, ClientError> {
        if !self.progress_bar {
            return self.rt.block_on(self.client.compute(graph, outputs));
        }
        let bar = task_progress_bar();
        let result = self.rt.block_on(async {
            let work = self.client.compute(graph, outputs);
            tokio::pin!(work);
            let mut redraw = tokio::time::interval(Duration::from_millis(100));
            loop {
                tokio::select! {
                    // The work first: it resets the counts of a finished run before any redraw.
                    biased;
                    r = &mut work => break r,
                    _ = redraw.tick() => {
                        let (done, total) = self.client.progress();
                        bar.set_length(total);
                        bar.set_position(done);
                    }
                }
            }
        });
        bar.finish_and_clear();
        result
    }
}

impl Drop for BlockingClient {
    fn drop(&mut self) {
        // Deliver what is queued (releases, fire-and-forget requests) before the runtime and
        // the connection go away.
        let outbox = self.client.inner.outbox.clone();
        self.rt.block_on(async move {
            let _ = tokio::time::timeout(Duration::from_secs(2), outbox.flushed()).await;
        });
    }
}

impl Executor for BlockingClient {
    type Error = ClientError;

    fn run(&self, graph: &Graph, outputs: &[TaskId]) -> Result<Vec<TaskResult>, ClientError> {
        self.compute(graph, outputs)
    }
}
