//! What the scheduler publishes for observers — the dashboard, the journal — and nothing else
//! they may read: task state changes with their cause (a finished run's time comes with its
//! change to memory), workers joining, leaving and reporting their memory.
//!
//! The scheduler's core records its state changes only when a feed is attached (one branch per
//! change otherwise). The shell gathers the changes of everything it handles in one turn of its
//! loop into one [`FeedEvent::Tasks`], so the cost is a vector push per change and one channel
//! send per turn, whatever the number of tasks. The events are plain serde types: the journal is
//! these events as JSON lines, and replaying it rebuilds exactly what the live feed showed.

use rask_graph::Key;
use serde::{Deserialize, Serialize};

/// A task's state as observers see it (the scheduler's states without their data). It mirrors
/// `rask_scheduler_core::Phase`, which stays free of serde (the core knows no formats); this
/// one is the published, serialised form.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Only its spec is kept (not needed now, or lost and not needed again yet).
    Released,
    /// Some inputs are not finished.
    Waiting,
    /// Runnable, queued in the scheduler.
    Queued,
    /// Runnable, but no connected worker can run it.
    NoWorker,
    /// Sent to a worker.
    Processing,
    /// Its result is held by workers.
    Memory,
    /// Failed (itself or an input).
    Erred,
    /// Gone: nobody wants it any more.
    Forgotten,
}

impl From<rask_scheduler_core::Phase> for Phase {
    fn from(p: rask_scheduler_core::Phase) -> Self {
        use rask_scheduler_core::Phase as P;
        match p {
            P::Released => Phase::Released,
            P::Waiting => Phase::Waiting,
            P::Queued => Phase::Queued,
            P::NoWorker => Phase::NoWorker,
            P::Processing => Phase::Processing,
            P::Memory => Phase::Memory,
            P::Erred => Phase::Erred,
            P::Forgotten => Phase::Forgotten,
        }
    }
}

/// The phases a task passed through before a change's phase within one scheduler event (same
/// time, same cause), oldest first: a leaf of a new graph goes released → waiting → queued →
/// processing in one step, published as one change. Inline (no allocation per change);
/// serialised as a list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Via {
    len: u8,
    phases: [Phase; Via::CAPACITY],
}

impl Via {
    /// Phases one change can pass through (the scheduler splits longer paths).
    pub const CAPACITY: usize = 4;

    /// No intermediate phase.
    pub const EMPTY: Via = Via { len: 0, phases: [Phase::Released; Via::CAPACITY] };

    /// The phases, oldest first.
    #[must_use]
    pub fn as_slice(&self) -> &[Phase] {
        &self.phases[..self.len as usize]
    }

    /// Whether there are none (most changes).
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Up to [`Via::CAPACITY`] phases; `None` if there are more.
    #[must_use]
    pub fn from_phases(phases: impl IntoIterator<Item = Phase>) -> Option<Via> {
        let mut v = Via::EMPTY;
        for p in phases {
            *v.phases.get_mut(v.len as usize)? = p;
            v.len += 1;
        }
        Some(v)
    }
}

impl Default for Via {
    fn default() -> Self {
        Via::EMPTY
    }
}

impl Serialize for Via {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.as_slice().serialize(s)
    }
}

impl<'de> Deserialize<'de> for Via {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let phases = Vec::<Phase>::deserialize(d)?;
        let n = phases.len();
        Via::from_phases(phases)
            .ok_or_else(|| serde::de::Error::custom(format!("{n} phases passed through; at most {}", Via::CAPACITY)))
    }
}

// The scheduler's records fit in the published ones.
const _: () = assert!(Via::CAPACITY == rask_scheduler_core::Via::CAPACITY);

impl From<rask_scheduler_core::Via> for Via {
    fn from(v: rask_scheduler_core::Via) -> Self {
        // Both hold at most the same number of phases.
        Via::from_phases(v.as_slice().iter().map(|p| Phase::from(*p))).unwrap_or_default()
    }
}

/// Keys as text for a batch of changes: which change each belongs to, and where it ends in one
/// string (see [`FeedEvent::Tasks`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyText {
    text: String,
    /// (index of the change, end of its key in `text`).
    ends: Vec<(u32, u32)>,
}

impl KeyText {
    /// Whether it holds no key.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// Adds the key of the change at `index`.
    pub fn push(&mut self, index: usize, key: &str) {
        self.text.push_str(key);
        self.ends.push((index as u32, self.text.len() as u32));
    }
}

impl FeedEvent {
    /// Changes with their own keys: moves a batch's key text into the `key` fields of the
    /// changes it belongs to, allocating them on the calling thread. Other events are left
    /// as they are.
    pub fn resolve_keys(&mut self) {
        let FeedEvent::Tasks { changes, new_keys, .. } = self else { return };
        let mut start = 0usize;
        for (index, end) in new_keys.ends.drain(..) {
            let end = end as usize;
            if let (Some(c), Some(k)) = (changes.get_mut(index as usize), new_keys.text.get(start..end)) {
                c.key = Some(Key::new(k));
            }
            start = end;
        }
        new_keys.text = String::new();
    }

    /// A batch of changes whose keys are already in place.
    #[must_use]
    pub fn tasks(at_us: u64, changes: Vec<TaskChange>) -> FeedEvent {
        FeedEvent::Tasks { at_us, changes, new_keys: KeyText::default() }
    }
}

/// What made a task change state: the event the scheduler was handling (Dask's stimulus).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "by", rename_all = "snake_case")]
pub enum Cause {
    /// A client submitted a graph (or part of one).
    Submitted {
        /// The client.
        client: u32,
    },
    /// A worker reported a task finished.
    Finished {
        /// The worker's id (see [`FeedEvent::WorkerJoined`]).
        worker: u32,
    },
    /// A worker reported a task failed.
    Failed {
        /// The worker.
        worker: u32,
    },
    /// A worker could not fetch a task's inputs, or dropped a task.
    InputsMissing {
        /// The worker.
        worker: u32,
    },
    /// A worker joined (queued work may now run).
    WorkerJoined {
        /// The worker.
        worker: u32,
    },
    /// A worker was lost or left; its tasks moved and its results may be recomputed.
    WorkerLeft {
        /// The worker.
        worker: u32,
    },
    /// A worker's data moved (retirement copies) or its state changed (pause, retire).
    Worker {
        /// The worker.
        worker: u32,
    },
    /// A client released, cancelled or scattered keys, or left.
    Client {
        /// The client.
        client: u32,
    },
    /// Keys handed over to run without a client waiting for them.
    FireAndForget,
    /// The scheduler's periodic check (timeouts, stalled workers, stealing).
    Tick,
}

/// One task state change. A task is named by a serial number unique for the scheduler's
/// lifetime; its key comes with its first change only (observers remember it), which keeps
/// publishing cheap.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskChange {
    /// The task's serial number.
    pub task: u64,
    /// Its key, on its first change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<Key>,
    /// The phases it passed through on the way to `phase` in the same event, oldest first.
    #[serde(default, skip_serializing_if = "Via::is_empty")]
    pub via: Via,
    /// Its new state.
    pub phase: Phase,
    /// The worker it went to (processing) or that first holds its result (memory).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<u32>,
    /// Set when this change ends a run: the run time (µs, as the worker measured) for a
    /// finished run, which with the change's time places it in the task stream; 0 for a failed
    /// run (erred, with `worker` the worker it failed on).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_us: Option<u64>,
    /// Why.
    pub cause: Cause,
}

/// One published fact. Times are microseconds since the scheduler started.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum FeedEvent {
    /// The scheduler started (the first event of a journal).
    Started {
        /// Wall-clock time of the start, milliseconds since the Unix epoch.
        unix_ms: u64,
        /// Its address.
        address: String,
    },
    /// Task state changes, in the order they happened.
    Tasks {
        /// When they were published.
        at_us: u64,
        /// The changes.
        changes: Vec<TaskChange>,
        /// The keys of tasks first seen in this batch, as text the observer turns into the
        /// changes' `key` fields ([`FeedEvent::resolve_keys`]) — so the scheduler never shares
        /// its keys' reference counts with another thread. Empty once resolved (and in
        /// journals).
        #[serde(default, skip_serializing_if = "KeyText::is_empty")]
        new_keys: KeyText,
    },
    /// A submission's dependencies, for the graph view (only graphs up to
    /// [`GRAPH_FEED_LIMIT`] tasks are published).
    Graph {
        /// Each task with its inputs.
        tasks: Vec<(Key, Vec<Key>)>,
    },
    /// A worker joined.
    WorkerJoined {
        /// When.
        at_us: u64,
        /// Its id in the other events.
        worker: u32,
        /// Its name.
        name: String,
        /// Its data address.
        address: String,
        /// Its threads.
        nthreads: u32,
        /// Its memory limit in bytes, if any.
        memory_limit: Option<u64>,
    },
    /// A worker left, was lost or retired.
    WorkerLeft {
        /// When.
        at_us: u64,
        /// Which.
        worker: u32,
        /// Why, as the scheduler recorded it.
        cause: String,
    },
    /// A worker's memory and CPU report (its heartbeat).
    WorkerMemory {
        /// When it arrived.
        at_us: u64,
        /// Which.
        worker: u32,
        /// Bytes of results in memory.
        managed: u64,
        /// Bytes of results on disk.
        spilled: u64,
        /// The process's resident memory.
        rss: u64,
        /// The process's CPU time so far (µs).
        cpu_us: u64,
        /// Bytes written to spill files so far.
        spill_written: u64,
        /// Bytes read back from spill files so far.
        spill_read: u64,
        /// Bytes fetched from other workers so far.
        fetched: u64,
    },
}

/// Largest submission whose dependencies are published for the graph view: drawing more is of
/// no use, and publishing a million edges would cost the scheduler.
pub const GRAPH_FEED_LIMIT: usize = 5_000;

/// Where the scheduler publishes (see [`crate::SchedulerConfig::feed`]).
pub type FeedSender = tokio::sync::mpsc::UnboundedSender<FeedEvent>;
