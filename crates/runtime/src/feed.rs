//! What the scheduler publishes for observers — the dashboard, the journal — and nothing else
//! they may read: task state changes with their cause (a finished run's time comes with its
//! change to memory), workers joining, leaving and reporting their memory.
//!
//! The scheduler's core records its state changes only when a feed is attached (one branch per
//! change otherwise). The shell copies the changes out of the core in batches of the core's
//! packed records, into buffers the observer gives back ([`Published`], [`Publisher`]): the
//! scheduler's thread copies 32 bytes per change and keeps its own buffers warm; the
//! observer's thread turns them into [`FeedEvent::Tasks`]. The events are plain serde types:
//! the journal is these events as JSON lines, and replaying it rebuilds exactly what the live
//! feed showed.

use rask_graph::Key;
use rask_scheduler_core::{Core, Transition};
use serde::{Deserialize, Serialize};
use std::sync::mpsc::{Receiver, SyncSender};

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
/// processing in one step, published as one change. Packed in two bytes exactly as the core
/// records it (so taking it over is a copy): the count in the low three bits, then three bits
/// per phase ([`Phase::code`]). Serialised as a list.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct Via(u16);

impl Via {
    /// Phases one change can pass through (the scheduler splits longer paths).
    pub const CAPACITY: usize = 4;

    /// No intermediate phase.
    pub const EMPTY: Via = Via(0);

    /// How many phases.
    #[must_use]
    pub fn len(&self) -> usize {
        usize::from(self.0 & 0b111).min(Self::CAPACITY)
    }

    /// Whether there are none (most changes).
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The phases, oldest first.
    pub fn iter(&self) -> impl Iterator<Item = Phase> + use<> {
        let v = *self;
        (0..v.len()).map(move |i| Phase::from_code((v.0 >> (3 * (i + 1))) as u8))
    }

    /// Its packed form (see [`Via`]).
    #[must_use]
    pub fn to_bits(self) -> u16 {
        self.0
    }

    /// The `Via` packed as `bits` (see [`Via`]); a count over [`Via::CAPACITY`] reads as the
    /// capacity, and bits past the phases it counts are dropped (so equal paths compare equal).
    #[must_use]
    pub fn from_bits(bits: u16) -> Via {
        let n = usize::from(bits & 0b111).min(Self::CAPACITY);
        let phases = bits & ((1u16 << (3 * (n + 1))) - 1) & !0b111;
        Via(phases | n as u16)
    }

    /// Up to [`Via::CAPACITY`] phases; `None` if there are more.
    #[must_use]
    pub fn from_phases(phases: impl IntoIterator<Item = Phase>) -> Option<Via> {
        let mut n = 0;
        let mut bits = 0u16;
        for p in phases {
            if n == Self::CAPACITY {
                return None;
            }
            n += 1;
            bits |= u16::from(p.code()) << (3 * n);
        }
        Some(Via(bits | n as u16))
    }
}

impl std::fmt::Debug for Via {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

impl Serialize for Via {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.iter())
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

// The scheduler's records fit in the published ones, packed alike.
const _: () = assert!(Via::CAPACITY == rask_scheduler_core::Via::CAPACITY);

impl From<rask_scheduler_core::Via> for Via {
    fn from(v: rask_scheduler_core::Via) -> Self {
        // The same layout, and the same phase codes (checked below).
        Via::from_bits(v.to_bits())
    }
}

// The phases are numbered alike here and in the scheduler's core.
const _: () = {
    use rask_scheduler_core::Phase as P;
    assert!(
        Phase::Released as u8 == P::Released as u8
            && Phase::Waiting as u8 == P::Waiting as u8
            && Phase::Queued as u8 == P::Queued as u8
            && Phase::NoWorker as u8 == P::NoWorker as u8
            && Phase::Processing as u8 == P::Processing as u8
            && Phase::Memory as u8 == P::Memory as u8
            && Phase::Erred as u8 == P::Erred as u8
            && Phase::Forgotten as u8 == P::Forgotten as u8
    );
};

impl Phase {
    /// Its position among the phases (three bits), as in the scheduler's records.
    #[must_use]
    pub fn code(self) -> u8 {
        self as u8
    }

    /// The phase `code` stands for (its low three bits).
    #[must_use]
    pub fn from_code(code: u8) -> Phase {
        Self::BY_CODE[usize::from(code & 0b111)]
    }

    /// The scheduler core's phase of the same name.
    fn to_core(self) -> rask_scheduler_core::Phase {
        use rask_scheduler_core::Phase as P;
        match self {
            Phase::Released => P::Released,
            Phase::Waiting => P::Waiting,
            Phase::Queued => P::Queued,
            Phase::NoWorker => P::NoWorker,
            Phase::Processing => P::Processing,
            Phase::Memory => P::Memory,
            Phase::Erred => P::Erred,
            Phase::Forgotten => P::Forgotten,
        }
    }

    /// Every phase, at the position of its code.
    const BY_CODE: [Phase; 8] = [
        Phase::Released,
        Phase::Waiting,
        Phase::Queued,
        Phase::NoWorker,
        Phase::Processing,
        Phase::Memory,
        Phase::Erred,
        Phase::Forgotten,
    ];
}

/// What the scheduler hands its observers (see [`FeedSender`]): a published event, or a batch
/// of its core's task changes in the core's packed records, with their keys as text. The
/// observer turns it into [`FeedEvent::Tasks`] on its own thread with
/// [`Published::into_events`], keys included, so the two threads never share a key's
/// reference count (an atomic on a cache line they would fight over).
#[derive(Debug)]
pub struct Published(Repr);

#[derive(Debug)]
enum Repr {
    Event(FeedEvent),
    Changes(RawChanges),
}

/// Task changes as the scheduler's core recorded them.
#[derive(Debug)]
struct RawChanges {
    /// The core's records, in order.
    records: Vec<Transition>,
    /// (index of the first record it caused, the cause, when), in order; each holds until the
    /// next one starts.
    causes: Vec<(u32, Cause, u64)>,
    /// The text the records' key spans index.
    keys: String,
    /// Where the emptied buffers go back to the scheduler, which copies the next changes into
    /// them: memory already mapped, no fresh pages and no regrowing.
    recycle: SyncSender<Buffers>,
}

/// A batch's buffers: records, causes and key text.
type Buffers = (Vec<Transition>, Vec<(u32, Cause, u64)>, String);

impl Published {
    /// Appends the events this stands for to `out`: itself, or for a batch of the core's
    /// changes one [`FeedEvent::Tasks`] per moment they happened at, every change in the
    /// published form with its own key (allocated on the calling thread).
    pub fn into_events(self, out: &mut Vec<FeedEvent>) {
        let mut batch: Option<(u64, Vec<TaskChange>)> = None;
        let event = self.visit(|at_us, change| {
            let change = change.to_change();
            match &mut batch {
                Some((at, changes)) if *at == at_us => changes.push(change),
                _ => {
                    if let Some((at_us, changes)) = batch.replace((at_us, vec![change])) {
                        out.push(FeedEvent::Tasks { at_us, changes });
                    }
                }
            }
        });
        if let Some((at_us, changes)) = batch {
            out.push(FeedEvent::Tasks { at_us, changes });
        }
        out.extend(event);
    }

    /// The event this is, if it is one; a batch of changes goes to `on_change` instead, each
    /// change with its time, in order, its key borrowed from the batch — without gathering
    /// them in a list or allocating per change (an observer that keeps keys its own way, and
    /// no journal, needs neither).
    pub fn visit(self, mut on_change: impl FnMut(u64, ChangeRef<'_>)) -> Option<FeedEvent> {
        self.visit_batch(|batch| {
            for run in batch.runs() {
                for change in run.changes() {
                    on_change(run.at_us, change);
                }
            }
        })
    }

    /// The event this is, if it is one; a batch of changes goes to `on_batch` instead, whole
    /// and borrowed: an observer that folds many changes per cause (the dashboard) deals with
    /// each cause and time once, and takes the changes in runs.
    pub fn visit_batch(self, on_batch: impl FnOnce(ChangeBatch<'_>)) -> Option<FeedEvent> {
        let raw = match self.0 {
            Repr::Event(e) => return Some(e),
            Repr::Changes(raw) => raw,
        };
        let RawChanges { mut records, mut causes, mut keys, recycle } = raw;
        // Every recorded change follows the event that caused it: the first cause starts at
        // the first change.
        debug_assert!(records.is_empty() || causes.first().is_some_and(|(start, ..)| *start == 0));
        on_batch(ChangeBatch::new(&records, &causes, &keys));
        // Back to the scheduler, emptied. Buffers grown past a few batches' size (long keys)
        // give the excess back rather than circulate it for the scheduler's lifetime; when the
        // scheduler has spares enough, they are dropped.
        records.clear();
        keys.clear();
        causes.clear();
        records.shrink_to(MAX_KEPT * FEED_CHUNK);
        keys.shrink_to(MAX_KEPT * KEY_BYTES * FEED_CHUNK);
        causes.shrink_to(MAX_KEPT * FEED_CHUNK);
        let _ = recycle.try_send((records, causes, keys));
        None
    }
}

/// A published batch of task changes, borrowed (see [`Published::visit_batch`]).
#[derive(Clone, Copy, Debug)]
pub struct ChangeBatch<'a> {
    records: &'a [Transition],
    causes: &'a [(u32, Cause, u64)],
    keys: &'a str,
}

impl<'a> ChangeBatch<'a> {
    /// A batch of `records` whose key spans index `keys`; `causes` as the scheduler's
    /// publisher files them: (index of the first record it caused, the cause, when), in
    /// order, the first at 0.
    fn new(records: &'a [Transition], causes: &'a [(u32, Cause, u64)], keys: &'a str) -> Self {
        debug_assert!(causes.windows(2).all(|w| w[0].0 <= w[1].0), "causes in the order of their changes");
        ChangeBatch { records, causes, keys }
    }

    /// The changes in runs that share a cause and a time, in order.
    pub fn runs(&self) -> impl Iterator<Item = ChangeRun<'a>> + use<'a> {
        let ChangeBatch { records, causes, keys } = *self;
        // A cause holds from its start to the next one's, the last to the batch's end. The
        // first holds from the batch's start (it always starts there: see `Publisher`); a
        // batch with none (not one the scheduler publishes) files its changes under a tick.
        let untold = causes.is_empty().then_some(ChangeRun { at_us: 0, cause: Cause::Tick, records, keys });
        let told = causes.iter().enumerate().map(move |(i, &(_, cause, at_us))| {
            let start = if i == 0 { 0 } else { (causes[i].0 as usize).min(records.len()) };
            let end = causes.get(i + 1).map_or(records.len(), |&(next, ..)| next as usize).clamp(start, records.len());
            let records = records.get(start..end).unwrap_or_default();
            ChangeRun { at_us, cause, records, keys }
        });
        untold.into_iter().chain(told)
    }
}

/// Task changes gathered into one batch in the form the scheduler publishes them (the core's
/// records, their keys as text, their causes by where they start), for tools and tests that
/// feed an observer without a scheduler (`examples/model_apply.rs` in the dashboard crate).
#[derive(Default, Debug)]
pub struct BatchBuilder {
    records: Vec<Transition>,
    causes: Vec<(u32, Cause, u64)>,
    keys: String,
}

impl BatchBuilder {
    /// Adds a change made at `at_us`, as the core records it: one record for the phases it
    /// passed through and its new one, the worker of the last.
    pub fn push(&mut self, at_us: u64, c: ChangeRef<'_>) {
        file_cause(&mut self.causes, self.records.len(), c.cause, at_us);
        let span = c.key.map(|k| {
            let start = self.keys.len() as u32;
            self.keys.push_str(k);
            (start, self.keys.len() as u32)
        });
        let worker = c.worker.map(rask_scheduler_core::WorkerId);
        let mut path = c.via.iter().chain([c.phase]);
        let first = path.next().map_or(rask_scheduler_core::Phase::Released, Phase::to_core);
        let mut t = Transition::new(c.task, span, first, if c.via.is_empty() { worker } else { None });
        for p in path {
            let extended = t.extend(p.to_core(), worker.filter(|_| p == c.phase));
            debug_assert!(extended, "a published path fits a record");
        }
        self.records.push(match c.duration_us {
            Some(d) => t.with_duration_us(d),
            None => t,
        });
    }

    /// How many changes it holds.
    #[must_use]
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// Whether it holds none.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// The batch, as an observer is lent it (see [`Published::visit_batch`]).
    #[must_use]
    pub fn batch(&self) -> ChangeBatch<'_> {
        ChangeBatch::new(&self.records, &self.causes, &self.keys)
    }

    /// Empties it for the next batch (which notes its first change's cause afresh, as the
    /// scheduler's batches do).
    pub fn clear(&mut self) {
        self.records.clear();
        self.causes.clear();
        self.keys.clear();
    }
}

/// Notes that the changes from the `at`th on were made at `at_us` for `cause`, unless the
/// cause in effect is that one already: how a batch's causes are filed (see [`ChangeBatch`]).
fn file_cause(causes: &mut Vec<(u32, Cause, u64)>, at: usize, cause: Cause, at_us: u64) {
    if causes.last().is_none_or(|&(_, c, t)| c != cause || t != at_us) {
        causes.push((at as u32, cause, at_us));
    }
}

/// Changes of one batch that share a cause and a time (see [`ChangeBatch::runs`]).
#[derive(Clone, Copy, Debug)]
pub struct ChangeRun<'a> {
    /// When they happened (µs since the scheduler started).
    pub at_us: u64,
    /// What caused them.
    pub cause: Cause,
    records: &'a [Transition],
    keys: &'a str,
}

impl<'a> ChangeRun<'a> {
    /// The changes, in order, their keys borrowed from the batch.
    pub fn changes(&self) -> impl ExactSizeIterator<Item = ChangeRef<'a>> + use<'a> {
        let ChangeRun { cause, records, keys, .. } = *self;
        records.iter().map(move |t| ChangeRef {
            task: t.task(),
            key: t.key().and_then(|(s, e)| keys.get(s as usize..e as usize)),
            via: t.via().into(),
            phase: t.phase().into(),
            worker: t.worker().map(|w| w.0),
            duration_us: t.duration_us(),
            cause,
        })
    }
}

impl From<FeedEvent> for Published {
    fn from(e: FeedEvent) -> Self {
        Published(Repr::Event(e))
    }
}

/// The scheduler shell's side of the feed (public for tools that drive a core directly, such
/// as `examples/feed_cost.rs`). The core keeps recording changes across turns;
/// they leave it in batches — once it holds [`FEED_CHUNK`] after an event, before any other
/// published event, and when sending — and go to the observer every [`FEED_BATCH_US`]: the
/// observer's thread wakes (a system call on the scheduler's) a few hundred times a second at
/// most, whatever the task rate.
///
/// Changes are copied out of the core, [`FEED_CHUNK`] at a time, into buffers the observer
/// gave back (new ones when none is spare, as after an event that changed a whole graph); the
/// core's own buffers stay with it. Copying and sending cost the scheduler's thread under a
/// point of its time in the dashboard benchmark. Handing the core's buffers over instead, and
/// the core new ones, cost it about as much as recording did: one event that changes a whole
/// graph (its intake, its release) recorded into freshly allocated megabytes, faulted in page
/// by page, and the next one did again.
pub struct Publisher {
    tx: FeedSender,
    /// Emptied buffers coming back from the observer, and where it sends them.
    spare: Receiver<Buffers>,
    recycle: SyncSender<Buffers>,
    /// Ready to go, in order.
    ready: Vec<Published>,
    /// What caused the changes the core holds (see [`RawChanges::causes`]).
    causes: Vec<(u32, Cause, u64)>,
    /// When it last sent, on the caller's clock.
    last_sent_us: u64,
}

/// Task changes a batch is taken at, once an event leaves the core holding this many.
const FEED_CHUNK: usize = 1024;

/// Returned buffers keep room for at most this many times [`FEED_CHUNK`] records (their key
/// text and causes likewise).
const MAX_KEPT: usize = 4;

/// Key bytes per record a fresh buffer has room for (keys come with a task's first change).
const KEY_BYTES: usize = 16;

/// Emptied buffers kept for reuse; more coming back are dropped. A batch taken while none is
/// spare gets fresh buffers of a batch's size. More spares would hold more memory and, reused
/// in turn, keep more of it passing through the scheduler's caches.
const SPARE_BUFFERS: usize = 16;

/// How long published events may wait to be sent together (µs).
const FEED_BATCH_US: u64 = 5_000;

impl Publisher {
    /// Publishes to `tx`.
    #[must_use]
    pub fn new(tx: FeedSender) -> Self {
        let (recycle, spare) = std::sync::mpsc::sync_channel(SPARE_BUFFERS);
        Publisher { tx, spare, recycle, ready: Vec::new(), causes: Vec::new(), last_sent_us: 0 }
    }

    /// Files the changes the core recorded since it held `before` under `cause`, at `at_us`.
    pub fn caused<P: Clone>(&mut self, core: &mut Core<P>, before: usize, cause: Cause, at_us: u64) {
        let after = core.transitions_pending();
        if after > before {
            file_cause(&mut self.causes, before, cause, at_us);
        }
        if after >= FEED_CHUNK {
            self.take_changes(core);
        }
    }

    /// Publishes `e` after every change recorded before it.
    pub fn event<P: Clone>(&mut self, core: &mut Core<P>, e: FeedEvent) {
        self.take_changes(core);
        self.ready.push(e.into());
    }

    /// Sends what has gathered if it has waited long enough by `at_us` (the caller's clock, in
    /// µs: the scheduler reads it once per turn anyway), or now if `now`. False when the
    /// observer is gone: nothing more needs publishing (nor recording).
    #[must_use]
    pub fn send<P: Clone>(&mut self, core: &mut Core<P>, now: bool, at_us: u64) -> bool {
        if now || at_us.saturating_sub(self.last_sent_us) >= FEED_BATCH_US || self.ready.len() >= 64 {
            self.take_changes(core);
            for e in self.ready.drain(..) {
                if self.tx.send(e).is_err() {
                    return false;
                }
            }
            self.last_sent_us = at_us;
        }
        !self.tx.is_closed()
    }

    /// Copies the core's changes, their keys and causes into batches of [`FEED_CHUNK`] changes
    /// (the last up to half as many again, rather than a sliver of its own), in buffers the
    /// observer gave back (see [`Core::copy_transitions`]).
    fn take_changes<P: Clone>(&mut self, core: &mut Core<P>) {
        let n = core.transitions_pending();
        if n == 0 {
            return;
        }
        // Every change follows the event that caused it (see `Published::visit_batch`).
        debug_assert!(self.causes.first().is_some_and(|&(at, ..)| at == 0), "the first change has its cause");
        // The cause in effect at each batch's start.
        let mut current = 0;
        let mut start = 0;
        while start < n {
            let end = if n - start <= FEED_CHUNK + FEED_CHUNK / 2 { n } else { start + FEED_CHUNK };
            // No spare (the observer is behind): fresh buffers, reused later.
            let (mut records, mut causes, mut keys) = self.spare.try_recv().unwrap_or_else(|_| {
                (
                    Vec::with_capacity(FEED_CHUNK),
                    Vec::with_capacity(FEED_CHUNK / 4),
                    String::with_capacity(KEY_BYTES * FEED_CHUNK),
                )
            });
            core.copy_transitions(start..end, &mut records, &mut keys);
            while self.causes.get(current + 1).is_some_and(|&(at, ..)| at as usize <= start) {
                current += 1;
            }
            let starting = self.causes.iter().skip(current).take_while(|&&(at, ..)| (at as usize) < end);
            causes
                .extend(starting.map(|&(at, cause, at_us)| ((at as usize).saturating_sub(start) as u32, cause, at_us)));
            let recycle = self.recycle.clone();
            self.ready.push(Published(Repr::Changes(RawChanges { records, causes, keys, recycle })));
            start = end;
        }
        core.clear_transitions();
        self.causes.clear();
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

impl TaskChange {
    /// This change with its key borrowed.
    #[must_use]
    pub fn borrowed(&self) -> ChangeRef<'_> {
        let TaskChange { task, ref key, via, phase, worker, duration_us, cause } = *self;
        ChangeRef { task, key: key.as_ref().map(Key::as_str), via, phase, worker, duration_us, cause }
    }
}

/// A [`TaskChange`] whose key is borrowed from the batch it came in (see
/// [`Published::visit_batch`]): an observer that keeps keys its own way allocates nothing per
/// change. The fields mean what they mean there.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ChangeRef<'a> {
    /// The task's serial number.
    pub task: u64,
    /// Its key, on its first change.
    pub key: Option<&'a str>,
    /// The phases it passed through on the way to `phase`, oldest first.
    pub via: Via,
    /// Its new state.
    pub phase: Phase,
    /// The worker it went to, that first holds its result, or whose run of it failed.
    pub worker: Option<u32>,
    /// The run time of the run this change ends (0 for a failed run).
    pub duration_us: Option<u64>,
    /// Why.
    pub cause: Cause,
}

impl ChangeRef<'_> {
    /// The published form, owning its key.
    #[must_use]
    pub fn to_change(&self) -> TaskChange {
        let ChangeRef { task, key, via, phase, worker, duration_us, cause } = *self;
        TaskChange { task, key: key.map(Key::new), via, phase, worker, duration_us, cause }
    }
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
        /// When they happened: the start of the scheduler's turn (one pass of its loop, a
        /// message or a tick) that made them.
        at_us: u64,
        /// The changes.
        changes: Vec<TaskChange>,
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

/// Where the scheduler publishes (see [`crate::SchedulerConfig::feed`]); the observer calls
/// [`Published::into_events`] on what it receives.
pub type FeedSender = tokio::sync::mpsc::UnboundedSender<Published>;

#[cfg(test)]
mod tests {
    use super::*;
    use rask_scheduler_core::{ClientId, Config, Event, NewTask, Phase as CorePhase, WorkerId, WorkerSpec};
    use std::sync::Arc;

    #[test]
    fn a_batch_runs_each_cause_from_its_start_to_the_next_ones() {
        let records: Vec<Transition> = (0..6).map(|t| Transition::new(t, None, CorePhase::Waiting, None)).collect();
        let tasks = |b: ChangeBatch<'_>| -> Vec<(u64, Cause, Vec<u64>)> {
            b.runs().map(|r| (r.at_us, r.cause, r.changes().map(|c| c.task).collect())).collect()
        };
        let (a, b, c) = (Cause::Submitted { client: 1 }, Cause::Finished { worker: 2 }, Cause::Tick);
        let causes = [(0, a, 5), (2, b, 6), (2, c, 7), (5, a, 8), (9, b, 9)];
        assert_eq!(
            tasks(ChangeBatch::new(&records, &causes, "")),
            [(5, a, vec![0, 1]), (6, b, vec![]), (7, c, vec![2, 3, 4]), (8, a, vec![5]), (9, b, vec![])],
            "every change under the cause in effect; causes past the end hold none"
        );
        assert_eq!(
            tasks(ChangeBatch::new(&records, &[(3, b, 1)], "")),
            [(1, b, vec![0, 1, 2, 3, 4, 5])],
            "the first holds from the start"
        );
        assert_eq!(
            tasks(ChangeBatch::new(&records[..2], &[], "")),
            [(0, Cause::Tick, vec![0, 1])],
            "none told: a tick"
        );
        assert_eq!(tasks(ChangeBatch::new(&[], &[], "")), [(0, Cause::Tick, vec![])], "an empty batch: one empty run");
    }

    fn record(task: u64, key: Option<(u32, u32)>, phase: CorePhase, worker: Option<u32>) -> Transition {
        Transition::new(task, key, phase, worker.map(WorkerId))
    }

    /// What the observer sees: the published form of each change, by batch.
    type Seen = Vec<(u64, Vec<(u64, Option<String>, Phase, Option<u32>, Option<u64>, Cause)>)>;

    fn seen(events: &[FeedEvent]) -> Seen {
        let tasks = events.iter().filter_map(|e| match e {
            FeedEvent::Tasks { at_us, changes } => Some((*at_us, changes)),
            _ => None,
        });
        tasks
            .map(|(at, changes)| {
                let changes = changes.iter().map(|c| {
                    (c.task, c.key.as_ref().map(|k| k.as_str().to_owned()), c.phase, c.worker, c.duration_us, c.cause)
                });
                (at, changes.collect())
            })
            .collect()
    }

    #[test]
    fn raw_changes_become_one_batch_per_moment_with_keys_and_causes_and_their_buffers_come_back() {
        let submitted = Cause::Submitted { client: 7 };
        let finished = Cause::Finished { worker: 2 };
        let (recycle, spare) = std::sync::mpsc::sync_channel(1);
        let raw = RawChanges {
            records: vec![
                record(1, Some((0, 5)), CorePhase::Waiting, None),
                record(2, Some((5, 8)), CorePhase::Processing, Some(2)),
                record(2, None, CorePhase::Memory, Some(2)).with_duration_us(40),
                record(1, None, CorePhase::Processing, Some(2)),
            ],
            causes: vec![(0, submitted, 10), (2, finished, 20)],
            keys: "inc-1sum".to_owned(),
            recycle,
        };
        let mut events = Vec::new();
        Published(Repr::Changes(raw)).into_events(&mut events);
        let inc = Some("inc-1".to_owned());
        assert_eq!(
            seen(&events),
            [
                (
                    10,
                    vec![
                        (1, inc, Phase::Waiting, None, None, submitted),
                        (2, Some("sum".to_owned()), Phase::Processing, Some(2), None, submitted),
                    ]
                ),
                (
                    20,
                    vec![
                        (2, None, Phase::Memory, Some(2), Some(40), finished),
                        (1, None, Phase::Processing, Some(2), None, finished)
                    ]
                ),
            ]
        );
        let (records, causes, keys) = spare.try_recv().expect("the buffers come back to the scheduler");
        assert!(records.is_empty() && causes.is_empty() && keys.is_empty());
        assert!(records.capacity() >= 4, "with their memory");
    }

    #[test]
    fn batches_cut_between_two_events_keep_each_change_under_its_own_cause_and_keys() {
        let mut core = recording_core();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut p = Publisher::new(tx);
        let first: Vec<String> = (0..FEED_CHUNK - 24).map(|i| format!("a-{i}")).collect();
        let second: Vec<String> = (0..FEED_CHUNK).map(|i| format!("bb-{i}")).collect();
        handle(&mut core, &mut p, submit(&first), SUBMITTED, 1);
        assert!(p.ready.is_empty(), "not a chunk's worth yet");
        handle(&mut core, &mut p, submit(&second), FINISHED, 2);
        assert_eq!(p.ready.len(), 2, "cut at the chunk size, inside the second event");
        assert!(p.send(&mut core, true, 2));
        let (_, events) = received(&mut rx);
        let got = changes_of(&events);
        let want: Vec<(Option<String>, Cause, u64)> = first
            .iter()
            .map(|k| (Some(k.clone()), SUBMITTED, 1))
            .chain(second.iter().map(|k| (Some(k.clone()), FINISHED, 2)))
            .collect();
        assert_eq!(got, want);
        // The core's buffers stayed with it, emptied.
        assert_eq!(core.transitions_pending(), 0);
    }

    #[test]
    fn buffers_come_back_emptied_and_no_larger_than_a_few_batches() {
        let (recycle, spare) = std::sync::mpsc::sync_channel(1);
        let mut records = Vec::with_capacity(2 * MAX_KEPT * FEED_CHUNK);
        records.push(record(1, Some((0, 1)), CorePhase::Waiting, None));
        let mut keys = String::with_capacity(2 * MAX_KEPT * KEY_BYTES * FEED_CHUNK);
        keys.push('a');
        let raw = RawChanges { records, causes: vec![(0, Cause::Tick, 1)], keys, recycle };
        let mut events = Vec::new();
        Published(Repr::Changes(raw)).into_events(&mut events);
        assert_eq!(seen(&events).len(), 1);
        let (records, causes, keys) = spare.try_recv().expect("the buffers come back");
        assert!(records.is_empty() && causes.is_empty() && keys.is_empty());
        assert!(records.capacity() <= MAX_KEPT * FEED_CHUNK, "{}", records.capacity());
        assert!(keys.capacity() <= MAX_KEPT * KEY_BYTES * FEED_CHUNK, "{}", keys.capacity());
    }

    #[test]
    fn phases_and_their_paths_read_the_same_as_the_scheduler_recorded_them() {
        let all = [
            CorePhase::Released,
            CorePhase::Waiting,
            CorePhase::Queued,
            CorePhase::NoWorker,
            CorePhase::Processing,
            CorePhase::Memory,
            CorePhase::Erred,
            CorePhase::Forgotten,
        ];
        for p in all {
            assert_eq!(Phase::from_code(Phase::from(p).code()), Phase::from(p), "{p:?}");
            assert_eq!(Phase::from(p).code(), p as u8, "{p:?}");
        }
        // A new task sent at once passes through three phases in one record; its path reads
        // the same once taken over bit for bit.
        let mut core = recording_core();
        core.handle(submit(&["a".into()]));
        let (mut records, mut keys) = (Vec::new(), String::new());
        core.take_transitions(&mut records, &mut keys);
        let path: Vec<Phase> = records[0].via().iter().map(Phase::from).collect();
        assert_eq!(path, [Phase::Released, Phase::Waiting, Phase::Queued]);
        assert_eq!(Via::from(records[0].via()).iter().collect::<Vec<_>>(), path);
        let four = [Phase::Released, Phase::Waiting, Phase::Queued, Phase::Processing];
        let via = Via::from_phases(four).expect("four fit");
        assert_eq!((via.iter().collect::<Vec<_>>(), via.len()), (four.to_vec(), 4));
        assert_eq!(Via::from_phases([Phase::Waiting; 5]), None);
        assert!(Via::EMPTY.is_empty() && Via::from_phases([]) == Some(Via::EMPTY));
        // Stray bits past the counted phases, or a count past the capacity, read as the path
        // they stand for.
        let one = Via::from_phases([Phase::Memory]).expect("fits");
        assert_eq!(Via::from_bits(one.to_bits() | 0b111 << 6), one);
        assert_eq!(Via::from_bits(via.to_bits() & !0b111 | 7), via);
    }

    #[test]
    fn other_events_pass_through_unchanged() {
        let e = FeedEvent::WorkerLeft { at_us: 3, worker: 1, cause: "lost".into() };
        let mut out = Vec::new();
        Published::from(e.clone()).into_events(&mut out);
        assert_eq!(out, std::slice::from_ref(&e));
        let visited = Published::from(e.clone()).visit(|_, c| panic!("not a change: {c:?}"));
        assert_eq!(visited, Some(e));
    }

    /// A recording core with one worker (3) and one client (1).
    fn recording_core() -> Core<u32> {
        let mut core: Core<u32> = Core::new(Config { record_transitions: true, ..Config::default() });
        let spec = WorkerSpec {
            name: Arc::from("w"),
            address: Arc::from("tcp://127.0.0.1:9"),
            nthreads: 1,
            resources: Vec::new(),
            restarted_after: None,
        };
        core.handle(Event::WorkerConnected { worker: WorkerId(3), spec });
        core.handle(Event::ClientConnected { client: ClientId(1) });
        core
    }

    /// A submission of independent tasks, all wanted.
    fn submit(keys: &[String]) -> Event<u32> {
        let task = |(i, k): (usize, &String)| NewTask {
            key: Key::new(k),
            deps: Vec::new(),
            payload: 0,
            priority: 0,
            order: i as u32,
            restrictions: None,
            wanted: true,
        };
        let tasks = keys.iter().enumerate().map(task).collect();
        Event::GraphSubmitted { client: ClientId(1), tasks, wanted: keys.iter().map(|k| Key::new(k)).collect() }
    }

    /// Handles `ev` as the scheduler's shell does with a feed attached.
    fn handle(
        core: &mut Core<u32>,
        p: &mut Publisher,
        ev: Event<u32>,
        cause: Cause,
        at: u64,
    ) -> Vec<rask_scheduler_core::Command<u32>> {
        let before = core.transitions_pending();
        let commands = core.handle(ev);
        p.caused(core, before, cause, at);
        commands
    }

    fn ticket_of(commands: &[rask_scheduler_core::Command<u32>], key: &str) -> Option<rask_scheduler_core::Ticket> {
        commands.iter().find_map(|c| match c {
            rask_scheduler_core::Command::Compute { key: k, ticket, .. } if k.as_str() == key => Some(*ticket),
            _ => None,
        })
    }

    fn received(rx: &mut tokio::sync::mpsc::UnboundedReceiver<Published>) -> (usize, Vec<FeedEvent>) {
        let (mut n, mut events) = (0, Vec::new());
        while let Ok(published) = rx.try_recv() {
            n += 1;
            published.into_events(&mut events);
        }
        (n, events)
    }

    const SUBMITTED: Cause = Cause::Submitted { client: 1 };
    const FINISHED: Cause = Cause::Finished { worker: 3 };

    #[test]
    fn the_publisher_keeps_changes_in_order_with_other_events_and_files_them_under_their_causes() {
        let mut core = recording_core();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut p = Publisher::new(tx);
        let commands = handle(&mut core, &mut p, submit(&["a".into()]), SUBMITTED, 5);
        let ticket = ticket_of(&commands, "a");
        p.event(&mut core, FeedEvent::WorkerLeft { at_us: 6, worker: 9, cause: "gone".into() });
        let finished =
            Event::TaskFinished { worker: WorkerId(3), key: Key::new("a"), ticket, nbytes: 1, duration_us: 2 };
        handle(&mut core, &mut p, finished, FINISHED, 7);
        // Only `send` sends.
        assert!(rx.try_recv().is_err(), "nothing was sent yet");
        assert!(p.send(&mut core, true, 0));
        let (_, events) = received(&mut rx);
        assert!(matches!(events[1], FeedEvent::WorkerLeft { worker: 9, .. }), "{events:?}");
        assert_eq!(
            seen(&events),
            [
                (5, vec![(1, Some("a".to_owned()), Phase::Processing, Some(3), None, SUBMITTED)]),
                (7, vec![(1, None, Phase::Memory, Some(3), Some(2), FINISHED)]),
            ]
        );
    }

    #[test]
    fn changes_wait_for_the_batch_interval_on_the_callers_clock_unless_sent_now() {
        let mut core = recording_core();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut p = Publisher::new(tx);
        handle(&mut core, &mut p, submit(&["a".into()]), SUBMITTED, 100);
        assert!(p.send(&mut core, false, FEED_BATCH_US - 1));
        assert!(rx.try_recv().is_err(), "held back within the interval");
        assert!(p.send(&mut core, false, FEED_BATCH_US));
        assert_eq!(received(&mut rx).0, 1, "sent once the interval is over");
        handle(&mut core, &mut p, submit(&["b".into()]), SUBMITTED, FEED_BATCH_US + 1);
        assert!(p.send(&mut core, false, FEED_BATCH_US + 2));
        assert!(rx.try_recv().is_err(), "the interval starts again from the last send");
        assert!(p.send(&mut core, true, FEED_BATCH_US + 3));
        assert_eq!(received(&mut rx).0, 1, "or at once when asked");
    }

    #[test]
    fn several_events_share_one_batch_each_change_under_its_own_cause_and_time() {
        let mut core = recording_core();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut p = Publisher::new(tx);
        let first = handle(&mut core, &mut p, submit(&["a".into()]), SUBMITTED, 5);
        handle(&mut core, &mut p, submit(&["b".into()]), SUBMITTED, 5);
        // Same cause, same time: one entry for both.
        assert_eq!(p.causes.len(), 1);
        let ticket = ticket_of(&first, "a");
        let finished =
            Event::TaskFinished { worker: WorkerId(3), key: Key::new("a"), ticket, nbytes: 1, duration_us: 4 };
        handle(&mut core, &mut p, finished, FINISHED, 6);
        assert_eq!(p.causes.len(), 2);
        assert!(p.send(&mut core, true, 0));
        let (batches, events) = received(&mut rx);
        assert_eq!(batches, 1, "one batch for the three events");
        let seen = seen(&events);
        assert_eq!(seen.len(), 2, "{seen:?}");
        let (at, changes) = &seen[0];
        assert_eq!(*at, 5);
        let firsts: Vec<_> = changes.iter().map(|c| (c.0, c.1.clone(), c.5)).collect();
        assert_eq!(firsts, [(1, Some("a".to_owned()), SUBMITTED), (2, Some("b".to_owned()), SUBMITTED)]);
        assert!(seen[1].0 == 6 && seen[1].1.iter().all(|c| c.5 == FINISHED), "{seen:?}");
        assert!(seen[1].1.iter().any(|c| c.0 == 1 && c.2 == Phase::Memory && c.4 == Some(4)));
    }

    /// (key, cause, time) of every change received, in order.
    fn changes_of(events: &[FeedEvent]) -> Vec<(Option<String>, Cause, u64)> {
        seen(events).into_iter().flat_map(|(at, changes)| changes.into_iter().map(move |c| (c.1, c.5, at))).collect()
    }

    #[test]
    fn a_large_event_goes_out_in_batches_of_the_chunk_size_and_a_closed_feed_is_noticed() {
        let mut core = recording_core();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut p = Publisher::new(tx);
        let keys: Vec<String> = (0..2 * FEED_CHUNK + 100).map(|i| format!("t-{i}")).collect();
        handle(&mut core, &mut p, submit(&keys), SUBMITTED, 1);
        assert_eq!(core.transitions_pending(), 0, "taken once past the chunk size");
        assert_eq!(p.ready.len(), 2, "a full batch, then the rest with its tail rather than a sliver");
        assert!(p.send(&mut core, true, 0));
        let (batches, events) = received(&mut rx);
        assert_eq!(batches, 2);
        let got = changes_of(&events);
        assert_eq!(got.len(), keys.len(), "one record per new task");
        // Every key arrives whole, in order, with the cause and time of its event.
        let want: Vec<(Option<String>, Cause, u64)> = keys.iter().map(|k| (Some(k.clone()), SUBMITTED, 1)).collect();
        assert_eq!(got, want);
        drop(rx);
        assert!(!p.send(&mut core, true, 0), "the observer is gone");
        core.stop_recording();
        handle(&mut core, &mut p, submit(&["late".into()]), SUBMITTED, 2);
        assert_eq!(core.transitions_pending(), 0, "nothing is recorded any more");
    }
}
