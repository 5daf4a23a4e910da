//! The scheduler state machine. See the crate documentation for the policies.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};

use rask_graph::{FxHashMap, FxHashSet};
use std::fmt;
use std::sync::Arc;

use rask_graph::{FailureKind, Key, TaskError};

/// A connected worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WorkerId(pub u32);

/// A connected client.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClientId(pub u32);

/// The pseudo-client holding fire-and-forget keys until they finish.
const FIRE_AND_FORGET: ClientId = ClientId(u32::MAX);

/// Slab index of a task inside the core (never leaves it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Tid(u32);

/// The workers holding a value: almost always one, so kept inline (no allocation per task).
pub type Holders = smallvec::SmallVec<[WorkerId; 2]>;

/// Scheduling priority: smaller runs first. (negated user priority, submission number, order).
pub type Prio = (i64, u64, u32);

/// Tunables.
#[derive(Clone, Debug)]
pub struct Config {
    /// Tasks in flight per worker thread, at least (Dask's `worker-saturation`).
    pub saturation: f64,
    /// Work to keep in flight per worker thread, in microseconds of estimated run time; lets
    /// workers whose tasks are tiny receive more of them per round-trip.
    pub target_busy_us: f64,
    /// Upper bound on tasks in flight per worker thread.
    pub max_in_flight_per_thread: usize,
    /// Assumed transfer bandwidth between workers, bytes per microsecond (for placement).
    pub bandwidth_bytes_per_us: f64,
    /// Assumed fixed cost of fetching one input from another worker, in microseconds (a
    /// round-trip between processes). Placement charges it per missing input, so a tiny task
    /// stays with its data unless another worker is idle by more than that; it also bounds
    /// how far consecutive root tasks are kept together on one worker (see `schedule`).
    pub transfer_latency_us: f64,
    /// Assumed run time of a task on a worker that has not finished any yet, in microseconds
    /// (Dask assumes 0.5 s too): until a worker's speed is known, a task already queued there
    /// counts as long, so an idle worker is preferred to it.
    pub unknown_duration_us: f64,
    /// A worker not heard from for this long (µs) is removed as lost; `None` never times out.
    /// Workers send a heartbeat several times a second, whatever their tasks are doing.
    pub worker_ttl_us: Option<u64>,
    /// A task may be running on this many workers that die before it fails as
    /// [`FailureKind::KilledWorker`] (one more death fails it; Dask's `allowed-failures`).
    pub allowed_failures: u32,
    /// How often a task may be sent back because its inputs could not be fetched from holders
    /// the scheduler no longer believed in (a holder it did believe in is corrected instead,
    /// and one that has left explains the failure: neither counts).
    pub max_input_failures: u32,
    /// Work stealing: only tasks on workers whose tasks take at least this long on average
    /// are worth a round-trip to move.
    pub steal_min_duration_us: f64,
    /// Work stealing: at most this many bytes of inputs may have to move with a stolen task.
    pub steal_max_input_bytes: u64,
    /// Record every task state change for [`Core::take_transitions`] or
    /// [`Core::copy_transitions`] (dashboards, journals). Off, it costs one predictable branch
    /// per change. On, the caller must take or copy and clear the changes after every event, or
    /// they accumulate.
    pub record_transitions: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            saturation: 1.1,
            target_busy_us: 2000.0,
            max_in_flight_per_thread: 4096,
            bandwidth_bytes_per_us: 1000.0,
            transfer_latency_us: 100.0,
            unknown_duration_us: 500_000.0,
            worker_ttl_us: Some(30_000_000),
            allowed_failures: 3,
            max_input_failures: 3,
            steal_min_duration_us: 1000.0,
            steal_max_input_bytes: 16 << 20,
            record_transitions: false,
        }
    }
}

/// A task's state as published to observers (dashboards, journals): the scheduler's states
/// without the data they carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Phase {
    /// Only its spec is kept (not needed now, or lost and not yet needed again).
    Released,
    /// Some inputs are not finished.
    Waiting,
    /// Runnable, queued in the scheduler.
    Queued,
    /// Runnable, but no connected worker could run it.
    NoWorker,
    /// Sent to a worker.
    Processing,
    /// Its result is held by workers.
    Memory,
    /// Failed (itself or an input).
    Erred,
    /// Gone from the scheduler: nobody wants it any more.
    Forgotten,
}

/// Records whose memory [`Core::clear_transitions`] keeps.
const MAX_KEPT_RECORDS: usize = 1 << 20;

// Every phase fits the three bits a record keeps for it.
const _: () = assert!(Phase::Forgotten as u8 == 7);

impl Phase {
    /// Three bits standing for it (see [`Transition`]).
    fn code(self) -> u8 {
        self as u8
    }

    /// The phase `code` stands for (its low three bits).
    fn from_code(code: u8) -> Phase {
        match code & 0b111 {
            0 => Phase::Released,
            1 => Phase::Waiting,
            2 => Phase::Queued,
            3 => Phase::NoWorker,
            4 => Phase::Processing,
            5 => Phase::Memory,
            6 => Phase::Erred,
            _ => Phase::Forgotten,
        }
    }
}

/// One task state change, recorded when [`Config::record_transitions`] is on. What caused it is
/// the event being handled, which the caller knows.
///
/// Tasks are named by a serial number unique for the core's lifetime; the key comes with a
/// task's first change only, as text (see [`Core::take_transitions`]): observers hash an
/// integer per change instead of a string, and never share a key's reference count (an atomic
/// on a line two threads would fight over).
///
/// Changes of one task within one event (same time, same cause) are recorded as one
/// transition: its phase is the last, and `via` lists the ones it passed through (a leaf of a
/// submitted graph goes released → waiting → queued → processing at once). Every phase is kept
/// (only the worker of an intermediate one is not), and observers handle half as many records.
///
/// A record is 32 bytes, two to a cache line: the core writes several per task on the
/// scheduler's hot path, and their memory traffic, not the work of filling them, is what
/// recording costs. Hence the packed fields behind accessors.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Transition {
    task: u64,
    /// Valid with [`Transition::HAS_DURATION`].
    duration_us: u64,
    /// (start, end) in the key text; valid with [`Transition::HAS_KEY`].
    key: (u32, u32),
    /// Valid with [`Transition::HAS_WORKER`].
    worker: u32,
    via: Via,
    /// The phase (its [`Phase::code`]) in the low bits, and which optional fields are set.
    flags: u8,
}

impl Transition {
    const PHASE_BITS: u8 = 0b111;
    const HAS_KEY: u8 = 1 << 4;
    const HAS_WORKER: u8 = 1 << 5;
    const HAS_DURATION: u8 = 1 << 6;

    /// A change of task `task` to `phase`, through no other phase; `key`: its span in the key
    /// text, on the task's first change; `worker`: as [`Transition::worker`] says.
    #[must_use]
    pub fn new(task: u64, key: Option<(u32, u32)>, phase: Phase, worker: Option<WorkerId>) -> Self {
        let mut flags = phase.code();
        if key.is_some() {
            flags |= Self::HAS_KEY;
        }
        if worker.is_some() {
            flags |= Self::HAS_WORKER;
        }
        Transition {
            task,
            duration_us: 0,
            key: key.unwrap_or_default(),
            worker: worker.map_or(0, |w| w.0),
            via: Via::EMPTY,
            flags,
        }
    }

    /// This change, ending a run on a worker that measured `duration_us` (see
    /// [`Transition::duration_us`]).
    #[must_use]
    pub fn with_duration_us(mut self, duration_us: u64) -> Self {
        self.duration_us = duration_us;
        self.flags |= Self::HAS_DURATION;
        self
    }

    /// The task's serial number.
    #[must_use]
    pub fn task(&self) -> u64 {
        self.task
    }

    /// Where its key is in the text [`Core::take_transitions`] (or
    /// [`Core::copy_transitions`]) gives with it (start, end), on its first change.
    #[must_use]
    pub fn key(&self) -> Option<(u32, u32)> {
        (self.flags & Self::HAS_KEY != 0).then_some(self.key)
    }

    /// The phases it passed through before [`Transition::phase`] in this event, oldest first.
    #[must_use]
    pub fn via(&self) -> Via {
        self.via
    }

    /// Its new state.
    #[must_use]
    pub fn phase(&self) -> Phase {
        Phase::from_code(self.flags & Self::PHASE_BITS)
    }

    /// The worker it was sent to (processing), that first held its result (memory), or whose
    /// run of it failed (erred).
    #[must_use]
    pub fn worker(&self) -> Option<WorkerId> {
        (self.flags & Self::HAS_WORKER != 0).then_some(WorkerId(self.worker))
    }

    /// Set when this change ends a run on a worker: the run time the worker measured (memory),
    /// or 0 for a failed run (erred). Tasks that fail because an input did never ran: unset.
    #[must_use]
    pub fn duration_us(&self) -> Option<u64> {
        (self.flags & Self::HAS_DURATION != 0).then_some(self.duration_us)
    }

    /// Moves on to `phase` (on `worker`), the current phase joining `via`; false, and
    /// unchanged, when this record ended a run (its time and worker belong to that phase) or
    /// its `via` is full. How the core makes one record of a task's changes in one event;
    /// public for tools and tests that build records as the core does.
    #[must_use]
    pub fn extend(&mut self, phase: Phase, worker: Option<WorkerId>) -> bool {
        if self.flags & Self::HAS_DURATION != 0 || !self.via.push(self.phase()) {
            return false;
        }
        self.flags = (self.flags & Self::HAS_KEY) | phase.code();
        self.set_worker(worker);
        true
    }

    /// Sets (or clears) the worker.
    pub(crate) fn set_worker(&mut self, worker: Option<WorkerId>) {
        match worker {
            Some(w) => {
                self.worker = w.0;
                self.flags |= Self::HAS_WORKER;
            }
            // Cleared, so records equal through their accessors compare equal.
            None => {
                self.worker = 0;
                self.flags &= !Self::HAS_WORKER;
            }
        }
    }
}

// Two records to a cache line.
const _: () = assert!(std::mem::size_of::<Transition>() == 32);

// An empty slot costs no more than a task: `repr(C)` keeps the niche `Option` uses.
const _: () = assert!(std::mem::size_of::<Option<Task<Box<u8>>>>() == std::mem::size_of::<Task<Box<u8>>>());

impl std::fmt::Debug for Transition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transition")
            .field("task", &self.task())
            .field("key", &self.key())
            .field("via", &self.via())
            .field("phase", &self.phase())
            .field("worker", &self.worker())
            .field("duration_us", &self.duration_us())
            .finish()
    }
}

/// Phases a task passed through within one event, oldest first (see [`Transition`]); up to
/// [`Via::CAPACITY`] (a longer path continues in a second transition), packed in two bytes.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct Via(u16);

impl Via {
    /// Phases one transition can pass through.
    pub const CAPACITY: usize = 4;

    /// No intermediate phase.
    pub const EMPTY: Via = Via(0);

    /// Bits per phase (and for the length, in the low bits).
    const BITS: u32 = 3;

    /// How many phases.
    #[must_use]
    pub fn len(&self) -> usize {
        usize::from(self.0 & 0b111)
    }

    /// Whether it passed through none.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The phases, oldest first.
    pub fn iter(&self) -> impl Iterator<Item = Phase> + use<> {
        let v = *self;
        (0..v.len()).map(move |i| Phase::from_code(((v.0 >> (Self::BITS * (i as u32 + 1))) & 0b111) as u8))
    }

    /// Its packed form: the count in the low three bits, then three bits per phase, oldest
    /// first, each phase as its position in [`Phase`]'s declaration. Observers that keep it
    /// copy these bits instead of rebuilding it phase by phase.
    #[must_use]
    pub fn to_bits(self) -> u16 {
        self.0
    }

    /// Appends `p`; false when full.
    fn push(&mut self, p: Phase) -> bool {
        let n = self.len();
        if n == Self::CAPACITY {
            return false;
        }
        self.0 = (self.0 & !0b111) | (n as u16 + 1) | (u16::from(p.code()) << (Self::BITS * (n as u32 + 1)));
        true
    }
}

impl std::fmt::Debug for Via {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

/// What a worker offers.
#[derive(Clone, Debug, PartialEq)]
pub struct WorkerSpec {
    /// Name (restrictions may use it).
    pub name: Arc<str>,
    /// Data address (restrictions may use it too).
    pub address: Arc<str>,
    /// Threads running tasks.
    pub nthreads: u32,
    /// Advertised resources.
    pub resources: Vec<(Arc<str>, f64)>,
    /// How the previous process of this worker ended, when its supervisor restarted it: it
    /// refines the cause recorded for that earlier departure.
    pub restarted_after: Option<String>,
}

/// Where a task may run.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Restrictions {
    /// Resources held while running.
    pub resources: Vec<(Arc<str>, f64)>,
    /// Worker names or addresses (empty: any).
    pub workers: Vec<Arc<str>>,
    /// With `workers`: fall back to any worker when none of them is connected.
    pub allow_other_workers: bool,
}

/// An input of a submitted task.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Dep {
    /// A task known by its key: submitted earlier, or anywhere in this submission.
    Key(Key),
    /// The task at this position of the same submission (or part): no key to send, decode
    /// and look up for the common case of a graph's inner edges.
    Position(u32),
}

impl From<Key> for Dep {
    fn from(k: Key) -> Self {
        Dep::Key(k)
    }
}

/// Names one assignment of a task ([`Command::Compute`]); the worker echoes it in its report
/// ([`Event::TaskFinished`]) so the core finds the task by index instead of hashing its key.
/// A ticket from an earlier assignment of a since-forgotten task is recognised as stale (the
/// slot's serial differs) rather than mistaken for the task now in that slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Ticket {
    /// The task's slot in the core's table.
    pub slot: u32,
    /// The serial the task had when assigned.
    pub serial: u64,
}

/// A task in a submitted graph.
#[derive(Clone, Debug)]
pub struct NewTask<P> {
    /// Unique key.
    pub key: Key,
    /// What it needs (in argument order), each once; keys may name tasks submitted earlier.
    pub deps: Vec<Dep>,
    /// What the worker runs (opaque here).
    pub payload: P,
    /// User priority (higher first).
    pub priority: i64,
    /// Position in the graph's order (lower first).
    pub order: u32,
    /// Placement constraints, if any.
    pub restrictions: Option<Box<Restrictions>>,
    /// The submitting client holds a future for it (saves sending and looking up its key
    /// a second time in the wanted list).
    pub wanted: bool,
}

/// What a worker's report is about (see `Core::take_report_of`).
enum Report {
    /// A task processing there.
    Assigned(Tid),
    /// An assignment cancelled while it ran (the task was forgotten; the worker was told to
    /// free its result).
    Orphan,
    /// Nothing this worker was asked for (a duplicate, or a task moved meanwhile).
    Unasked,
}

/// Why a worker was lost: carried by its removal, recorded in [`Core::departures`], and
/// quoted in the error of a task that kept killing workers.
#[derive(Clone, Debug, PartialEq)]
pub enum LossCause {
    /// Its connection closed without a goodbye: the process exited, crashed or was killed.
    ConnectionClosed,
    /// Nothing was heard from it for longer than [`Config::worker_ttl_us`].
    HeartbeatTimeout {
        /// How long it had been silent, in milliseconds.
        silent_ms: u64,
    },
    /// It said why before leaving (stopped by a signal, memory limit, ...).
    Said(String),
}

impl fmt::Display for LossCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LossCause::ConnectionClosed => {
                f.write_str("connection closed without a goodbye (exited, crashed or killed)")
            }
            LossCause::HeartbeatTimeout { silent_ms } => {
                write!(f, "heartbeat timeout: nothing heard for {:.1} s", *silent_ms as f64 / 1000.0)
            }
            LossCause::Said(why) => f.write_str(why),
        }
    }
}

/// A worker that left, for diagnostics.
#[derive(Clone, Debug, PartialEq)]
pub struct Departure {
    /// Its name.
    pub name: Arc<str>,
    /// Its data address.
    pub address: Arc<str>,
    /// Why it left.
    pub cause: LossCause,
}

/// Facts the scheduler learns.
#[derive(Clone, Debug)]
pub enum Event<P> {
    /// A client connected.
    ClientConnected {
        /// Its id.
        client: ClientId,
    },
    /// A client disconnected (its futures are released).
    ClientDisconnected {
        /// Its id.
        client: ClientId,
    },
    /// A client sent the first parts of a large graph: their tasks are registered and linked
    /// (they may depend only on keys already known), and kept until the client's
    /// `GraphSubmitted` completes the graph — or forgotten if the client leaves before that,
    /// so an interrupted submission leaves nothing behind.
    GraphPart {
        /// Who.
        client: ClientId,
        /// New tasks (keys already known are reused).
        tasks: Vec<NewTask<P>>,
    },
    /// A client submitted tasks (the last part, if it sent parts) and wants futures for
    /// `wanted`.
    GraphSubmitted {
        /// Who.
        client: ClientId,
        /// New tasks (keys already known are reused).
        tasks: Vec<NewTask<P>>,
        /// Keys the client holds futures for.
        wanted: Vec<Key>,
    },
    /// A client dropped its futures for these keys.
    KeysReleased {
        /// Who.
        client: ClientId,
        /// Which.
        keys: Vec<Key>,
    },
    /// A client cancelled these keys.
    KeysCancelled {
        /// Who.
        client: ClientId,
        /// Which.
        keys: Vec<Key>,
    },
    /// Compute these keys even if every client releases them (`fire_and_forget`); they are
    /// released once finished.
    KeysFireAndForget {
        /// Which.
        keys: Vec<Key>,
    },
    /// A client put values directly on workers (`scatter`); it holds futures for them.
    DataScattered {
        /// Who.
        client: ClientId,
        /// (key, size, holders).
        items: Vec<(Key, u64, Vec<WorkerId>)>,
    },
    /// A worker joined.
    WorkerConnected {
        /// Its id.
        worker: WorkerId,
        /// What it offers.
        spec: WorkerSpec,
    },
    /// A worker left or was lost.
    WorkerDisconnected {
        /// Its id.
        worker: WorkerId,
        /// Why.
        cause: LossCause,
    },
    /// A message from a worker arrived at `at_us` (the shell's clock; one event per batch).
    WorkerHeard {
        /// Which.
        worker: WorkerId,
        /// When, in microseconds since the shell started.
        at_us: u64,
    },
    /// A worker asks to leave gracefully (it was sent SIGTERM): it gets no new tasks, finishes
    /// the ones it has, and its results that exist nowhere else are copied to other workers
    /// before it is told to go ([`Command::Retired`]), so nothing is recomputed.
    WorkerRetiring {
        /// Which.
        worker: WorkerId,
    },
    /// A worker paused (its process memory is above 80% of its limit: it starts no task) or
    /// resumed. A paused worker is sent no new work.
    WorkerPaused {
        /// Which.
        worker: WorkerId,
        /// Paused (true) or resumed (false).
        paused: bool,
    },
    /// A worker fetched a copy of a value it was asked to take over ([`Command::Acquire`]).
    DataAcquired {
        /// Which worker now holds a copy.
        worker: WorkerId,
        /// Which value.
        key: Key,
        /// Its size.
        nbytes: u64,
    },
    /// A worker could not copy a value off a retiring worker (too large to send, unreadable,
    /// or no answer): the retirement stops waiting for that value (it is recomputed if needed
    /// once the retiring worker is gone).
    AcquireFailed {
        /// Which value.
        key: Key,
    },
    /// Time passes (the shell ticks a few times a second): workers silent for longer than the
    /// TTL are removed.
    Tick {
        /// Now, in microseconds since the shell started.
        now_us: u64,
    },
    /// A worker finished a task and holds its value.
    TaskFinished {
        /// Where.
        worker: WorkerId,
        /// Which.
        key: Key,
        /// The ticket of the assignment, when the worker echoed it (the key is then only
        /// needed if the ticket turns out stale).
        ticket: Option<Ticket>,
        /// Size of the value.
        nbytes: u64,
        /// Run time.
        duration_us: u64,
    },
    /// A worker's task failed (after its retries).
    TaskFailed {
        /// Where.
        worker: WorkerId,
        /// Which.
        key: Key,
        /// The ticket of the assignment, when the worker echoed it.
        ticket: Option<Ticket>,
        /// Why (root key set by the worker).
        error: Arc<TaskError>,
    },
    /// A worker could not fetch some inputs of a task.
    InputsMissing {
        /// Where.
        worker: WorkerId,
        /// The task.
        key: Key,
        /// The ticket of the assignment, when the worker echoed it.
        ticket: Option<Ticket>,
        /// (input, the worker that was asked for it and did not deliver it).
        missing: Vec<(Key, WorkerId)>,
    },
    /// A worker dropped a task it had not started, after being told to free it.
    TaskDropped {
        /// Where.
        worker: WorkerId,
        /// Which.
        key: Key,
        /// The ticket of the assignment, when the worker echoed it.
        ticket: Option<Ticket>,
    },
}

/// What the shell must do.
#[derive(Clone, Debug, PartialEq)]
pub enum Command<P> {
    /// Copy a value from a retiring worker to this one (it reports `DataAcquired`).
    Acquire {
        /// Who fetches.
        worker: WorkerId,
        /// Which value.
        key: Key,
        /// Who has it.
        from: WorkerId,
    },
    /// A retiring worker has nothing left that exists only there: tell it to go. The core has
    /// already removed it (nothing was lost).
    Retired {
        /// Which.
        worker: WorkerId,
    },
    /// The core removed a worker it considers lost: close its connection (if the worker was
    /// only frozen, it finds out when it wakes and joins again as a new worker).
    DropWorker {
        /// Which.
        worker: WorkerId,
        /// Why.
        cause: LossCause,
    },
    /// Run a task on a worker; inputs it lacks are held by the listed workers.
    Compute {
        /// Where.
        worker: WorkerId,
        /// Which.
        key: Key,
        /// What.
        payload: P,
        /// (input, holders) in dependency order.
        inputs: Vec<(Key, Holders)>,
        /// Order on the worker.
        prio: Prio,
        /// For the worker to echo in its report.
        ticket: Ticket,
    },
    /// Ask a worker to give back a task it has not started (work stealing); it answers
    /// with `TaskDropped` if it could, and runs the task as usual otherwise.
    Steal {
        /// The busy worker.
        worker: WorkerId,
        /// The task.
        key: Key,
    },
    /// Drop a value from a worker (the shell batches these per worker).
    Free {
        /// Where.
        worker: WorkerId,
        /// Which.
        key: Key,
    },
    /// Tell a client how far the tasks its submissions registered have come (sent on ticks,
    /// when it changed): `done` of `total` finished. Both go back to zero once all are done.
    Progress {
        /// Who.
        client: ClientId,
        /// Finished (in memory or failed).
        done: u64,
        /// Registered by its submissions (and not dropped unrun).
        total: u64,
    },
    /// Tell a client its key is in memory.
    KeyInMemory {
        /// Who.
        client: ClientId,
        /// Which.
        key: Key,
        /// Holders.
        workers: Vec<WorkerId>,
        /// Size.
        nbytes: u64,
    },
    /// Tell a client its key failed.
    KeyErred {
        /// Who.
        client: ClientId,
        /// Which.
        key: Key,
        /// The root failure.
        error: Arc<TaskError>,
    },
    /// Tell a client its key's value was lost with a worker and is being recomputed.
    KeyLost {
        /// Who.
        client: ClientId,
        /// Which.
        key: Key,
    },
    /// Tell a client its key was cancelled.
    KeyCancelled {
        /// Who.
        client: ClientId,
        /// Which.
        key: Key,
    },
}

#[derive(Clone, Debug, PartialEq)]
enum State {
    /// Only the spec is kept (not needed now, or lost).
    Released,
    /// Some inputs are not finished.
    Waiting,
    /// Runnable, queued in the scheduler.
    Ready,
    /// Runnable, but no connected worker could run it.
    NoWorker,
    /// Assigned to a worker.
    Processing { on: WorkerId },
    /// Value held by these workers.
    Memory { who_has: Holders },
    /// Failed (itself or an input).
    Erred(Arc<TaskError>),
}

impl State {
    fn phase(&self) -> Phase {
        match self {
            State::Released => Phase::Released,
            State::Waiting => Phase::Waiting,
            State::Ready => Phase::Queued,
            State::NoWorker => Phase::NoWorker,
            State::Processing { .. } => Phase::Processing,
            State::Memory { .. } => Phase::Memory,
            State::Erred(_) => Phase::Erred,
        }
    }

    fn pending(&self) -> bool {
        matches!(self, State::Waiting | State::Ready | State::NoWorker | State::Processing { .. })
    }
}

/// A task as the core keeps it. The fields most paths read come first, in an order `repr(C)`
/// keeps: the state with the priority the assignment loop compares, the counters a finished
/// input updates, and the serial and record index that recording reads (recording used to
/// read those two from a cache line nothing else on its path touched); the lists, the key and
/// the payload follow.
#[repr(C)]
struct Task<P> {
    state: State,
    prio: Prio,
    /// Inputs not yet finished (only meaningful while `Waiting`).
    waiting_on: u32,
    /// Dependents in a pending state (they still need this task's value).
    consumers: u32,
    /// Unique for the core's lifetime (slots are reused; serials are not): names the task in
    /// published transitions.
    serial: u64,
    /// (event number, index in `transitions`) of its latest recorded change: a change in the
    /// same event extends that record instead of adding one.
    noted: (u32, u32),
    nbytes: u64,
    /// Open graph submissions (sent in parts, not finished yet) that include this task: it
    /// must not be forgotten before they finish.
    held: u32,
    input_failures: u32,
    /// The client whose submission registered it (its progress counts this task).
    owner: ClientId,
    /// A steal request for this task is out; do not ask again.
    steal_requested: bool,
    /// Counted as finished in its owner's progress (once, even if it is recomputed).
    counted: bool,
    deps: Vec<Tid>,
    dependents: Vec<Tid>,
    wanted_by: Vec<ClientId>,
    key: Key,
    /// What to run; `None` for scattered data, which cannot be recomputed.
    payload: Option<P>,
    restrictions: Option<Box<Restrictions>>,
    /// Workers that died while (probably) running it, with why: its `KilledWorker` record.
    deaths: Option<Box<Deaths>>,
}

/// Workers (by name) that died while a task was probably running on them, with why.
type Deaths = Vec<(Arc<str>, LossCause)>;

struct Worker {
    spec: WorkerSpec,
    /// Tasks assigned and not yet reported (each holds its restrictions' resources).
    processing: FxHashSet<Tid>,
    /// Tasks forgotten while assigned here (a short list), with the resources they hold: the
    /// worker may still be running them, so their slot and resources stay taken until it
    /// reports on that very assignment.
    orphans: Vec<Orphan>,
    available: Vec<(Arc<str>, f64)>,
    /// Moving average of task run time.
    avg_duration_us: f64,
    /// When a message from it last arrived (shell clock, µs).
    last_heard_us: u64,
    /// Leaving gracefully: no new work; its unique results are being copied elsewhere.
    retiring: bool,
    /// While retiring: the tasks whose results it holds (found once when it starts retiring,
    /// plus those it finishes since), so each event checks these rather than every task.
    holds: Vec<Tid>,
    /// Paused for memory: no new work until it resumes.
    paused: bool,
}

/// A task forgotten while its worker may still run it (see [`Worker::orphans`]).
struct Orphan {
    /// Its serial (the assignment's ticket names it).
    serial: u64,
    key: Key,
    resources: Vec<(Arc<str>, f64)>,
}

impl Worker {
    /// Tasks it was sent and has not reported on (including orphans).
    fn load(&self) -> usize {
        self.processing.len() + self.orphans.len()
    }

    /// Takes (`sign` -1) or gives back (+1) resources a task holds while running here.
    fn adjust_available(&mut self, resources: &[(Arc<str>, f64)], sign: f64) {
        for (n, a) in resources {
            if let Some((_, free)) = self.available.iter_mut().find(|(wn, _)| wn == n) {
                *free += sign * a;
            }
        }
    }
}

impl<P> Task<P> {
    /// The resources it holds while running (none without restrictions).
    fn resources(&self) -> &[(Arc<str>, f64)] {
        self.restrictions.as_ref().map_or(&[], |r| &r.resources)
    }
}

/// Slots of the task table that forgotten tasks left, for new tasks.
///
/// A graph submitted into a table whose slots are reused last freed first (freed in the order
/// its tasks completed and were forgotten) would have its tasks scattered over the table,
/// neighbours in the graph far apart in memory: measured on tree-15 (`examples/core_tree.rs`),
/// every run after the second took 40% longer than the second. Ordered before a submission, the
/// slots freed since the last submission fill lowest first in submission order, as in a fresh
/// table.
#[derive(Default)]
struct FreeSlots {
    /// Up to `sorted`: runs each sorted highest first (popped lowest first), one per ordering;
    /// after it, the slots freed since, in the order they were freed.
    slots: Vec<u32>,
    sorted: usize,
}

impl FreeSlots {
    fn push(&mut self, slot: u32) {
        self.slots.push(slot);
    }

    /// The slot to fill next: the last one freed since the last ordering, else the lowest of
    /// the slots freed before it.
    fn pop(&mut self) -> Option<u32> {
        let slot = self.slots.pop();
        self.sorted = self.sorted.min(self.slots.len());
        slot
    }

    fn len(&self) -> usize {
        self.slots.len()
    }

    /// Sorts the slots freed since the last ordering among themselves, so they are popped lowest
    /// first: each slot is sorted once, O(log n) per free, however many older ones wait below.
    fn order(&mut self) {
        let tail = &mut self.slots[self.sorted..];
        if tail.len() > 1 {
            tail.sort_unstable_by(|a, b| b.cmp(a));
        }
        self.sorted = self.slots.len();
    }
}

/// How far a client's work has come: the tasks its submissions registered, and how many of
/// them have finished (in memory or failed), for its progress bar.
#[derive(Default)]
struct ClientProgress {
    registered: u64,
    finished: u64,
    /// What the client was last told (done, total).
    reported: (u64, u64),
}

/// The scheduler state. See the crate documentation.
pub struct Core<P> {
    cfg: Config,
    /// State changes since they were last taken or cleared (when recording).
    transitions: Vec<Transition>,
    /// The keys of their new tasks, as text (copied: no reference count touched).
    transition_keys: String,
    /// Counts events, so changes of one task within one event are recorded together.
    event_no: u32,
    /// The last task serial given out.
    serials: u64,
    tasks: Vec<Option<Task<P>>>,
    free_slots: FreeSlots,
    by_key: FxHashMap<Key, Tid>,
    workers: BTreeMap<WorkerId, Worker>,
    clients: BTreeMap<ClientId, ClientProgress>,
    ready: BinaryHeap<Reverse<(Prio, Tid)>>,
    no_worker: Vec<Tid>,
    submissions: u64,
    out: Vec<Command<P>>,
    /// Reusable id buffers, so iterating a task's neighbours while mutating the core does not
    /// allocate on every event.
    scratch: Vec<Vec<Tid>>,
    /// Tasks to forget once the current event is fully handled (never in the middle of a
    /// handler, which may still refer to them).
    to_forget: Vec<Tid>,
    /// The worker the last root task (one without inputs) went to.
    last_root: Option<WorkerId>,
    /// Clients in the middle of sending a graph in parts: the submission's priority
    /// generation and the tasks registered so far (kept alive until the last part).
    open_parts: BTreeMap<ClientId, (u64, Vec<Tid>)>,
    /// The latest time the shell reported (µs).
    now_us: u64,
    /// The most recent worker departures, oldest first (at most [`MAX_DEPARTURES`]).
    departures: std::collections::VecDeque<Departure>,
    /// Values being copied off retiring workers.
    acquiring: FxHashSet<Tid>,
    /// Values that could not be copied off a retiring worker: it stops waiting for them.
    unmovable: FxHashSet<Tid>,
}

/// Departures kept for diagnostics.
const MAX_DEPARTURES: usize = 256;

impl<P: Clone> Core<P> {
    /// An empty scheduler.
    #[must_use]
    pub fn new(cfg: Config) -> Self {
        Core {
            cfg,
            transitions: Vec::new(),
            transition_keys: String::new(),
            event_no: 0,
            serials: 0,
            tasks: Vec::new(),
            free_slots: FreeSlots::default(),
            by_key: FxHashMap::default(),
            workers: BTreeMap::new(),
            clients: BTreeMap::new(),
            ready: BinaryHeap::new(),
            no_worker: Vec::new(),
            submissions: 0,
            out: Vec::new(),
            scratch: Vec::new(),
            to_forget: Vec::new(),
            last_root: None,
            open_parts: BTreeMap::new(),
            now_us: 0,
            departures: std::collections::VecDeque::new(),
            acquiring: FxHashSet::default(),
            unmovable: FxHashSet::default(),
        }
    }

    /// Number of tasks known (in any state).
    #[must_use]
    pub fn task_count(&self) -> usize {
        self.by_key.len()
    }

    /// Number of connected workers.
    #[must_use]
    pub fn worker_count(&self) -> usize {
        self.workers.len()
    }

    /// The state of a key, for diagnostics and tests ("memory", "processing", ...).
    #[must_use]
    pub fn state_of(&self, key: &str) -> Option<&'static str> {
        let t = self.by_key.get(key)?;
        Some(match self.task(*t).state {
            State::Released => "released",
            State::Waiting => "waiting",
            State::Ready => "queued",
            State::NoWorker => "no-worker",
            State::Processing { .. } => "processing",
            State::Memory { .. } => "memory",
            State::Erred(_) => "erred",
        })
    }

    /// Workers that left, oldest first, with why (the last [`MAX_DEPARTURES`]).
    pub fn departures(&self) -> impl Iterator<Item = &Departure> {
        self.departures.iter()
    }

    /// A key's state as observers see it (`None`: not known, i.e. forgotten or never seen).
    #[must_use]
    pub fn phase(&self, key: &str) -> Option<Phase> {
        let t = *self.by_key.get(key)?;
        Some(self.task(t).state.phase())
    }

    /// Which workers hold a key's value.
    #[must_use]
    pub fn who_has(&self, key: &str) -> Vec<WorkerId> {
        match self.by_key.get(key).map(|t| &self.task(*t).state) {
            Some(State::Memory { who_has }) => who_has.to_vec(),
            _ => Vec::new(),
        }
    }

    /// Stops recording state changes (see [`Config::record_transitions`]) and drops those not
    /// taken yet: for when their observer is gone.
    pub fn stop_recording(&mut self) {
        self.cfg.record_transitions = false;
        self.transitions = Vec::new();
        self.transition_keys = String::new();
    }

    /// Changes recorded since they were last taken or cleared: a caller gathering several
    /// events' changes in one batch notes this before each event to tell them apart.
    #[must_use]
    pub fn transitions_pending(&self) -> usize {
        self.transitions.len()
    }

    /// Moves the state changes recorded since the last call into `out` (nothing unless
    /// [`Config::record_transitions`] is on), in the order they happened, and the keys of new
    /// tasks into `keys` (their [`Transition::key`] spans index it).
    ///
    /// When both are empty they are swapped with the core's own buffers instead of copied: the
    /// caller hands over spare capacity and gets the batch without touching a change.
    pub fn take_transitions(&mut self, out: &mut Vec<Transition>, keys: &mut String) {
        if out.is_empty() && keys.is_empty() {
            std::mem::swap(out, &mut self.transitions);
            std::mem::swap(keys, &mut self.transition_keys);
            return;
        }
        self.copy_transitions(0..self.transitions.len(), out, keys);
        self.transitions.clear();
        self.transition_keys.clear();
    }

    /// Appends the changes recorded at `range` of those pending (indices as
    /// [`Core::transitions_pending`] counts them; a range reaching past them stops at the
    /// last) to `out`, and the text of their new tasks' keys to `keys`, their
    /// [`Transition::key`] spans moved to index it. The core keeps its records until
    /// [`Core::clear_transitions`].
    ///
    /// For a caller that hands changes over in pieces of a bounded size: the core's own
    /// buffers stay with it, warm and grown to its largest event once, rather than leave with
    /// every batch and be allocated afresh (fresh pages, faulted in one by one) for the next
    /// event that records more than the last.
    pub fn copy_transitions(&self, range: std::ops::Range<usize>, out: &mut Vec<Transition>, keys: &mut String) {
        let end = range.end.min(self.transitions.len());
        let Some(records) = self.transitions.get(range.start.min(end)..end) else { return };
        let from = out.len();
        // One block copy; then only the records that carry a key are touched again.
        out.extend_from_slice(records);
        let copied = &mut out[from..];
        let Some(i) = copied.iter().position(|t| t.flags & Transition::HAS_KEY != 0) else { return };
        // A key's text is written with its task's first record, so the spans of a run of
        // records follow one another in the text.
        let first = copied[i].key.0;
        let base = u32::try_from(keys.len()).expect("a batch's key text stays far below 4 GiB");
        let mut end = first;
        for t in &mut copied[i..] {
            if t.flags & Transition::HAS_KEY != 0 {
                debug_assert_eq!(t.key.0, end, "key spans follow one another");
                end = t.key.1;
                t.key = (t.key.0 - first + base, t.key.1 - first + base);
            }
        }
        let text = self.transition_keys.get(first as usize..end as usize);
        debug_assert!(text.is_some(), "key spans lie within the key text");
        keys.push_str(text.unwrap_or_default());
    }

    /// Forgets the changes recorded so far (after [`Core::copy_transitions`]). The buffers
    /// keep their memory, up to a million records (32 MiB) and 16 MiB of key text: an event
    /// that changed more tasks (millions submitted at once) gives the rest back.
    pub fn clear_transitions(&mut self) {
        self.transitions.clear();
        self.transition_keys.clear();
        self.transitions.shrink_to(MAX_KEPT_RECORDS);
        self.transition_keys.shrink_to(MAX_KEPT_RECORDS * 16);
    }

    /// Applies one event and returns the commands that follow from it.
    pub fn handle(&mut self, event: Event<P>) -> Vec<Command<P>> {
        let mut out = Vec::new();
        self.handle_into(event, &mut out);
        out
    }

    /// Like [`Core::handle`], appending the commands to `out` — a buffer the caller reuses, so
    /// the hot loop does not allocate a command vector per event.
    pub fn handle_into(&mut self, event: Event<P>, out: &mut Vec<Command<P>>) {
        std::mem::swap(&mut self.out, out);
        self.apply(event);
        std::mem::swap(&mut self.out, out);
    }

    fn apply(&mut self, event: Event<P>) {
        self.event_no = self.event_no.wrapping_add(1);
        match event {
            Event::ClientConnected { client } => {
                self.clients.entry(client).or_default();
            }
            Event::ClientDisconnected { client } => {
                self.clients.remove(&client);
                // Parts of a graph the client never finished sending.
                if let Some((_, pending)) = self.open_parts.remove(&client) {
                    self.unhold(pending);
                }
                let keys: Vec<Tid> = self.live_ids().filter(|t| self.task(*t).wanted_by.contains(&client)).collect();
                for t in keys {
                    self.unwant(t, client);
                }
            }
            Event::GraphPart { client, tasks } => {
                let generation = self.generation_for(client);
                let (part, wanted) = self.register(client, tasks, generation);
                for &t in &part {
                    self.task_mut(t).held += 1;
                }
                if let Some((_, pending)) = self.open_parts.get_mut(&client) {
                    pending.extend(part);
                }
                // Wanted tasks of a part start now, while the rest of the graph arrives.
                for t in wanted {
                    self.want_id(client, t);
                }
            }
            Event::GraphSubmitted { client, tasks, wanted } => self.submit(client, tasks, wanted),
            Event::KeysReleased { client, keys } => {
                for k in keys {
                    if let Some(t) = self.by_key.get(&k).copied() {
                        self.unwant(t, client);
                    }
                }
            }
            Event::KeysCancelled { client, keys } => {
                for k in keys {
                    if let Some(t) = self.by_key.get(&k).copied() {
                        self.out.push(Command::KeyCancelled { client, key: k });
                        self.unwant(t, client);
                    }
                }
            }
            Event::KeysFireAndForget { keys } => {
                for k in keys {
                    let Some(t) = self.by_key.get(&k).copied() else { continue };
                    if self.task(t).state.pending() && !self.task(t).wanted_by.contains(&FIRE_AND_FORGET) {
                        self.task_mut(t).wanted_by.push(FIRE_AND_FORGET);
                    }
                }
            }
            Event::DataScattered { client, items } => self.scattered(client, items),
            Event::WorkerConnected { worker, spec } => {
                if let Some(why) = &spec.restarted_after {
                    // The latest departure of this name, if only known as a closed connection,
                    // and the deaths pending tasks recorded for it.
                    let cause = LossCause::Said(format!("{why}; restarted by its supervisor"));
                    let earlier = self.departures.iter_mut().rev().find(|d| d.name == spec.name);
                    if let Some(d) = earlier.filter(|d| d.cause == LossCause::ConnectionClosed) {
                        d.cause = cause.clone();
                    }
                    for slot in self.tasks.iter_mut().flatten() {
                        let Some(deaths) = slot.deaths.as_deref_mut() else { continue };
                        let last = deaths.iter_mut().rev().find(|(n, _)| *n == spec.name);
                        if let Some((_, c)) = last.filter(|(_, c)| *c == LossCause::ConnectionClosed) {
                            *c = cause.clone();
                        }
                    }
                }
                let available = spec.resources.clone();
                self.workers.insert(
                    worker,
                    Worker {
                        spec,
                        processing: FxHashSet::default(),
                        orphans: Vec::new(),
                        available,
                        avg_duration_us: 0.0,
                        last_heard_us: self.now_us,
                        retiring: false,
                        holds: Vec::new(),
                        paused: false,
                    },
                );
                // Tasks nobody could run may fit now.
                for t in std::mem::take(&mut self.no_worker) {
                    if self.exists(t) && matches!(self.task(t).state, State::NoWorker) {
                        self.make_ready(t);
                    }
                }
            }
            Event::WorkerDisconnected { worker, cause } => self.remove_worker(worker, cause),
            Event::WorkerRetiring { worker } => {
                let holds: Vec<Tid> = self
                    .live_ids()
                    .filter(|t| matches!(&self.task(*t).state, State::Memory { who_has } if who_has.contains(&worker)))
                    .collect();
                if let Some(w) = self.workers.get_mut(&worker) {
                    if !w.retiring {
                        w.retiring = true;
                        w.holds = holds;
                    }
                }
            }
            Event::DataAcquired { worker, key, nbytes } => self.acquired(worker, &key, nbytes),
            Event::AcquireFailed { key } => {
                if let Some(t) = self.by_key.get(&key).copied() {
                    self.acquiring.remove(&t);
                    self.unmovable.insert(t);
                }
            }
            Event::WorkerPaused { worker, paused } => {
                if let Some(w) = self.workers.get_mut(&worker) {
                    w.paused = paused;
                }
            }
            Event::WorkerHeard { worker, at_us } => {
                self.now_us = self.now_us.max(at_us);
                if let Some(w) = self.workers.get_mut(&worker) {
                    w.last_heard_us = w.last_heard_us.max(at_us);
                }
            }
            Event::Tick { now_us } => {
                // A long gap since the last tick means this process stalled (stopped, swapped):
                // the workers' silence is then ours, not theirs.
                let gap = now_us.saturating_sub(self.now_us);
                if self.cfg.worker_ttl_us.is_some_and(|ttl| gap > ttl / 2) {
                    for w in self.workers.values_mut() {
                        w.last_heard_us = w.last_heard_us.max(now_us);
                    }
                }
                self.now_us = self.now_us.max(now_us);
                self.report_progress();
                if let Some(ttl) = self.cfg.worker_ttl_us {
                    let silent: Vec<(WorkerId, u64)> = self
                        .workers
                        .iter()
                        .map(|(id, w)| (*id, self.now_us.saturating_sub(w.last_heard_us)))
                        .filter(|(_, quiet)| *quiet > ttl)
                        .collect();
                    for (worker, quiet) in silent {
                        let cause = LossCause::HeartbeatTimeout { silent_ms: quiet / 1000 };
                        self.out.push(Command::DropWorker { worker, cause: cause.clone() });
                        self.remove_worker(worker, cause);
                    }
                }
            }
            Event::TaskFinished { worker, key, ticket, nbytes, duration_us } => {
                self.finished(worker, &key, ticket, nbytes, duration_us);
            }
            Event::TaskFailed { worker, key, ticket, error } => self.failed(worker, &key, ticket, error),
            Event::InputsMissing { worker, key, ticket, missing } => {
                self.inputs_missing(worker, &key, ticket, missing);
            }
            Event::TaskDropped { worker, key, ticket } => self.dropped(worker, &key, ticket),
        }
        while let Some(t) = self.to_forget.pop() {
            self.forget_now(t);
        }
        self.schedule();
        if self.workers.values().any(|w| w.retiring) {
            self.advance_retirements();
            while let Some(t) = self.to_forget.pop() {
                self.forget_now(t);
            }
            // A worker that retired without moving everything leaves work to place.
            self.schedule();
        }
    }

    /// Copies the needed values only retiring workers hold to other workers; lets a retiring
    /// worker go once it runs nothing and holds nothing unique.
    fn advance_retirements(&mut self) {
        let retiring: Vec<WorkerId> = self.workers.iter().filter(|(_, w)| w.retiring).map(|(id, _)| *id).collect();
        for wid in retiring {
            let mut holds = self.workers.get_mut(&wid).map(|w| std::mem::take(&mut w.holds)).unwrap_or_default();
            holds.retain(|t| {
                self.exists(*t) && matches!(&self.task(*t).state, State::Memory { who_has } if who_has.contains(&wid))
            });
            let unique: Vec<Tid> = holds
                .iter()
                .copied()
                .filter(|t| matches!(&self.task(*t).state, State::Memory { who_has } if who_has.as_slice() == [wid]))
                .filter(|t| self.needed(*t) && !self.unmovable.contains(t))
                .collect();
            if let Some(w) = self.workers.get_mut(&wid) {
                w.holds = holds;
            }
            let target = self
                .workers
                .iter()
                .filter(|(id, w)| **id != wid && !w.retiring && !w.paused)
                .min_by_key(|(id, w)| (w.load(), **id))
                .map(|(id, _)| *id);
            let busy = self.workers.get(&wid).is_some_and(|w| w.load() > 0);
            match target {
                Some(to) if !unique.is_empty() => {
                    for t in unique {
                        if self.acquiring.insert(t) {
                            let key = self.task(t).key.clone();
                            self.out.push(Command::Acquire { worker: to, key, from: wid });
                        }
                    }
                }
                // Nothing unique left, or no other worker to hold it (then it is recomputed when
                // one joins, rather than keeping the last worker from stopping): it may go once
                // idle.
                _ if !busy => {
                    self.out.push(Command::Retired { worker: wid });
                    self.remove_worker(wid, LossCause::Said("retired gracefully (SIGTERM)".into()));
                }
                _ => {}
            }
        }
    }

    fn acquired(&mut self, wid: WorkerId, key: &Key, nbytes: u64) {
        let t = self.by_key.get(key).copied();
        if let Some(t) = t {
            self.acquiring.remove(&t);
        }
        match t {
            Some(t) if self.workers.contains_key(&wid) && matches!(self.task(t).state, State::Memory { .. }) => {
                self.task_mut(t).nbytes = nbytes;
                if let State::Memory { who_has } = &mut self.task_mut(t).state {
                    if !who_has.contains(&wid) {
                        who_has.push(wid);
                    }
                }
                self.note_held(wid, t);
            }
            // Not needed any more: the copy is garbage.
            _ => self.out.push(Command::Free { worker: wid, key: key.clone() }),
        }
    }

    // ----- small helpers -------------------------------------------------------------------

    /// Records `t`'s current state as a transition (when recording).
    #[inline]
    fn note(&mut self, t: Tid) {
        if self.cfg.record_transitions {
            self.record_change(t, false);
        }
    }

    /// [`Self::note`] for a new task: its key goes with the transition.
    #[inline]
    fn note_first(&mut self, t: Tid) {
        if self.cfg.record_transitions {
            self.record_change(t, true);
        }
    }

    /// [`Self::note`] when recording: extends the task's record of this event if it can (see
    /// [`Transition::extend`]), else adds one. One lookup of the task, whose fields it reads
    /// and updates in place.
    fn record_change(&mut self, t: Tid, first: bool) {
        let event_no = self.event_no;
        let task = self.tasks[t.0 as usize].as_mut().expect("invariant: live task id");
        let (phase, worker) = match &task.state {
            State::Processing { on } => (Phase::Processing, Some(*on)),
            State::Memory { who_has } => (Phase::Memory, who_has.first().copied()),
            other => (other.phase(), None),
        };
        let key = if first {
            let text = &mut self.transition_keys;
            let start = text.len() as u32;
            text.push_str(task.key.as_str());
            Some((start, text.len() as u32))
        } else {
            let this_event = Self::record_in(&mut self.transitions, event_no, task.serial, task.noted);
            if this_event.is_some_and(|tr| tr.extend(phase, worker)) {
                return;
            }
            None
        };
        task.noted = (event_no, self.transitions.len() as u32);
        self.transitions.push(Transition::new(task.serial, key, phase, worker));
    }

    /// The record, among `transitions`, of the latest change of the task numbered `serial`
    /// (its `noted`), if that change was made in event `event_no`: a further change in the
    /// same event extends it.
    fn record_in(
        transitions: &mut [Transition],
        event_no: u32,
        serial: u64,
        (event, at): (u32, u32),
    ) -> Option<&mut Transition> {
        if event != event_no {
            return None;
        }
        transitions.get_mut(at as usize).filter(|tr| tr.task == serial)
    }

    /// The record of `t`'s latest change, if it was made in this event.
    fn last_record(&mut self, t: Tid) -> Option<&mut Transition> {
        let (serial, noted) = (self.task(t).serial, self.task(t).noted);
        Self::record_in(&mut self.transitions, self.event_no, serial, noted)
    }

    /// `t` finished (in memory or failed): its owner's progress counts it, once.
    fn count_finished(&mut self, t: Tid) {
        let task = self.task_mut(t);
        if !task.counted {
            task.counted = true;
            let owner = task.owner;
            if let Some(c) = self.clients.get_mut(&owner) {
                c.finished += 1;
                Self::settle_progress(&mut self.out, owner, c);
            }
        }
    }

    /// Once all of a client's registered tasks have finished, it is told so at once, and its
    /// next submission counts from zero.
    fn settle_progress(out: &mut Vec<Command<P>>, client: ClientId, c: &mut ClientProgress) {
        if c.registered > 0 && c.finished >= c.registered {
            out.push(Command::Progress { client, done: c.finished, total: c.registered });
            *c = ClientProgress::default();
        }
    }

    /// Tells clients how far their work has come, when it moved since they were last told.
    fn report_progress(&mut self) {
        for (client, c) in &mut self.clients {
            let now = (c.finished, c.registered);
            if now != c.reported {
                self.out.push(Command::Progress { client: *client, done: now.0, total: now.1 });
                c.reported = now;
            }
        }
    }

    /// A retiring worker now holds `t`'s result (see [`Worker::holds`]).
    fn note_held(&mut self, wid: WorkerId, t: Tid) {
        if let Some(w) = self.workers.get_mut(&wid) {
            if w.retiring {
                w.holds.push(t);
            }
        }
    }

    /// A copy of `t`'s dependents (or dependencies) in a recycled buffer; give it back with
    /// [`Self::recycle`].
    fn neighbours(&mut self, t: Tid, dependents: bool) -> Vec<Tid> {
        let mut v = self.scratch.pop().unwrap_or_default();
        let task = self.task(t);
        v.extend_from_slice(if dependents { &task.dependents } else { &task.deps });
        v
    }

    fn recycle(&mut self, mut v: Vec<Tid>) {
        v.clear();
        self.scratch.push(v);
    }

    fn task(&self, t: Tid) -> &Task<P> {
        self.tasks[t.0 as usize].as_ref().expect("invariant: live task id")
    }

    fn task_mut(&mut self, t: Tid) -> &mut Task<P> {
        self.tasks[t.0 as usize].as_mut().expect("invariant: live task id")
    }

    fn exists(&self, t: Tid) -> bool {
        self.tasks.get(t.0 as usize).is_some_and(Option::is_some)
    }

    fn live_ids(&self) -> impl Iterator<Item = Tid> + '_ {
        self.tasks.iter().enumerate().filter(|(_, t)| t.is_some()).map(|(i, _)| Tid(i as u32))
    }

    fn alloc(&mut self, task: Task<P>) -> Tid {
        let key = task.key.clone();
        let t = Self::place(&mut self.tasks, &mut self.free_slots, &mut self.serials, task);
        self.by_key.insert(key, t);
        self.note_first(t);
        t
    }

    /// Stores a task in a free slot of the table (not yet in `by_key`), giving it its serial.
    fn place(
        tasks: &mut Vec<Option<Task<P>>>,
        free_slots: &mut FreeSlots,
        serials: &mut u64,
        mut task: Task<P>,
    ) -> Tid {
        *serials += 1;
        task.serial = *serials;
        match free_slots.pop() {
            Some(i) => {
                tasks[i as usize] = Some(task);
                Tid(i)
            }
            None => {
                tasks.push(Some(task));
                Tid(tasks.len() as u32 - 1)
            }
        }
    }

    fn notify_wanters(&mut self, t: Tid) {
        // Fire-and-forget holds last only until the task is finished; callers release after.
        if matches!(self.task(t).state, State::Memory { .. } | State::Erred(_)) {
            self.task_mut(t).wanted_by.retain(|c| *c != FIRE_AND_FORGET);
        }
        let clients = self.task(t).wanted_by.clone();
        for c in clients {
            if let Some(cmd) = self.status_for(t, c) {
                self.out.push(cmd);
            }
        }
    }

    /// The message telling `client` that `t` is finished (in memory or failed); `None` while
    /// it is not.
    fn status_for(&self, t: Tid, client: ClientId) -> Option<Command<P>> {
        let task = self.task(t);
        match &task.state {
            State::Memory { who_has } => Some(Command::KeyInMemory {
                client,
                key: task.key.clone(),
                workers: who_has.to_vec(),
                nbytes: task.nbytes,
            }),
            State::Erred(e) => Some(Command::KeyErred { client, key: task.key.clone(), error: Arc::clone(e) }),
            _ => None,
        }
    }

    // ----- submission ------------------------------------------------------------------------

    /// The priority generation of `client`'s submission in progress (parts share their final
    /// submission's place in the FIFO order), opening one if none is.
    fn generation_for(&mut self, client: ClientId) -> u64 {
        if let Some((g, _)) = self.open_parts.get(&client) {
            return *g;
        }
        self.submissions += 1;
        self.open_parts.insert(client, (self.submissions, Vec::new()));
        self.submissions
    }

    fn submit(&mut self, client: ClientId, tasks: Vec<NewTask<P>>, wanted: Vec<Key>) {
        let generation = self.generation_for(client);
        let (submitted, flagged) = self.register(client, tasks, generation);
        let pending = self.open_parts.remove(&client).map(|(_, p)| p).unwrap_or_default();
        for t in flagged {
            self.want_id(client, t);
        }
        self.want(client, wanted);
        self.unhold(pending);
        // Tasks submitted but neither wanted nor needed are dropped right away.
        for t in submitted {
            self.maybe_forget(t);
        }
    }

    /// An open submission holding `tasks` finished or was abandoned: let them go unless
    /// wanted or needed.
    fn unhold(&mut self, tasks: Vec<Tid>) {
        for t in tasks {
            let task = self.task_mut(t);
            task.held -= 1;
            self.maybe_forget(t);
        }
    }

    /// Adds new tasks (reusing known keys) and links them; returns the ids of all of `tasks`
    /// (reused ones first) and of those flagged wanted. Inputs must be known already or among `tasks`; an unknown input
    /// fails the task.
    fn register(&mut self, client: ClientId, tasks: Vec<NewTask<P>>, generation: u64) -> (Vec<Tid>, Vec<Tid>) {
        // Grow once, not by repeated doubling: a million-task graph would otherwise copy and
        // touch its task table several times over.
        let free = self.free_slots.len();
        // A single task gains nothing from ordering; the slot freed last is the likeliest to
        // still be in cache.
        if tasks.len() > 1 {
            self.free_slots.order();
        }
        self.tasks.reserve(tasks.len().saturating_sub(free));
        self.by_key.reserve(tasks.len());
        if self.cfg.record_transitions {
            // Likewise the records of the tasks' first changes (the key text grows as it
            // goes: summing the keys' lengths first would read the whole submission twice).
            self.transitions.reserve(tasks.len());
        }
        let mut fresh: Vec<(Tid, Vec<Dep>)> = Vec::with_capacity(tasks.len());
        let mut reused: Vec<Tid> = Vec::new();
        let mut wanted: Vec<Tid> = Vec::new();
        // The task at each position of the submission (for `Dep::Position`).
        let mut at: Vec<Tid> = Vec::with_capacity(tasks.len());
        for nt in tasks {
            // One hash probe per task: a known key (same key, same content) reuses the task.
            let entry = match self.by_key.entry(nt.key.clone()) {
                std::collections::hash_map::Entry::Vacant(entry) => entry,
                std::collections::hash_map::Entry::Occupied(known) => {
                    at.push(*known.get());
                    reused.push(*known.get());
                    if nt.wanted {
                        wanted.push(*known.get());
                    }
                    continue;
                }
            };
            let task = Task {
                key: nt.key,
                payload: Some(nt.payload),
                deps: Vec::new(),
                dependents: Vec::new(),
                state: State::Released,
                prio: (nt.priority.saturating_neg(), generation, nt.order),
                restrictions: nt.restrictions,
                wanted_by: Vec::new(),
                waiting_on: 0,
                consumers: 0,
                nbytes: 0,
                input_failures: 0,
                steal_requested: false,
                held: 0,
                deaths: None,
                serial: 0,
                owner: client,
                counted: false,
                noted: (0, 0),
            };
            let t = Self::place(&mut self.tasks, &mut self.free_slots, &mut self.serials, task);
            entry.insert(t);
            at.push(t);
            self.note_first(t);
            if nt.wanted {
                wanted.push(t);
            }
            fresh.push((t, nt.deps));
        }
        if let Some(c) = self.clients.get_mut(&client) {
            c.registered += fresh.len() as u64;
            if !fresh.is_empty() {
                // Told at the next tick even if it still reads 0 of N.
                c.reported = (u64::MAX, u64::MAX);
            }
        }
        // Link dependencies; an unknown input fails the task (and what depends on it).
        let mut unknown: Vec<(Tid, String)> = Vec::new();
        let mut seen: FxHashSet<Tid> = FxHashSet::default();
        let mut forward = false;
        for (t, deps) in &mut fresh {
            let mut ids = Vec::with_capacity(deps.len());
            // Duplicates are dropped: by scanning for the usual handful of inputs, through a
            // set in linear time for large fan-ins (a reduction may have 10⁶ inputs).
            let many = deps.len() > 16;
            seen.clear();
            for dep in deps.drain(..) {
                let found = match &dep {
                    Dep::Key(k) => self.by_key.get(k).copied(),
                    Dep::Position(i) => at.get(*i as usize).copied(),
                };
                match found {
                    Some(d) if if many { seen.insert(d) } else { !ids.contains(&d) } => ids.push(d),
                    Some(_) => {}
                    None => unknown.push((
                        *t,
                        match dep {
                            Dep::Key(k) => {
                                format!("input {k} is not known to the scheduler (released before this graph arrived?)")
                            }
                            Dep::Position(i) => {
                                format!("input #{i} of the submission does not exist (it has {} tasks)", at.len())
                            }
                        },
                    )),
                }
            }
            let serial = self.task(*t).serial;
            for d in &ids {
                let dep = self.task_mut(*d);
                dep.dependents.push(*t);
                // Tasks registered earlier have smaller serials: only an input registered
                // with or after its dependent can close a cycle.
                forward |= dep.serial >= serial;
            }
            self.task_mut(*t).deps = ids;
        }
        for (t, message) in unknown {
            let key = self.task(t).key.clone();
            let err = Arc::new(TaskError { key, message, kind: FailureKind::Unrunnable, attempts: 0 });
            self.task_mut(t).state = State::Erred(err);
            self.note(t);
            self.count_finished(t);
        }
        if let Some(cycle) = forward.then(|| self.find_cycle(&fresh)).flatten() {
            for (t, _) in &fresh {
                let key = self.task(*t).key.clone();
                let err = Arc::new(TaskError {
                    key,
                    message: format!("the submitted graph has a dependency cycle through {cycle}"),
                    kind: FailureKind::Unrunnable,
                    attempts: 0,
                });
                self.task_mut(*t).state = State::Erred(err);
                self.note(*t);
                self.count_finished(*t);
            }
        }
        reused.extend(fresh.into_iter().map(|(t, _)| t));
        (reused, wanted)
    }

    /// `client` holds futures for `wanted`: compute them, or report them if already done.
    fn want(&mut self, client: ClientId, wanted: Vec<Key>) {
        for k in wanted {
            let Some(t) = self.by_key.get(&k).copied() else {
                let error = Arc::new(TaskError {
                    key: k.clone(),
                    message: format!("key {k} is not known to the scheduler"),
                    kind: FailureKind::Unrunnable,
                    attempts: 0,
                });
                self.out.push(Command::KeyErred { client, key: k, error });
                continue;
            };
            self.want_id(client, t);
        }
    }

    fn want_id(&mut self, client: ClientId, t: Tid) {
        if !self.task(t).wanted_by.contains(&client) {
            self.task_mut(t).wanted_by.push(client);
        }
        match self.task(t).state {
            State::Memory { .. } | State::Erred(_) => self.out.extend(self.status_for(t, client)),
            State::Released => self.compute(t),
            _ => {}
        }
    }

    /// Kahn over the fresh tasks; returns a key on a cycle, if any.
    fn find_cycle(&self, fresh: &[(Tid, Vec<Dep>)]) -> Option<Key> {
        let index: FxHashMap<Tid, usize> = fresh.iter().enumerate().map(|(i, (t, _))| (*t, i)).collect();
        let mut indeg: Vec<usize> =
            fresh.iter().map(|(t, _)| self.task(*t).deps.iter().filter(|d| index.contains_key(d)).count()).collect();
        let mut stack: Vec<usize> = (0..fresh.len()).filter(|i| indeg[*i] == 0).collect();
        let mut seen = 0;
        while let Some(i) = stack.pop() {
            seen += 1;
            for d in &self.task(fresh[i].0).dependents {
                if let Some(j) = index.get(d) {
                    indeg[*j] -= 1;
                    if indeg[*j] == 0 {
                        stack.push(*j);
                    }
                }
            }
        }
        (seen < fresh.len()).then(|| {
            let i = indeg.iter().position(|d| *d > 0).unwrap_or(0);
            self.task(fresh[i].0).key.clone()
        })
    }

    /// Makes a released task (and the released inputs it needs) compute.
    fn compute(&mut self, t: Tid) {
        let mut stack = self.scratch.pop().unwrap_or_default();
        stack.push(t);
        while let Some(t) = stack.pop() {
            if !matches!(self.task(t).state, State::Released) {
                continue;
            }
            if self.task(t).payload.is_none() {
                // Scattered data exists only where it was put; once lost it cannot come back.
                let err = Arc::new(TaskError {
                    key: self.task(t).key.clone(),
                    message: "lost: the scattered data was held only by workers that are gone".into(),
                    kind: FailureKind::Unrunnable,
                    attempts: 0,
                });
                self.task_mut(t).state = State::Erred(err);
                self.note(t);
                self.notify_wanters(t);
                self.propagate_failure(t);
                continue;
            }
            let deps = self.task(t).deps.clone();
            let mut waiting = 0;
            for d in &deps {
                self.task_mut(*d).consumers += 1;
                match self.task(*d).state {
                    State::Memory { .. } | State::Erred(_) => {}
                    State::Released => {
                        waiting += 1;
                        stack.push(*d);
                    }
                    _ => waiting += 1,
                }
            }
            let task = self.task_mut(t);
            task.waiting_on = waiting;
            task.state = State::Waiting;
            self.note(t);
            if waiting == 0 {
                self.inputs_done(t);
            }
        }
        self.recycle(stack);
    }

    /// All inputs finished: fail with the first failed input, or become ready.
    fn inputs_done(&mut self, t: Tid) {
        let first_failed = self.task(t).deps.iter().find_map(|d| match &self.task(*d).state {
            State::Erred(e) => Some(Arc::clone(e)),
            _ => None,
        });
        match first_failed {
            Some(e) => {
                self.set_finished(t, State::Erred(e));
                self.notify_wanters(t);
                self.propagate_failure(t);
                self.release_inputs(t);
                self.maybe_forget(t);
            }
            None => self.make_ready(t),
        }
    }

    fn make_ready(&mut self, t: Tid) {
        if !self.can_ever_run(t) {
            self.task_mut(t).state = State::NoWorker;
            self.note(t);
            self.no_worker.push(t);
            return;
        }
        self.task_mut(t).state = State::Ready;
        self.note(t);
        let prio = self.task(t).prio;
        self.ready.push(Reverse((prio, t)));
    }

    // ----- placement ------------------------------------------------------------------------

    fn eligible(&self, t: Tid, w: &Worker) -> bool {
        let Some(r) = &self.task(t).restrictions else { return true };
        let names_ok = r.workers.is_empty()
            || r.workers.iter().any(|n| **n == *w.spec.name || **n == *w.spec.address)
            || (r.allow_other_workers && !self.workers.values().any(|o| self.named(r, o)));
        let resources_ok =
            r.resources.iter().all(|(n, a)| w.spec.resources.iter().any(|(wn, wa)| wn == n && *wa >= *a));
        names_ok && resources_ok
    }

    fn named(&self, r: &Restrictions, w: &Worker) -> bool {
        r.workers.iter().any(|n| **n == *w.spec.name || **n == *w.spec.address)
    }

    fn can_ever_run(&self, t: Tid) -> bool {
        self.workers.values().any(|w| self.eligible(t, w))
    }

    fn limit(&self, w: &Worker) -> usize {
        let threads = f64::from(w.spec.nthreads.max(1));
        let per_thread = if w.avg_duration_us > 0.0 {
            (self.cfg.target_busy_us / w.avg_duration_us).max(self.cfg.saturation)
        } else {
            self.cfg.saturation
        };
        let cap = self.cfg.max_in_flight_per_thread as f64 * threads;
        (threads * per_thread).ceil().clamp(1.0, cap) as usize
    }

    fn has_slot(&self, w: &Worker) -> bool {
        !w.retiring && !w.paused && w.load() < self.limit(w)
    }

    fn resources_free(t: &Task<P>, w: &Worker) -> bool {
        t.restrictions
            .as_ref()
            .is_none_or(|r| r.resources.iter().all(|(n, a)| w.available.iter().any(|(wn, wa)| wn == n && *wa >= *a)))
    }

    /// Bytes of `t`'s inputs that worker `wid` would have to fetch.
    fn missing_bytes(&self, t: Tid, wid: WorkerId) -> u64 {
        self.missing(t, wid).1
    }

    /// Inputs of `t` that worker `wid` would have to fetch: (how many, total bytes).
    fn missing(&self, t: Tid, wid: WorkerId) -> (u32, u64) {
        let (mut count, mut bytes) = (0u32, 0u64);
        for d in &self.task(t).deps {
            let dep = self.task(*d);
            if let State::Memory { who_has } = &dep.state {
                if !who_has.contains(&wid) {
                    count += 1;
                    bytes += dep.nbytes;
                }
            }
        }
        (count, bytes)
    }

    /// Estimated wait (µs) before a task sent to `w` now would start.
    fn wait_us(&self, w: &Worker) -> f64 {
        let avg = if w.avg_duration_us > 0.0 { w.avg_duration_us } else { self.cfg.unknown_duration_us };
        w.load() as f64 / f64::from(w.spec.nthreads.max(1)) * avg
    }

    /// Estimated cost (µs) of running `t` on `w`: fetching missing inputs (a round-trip each,
    /// plus their bytes) and queueing.
    fn cost(&self, t: Tid, wid: WorkerId, w: &Worker) -> f64 {
        let (count, bytes) = self.missing(t, wid);
        f64::from(count) * self.cfg.transfer_latency_us
            + bytes as f64 / self.cfg.bandwidth_bytes_per_us
            + self.wait_us(w)
    }

    /// Assigns ready tasks to workers with free slots, best priority first.
    fn schedule(&mut self) {
        let mut skipped: Vec<Reverse<(Prio, Tid)>> = Vec::new();
        loop {
            if !self.workers.values().any(|w| self.has_slot(w)) {
                break;
            }
            let Some(Reverse((prio, t))) = self.ready.pop() else { break };
            if !self.exists(t) || !matches!(self.task(t).state, State::Ready) || self.task(t).prio != prio {
                continue; // stale heap entry
            }
            let task = self.task(t);
            let is_root = task.deps.is_empty();
            let mut best: Option<(f64, WorkerId)> = None;
            let mut sticky: Option<(f64, WorkerId)> = None;
            for (wid, w) in &self.workers {
                if !self.has_slot(w) || !self.eligible(t, w) || !Self::resources_free(task, w) {
                    continue;
                }
                let c = self.cost(t, *wid, w);
                if best.is_none_or(|(bc, _)| c < bc) {
                    best = Some((c, *wid));
                }
                if is_root && self.last_root == Some(*wid) {
                    sticky = Some((c, *wid));
                }
            }
            // Root tasks next to each other in priority order usually feed the same
            // dependents (the leaves of a reduction): keep giving them to the same worker
            // while it is not behind the best one by more than a transfer would cost, so
            // their dependents find their inputs in place instead of fetching one of two.
            if let (Some((sc, sw)), Some((bc, _))) = (sticky, best) {
                if sc <= bc + self.cfg.transfer_latency_us {
                    best = Some((sc, sw));
                }
            }
            match best {
                Some((_, wid)) => {
                    if is_root {
                        self.last_root = Some(wid);
                    }
                    self.assign(t, wid);
                }
                None if !self.can_ever_run(t) => {
                    self.task_mut(t).state = State::NoWorker;
                    self.note(t);
                    self.no_worker.push(t);
                }
                None => skipped.push(Reverse((prio, t))),
            }
        }
        let nothing_queued = self.ready.is_empty() && skipped.is_empty();
        self.ready.extend(skipped);
        if nothing_queued {
            self.steal();
        }
    }

    /// Work stealing: when a worker has idle threads and nothing is queued, ask busy workers to
    /// give back tasks they hold but have not started — only slow ones (a round-trip must be
    /// worth it), only unrestricted ones, and only if their inputs are cheap to move. The
    /// victim answers `TaskDropped` and the task is placed again; a task already running is
    /// simply not given back.
    fn steal(&mut self) {
        let idle: Vec<(WorkerId, usize)> = self
            .workers
            .iter()
            .filter(|(_, w)| !w.retiring && !w.paused && w.load() < w.spec.nthreads as usize)
            .map(|(id, w)| (*id, w.spec.nthreads as usize - w.load()))
            .collect();
        for (thief, free_threads) in idle {
            for _ in 0..free_threads {
                let Some((victim, t)) = self.steal_candidate(thief) else { return };
                self.task_mut(t).steal_requested = true;
                let key = self.task(t).key.clone();
                self.out.push(Command::Steal { worker: victim, key });
            }
        }
    }

    fn steal_candidate(&self, thief: WorkerId) -> Option<(WorkerId, Tid)> {
        let thief_w = self.workers.get(&thief)?;
        let mut best: Option<(Prio, WorkerId, Tid)> = None;
        for (vid, v) in &self.workers {
            let surplus = v.load().saturating_sub(v.spec.nthreads as usize);
            // Unknown durations (nothing finished there yet) count as slow: first tasks are
            // often the long ones, and waiting to learn would waste the idle worker.
            let known_fast = v.avg_duration_us > 0.0 && v.avg_duration_us < self.cfg.steal_min_duration_us;
            if *vid == thief || surplus == 0 || known_fast {
                continue;
            }
            for &t in &v.processing {
                let task = self.task(t);
                if !matches!(task.state, State::Processing { on } if on == *vid)
                    || task.steal_requested
                    || task.restrictions.is_some()
                    || !self.eligible(t, thief_w)
                {
                    continue;
                }
                let bytes = self.missing_bytes(t, thief);
                if bytes > self.cfg.steal_max_input_bytes {
                    continue;
                }
                // The victim runs its lowest-priority task last: that one is the least likely
                // to have started.
                if best.is_none_or(|(p, _, bt)| (task.prio, t) > (p, bt)) {
                    best = Some((task.prio, *vid, t));
                }
            }
        }
        best.map(|(_, v, t)| (v, t))
    }

    fn assign(&mut self, t: Tid, wid: WorkerId) {
        let key = self.task(t).key.clone();
        let inputs: Vec<(Key, Holders)> = self
            .task(t)
            .deps
            .iter()
            .map(|d| {
                let dep = self.task(*d);
                let holders = match &dep.state {
                    State::Memory { who_has } => who_has.clone(),
                    _ => Holders::new(),
                };
                (dep.key.clone(), holders)
            })
            .collect();
        let Self { tasks, workers, .. } = self;
        let task = tasks[t.0 as usize].as_mut().expect("invariant: live task id");
        let w = workers.get_mut(&wid).expect("invariant: chosen worker exists");
        w.adjust_available(task.resources(), -1.0);
        w.processing.insert(t);
        task.state = State::Processing { on: wid };
        let prio = task.prio;
        let payload = task.payload.clone();
        let ticket = Ticket { slot: t.0, serial: task.serial };
        self.note(t);
        if let Some(payload) = payload {
            self.out.push(Command::Compute { worker: wid, key, payload, inputs, prio, ticket });
        }
    }

    /// Ends a worker's accounting for its report on `key` (with `ticket`, if it echoed one):
    /// the task the report is about, if that task was processing there ([`Self::reported`],
    /// then [`Self::unassign`]).
    fn take_report(&mut self, wid: WorkerId, key: &Key, ticket: Option<Ticket>) -> Option<Tid> {
        match self.take_report_of(wid, key, ticket) {
            Report::Assigned(t) => Some(t),
            Report::Orphan | Report::Unasked => None,
        }
    }

    /// [`Self::take_report`], telling apart a report on an assignment that was cancelled.
    fn take_report_of(&mut self, wid: WorkerId, key: &Key, ticket: Option<Ticket>) -> Report {
        let t = self.reported(wid, key, ticket);
        self.unassign(wid, t, key, ticket)
    }

    /// The task a worker's report on `key` (with `ticket`, if it echoed one) is about, if that
    /// task is processing there; the key is hashed only without a ticket.
    fn reported(&self, wid: WorkerId, key: &Key, ticket: Option<Ticket>) -> Option<Tid> {
        let t = match ticket {
            Some(tk) => Some(Tid(tk.slot)).filter(|t| self.exists(*t) && self.task(*t).serial == tk.serial)?,
            None => self.by_key.get(key).copied()?,
        };
        matches!(self.task(t).state, State::Processing { on } if on == wid).then_some(t)
    }

    /// Ends a worker's accounting for a report on `key` (with `ticket`, if echoed) about task
    /// `t` (from [`Self::reported`]); says what the report is about. A report about a task
    /// forgotten while it ran releases that orphan's slot: the one its ticket names, or
    /// without a ticket the oldest of that key.
    fn unassign(&mut self, wid: WorkerId, t: Option<Tid>, key: &Key, ticket: Option<Ticket>) -> Report {
        let Self { tasks, workers, .. } = self;
        let Some(w) = workers.get_mut(&wid) else { return Report::Unasked };
        if let Some(t) = t {
            if w.processing.remove(&t) {
                let task = tasks[t.0 as usize].as_ref().expect("invariant: live task id");
                w.adjust_available(task.resources(), 1.0);
                return Report::Assigned(t);
            }
        }
        let orphan = w.orphans.iter().position(|o| match ticket {
            Some(tk) => o.serial == tk.serial,
            None => o.key == *key,
        });
        let Some(i) = orphan else { return Report::Unasked };
        let Orphan { resources, .. } = w.orphans.remove(i);
        w.adjust_available(&resources, 1.0);
        Report::Orphan
    }

    fn scattered(&mut self, client: ClientId, items: Vec<(Key, u64, Vec<WorkerId>)>) {
        for (key, nbytes, holders) in items {
            let holders: Holders = holders.into_iter().filter(|w| self.workers.contains_key(w)).collect();
            let t = match self.by_key.get(&key).copied() {
                Some(t) => t,
                None => self.alloc(Task {
                    key: key.clone(),
                    payload: None,
                    deps: Vec::new(),
                    dependents: Vec::new(),
                    state: State::Released,
                    prio: (0, 0, 0),
                    restrictions: None,
                    wanted_by: Vec::new(),
                    waiting_on: 0,
                    consumers: 0,
                    nbytes,
                    input_failures: 0,
                    steal_requested: false,
                    held: 0,
                    deaths: None,
                    serial: 0,
                    // Data, not work: not part of the client's progress.
                    owner: client,
                    counted: true,
                    noted: (0, 0),
                }),
            };
            if !self.task(t).wanted_by.contains(&client) {
                self.task_mut(t).wanted_by.push(client);
            }
            for h in &holders {
                self.note_held(*h, t);
            }
            match &mut self.task_mut(t).state {
                State::Memory { who_has } => {
                    for h in holders {
                        if !who_has.contains(&h) {
                            who_has.push(h);
                        }
                    }
                }
                State::Released if !holders.is_empty() => {
                    self.task_mut(t).nbytes = nbytes;
                    self.task_mut(t).state = State::Memory { who_has: holders };
                    self.note(t);
                    // A task registered earlier counts as done for its owner's progress.
                    self.count_finished(t);
                    // Dependents waiting for it (a recomputation) can go on.
                    for d in self.task(t).dependents.clone() {
                        if matches!(self.task(d).state, State::Waiting) {
                            self.task_mut(d).waiting_on -= 1;
                            if self.task(d).waiting_on == 0 {
                                self.inputs_done(d);
                            }
                        }
                    }
                }
                _ => {}
            }
            match self.task(t).state {
                State::Memory { .. } | State::Erred(_) => self.out.extend(self.status_for(t, client)),
                _ => {
                    // Every holder left before the scatter was registered.
                    self.compute(t);
                }
            }
        }
    }

    // ----- results --------------------------------------------------------------------------

    /// Moves a pending task into a finished state, updating its inputs' consumer counts.
    fn set_finished(&mut self, t: Tid, state: State) {
        let was_pending = self.task(t).state.pending();
        let done = matches!(state, State::Memory { .. } | State::Erred(_));
        self.task_mut(t).state = state;
        self.note(t);
        if done {
            self.count_finished(t);
        }
        if was_pending {
            let deps = self.neighbours(t, false);
            for &d in &deps {
                let dep = self.task_mut(d);
                dep.consumers = dep.consumers.saturating_sub(1);
            }
            self.recycle(deps);
        }
    }

    fn finished(&mut self, wid: WorkerId, key: &Key, ticket: Option<Ticket>, nbytes: u64, duration_us: u64) {
        let report = self.take_report_of(wid, key, ticket);
        if let Some(w) = self.workers.get_mut(&wid) {
            // Count at least 1 µs, so instant tasks still raise the in-flight limit.
            let d = duration_us.max(1) as f64;
            w.avg_duration_us = if w.avg_duration_us == 0.0 { d } else { 0.9 * w.avg_duration_us + 0.1 * d };
        }
        let t = match report {
            Report::Assigned(t) => t,
            Report::Orphan => {
                // Cancelled while it ran: the worker was told to free it, and drops it (or
                // did already, when it ran the task at once). It is not adopted, even if the
                // key is in memory elsewhere by now; the `Free` is repeated in case the result
                // landed after it — unless this worker runs or holds the key anew.
                let anew = self.by_key.get(key).is_some_and(|t| match &self.task(*t).state {
                    State::Processing { on } => *on == wid,
                    State::Memory { who_has } => who_has.contains(&wid),
                    _ => false,
                });
                if !anew {
                    self.out.push(Command::Free { worker: wid, key: key.clone() });
                }
                return;
            }
            Report::Unasked => {
                // A result nobody asked for (a duplicate): keep it only if useful.
                match self.by_key.get(key).copied() {
                    Some(t) if matches!(self.task(t).state, State::Memory { .. }) && self.needed(t) => {
                        if let State::Memory { who_has } = &mut self.task_mut(t).state {
                            if !who_has.contains(&wid) {
                                who_has.push(wid);
                            }
                        }
                        self.note_held(wid, t);
                    }
                    _ => self.out.push(Command::Free { worker: wid, key: key.clone() }),
                }
                return;
            }
        };
        self.task_mut(t).nbytes = nbytes;
        self.set_finished(t, State::Memory { who_has: smallvec::smallvec![wid] });
        // The change to memory carries the run time.
        if let Some(tr) = self.last_record(t) {
            *tr = tr.with_duration_us(duration_us);
        }
        self.note_held(wid, t);
        self.notify_wanters(t);
        let dependents = self.neighbours(t, true);
        for &d in &dependents {
            if matches!(self.task(d).state, State::Waiting) {
                let dep = self.task_mut(d);
                dep.waiting_on -= 1;
                if dep.waiting_on == 0 {
                    self.inputs_done(d);
                }
            }
        }
        self.recycle(dependents);
        self.release_inputs(t);
        self.maybe_release(t);
    }

    fn failed(&mut self, wid: WorkerId, key: &Key, ticket: Option<Ticket>, error: Arc<TaskError>) {
        let Some(t) = self.take_report(wid, key, ticket) else { return };
        self.set_finished(t, State::Erred(error));
        // The change to erred ended a run on `wid` (time unknown).
        if let Some(tr) = self.last_record(t) {
            tr.set_worker(Some(wid));
            *tr = tr.with_duration_us(0);
        }
        self.notify_wanters(t);
        self.propagate_failure(t);
        self.release_inputs(t);
        self.maybe_forget(t);
    }

    fn inputs_missing(&mut self, wid: WorkerId, key: &Key, ticket: Option<Ticket>, missing: Vec<(Key, WorkerId)>) {
        // The holders that failed to deliver do not have the value (any more): believe them,
        // so the next attempt goes elsewhere or the value is recomputed. Holders that have left
        // meanwhile are not named (the shell knows no such worker): their departure explains
        // the failure, and was handled already.
        let mut corrected = missing.is_empty();
        for (input, holder) in missing {
            let Some(d) = self.by_key.get(&input).copied() else { continue };
            let State::Memory { who_has } = &mut self.task_mut(d).state else { continue };
            if !who_has.contains(&holder) {
                continue;
            }
            who_has.retain(|w| *w != holder);
            corrected = true;
            if who_has.is_empty() {
                self.lose(d);
            }
        }
        let Some(t) = self.take_report(wid, key, ticket) else { return };
        if !corrected {
            self.task_mut(t).input_failures += 1;
        }
        if self.task(t).input_failures > self.cfg.max_input_failures {
            let err = Arc::new(TaskError {
                key: key.clone(),
                message: format!("inputs could not be fetched after {} attempts", self.cfg.max_input_failures),
                kind: FailureKind::Unrunnable,
                attempts: self.task(t).input_failures,
            });
            self.set_finished(t, State::Erred(err));
            self.notify_wanters(t);
            self.propagate_failure(t);
            self.release_inputs(t);
            self.maybe_forget(t);
        } else {
            self.requeue(t);
        }
    }

    /// Tells the clients holding `t` that its value is gone (and being recomputed).
    fn tell_lost(&mut self, t: Tid) {
        let task = self.task(t);
        let notes: Vec<Command<P>> = task
            .wanted_by
            .iter()
            .filter(|c| **c != FIRE_AND_FORGET)
            .map(|c| Command::KeyLost { client: *c, key: task.key.clone() })
            .collect();
        self.out.extend(notes);
    }

    /// A value held by no worker any more: dependents wait for it again, clients holding it
    /// are told, and it is recomputed if still needed (scattered data fails as lost).
    fn lose(&mut self, t: Tid) {
        self.task_mut(t).state = State::Released;
        self.note(t);
        self.tell_lost(t);
        let dependents = self.neighbours(t, true);
        for &d in &dependents {
            match self.task(d).state {
                State::Waiting => self.task_mut(d).waiting_on += 1,
                State::Ready | State::NoWorker => self.requeue(d),
                _ => {}
            }
        }
        self.recycle(dependents);
        if self.needed(t) {
            self.compute(t);
        } else {
            self.maybe_forget(t);
        }
    }

    /// A task taken back from a worker: queue it again, or wait for inputs that were lost.
    fn requeue(&mut self, t: Tid) {
        self.task_mut(t).steal_requested = false;
        let unfinished = self
            .task(t)
            .deps
            .iter()
            .filter(|d| !matches!(self.task(**d).state, State::Memory { .. } | State::Erred(_)))
            .count() as u32;
        if unfinished == 0 {
            // Inputs may have failed meanwhile (e.g. lost scattered data): inherit that.
            self.inputs_done(t);
        } else {
            let task = self.task_mut(t);
            task.state = State::Waiting;
            task.waiting_on = unfinished;
            self.note(t);
        }
    }

    /// A worker dropped a task it had not started (after a `Free`): release its slot.
    fn dropped(&mut self, wid: WorkerId, key: &Key, ticket: Option<Ticket>) {
        if let Some(t) = self.take_report(wid, key, ticket) {
            self.requeue(t);
        }
    }

    /// Waiting dependents of a failed task count it as finished.
    fn propagate_failure(&mut self, t: Tid) {
        for d in self.task(t).dependents.clone() {
            if matches!(self.task(d).state, State::Waiting) {
                let dep = self.task_mut(d);
                dep.waiting_on -= 1;
                if dep.waiting_on == 0 {
                    self.inputs_done(d);
                }
            }
        }
    }

    // ----- releasing and forgetting ---------------------------------------------------------

    fn needed(&self, t: Tid) -> bool {
        let task = self.task(t);
        !task.wanted_by.is_empty() || task.consumers > 0
    }

    /// After `t` finished, its inputs may no longer be needed.
    fn release_inputs(&mut self, t: Tid) {
        let deps = self.neighbours(t, false);
        for &d in &deps {
            self.maybe_release(d);
        }
        self.recycle(deps);
    }

    /// Frees a finished task's data if nobody needs it; forgets it if nothing refers to it.
    fn maybe_release(&mut self, t: Tid) {
        if !self.exists(t) || self.needed(t) {
            return;
        }
        if let State::Memory { who_has } = &self.task(t).state {
            let key = self.task(t).key.clone();
            for w in who_has.clone() {
                self.out.push(Command::Free { worker: w, key: key.clone() });
            }
            self.task_mut(t).state = State::Released;
            self.note(t);
        }
        self.maybe_forget(t);
    }

    /// Schedules a check whether `t` can be forgotten, at the end of the current event.
    fn maybe_forget(&mut self, t: Tid) {
        self.to_forget.push(t);
    }

    /// Removes a task nobody wants and nothing depends on; its inputs are then released and
    /// checked for forgetting in turn (through `to_forget`).
    fn forget_now(&mut self, t: Tid) {
        if !self.exists(t) {
            return;
        }
        let task = self.task(t);
        if !task.wanted_by.is_empty() || !task.dependents.is_empty() || task.held > 0 {
            return;
        }
        // Not wanted and nothing depends on it: stop it if pending, free its data.
        let running_on = match task.state {
            State::Processing { on } => Some(on),
            _ => None,
        };
        if task.state.pending() {
            self.set_finished(t, State::Released);
        }
        let task = self.tasks[t.0 as usize].take().expect("invariant: checked above");
        if !task.counted {
            // It will not run (cancelled, or submitted but never needed).
            if let Some(c) = self.clients.get_mut(&task.owner) {
                c.registered = c.registered.saturating_sub(1);
                Self::settle_progress(&mut self.out, task.owner, c);
            }
        }
        if self.cfg.record_transitions {
            let this_event = Self::record_in(&mut self.transitions, self.event_no, task.serial, task.noted);
            if !this_event.is_some_and(|tr| tr.extend(Phase::Forgotten, None)) {
                self.transitions.push(Transition::new(task.serial, None, Phase::Forgotten, None));
            }
        }
        self.free_slots.push(t.0);
        self.acquiring.remove(&t);
        self.unmovable.remove(&t);
        self.by_key.remove(&task.key);
        if let State::Memory { who_has } = &task.state {
            for w in who_has {
                self.out.push(Command::Free { worker: *w, key: task.key.clone() });
            }
        }
        if let Some(on) = running_on {
            // The worker keeps its accounting until it reports; tell it to drop the result.
            if let Some(w) = self.workers.get_mut(&on) {
                if w.processing.remove(&t) {
                    let resources = task.resources().to_vec();
                    w.orphans.push(Orphan { serial: task.serial, key: task.key.clone(), resources });
                }
            }
            self.out.push(Command::Free { worker: on, key: task.key.clone() });
        }
        for d in &task.deps {
            if self.exists(*d) {
                self.task_mut(*d).dependents.retain(|x| *x != t);
                self.maybe_release(*d);
            }
        }
    }

    fn unwant(&mut self, t: Tid, client: ClientId) {
        if !self.exists(t) {
            return;
        }
        self.task_mut(t).wanted_by.retain(|c| *c != client);
        if self.needed(t) {
            return;
        }
        if self.task(t).state.pending() && self.task(t).dependents.is_empty() {
            self.maybe_forget(t);
        } else {
            self.maybe_release(t);
        }
    }

    // ----- workers leaving ------------------------------------------------------------------

    fn remove_worker(&mut self, wid: WorkerId, cause: LossCause) {
        let Some(w) = self.workers.remove(&wid) else { return };
        // Copies in flight to or from it will not arrive: retirements ask again.
        self.acquiring.clear();
        self.unmovable.clear();
        if self.departures.len() == MAX_DEPARTURES {
            self.departures.pop_front();
        }
        let departure =
            Departure { name: Arc::clone(&w.spec.name), address: Arc::clone(&w.spec.address), cause: cause.clone() };
        self.departures.push_back(departure);
        // Values held only there are lost; clients holding values that live on elsewhere (a
        // retired worker's results, or replicas) learn where they are now.
        let mut lost = Vec::new();
        let mut moved = Vec::new();
        for t in self.live_ids().collect::<Vec<_>>() {
            if let State::Memory { who_has } = &mut self.task_mut(t).state {
                let before = who_has.len();
                who_has.retain(|x| *x != wid);
                if who_has.is_empty() {
                    lost.push(t);
                } else if who_has.len() < before {
                    moved.push(t);
                }
            }
        }
        for t in moved {
            self.notify_wanters(t);
        }
        for t in &lost {
            self.task_mut(*t).state = State::Released;
            self.note(*t);
            self.tell_lost(*t);
            // Dependents that were waiting for inputs now wait for this one again.
            for d in self.task(*t).dependents.clone() {
                if matches!(self.task(d).state, State::Waiting) {
                    self.task_mut(d).waiting_on += 1;
                }
            }
        }
        // Tasks running there go back to the queue (or wait for lost inputs); so do queued
        // tasks whose inputs were lost.
        let mut back: Vec<Tid> = w.processing.iter().copied().collect();
        // The tasks it was most likely running when it died: as many as it has threads, in the
        // order it runs them (priority). Each records the death; one death more than allowed
        // fails the task, which is probably what killed the workers.
        back.sort_unstable_by_key(|t| (self.task(*t).prio, *t));
        let mut failed = Vec::new();
        // A worker that left on purpose (a goodbye) is no evidence against its tasks.
        let involuntary = !matches!(cause, LossCause::Said(_));
        let suspects = if involuntary { w.spec.nthreads.max(1) as usize } else { 0 };
        for &t in back.iter().take(suspects) {
            let deaths = self.task_mut(t).deaths.get_or_insert_with(Box::default);
            deaths.push((Arc::clone(&w.spec.name), cause.clone()));
            if deaths.len() > self.cfg.allowed_failures as usize {
                failed.push(t);
            }
        }
        back.retain(|t| !failed.contains(t));
        for t in failed {
            self.killed_worker(t);
        }
        back.extend(self.live_ids().filter(|t| {
            matches!(self.task(*t).state, State::Ready | State::NoWorker)
                && self.task(*t).deps.iter().any(|d| matches!(self.task(*d).state, State::Released))
        }));
        back.sort_unstable();
        for t in back {
            self.requeue(t);
        }
        // Lost values still needed are recomputed (with any released inputs they need).
        for t in lost {
            if self.needed(t) {
                self.compute(t);
            } else {
                self.maybe_forget(t);
            }
        }
        // Queued tasks that only this worker could run cannot run now.
        let stuck: Vec<Tid> =
            self.live_ids().filter(|t| matches!(self.task(*t).state, State::Ready) && !self.can_ever_run(*t)).collect();
        for t in stuck {
            self.task_mut(t).state = State::NoWorker;
            self.note(t);
            self.no_worker.push(t);
        }
    }

    /// `t` was running on more workers that died than allowed: it fails, naming them.
    fn killed_worker(&mut self, t: Tid) {
        let task = self.task(t);
        let deaths = task.deaths.as_deref().map(Vec::as_slice).unwrap_or_default();
        let list: Vec<String> = deaths.iter().map(|(name, why)| format!("{name} ({why})")).collect();
        let err = Arc::new(TaskError {
            key: task.key.clone(),
            message: format!(
                "{} workers died while running it: {}; the task itself is the likely cause (allowed failures: {})",
                deaths.len(),
                list.join(", "),
                self.cfg.allowed_failures
            ),
            kind: FailureKind::KilledWorker,
            attempts: deaths.len() as u32,
        });
        self.set_finished(t, State::Erred(err));
        self.notify_wanters(t);
        self.propagate_failure(t);
        self.release_inputs(t);
        self.maybe_forget(t);
    }

    // ----- invariants -----------------------------------------------------------------------

    /// Checks every invariant of the state; returns a description of the first violation.
    ///
    /// # Errors
    /// The violated invariant, naming the task or worker.
    pub fn validate(&self) -> Result<(), String> {
        let fail = |m: String| Err(m);
        for (key, t) in &self.by_key {
            if !self.exists(*t) || &self.task(*t).key != key {
                return fail(format!("key map entry {key} points to a missing or different task"));
            }
        }
        let live = self.live_ids().count();
        if live != self.by_key.len() {
            return fail(format!("{live} live tasks but {} keys", self.by_key.len()));
        }
        for t in self.live_ids() {
            let task = self.task(t);
            let k = &task.key;
            for d in &task.deps {
                if !self.exists(*d) {
                    return fail(format!("{k}: input is forgotten"));
                }
                if !self.task(*d).dependents.contains(&t) {
                    return fail(format!("{k}: not listed as dependent of {}", self.task(*d).key));
                }
            }
            for d in &task.dependents {
                if !self.exists(*d) || !self.task(*d).deps.contains(&t) {
                    return fail(format!("{k}: dependent list is not symmetric"));
                }
            }
            let consumers = task.dependents.iter().filter(|d| self.task(**d).state.pending()).count() as u32;
            if consumers != task.consumers {
                return fail(format!("{k}: consumers {} but {consumers} pending dependents", task.consumers));
            }
            let finished = |d: &Tid| matches!(self.task(*d).state, State::Memory { .. } | State::Erred(_));
            match &task.state {
                State::Waiting => {
                    let unfinished = task.deps.iter().filter(|d| !finished(d)).count() as u32;
                    if unfinished != task.waiting_on || unfinished == 0 {
                        return fail(format!("{k}: waiting on {} but {unfinished} inputs unfinished", task.waiting_on));
                    }
                }
                State::Ready | State::NoWorker | State::Processing { .. } => {
                    // A processing task's input may be lost after it was assigned; the worker
                    // then reports it missing and the task waits for the recomputation.
                    let missing = task.deps.iter().find(|d| !matches!(self.task(**d).state, State::Memory { .. }));
                    if let (Some(d), false) = (missing, matches!(task.state, State::Processing { .. })) {
                        return fail(format!("{k}: runnable but input {} is not in memory", self.task(*d).key));
                    }
                    if let State::Processing { on } = task.state {
                        match self.workers.get(&on) {
                            Some(w) if w.processing.contains(&t) => {}
                            _ => return fail(format!("{k}: processing on a worker that does not know it")),
                        }
                    }
                }
                State::Memory { who_has } => {
                    if who_has.is_empty() || who_has.iter().any(|w| !self.workers.contains_key(w)) {
                        return fail(format!("{k}: in memory on no or unknown workers"));
                    }
                    let untracked = who_has
                        .iter()
                        .find(|w| self.workers.get(w).is_some_and(|w| w.retiring && !w.holds.contains(&t)));
                    if let Some(w) = untracked {
                        return fail(format!("{k}: held by retiring worker {w:?} without being in its list"));
                    }
                }
                State::Released | State::Erred(_) => {}
            }
            if task.wanted_by.is_empty() && task.dependents.is_empty() && task.held == 0 {
                return fail(format!("{k}: neither wanted nor depended upon, yet not forgotten"));
            }
        }
        let mut holds: FxHashMap<Tid, u32> = FxHashMap::default();
        for (client, (_, pending)) in &self.open_parts {
            for t in pending {
                if !self.exists(*t) {
                    return fail(format!("client {client:?}: an open submission holds a forgotten task"));
                }
                *holds.entry(*t).or_default() += 1;
            }
        }
        for t in self.live_ids() {
            let held = self.task(t).held;
            if holds.get(&t).copied().unwrap_or(0) != held {
                return fail(format!("{}: held {held} times, open submissions say otherwise", self.task(t).key));
            }
        }
        for (client, c) in &self.clients {
            if c.finished > c.registered {
                return fail(format!(
                    "client {client:?}: {} tasks finished of {} registered",
                    c.finished, c.registered
                ));
            }
        }
        for (wid, w) in &self.workers {
            for t in &w.processing {
                if !self.exists(*t) || !matches!(self.task(*t).state, State::Processing { on } if on == *wid) {
                    return fail(format!("worker {wid:?}: counts a task as processing there that is not"));
                }
            }
            for (n, a) in &w.spec.resources {
                let used: f64 = (w.processing.iter().flat_map(|t| self.task(*t).resources()))
                    .chain(w.orphans.iter().flat_map(|o| &o.resources))
                    .filter(|(pn, _)| pn == n)
                    .map(|(_, x)| x)
                    .sum();
                let free = w.available.iter().find(|(an, _)| an == n).map_or(0.0, |(_, x)| *x);
                if (a - used - free).abs() > 1e-9 || free < -1e-9 {
                    return fail(format!("worker {wid:?}: resource {n} accounting is off (free {free}, used {used})"));
                }
            }
        }
        Ok(())
    }
}

impl<P> fmt::Debug for Core<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Core").field("tasks", &self.by_key.len()).field("workers", &self.workers.len()).finish()
    }
}

#[cfg(test)]
mod free_slots_tests {
    use super::FreeSlots;

    fn pops(f: &mut FreeSlots, n: usize) -> Vec<u32> {
        (0..n).filter_map(|_| f.pop()).collect()
    }

    #[test]
    fn slots_freed_since_the_last_ordering_are_popped_lowest_first_after_it() {
        let mut f = FreeSlots::default();
        for s in [5, 1, 6, 0, 3, 2, 4] {
            f.push(s);
        }
        // Unordered: the last freed first.
        assert_eq!(f.pop(), Some(4));
        f.push(4);
        f.order();
        assert_eq!(pops(&mut f, 3), [0, 1, 2]);
        // Freed again in a scrambled order while older ordered slots wait below: only the new
        // ones are ordered, and they come first.
        for s in [2, 0, 1] {
            f.push(s);
        }
        f.order();
        assert_eq!(pops(&mut f, 5), [0, 1, 2, 3, 4]);
        // Without an ordering, a freed slot is reused at once.
        f.push(9);
        assert_eq!(pops(&mut f, 3), [9, 5, 6]);
        assert_eq!((f.pop(), f.len()), (None, 0));
    }

    #[test]
    fn popping_into_the_ordered_runs_keeps_later_frees_apart() {
        let mut f = FreeSlots::default();
        for s in [3, 1, 2] {
            f.push(s);
        }
        f.order();
        assert_eq!(pops(&mut f, 2), [1, 2]);
        // The run now holds only 3; 8 and 7 are new and get ordered on their own.
        f.push(8);
        f.push(7);
        f.order();
        assert_eq!(pops(&mut f, 3), [7, 8, 3]);
    }
}
