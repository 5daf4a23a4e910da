//! Every message, grouped by direction. Each frame carries a batch of one of these enums.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use rask_graph::Key;

use crate::wire::{TaskBody, WireError, WireTask, WireTicket, WireValue};

/// How a worker's memory is used, and its spill traffic since it started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryReport {
    /// Bytes of results held in memory.
    pub managed: u64,
    /// Bytes of results spilled to disk.
    pub spilled: u64,
    /// Bytes written to spill files.
    pub written: u64,
    /// Microseconds spent encoding and writing them.
    pub write_us: u64,
    /// Bytes read back from spill files.
    pub read: u64,
    /// Microseconds spent reading and decoding them.
    pub read_us: u64,
    /// The worker process's resident memory (bytes; shared by the workers of one process).
    pub rss: u64,
    /// CPU time the worker process has used so far (µs, all threads; shared likewise).
    pub cpu_us: u64,
    /// Bytes of inputs fetched from other workers so far.
    pub fetched: u64,
}

/// Sent to the scheduler by clients and workers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ToScheduler {
    /// Client: the first parts of a large graph, each in its own frame so the scheduler takes
    /// one in while the client encodes the next. A part's tasks depend only on keys already
    /// known or in the part; the graph is complete with the `SubmitGraph` that follows.
    SubmitPart {
        /// The tasks.
        #[serde(deserialize_with = "crate::wire::presized")]
        tasks: Vec<WireTask>,
    },
    /// Client: add these tasks (keys already known are reused) and hold futures for `wanted`;
    /// the last part of a graph sent in parts.
    SubmitGraph {
        /// The tasks.
        #[serde(deserialize_with = "crate::wire::presized")]
        tasks: Vec<WireTask>,
        /// Keys the client holds futures for.
        wanted: Vec<Key>,
    },
    /// Client: the futures of these keys were dropped.
    Release {
        /// The keys.
        keys: Vec<Key>,
    },
    /// Client: stop these keys (and what depends on them) if nobody else wants them.
    Cancel {
        /// The keys.
        keys: Vec<Key>,
    },
    /// Client: compute these keys even if no client holds a future to them any more.
    FireAndForget {
        /// The keys.
        keys: Vec<Key>,
    },
    /// Client: these values were put on these workers (data addresses) with `PutData`; the
    /// client holds futures for them.
    Scattered {
        /// (key, size in bytes, data addresses holding it).
        items: Vec<(Key, u64, Vec<String>)>,
    },
    /// Client: which workers are connected?
    WhoIsThere,
    /// Worker: a task finished and its value is held here.
    TaskFinished {
        /// The task.
        key: Key,
        /// The ticket of its `Compute`.
        ticket: WireTicket,
        /// Size of the value.
        nbytes: u64,
        /// Run time in microseconds (for scheduling estimates).
        duration_us: u64,
    },
    /// Worker: a task failed (after its retries).
    TaskFailed {
        /// The task.
        key: Key,
        /// The ticket of its `Compute`.
        ticket: WireTicket,
        /// Why.
        error: WireError,
    },
    /// Worker: a task could not start because inputs could not be fetched.
    MissingInputs {
        /// The task that could not start.
        key: Key,
        /// The ticket of its `Compute`.
        ticket: WireTicket,
        /// (input, data address of the worker that was asked for it and did not deliver).
        missing: Vec<(Key, String)>,
    },
    /// Worker: told to free a task it had not started, it dropped it.
    TaskDropped {
        /// The task.
        key: Key,
        /// The ticket of its `Compute`.
        ticket: WireTicket,
    },
    /// Anyone: still alive, for a peer with nothing else to say (workers' memory reports
    /// serve as theirs; the scheduler drops a worker not heard from within its TTL).
    Heartbeat,
    /// Worker: how its memory is used; sent several times a second, it is also the worker's
    /// heartbeat.
    Memory {
        /// The numbers.
        report: MemoryReport,
    },
    /// Worker: it paused (process memory over 80% of its limit: it starts no task) or resumed.
    Paused {
        /// Paused (true) or resumed (false).
        paused: bool,
    },
    /// Worker: asks to leave gracefully (SIGTERM): no new work, and its unique results are
    /// copied elsewhere before the scheduler answers `Shutdown`.
    Retire,
    /// Worker: it fetched a copy of a value it was asked to take over (`Acquire`).
    Acquired {
        /// The value.
        key: Key,
        /// Its size.
        nbytes: u64,
    },
    /// Worker: it could not copy a value it was asked to take over (`Acquire`).
    AcquireFailed {
        /// The value.
        key: Key,
    },
    /// Worker: leaving on purpose, and why (recorded as the cause of its departure).
    Goodbye {
        /// Why.
        reason: String,
    },
}

/// Sent by the scheduler to clients and workers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum FromScheduler {
    /// To a client: a submitted graph has been taken in (every task is known and scheduled).
    GraphAccepted {
        /// Number of tasks in the submission.
        tasks: u64,
    },
    /// To a client: the connected workers (answer to `WhoIsThere`).
    Workers {
        /// (name, data address, threads).
        workers: Vec<(String, String, u32)>,
        /// Workers that left, oldest first: (name, data address, why).
        departed: Vec<(String, String, String)>,
        /// Memory of the connected workers, by name.
        memory: Vec<(String, MemoryReport)>,
    },
    /// To a client, a few times a second while it changes: `done` of the `total` tasks its
    /// submissions registered have finished (both restart from zero once all have).
    Progress {
        /// Finished (in memory or failed).
        done: u64,
        /// Registered.
        total: u64,
    },
    /// To a client: a wanted key is in memory on these workers (data addresses).
    KeyInMemory {
        /// The key.
        key: Key,
        /// Where it can be fetched.
        workers: Vec<String>,
        /// Its size.
        nbytes: u64,
    },
    /// To a client: a wanted key failed.
    KeyErred {
        /// The key.
        key: Key,
        /// The root failure.
        error: WireError,
    },
    /// To a client: a wanted key's value was lost with a worker; it is being recomputed (a
    /// `KeyInMemory` or `KeyErred` follows).
    KeyLost {
        /// The key.
        key: Key,
    },
    /// To a client: a wanted key was cancelled.
    KeyCancelled {
        /// The key.
        key: Key,
    },
    /// To a worker: run this task; inputs not held locally are at the given peers.
    Compute {
        /// The task.
        key: Key,
        /// What to run, as the client encoded it (shared, not copied, between the scheduler's
        /// copy and the message).
        body: TaskBody,
        /// (input key, data addresses holding it), in dependency order.
        inputs: Vec<(Key, Vec<Arc<str>>)>,
        /// Re-runs after a failed attempt.
        retries: u32,
        /// Per-attempt time limit in microseconds.
        timeout_us: Option<u64>,
        /// Lower runs first on the worker.
        priority: (i64, u64, u32),
        /// To echo in `TaskFinished`.
        ticket: WireTicket,
    },
    /// To a worker: give these tasks back if they have not started (work stealing); answered
    /// with `TaskDropped` for each task given back.
    Steal {
        /// The tasks.
        keys: Vec<Key>,
    },
    /// To a worker: fetch copies of these values from the given workers (data addresses) and
    /// keep them (a retiring worker's results); answered with `Acquired` for each.
    Acquire {
        /// (value, holder's data address).
        keys: Vec<(Key, Arc<str>)>,
    },
    /// To a worker: drop these values.
    Free {
        /// The keys.
        keys: Vec<Key>,
    },
    /// To a worker or client: the scheduler is going away.
    Shutdown {
        /// Why.
        reason: String,
    },
}

/// Between a client or worker and a worker's data port.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum PeerMsg {
    /// Ask for values.
    GetData {
        /// The keys.
        keys: Vec<Key>,
    },
    /// The values asked for (`None`: not held here), possibly over several frames: values
    /// too large for one frame together come in several, all but the last with `more`.
    Data {
        /// (key, value) in the order asked.
        values: Vec<(Key, Option<WireValue>)>,
        /// Values held but too large to send in any frame, with why.
        unsendable: Vec<(Key, String)>,
        /// Another `Data` frame follows for the same request.
        more: bool,
    },
    /// Store these values (scatter).
    PutData {
        /// (key, value).
        values: Vec<(Key, WireValue)>,
    },
    /// The values of a `PutData` are stored.
    Stored {
        /// The keys stored.
        keys: Vec<Key>,
    },
}
