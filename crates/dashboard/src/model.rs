//! What the dashboard knows: the scheduler's published events folded into counts, per-prefix
//! progress, a task stream, workers and a bounded story of state changes. Pure: events in,
//! snapshots out — the live feed and a replayed journal go through the same code, so a replay
//! shows exactly what the live dashboard showed.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::num::NonZeroU64;
use std::sync::Arc;

use rask_graph::{FxHashMap, Key};
use rask_runtime::feed::{Cause, ChangeBatch, ChangeRef, FeedEvent, Phase, TaskChange, Via};
use serde::Serialize;

/// State changes kept for task stories (the oldest are dropped first).
const STORY_LIMIT: usize = 200_000;
/// Task runs kept for the task stream.
const STREAM_LIMIT: usize = 20_000;
/// Memory samples kept per worker (for the report's memory-over-time chart).
const MEMORY_HISTORY: usize = 2_000;
/// Task prefixes tracked; tasks of later ones count under [`OTHER_PREFIX`].
const MAX_PREFIXES: usize = 500;
/// The prefix of tasks beyond [`MAX_PREFIXES`].
const OTHER_PREFIX: &str = "(other)";
/// Window over which throughput is measured.
const THROUGHPUT_WINDOW_US: u64 = 2_000_000;

/// The task prefix Dask groups by: the key without trailing `-NUMBER` or `-hexhash` parts
/// (`"inc-12"` → `"inc"`, `"tree-14-1234"` → `"tree"`).
#[must_use]
pub fn prefix_of(key: &str) -> &str {
    // One pass over the bytes from the end (a new task's key is scanned once, a few hundred
    // thousand times a second), each byte classified by a table: `end` is where the prefix
    // ends so far; the part after it being scanned is numeric or hex-like while its bytes are.
    let bytes = key.as_bytes();
    let mut end = bytes.len();
    let mut part = DIGIT | HEX;
    for i in (0..bytes.len()).rev() {
        let class = BYTE_CLASS[usize::from(bytes[i])];
        if class == SEPARATOR {
            let len = end - i - 1;
            if i > 0 && ((part & DIGIT != 0 && len > 0) || (part & HEX != 0 && len >= 8)) {
                end = i;
                part = DIGIT | HEX;
                continue;
            }
            break;
        }
        part &= class;
        if part == 0 {
            // Neither numeric nor hex-like: this part stays, and so does all before it.
            break;
        }
    }
    &key[..end]
}

/// [`prefix_of`]'s byte class of a decimal digit (which is also [`HEX`]).
const DIGIT: u8 = 1;
/// A hex digit's byte class.
const HEX: u8 = 2;
/// A separator's (`-`, `_`) byte class; other bytes are in none.
const SEPARATOR: u8 = 4;
/// Every byte's class (see [`prefix_of`]).
const BYTE_CLASS: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        t[b] = if c.is_ascii_digit() {
            DIGIT | HEX
        } else if c.is_ascii_hexdigit() {
            HEX
        } else if c == b'-' || c == b'_' {
            SEPARATOR
        } else {
            0
        };
        b += 1;
    }
    t
};

/// Where a key's text is in the model's [`KeyText`] (its offset plus one, so an absent key
/// costs no extra word): a task's key is copied there once, from the batch it came in, instead
/// of being allocated on its own (a few hundred thousand a second).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct KeyRef(NonZeroU64);

/// The text of the keys the model remembers, each behind its length (LEB128), end to end in
/// one buffer. Keys no longer referred to stay until the buffer is compacted
/// ([`Model::compact_keys`]: the keys still referred to are copied into a fresh one), once it
/// has grown to twice the size it had after the last compaction (and at least
/// [`KeyText::MIN_COMPACT`]): a compaction copies at most the whole text, twice what was
/// appended since the one before, so the copying costs at most two bytes per byte appended.
struct KeyText {
    text: Vec<u8>,
    /// Compact when the text grows past this.
    compact_at: usize,
}

impl Default for KeyText {
    fn default() -> Self {
        KeyText { text: Vec::new(), compact_at: KeyText::MIN_COMPACT }
    }
}

impl KeyText {
    /// Text size below which the buffer is never compacted.
    const MIN_COMPACT: usize = 8 << 20;

    fn push(&mut self, key: &str) -> KeyRef {
        let at = self.text.len() as u64;
        let mut len = key.len() as u64;
        while len >= 0x80 {
            self.text.push((len as u8 & 0x7f) | 0x80);
            len >>= 7;
        }
        self.text.push(len as u8);
        self.text.extend_from_slice(key.as_bytes());
        KeyRef(NonZeroU64::MIN.saturating_add(at))
    }

    /// The key's length prefix and text.
    fn entry(&self, r: KeyRef) -> &[u8] {
        let at = (r.0.get() - 1) as usize;
        let (mut len, mut shift, mut end) = (0usize, 0u32, at);
        for b in self.text.get(at..).unwrap_or_default() {
            end += 1;
            len |= usize::from(b & 0x7f).checked_shl(shift).unwrap_or(0);
            shift += 7;
            if b & 0x80 == 0 {
                break;
            }
        }
        end.checked_add(len).and_then(|end| self.text.get(at..end)).unwrap_or_default()
    }

    fn get(&self, r: KeyRef) -> &str {
        let entry = self.entry(r);
        let text = entry.iter().position(|b| b & 0x80 == 0).and_then(|i| entry.get(i + 1..)).unwrap_or_default();
        // Only whole keys (text) are pushed.
        std::str::from_utf8(text).unwrap_or_default()
    }

    /// Appends `r`'s entry from `from`, returning where it now is.
    fn copy_from(&mut self, from: &KeyText, r: KeyRef) -> KeyRef {
        let at = self.text.len() as u64;
        self.text.extend_from_slice(from.entry(r));
        KeyRef(NonZeroU64::MIN.saturating_add(at))
    }
}

/// One task the scheduler still knows: what every change reads and writes, kept small (8
/// bytes; with where its key is, a task's slot in the [`TaskTable`] is 16).
#[derive(Clone, Copy)]
struct TaskRec {
    phase: Phase,
    /// [`TaskRec::FINISHED`], [`TaskRec::ON_WORKER`].
    flags: u8,
    /// Prefix ids stay below [`MAX_PREFIXES`] + 1.
    prefix: u16,
    /// Valid with [`TaskRec::ON_WORKER`].
    worker: u32,
}

const _: () = assert!(std::mem::size_of::<TaskRec>() == 8 && MAX_PREFIXES < u16::MAX as usize);

impl TaskRec {
    /// Its result was computed (and not lost since): released or forgotten now means done.
    const FINISHED: u8 = 1;
    /// It is processing on `worker`.
    const ON_WORKER: u8 = 2;

    fn new(phase: Phase, finished: bool, prefix: u32, worker: Option<u32>) -> Self {
        let mut flags = if finished { Self::FINISHED } else { 0 };
        if worker.is_some() {
            flags |= Self::ON_WORKER;
        }
        TaskRec { phase, flags, prefix: prefix as u16, worker: worker.unwrap_or(0) }
    }

    fn finished(&self) -> bool {
        self.flags & Self::FINISHED != 0
    }

    /// Where it is processing, while it is.
    fn worker(&self) -> Option<u32> {
        (self.flags & Self::ON_WORKER != 0).then_some(self.worker)
    }
}

/// Live tasks by serial number. Serials are handed out in order and tasks mostly finish in
/// order, so a window indexed by serial holds them (no hashing; neighbours are adjacent in
/// memory, which matters at a few hundred thousand changes a second), each with where its key
/// is (16 bytes a task). Tasks that outlive the window's front by far move to a map, so one
/// long-lived task cannot pin a window of everything submitted after it.
#[derive(Default)]
struct TaskTable {
    /// Serial of `window[0]`.
    base: u64,
    window: VecDeque<Option<(TaskRec, KeyRef)>>,
    /// Live tasks in `window`.
    in_window: usize,
    /// Stragglers from before `base`.
    old: FxHashMap<u64, (TaskRec, KeyRef)>,
}

// A slot is a task and its key's place, nothing more: `None` uses a niche of the phase.
const _: () = assert!(std::mem::size_of::<Option<(TaskRec, KeyRef)>>() == 16);

impl TaskTable {
    /// The window is compacted into `old` beyond this length when mostly empty.
    const SPAN: usize = 1 << 16;

    fn len(&self) -> usize {
        self.in_window + self.old.len()
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn slot(&self, serial: u64) -> Option<&(TaskRec, KeyRef)> {
        match serial.checked_sub(self.base) {
            Some(i) if (i as usize) < self.window.len() => self.window[i as usize].as_ref(),
            _ => self.old.get(&serial),
        }
    }

    fn get_mut(&mut self, serial: u64) -> Option<&mut TaskRec> {
        match serial.checked_sub(self.base) {
            Some(i) if (i as usize) < self.window.len() => self.window[i as usize].as_mut().map(|(r, _)| r),
            _ => self.old.get_mut(&serial).map(|(r, _)| r),
        }
    }

    fn insert(&mut self, serial: u64, rec: TaskRec, key: KeyRef) {
        if self.window.is_empty() {
            self.base = serial;
        }
        let Some(i) = serial.checked_sub(self.base) else {
            self.old.insert(serial, (rec, key));
            return;
        };
        let i = i as usize;
        // Serials mostly arrive in order: the next one is a push.
        if i >= self.window.len() {
            self.window.resize(i, None);
            self.window.push_back(Some((rec, key)));
            self.in_window += 1;
        } else if self.window[i].replace((rec, key)).is_none() {
            self.in_window += 1;
        }
    }

    fn remove(&mut self, serial: u64) -> Option<(TaskRec, KeyRef)> {
        let gone = match serial.checked_sub(self.base) {
            Some(i) if (i as usize) < self.window.len() => {
                let gone = self.window[i as usize].take();
                self.in_window -= usize::from(gone.is_some());
                gone
            }
            _ => return self.old.remove(&serial),
        };
        while matches!(self.window.front(), Some(None)) {
            self.window.pop_front();
            self.base += 1;
        }
        while self.window.len() > Self::SPAN && self.window.len() > 4 * self.in_window {
            if let Some(straggler) = self.window.pop_front().flatten() {
                self.in_window -= 1;
                self.old.insert(self.base, straggler);
            }
            self.base += 1;
        }
        gone
    }

    /// Live tasks with where their keys are.
    fn iter(&self) -> impl Iterator<Item = (u64, &TaskRec, KeyRef)> {
        let base = self.base;
        let window =
            self.window.iter().enumerate().filter_map(move |(i, s)| s.as_ref().map(|(r, k)| (base + i as u64, r, *k)));
        window.chain(self.old.iter().map(|(s, (r, k))| (*s, r, *k)))
    }

    /// Every key reference it holds, to move them (see [`Model::compact_keys`]).
    fn key_refs_mut(&mut self) -> impl Iterator<Item = &mut KeyRef> {
        self.window.iter_mut().flatten().map(|(_, k)| k).chain(self.old.values_mut().map(|(_, k)| k))
    }
}

/// Progress of one task prefix.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct PrefixProgress {
    /// The prefix.
    pub name: Arc<str>,
    /// Not runnable yet, queued, or released for now.
    pub waiting: u64,
    /// Running on a worker.
    pub processing: u64,
    /// Result in memory.
    pub memory: u64,
    /// Failed.
    pub erred: u64,
    /// Finished and since released (done with).
    pub done: u64,
    /// Mean run time of its finished runs (µs).
    pub mean_duration_us: u64,
    /// Its tasks by [`state_code`]: every change moves one count to another, the counts above
    /// and the model's counts by state are sums of these, worked out for a snapshot.
    #[serde(skip)]
    by_state: [u64; 16],
    #[serde(skip)]
    runs: u64,
    #[serde(skip)]
    total_duration_us: u64,
}

impl PrefixProgress {
    /// A snapshot: the counts shown worked out from those kept. A task released or forgotten
    /// after its result was computed is done.
    fn snapshot(&self) -> PrefixProgress {
        let n = |phase: Phase| self.in_phase(phase);
        let finished = |phase: Phase| self.by_state[state_code(phase, true)];
        let unfinished = |phase: Phase| self.by_state[state_code(phase, false)];
        PrefixProgress {
            name: Arc::clone(&self.name),
            waiting: unfinished(Phase::Released) + n(Phase::Waiting) + n(Phase::Queued) + n(Phase::NoWorker),
            processing: n(Phase::Processing),
            memory: n(Phase::Memory),
            erred: n(Phase::Erred),
            done: finished(Phase::Released) + finished(Phase::Forgotten),
            mean_duration_us: self.total_duration_us.checked_div(self.runs).unwrap_or(0),
            // What the counts above were worked out from stays with the model.
            by_state: [0; 16],
            runs: self.runs,
            total_duration_us: self.total_duration_us,
        }
    }

    /// Its tasks in `phase`, their results computed or not.
    fn in_phase(&self, phase: Phase) -> u64 {
        self.by_state[state_code(phase, false)] + self.by_state[state_code(phase, true)]
    }
}

/// Where a task in `phase` is counted ([`PrefixProgress::by_state`]); `finished`: its result
/// was computed (see [`finished_after`]).
fn state_code(phase: Phase, finished: bool) -> usize {
    usize::from(phase.code()) | usize::from(finished) << 3
}

/// A worker, present or departed.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct WorkerView {
    /// Its id in the feed.
    pub id: u32,
    /// Its name.
    pub name: String,
    /// Its data address.
    pub address: String,
    /// Threads.
    pub nthreads: u32,
    /// Memory limit (bytes), if any.
    pub memory_limit: Option<u64>,
    /// Bytes of results in memory.
    pub managed: u64,
    /// Bytes of results on disk.
    pub spilled: u64,
    /// Process memory not accounted for by results (`rss - managed`).
    pub unmanaged: u64,
    /// Process resident memory.
    pub rss: u64,
    /// CPU use over its last report interval, percent of one core.
    pub cpu_percent: f64,
    /// Tasks processing there now.
    pub processing: u64,
    /// Tasks it ran.
    pub ran: u64,
    /// Bytes written to / read from spill files, fetched from peers (totals).
    pub spill_written: u64,
    /// See `spill_written`.
    pub spill_read: u64,
    /// See `spill_written`.
    pub fetched: u64,
    /// When it joined (µs since the scheduler started).
    pub joined_us: u64,
    /// When it left and why, if it did.
    pub left: Option<(u64, String)>,
    #[serde(skip)]
    cpu_sample: Option<(u64, u64)>,
    #[serde(skip)]
    lanes: Vec<u64>,
}

/// One run in the task stream.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Run {
    /// Order of arrival (for incremental fetches).
    pub seq: u64,
    /// The task.
    pub key: Key,
    /// Its prefix.
    pub prefix: Arc<str>,
    /// The worker's id.
    pub worker: u32,
    /// The worker thread lane it is drawn in.
    pub lane: u32,
    /// Start (µs since the scheduler started).
    pub start_us: u64,
    /// Run time (µs).
    pub duration_us: u64,
    /// Whether it succeeded.
    pub ok: bool,
}

/// A [`Run`] as kept: its prefix by number and its key in the model's [`KeyText`], so
/// recording one allocates nothing and touches no reference count.
#[derive(Clone, Debug)]
struct RunRec {
    seq: u64,
    key: KeyRef,
    prefix: u32,
    worker: u32,
    lane: u32,
    start_us: u64,
    duration_us: u64,
    ok: bool,
}

/// One entry of a task's story.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct StoryEntry {
    /// When (µs since the scheduler started).
    pub at_us: u64,
    /// The task's serial number.
    pub task: u64,
    /// The states it passed through on the way, at the same time and for the same cause.
    #[serde(skip_serializing_if = "Via::is_empty")]
    pub via: Via,
    /// Its new state.
    pub phase: Phase,
    /// The worker involved, if any.
    pub worker: Option<u32>,
    /// What caused it.
    pub cause: Cause,
}

/// A story entry as kept: 16 bytes (see [`StoryLog`]).
#[derive(Clone, Copy)]
struct StoryRec {
    task: u64,
    worker: u32,
    /// The phase, the phases passed through and whether there is a worker (see
    /// [`StoryRec::pack`]).
    packed: u32,
}

impl StoryRec {
    const HAS_WORKER: u32 = 1 << 31;

    /// Bits 0–2 the phase, then the path as the feed packs it ([`Via::to_bits`], 15 bits),
    /// and the top bit for the worker.
    fn pack(task: u64, via: Via, phase: Phase, worker: Option<u32>) -> Self {
        let mut packed = u32::from(phase.code()) | u32::from(via.to_bits()) << 3;
        if worker.is_some() {
            packed |= Self::HAS_WORKER;
        }
        StoryRec { task, worker: worker.unwrap_or(0), packed }
    }

    fn entry(&self, at_us: u64, cause: Cause) -> StoryEntry {
        StoryEntry {
            at_us,
            task: self.task,
            via: Via::from_bits((self.packed >> 3) as u16),
            phase: Phase::from_code(self.packed as u8),
            worker: (self.packed & Self::HAS_WORKER != 0).then_some(self.worker),
            cause,
        }
    }
}

/// The latest state changes of all tasks, for task stories: 16 bytes each, with their causes
/// and times kept once per run of changes that share them (a scheduler event changes many
/// tasks at one time for one cause), so keeping a change is a short write.
#[derive(Default)]
struct StoryLog {
    recs: VecDeque<StoryRec>,
    /// Number of `recs[0]` among all changes ever kept.
    front: u64,
    /// (number of the first change it applies to, cause, time), in order; each holds until
    /// the next one starts.
    causes: VecDeque<(u64, Cause, u64)>,
}

impl StoryLog {
    /// The changes pushed next happened at `at_us`, for `cause`.
    fn begin(&mut self, at_us: u64, cause: Cause) {
        let n = self.front + self.recs.len() as u64;
        match self.causes.back_mut() {
            Some((_, c, t)) if *c == cause && *t == at_us => {}
            // Nothing was kept under the last one (its changes were of unknown tasks): it
            // goes, and the one before it holds on if it is this one.
            Some((start, ..)) if *start == n => {
                self.causes.pop_back();
                if self.causes.back().is_none_or(|&(_, c, t)| c != cause || t != at_us) {
                    self.causes.push_back((n, cause, at_us));
                }
            }
            _ => self.causes.push_back((n, cause, at_us)),
        }
    }

    /// Drops the oldest changes beyond [`STORY_LIMIT`] (after a batch of pushes: once per
    /// batch, not per change).
    fn trim(&mut self) {
        let excess = self.recs.len().saturating_sub(STORY_LIMIT);
        if excess > 0 {
            self.recs.drain(..excess);
            self.front += excess as u64;
            while self.causes.get(1).is_some_and(|(start, ..)| *start <= self.front) {
                self.causes.pop_front();
            }
        }
    }

    /// The kept changes of `task`, oldest first.
    fn of(&self, task: u64) -> Vec<StoryEntry> {
        let mut out = Vec::new();
        for (i, r) in self.recs.iter().enumerate().filter(|(_, r)| r.task == task) {
            let n = self.front + i as u64;
            let run = self.causes.partition_point(|(start, ..)| *start <= n).saturating_sub(1);
            let (cause, at_us) = self.causes.get(run).map_or((Cause::Tick, 0), |&(_, c, t)| (c, t));
            out.push(r.entry(at_us, cause));
        }
        out
    }
}

/// A memory sample.
#[derive(Clone, Copy, Debug, Serialize, PartialEq)]
pub struct MemorySample {
    /// When.
    pub at_us: u64,
    /// Results in memory.
    pub managed: u64,
    /// Results on disk.
    pub spilled: u64,
    /// Process memory.
    pub rss: u64,
}

/// Everything the status page shows.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Status {
    /// The scheduler's address.
    pub address: String,
    /// When it started (ms since the Unix epoch).
    pub started_unix_ms: u64,
    /// The latest event's time (µs since the start).
    pub now_us: u64,
    /// Tasks the scheduler knows, by state.
    pub counts: BTreeMap<&'static str, u64>,
    /// Tasks finished (successfully) so far.
    pub completed: u64,
    /// Tasks failed so far.
    pub failed: u64,
    /// Tasks finished per second over the last two seconds of events.
    pub throughput: f64,
    /// Progress by task prefix, in order of first appearance.
    pub prefixes: Vec<PrefixProgress>,
    /// Workers, present and departed, in order of joining.
    pub workers: Vec<WorkerView>,
    /// The sequence number of the latest task run.
    pub stream_seq: u64,
}

/// A task of the graph view: its key, its inputs and its state's name.
pub type GraphNode = (Key, Vec<Key>, &'static str);

/// The dashboard's state.
#[derive(Default)]
pub struct Model {
    address: String,
    started_unix_ms: u64,
    now_us: u64,
    tasks: TaskTable,
    /// Serials of recently forgotten tasks, to find their stories by key.
    forgotten: VecDeque<(u64, KeyRef)>,
    /// The text of the keys of the tasks and forgotten tasks above and of the runs below.
    keys: KeyText,
    prefixes: Vec<PrefixProgress>,
    prefix_ids: FxHashMap<String, u32>,
    /// The prefix [`Model::prefix_id`] found last (a hint: checked before use).
    last_prefix: u32,
    completed: u64,
    failed: u64,
    story: StoryLog,
    stream: VecDeque<RunRec>,
    stream_seq: u64,
    workers: BTreeMap<u32, WorkerView>,
    memory: BTreeMap<u32, VecDeque<MemorySample>>,
    finishes: VecDeque<u64>,
    graph: Vec<(Key, Vec<Key>)>,
    graph_truncated: bool,
    /// Bumped by every event, so observers can tell whether anything changed.
    version: u64,
}

fn phase_name(p: Phase) -> &'static str {
    match p {
        Phase::Released => "released",
        Phase::Waiting => "waiting",
        Phase::Queued => "queued",
        Phase::NoWorker => "no-worker",
        Phase::Processing => "processing",
        Phase::Memory => "memory",
        Phase::Erred => "erred",
        Phase::Forgotten => "forgotten",
    }
}

/// Whether a task's result stands computed after it passed through `via` to `phase`, given
/// whether it did before: computed results stay done when released; running it again (lost
/// data) undoes that. The phases passed through in the same event count too (memory, then
/// released).
fn finished_after(done: bool, via: Via, phase: Phase) -> bool {
    let after = |done: bool, p: Phase| match p {
        Phase::Memory => true,
        Phase::Waiting | Phase::Queued | Phase::NoWorker | Phase::Processing | Phase::Erred => false,
        Phase::Released | Phase::Forgotten => done,
    };
    if via.is_empty() { after(done, phase) } else { via.iter().chain([phase]).fold(done, after) }
}

const LIVE_PHASES: [Phase; 7] =
    [Phase::Released, Phase::Waiting, Phase::Queued, Phase::NoWorker, Phase::Processing, Phase::Memory, Phase::Erred];

impl Model {
    /// An empty model.
    #[must_use]
    pub fn new() -> Self {
        Model::default()
    }

    /// Changes with every event applied.
    #[must_use]
    pub fn version(&self) -> u64 {
        self.version
    }

    fn prefix_id(&mut self, key: &str) -> u32 {
        let mut p = prefix_of(key);
        // New tasks come in runs of one prefix: the last one found is checked before hashing.
        if self.prefixes.get(self.last_prefix as usize).is_some_and(|last| *last.name == *p) {
            return self.last_prefix;
        }
        if let Some(id) = self.prefix_ids.get(p) {
            self.last_prefix = *id;
            return *id;
        }
        // Keys that do not group (no numbered suffix) would make a prefix per task.
        if self.prefixes.len() >= MAX_PREFIXES {
            p = OTHER_PREFIX;
            if let Some(id) = self.prefix_ids.get(p) {
                return *id;
            }
        }
        let id = self.prefixes.len() as u32;
        self.prefixes.push(PrefixProgress { name: Arc::from(p), ..PrefixProgress::default() });
        self.prefix_ids.insert(p.to_owned(), id);
        id
    }

    /// Folds in one task state change made at `at_us`: the same as applying a
    /// [`FeedEvent::Tasks`] holding it, without the list.
    pub fn apply_change(&mut self, at_us: u64, c: &TaskChange) {
        self.apply_change_ref(at_us, c.borrowed());
    }

    /// [`Model::apply_change`] with the key borrowed: allocates nothing per change.
    pub fn apply_change_ref(&mut self, at_us: u64, c: ChangeRef<'_>) {
        self.version += 1;
        self.now_us = self.now_us.max(at_us);
        self.story.begin(at_us, c.cause);
        self.change(at_us, c);
        self.story.trim();
        if self.keys.text.len() >= self.keys.compact_at {
            self.compact_keys();
        }
    }

    /// Folds in a published batch of changes, as the live dashboard does: the same as
    /// applying each change in turn, with what the changes of one cause share (their time,
    /// their place in the story, the key text's upkeep) dealt with once per run or batch.
    pub fn apply_batch(&mut self, batch: ChangeBatch<'_>) {
        self.version += 1;
        for run in batch.runs() {
            self.now_us = self.now_us.max(run.at_us);
            self.story.begin(run.at_us, run.cause);
            for c in run.changes() {
                self.change(run.at_us, c);
            }
        }
        self.story.trim();
        if self.keys.text.len() >= self.keys.compact_at {
            self.compact_keys();
        }
    }

    /// Copies the keys still referred to into a fresh buffer (see [`KeyText`]).
    fn compact_keys(&mut self) {
        let old = std::mem::take(&mut self.keys);
        let mut fresh = KeyText::default();
        // A task that ran shares its key with its run: copied once.
        let mut copies: FxHashMap<KeyRef, KeyRef> = FxHashMap::default();
        let mut moved = |r: &mut KeyRef| *r = *copies.entry(*r).or_insert_with(|| fresh.copy_from(&old, *r));
        self.tasks.key_refs_mut().for_each(&mut moved);
        self.forgotten.iter_mut().for_each(|(_, k)| moved(k));
        self.stream.iter_mut().for_each(|r| moved(&mut r.key));
        fresh.compact_at = (2 * fresh.text.len()).max(KeyText::MIN_COMPACT);
        self.keys = fresh;
    }

    /// The text of a key the model refers to.
    fn key_text(&self, r: KeyRef) -> &str {
        self.keys.get(r)
    }

    /// Folds one published event in.
    pub fn apply(&mut self, event: FeedEvent) {
        self.version += 1;
        match event {
            FeedEvent::Started { unix_ms, address } => {
                self.started_unix_ms = unix_ms;
                self.address = address;
            }
            FeedEvent::Tasks { at_us, changes } => {
                for c in &changes {
                    self.apply_change(at_us, c);
                }
            }
            FeedEvent::Graph { tasks } => {
                // Nothing left of the previous computation: the new one gets the graph view.
                if self.tasks.is_empty() {
                    self.graph.clear();
                    self.graph_truncated = false;
                }
                let room = rask_runtime::feed::GRAPH_FEED_LIMIT.saturating_sub(self.graph.len());
                if tasks.len() > room {
                    self.graph_truncated = true;
                }
                self.graph.extend(tasks.into_iter().take(room));
            }
            FeedEvent::WorkerJoined { at_us, worker, name, address, nthreads, memory_limit } => {
                self.now_us = self.now_us.max(at_us);
                self.workers.insert(
                    worker,
                    WorkerView {
                        id: worker,
                        name,
                        address,
                        nthreads,
                        memory_limit,
                        managed: 0,
                        spilled: 0,
                        unmanaged: 0,
                        rss: 0,
                        cpu_percent: 0.0,
                        processing: 0,
                        ran: 0,
                        spill_written: 0,
                        spill_read: 0,
                        fetched: 0,
                        joined_us: at_us,
                        left: None,
                        cpu_sample: None,
                        lanes: vec![0; nthreads.max(1) as usize],
                    },
                );
            }
            FeedEvent::WorkerLeft { at_us, worker, cause } => {
                self.now_us = self.now_us.max(at_us);
                if let Some(w) = self.workers.get_mut(&worker) {
                    w.left.get_or_insert((at_us, cause));
                    w.processing = 0;
                }
            }
            FeedEvent::WorkerMemory {
                at_us,
                worker,
                managed,
                spilled,
                rss,
                cpu_us,
                spill_written,
                spill_read,
                fetched,
            } => {
                self.now_us = self.now_us.max(at_us);
                if let Some(w) = self.workers.get_mut(&worker) {
                    if let Some((t0, c0)) = w.cpu_sample {
                        if at_us > t0 {
                            w.cpu_percent = cpu_us.saturating_sub(c0) as f64 * 100.0 / (at_us - t0) as f64;
                        }
                    }
                    w.cpu_sample = Some((at_us, cpu_us));
                    w.managed = managed;
                    w.spilled = spilled;
                    w.rss = rss;
                    w.unmanaged = rss.saturating_sub(managed);
                    w.spill_written = spill_written;
                    w.spill_read = spill_read;
                    w.fetched = fetched;
                }
                let h = self.memory.entry(worker).or_default();
                h.push_back(MemorySample { at_us, managed, spilled, rss });
                if h.len() > MEMORY_HISTORY {
                    h.pop_front();
                }
            }
        }
    }

    /// Folds one change in, its story entry included (under the cause and time the caller
    /// began, see [`StoryLog::begin`]); a change of a task the model never saw is dropped.
    /// The common case — a known task moving on — reads its slot once and writes it back in
    /// place; a task's first change takes a path of its own. Inlined into the batch's loop
    /// with its parts (`count`, `ran`): `model_apply` folds a tree in 101–106 ns a task so,
    /// 118–126 when the compiler is left to choose.
    #[inline(always)]
    fn change(&mut self, at_us: u64, c: ChangeRef<'_>) {
        let ChangeRef { task, key, via, phase, worker, duration_us, .. } = c;
        let Some((old, key_ref)) = self.tasks.slot(task).copied() else {
            // A change for a task whose first change was never seen (a journal cut short at
            // its start): nothing to attach it to.
            let Some(key) = key else { return };
            self.story.recs.push_back(StoryRec::pack(task, via, phase, worker));
            self.appear(at_us, task, key, via, phase, worker, duration_us);
            return;
        };
        self.story.recs.push_back(StoryRec::pack(task, via, phase, worker));
        let finished = finished_after(old.finished(), via, phase);
        let prefix = u32::from(old.prefix);
        self.count(Some((old.phase, old.finished())), prefix, phase, finished);
        if let Some(w) = old.worker() {
            // It was processing there (only then is its worker kept).
            if let Some(w) = self.workers.get_mut(&w) {
                w.processing = w.processing.saturating_sub(1);
            }
        }
        let processing_on = self.ran(at_us, key_ref, prefix, phase, worker, duration_us);
        if phase == Phase::Forgotten {
            self.tasks.remove(task);
            self.forget(task, key_ref);
        } else if let Some(t) = self.tasks.get_mut(task) {
            *t = TaskRec::new(phase, finished, prefix, processing_on);
        }
    }

    /// A task's first change: it gets its prefix, its key is kept, and it is counted.
    #[allow(clippy::too_many_arguments)]
    fn appear(
        &mut self,
        at_us: u64,
        task: u64,
        key: &str,
        via: Via,
        phase: Phase,
        worker: Option<u32>,
        duration_us: Option<u64>,
    ) {
        let prefix = self.prefix_id(key);
        let finished = finished_after(false, via, phase);
        self.count(None, prefix, phase, finished);
        let key_ref = self.keys.push(key);
        let processing_on = self.ran(at_us, key_ref, prefix, phase, worker, duration_us);
        if phase == Phase::Forgotten {
            // New and forgotten at once (its first change was its last).
            self.forget(task, key_ref);
        } else {
            self.tasks.insert(task, TaskRec::new(phase, finished, prefix, processing_on), key_ref);
        }
    }

    /// Moves a task of `prefix` from `old` (phase, finished; `None`: new) to `phase`.
    #[inline(always)]
    fn count(&mut self, old: Option<(Phase, bool)>, prefix: u32, phase: Phase, finished: bool) {
        let by_state = &mut self.prefixes[prefix as usize].by_state;
        if let Some((old_phase, old_finished)) = old {
            let from = &mut by_state[state_code(old_phase, old_finished)];
            *from = from.saturating_sub(1);
        }
        by_state[state_code(phase, finished)] += 1;
    }

    /// The rest of a change to `phase`: a finished run joins the task stream (its time comes
    /// with the change to memory; a failure with its worker), and a task sent to a worker
    /// counts there. Returns the worker it is processing on now, if it is. `key`: where the
    /// task's key is.
    #[inline(always)]
    fn ran(
        &mut self,
        at_us: u64,
        key: KeyRef,
        prefix: u32,
        phase: Phase,
        worker: Option<u32>,
        duration_us: Option<u64>,
    ) -> Option<u32> {
        let (start_us, duration_us, ok) = match (phase, duration_us) {
            (Phase::Processing, _) => {
                let w = worker?;
                if let Some(wv) = self.workers.get_mut(&w) {
                    wv.processing += 1;
                }
                return Some(w);
            }
            (Phase::Memory, Some(d)) => (at_us.saturating_sub(d), d, true),
            (Phase::Erred, Some(_)) => (at_us, 0, false),
            _ => return None,
        };
        let w = worker?;
        let p = &mut self.prefixes[prefix as usize];
        if ok {
            p.runs += 1;
            p.total_duration_us += duration_us;
            self.completed += 1;
            self.finishes.push_back(at_us);
            let since = at_us.saturating_sub(THROUGHPUT_WINDOW_US);
            while self.finishes.front().is_some_and(|t| *t < since) {
                self.finishes.pop_front();
            }
        } else {
            self.failed += 1;
        }
        let lane = match self.workers.get_mut(&w) {
            Some(wv) => {
                wv.ran += 1;
                lane_for(&mut wv.lanes, start_us, duration_us)
            }
            None => 0,
        };
        self.stream_seq += 1;
        let seq = self.stream_seq;
        self.stream.push_back(RunRec { seq, key, prefix, worker: w, lane, start_us, duration_us, ok });
        if self.stream.len() > STREAM_LIMIT {
            self.stream.pop_front();
        }
        None
    }

    /// Remembers a forgotten task's serial by its key, to find its story.
    fn forget(&mut self, task: u64, key: KeyRef) {
        self.forgotten.push_back((task, key));
        if self.forgotten.len() > STORY_LIMIT / 4 {
            self.forgotten.pop_front();
        }
    }

    /// Tasks known, by state (forgotten ones are not).
    #[must_use]
    pub fn counts(&self) -> BTreeMap<&'static str, u64> {
        LIVE_PHASES.iter().map(|&p| (phase_name(p), self.prefixes.iter().map(|x| x.in_phase(p)).sum())).collect()
    }

    /// Finished tasks per second over the last two seconds of events.
    fn throughput(&mut self) -> f64 {
        let since = self.now_us.saturating_sub(THROUGHPUT_WINDOW_US);
        while self.finishes.front().is_some_and(|t| *t < since) {
            self.finishes.pop_front();
        }
        self.finishes.len() as f64 / (THROUGHPUT_WINDOW_US as f64 / 1e6)
    }

    /// The status snapshot.
    pub fn status(&mut self) -> Status {
        Status {
            address: self.address.clone(),
            started_unix_ms: self.started_unix_ms,
            now_us: self.now_us,
            counts: self.counts(),
            completed: self.completed,
            failed: self.failed,
            throughput: self.throughput(),
            // Counts and means are worked out here, not with every change.
            prefixes: self.prefixes.iter().map(PrefixProgress::snapshot).collect(),
            workers: self.workers.values().cloned().collect(),
            stream_seq: self.stream_seq,
        }
    }

    /// A kept run in its published form (with its prefix's name).
    fn run(&self, r: &RunRec) -> Run {
        let prefix =
            self.prefixes.get(r.prefix as usize).map_or_else(|| Arc::from(OTHER_PREFIX), |p| Arc::clone(&p.name));
        Run {
            seq: r.seq,
            key: Key::new(self.key_text(r.key)),
            prefix,
            worker: r.worker,
            lane: r.lane,
            start_us: r.start_us,
            duration_us: r.duration_us,
            ok: r.ok,
        }
    }

    /// Task runs after `seq`, oldest first, at most `limit`.
    #[must_use]
    pub fn stream_after(&self, seq: u64, limit: usize) -> Vec<Run> {
        let start = self.stream.partition_point(|r| r.seq <= seq);
        self.stream.range(start..).take(limit).map(|r| self.run(r)).collect()
    }

    /// A task's current state (`None`: not known now) and its recorded story, oldest first
    /// (the latest task of that key, if the key was used more than once).
    #[must_use]
    pub fn story(&self, key: &str) -> (Option<Phase>, Vec<StoryEntry>) {
        let live = self.tasks.iter().find(|(_, _, k)| self.key_text(*k) == key).map(|(s, t, _)| (s, Some(t.phase)));
        let forgotten = || self.forgotten.iter().rev().find(|(_, k)| self.key_text(*k) == key).map(|(s, _)| (*s, None));
        let Some((serial, now)) = live.or_else(forgotten) else { return (None, Vec::new()) };
        (now, self.story.of(serial))
    }

    /// A worker by name (the latest of that name), with its memory history and recent runs.
    #[must_use]
    pub fn worker(&self, name: &str) -> Option<(WorkerView, Vec<MemorySample>, Vec<Run>)> {
        let w = self.workers.values().rev().find(|w| w.name == name)?;
        let memory = self.memory.get(&w.id).map(|h| h.iter().copied().collect()).unwrap_or_default();
        let runs: Vec<Run> =
            self.stream.iter().rev().filter(|r| r.worker == w.id).take(200).map(|r| self.run(r)).collect();
        Some((w.clone(), memory, runs))
    }

    /// The current computation's tasks with their inputs and states (graphs up to the feed's
    /// limit), and whether it was cut short.
    #[must_use]
    pub fn graph(&self) -> (Vec<GraphNode>, bool) {
        let live: HashMap<&str, Phase> = self.tasks.iter().map(|(_, t, k)| (self.key_text(k), t.phase)).collect();
        let nodes = self
            .graph
            .iter()
            .map(|(k, deps)| {
                let phase = live.get(k.as_str()).map_or("forgotten", |p| phase_name(*p));
                (k.clone(), deps.clone(), phase)
            })
            .collect();
        (nodes, self.graph_truncated)
    }

    /// Memory samples of every worker, for the report.
    #[must_use]
    pub fn memory_history(&self) -> BTreeMap<u32, Vec<MemorySample>> {
        self.memory.iter().map(|(w, h)| (*w, h.iter().copied().collect())).collect()
    }

    /// The Prometheus text exposition of the counters and gauges.
    pub fn metrics(&mut self) -> String {
        use std::fmt::Write;
        fn family(out: &mut String, name: &str, kind: &str, help: &str) {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        }
        let status = self.status();
        let mut out = String::new();
        family(&mut out, "rask_tasks", "gauge", "Tasks the scheduler knows, by state.");
        for (state, n) in &status.counts {
            let _ = writeln!(out, "rask_tasks{{state=\"{state}\"}} {n}");
        }
        let scalars: [(&str, &str, &str, String); 4] = [
            ("rask_tasks_completed_total", "counter", "Tasks finished successfully.", status.completed.to_string()),
            ("rask_tasks_failed_total", "counter", "Task runs that failed.", status.failed.to_string()),
            (
                "rask_throughput_tasks_per_second",
                "gauge",
                "Tasks finished per second over the last two seconds.",
                status.throughput.to_string(),
            ),
            (
                "rask_workers",
                "gauge",
                "Workers connected.",
                status.workers.iter().filter(|w| w.left.is_none()).count().to_string(),
            ),
        ];
        for (name, kind, help, value) in scalars {
            family(&mut out, name, kind, help);
            let _ = writeln!(out, "{name} {value}");
        }
        type Field = fn(&WorkerView) -> String;
        let per_worker: [(&str, &str, &str, Field); 8] = [
            ("rask_worker_memory_managed_bytes", "gauge", "Bytes of results in memory.", |w| w.managed.to_string()),
            ("rask_worker_memory_spilled_bytes", "gauge", "Bytes of results on disk.", |w| w.spilled.to_string()),
            ("rask_worker_memory_unmanaged_bytes", "gauge", "Process memory besides results.", |w| {
                w.unmanaged.to_string()
            }),
            ("rask_worker_cpu_percent", "gauge", "CPU use, percent of one core.", |w| format!("{:.1}", w.cpu_percent)),
            ("rask_worker_processing_tasks", "gauge", "Tasks processing on the worker.", |w| w.processing.to_string()),
            ("rask_worker_transfer_bytes_total", "counter", "Bytes fetched from other workers.", |w| {
                w.fetched.to_string()
            }),
            ("rask_worker_spill_written_bytes_total", "counter", "Bytes written to spill files.", |w| {
                w.spill_written.to_string()
            }),
            ("rask_worker_spill_read_bytes_total", "counter", "Bytes read back from spill files.", |w| {
                w.spill_read.to_string()
            }),
        ];
        for (name, kind, help, field) in per_worker {
            family(&mut out, name, kind, help);
            for w in status.workers.iter().filter(|w| w.left.is_none()) {
                let _ = writeln!(out, "{name}{{worker=\"{}\"}} {}", escape_label(&w.name), field(w));
            }
        }
        out
    }
}

/// Escapes a Prometheus label value.
pub(crate) fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// The first lane free at `start` (else the one that frees first), marked busy until the end.
fn lane_for(lanes: &mut [u64], start: u64, duration: u64) -> u32 {
    let i = lanes
        .iter()
        .position(|busy_until| *busy_until <= start)
        .unwrap_or_else(|| lanes.iter().enumerate().min_by_key(|(_, b)| **b).map_or(0, |(i, _)| i));
    if let Some(l) = lanes.get_mut(i) {
        *l = start + duration;
    }
    i as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A change of task `task` (named `key` on its first change).
    fn change(task: u64, key: Option<&str>, phase: Phase, worker: Option<u32>) -> TaskChange {
        TaskChange {
            task,
            key: key.map(Key::new),
            via: Via::EMPTY,
            phase,
            worker,
            duration_us: None,
            cause: Cause::Tick,
        }
    }

    /// Folds `changes` into a fresh model one by one, and into another in batches of
    /// `size` as the scheduler publishes them (the core's records, each batch's causes from
    /// its first record on); both models must then show the same.
    fn fold_both_ways(changes: &[(u64, TaskChange)], size: usize) -> (Model, Model) {
        let (mut one_by_one, mut batched) = (Model::new(), Model::new());
        for m in [&mut one_by_one, &mut batched] {
            joined(m, 1, "w1", 2);
            joined(m, 2, "w2", 1);
        }
        for (at_us, c) in changes {
            one_by_one.apply_change(*at_us, c);
        }
        let mut b = rask_runtime::feed::BatchBuilder::default();
        for chunk in changes.chunks(size) {
            for (at_us, c) in chunk {
                b.push(*at_us, c.borrowed());
            }
            assert_eq!(b.len(), chunk.len());
            batched.apply_batch(b.batch());
            b.clear();
        }
        (one_by_one, batched)
    }

    fn joined(m: &mut Model, worker: u32, name: &str, nthreads: u32) {
        m.apply(FeedEvent::WorkerJoined {
            at_us: 0,
            worker,
            name: name.into(),
            address: "tcp://x:1".into(),
            nthreads,
            memory_limit: None,
        });
    }

    #[test]
    fn prefixes_drop_numeric_and_hash_suffixes() {
        assert_eq!(prefix_of("inc-12"), "inc");
        assert_eq!(prefix_of("tree-14-1234"), "tree");
        assert_eq!(prefix_of("load-parquet-0a1b2c3d4e5f"), "load-parquet");
        assert_eq!(prefix_of("total"), "total");
        assert_eq!(prefix_of("-1"), "-1");
    }

    /// The straightforward statement of the rule, which `prefix_of` computes in one pass.
    fn prefix_by_parts(key: &str) -> &str {
        let mut end = key.len();
        while let Some(i) = key[..end].rfind(['-', '_']) {
            let part = &key[i + 1..end];
            let numeric = !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit());
            let hashy = part.len() >= 8 && part.bytes().all(|b| b.is_ascii_hexdigit());
            if (numeric || hashy) && i > 0 {
                end = i;
            } else {
                break;
            }
        }
        &key[..end]
    }

    #[test]
    fn prefixes_follow_the_rule_part_by_part() {
        let keys = [
            "",
            "-",
            "_",
            "a",
            "a-",
            "a_",
            "-a",
            "a--1",
            "a-1-",
            "a-1_2",
            "x_12_abcdef12",
            "x-abcdef1",
            "x-abcdefgh",
            "x-ABCDEF12",
            "-12-34",
            "_-1",
            "é-1",
            "a-é1",
            "a-1é",
            "sum-00000000",
            "t-14-1234-",
            "a-b-1-c-2",
            "deadbeef",
            "x-deadbeef-1",
            "q-12345678901234567890",
        ];
        for k in keys {
            assert_eq!(prefix_of(k), prefix_by_parts(k), "{k:?}");
        }
    }

    #[test]
    fn a_cause_under_which_nothing_was_kept_leaves_no_entry() {
        let mut log = StoryLog::default();
        let (a, b) = (Cause::Tick, Cause::Client { client: 1 });
        let keep = |log: &mut StoryLog, phase| log.recs.push_back(StoryRec::pack(5, Via::EMPTY, phase, None));
        log.begin(1, a);
        keep(&mut log, Phase::Waiting);
        // Changes of unknown tasks only, then the first cause again: it holds on.
        log.begin(2, b);
        log.begin(1, a);
        keep(&mut log, Phase::Queued);
        // Another such run, then a new cause: it takes the empty one's place.
        log.begin(3, b);
        log.begin(4, a);
        keep(&mut log, Phase::Processing);
        assert_eq!(log.causes.iter().map(|&(n, c, t)| (n, c, t)).collect::<Vec<_>>(), [(0, a, 1), (2, a, 4)]);
        let seen: Vec<(u64, Cause, Phase)> = log.of(5).iter().map(|e| (e.at_us, e.cause, e.phase)).collect();
        assert_eq!(seen, [(1, a, Phase::Waiting), (1, a, Phase::Queued), (4, a, Phase::Processing)]);
    }

    #[test]
    fn batches_fold_as_their_changes_one_by_one() {
        let by = |cause: Cause, c: TaskChange| TaskChange { cause, ..c };
        let submitted = Cause::Submitted { client: 7 };
        let (on1, on2) = (Cause::Finished { worker: 1 }, Cause::Finished { worker: 2 });
        let mut leaf = change(1, Some("load-1"), Phase::Processing, Some(1));
        leaf.via = Via::from_phases([Phase::Released, Phase::Waiting, Phase::Queued]).expect("three phases");
        let leaf_via = leaf.via;
        let ran =
            |task, worker, d| TaskChange { duration_us: Some(d), ..change(task, None, Phase::Memory, Some(worker)) };
        let changes = [
            (10, by(submitted, leaf)),
            (10, by(submitted, change(2, Some("load-2"), Phase::Queued, None))),
            (10, by(submitted, change(3, Some("sum-0a1b2c3d4e"), Phase::Waiting, None))),
            // A run of a task never seen (a journal cut short): dropped either way.
            (11, by(Cause::Tick, ran(99, 1, 3))),
            (12, by(on1, ran(1, 1, 2))),
            (12, by(on1, change(2, None, Phase::Processing, Some(1)))),
            (15, by(on2, TaskChange { duration_us: Some(0), ..change(2, None, Phase::Erred, Some(1)) })),
            (15, by(on2, change(3, None, Phase::Erred, None))),
            (16, by(Cause::WorkerLeft { worker: 1 }, change(1, None, Phase::Waiting, None))),
            (17, by(on2, change(1, None, Phase::Processing, Some(2)))),
            (18, by(on2, ran(1, 2, 1))),
            (18, by(on2, change(4, Some("once-1"), Phase::Forgotten, None))),
            (20, by(Cause::Client { client: 7 }, change(3, None, Phase::Forgotten, None))),
            (20, by(Cause::Client { client: 7 }, change(2, None, Phase::Forgotten, None))),
            (21, by(Cause::Client { client: 7 }, change(1, None, Phase::Released, None))),
        ];
        for size in [1, 2, 3, 5, changes.len()] {
            let (mut one, mut batched) = fold_both_ways(&changes, size);
            assert_eq!(batched.status(), one.status(), "batches of {size}");
            assert_eq!(batched.stream_after(0, 100), one.stream_after(0, 100), "batches of {size}");
            for key in ["load-1", "load-2", "sum-0a1b2c3d4e", "once-1"] {
                assert_eq!(batched.story(key), one.story(key), "story of {key}, batches of {size}");
            }
        }
        // What both show, worked out by hand.
        let (mut m, _) = fold_both_ways(&changes, 1);
        let s = m.status();
        assert_eq!((s.completed, s.failed, s.stream_seq), (2, 1, 3));
        let live: Vec<(&str, u64)> = s.counts.iter().filter(|(_, n)| **n > 0).map(|(k, n)| (*k, *n)).collect();
        assert_eq!(live, [("released", 1)]);
        let prefixes: Vec<(&str, [u64; 6])> = s
            .prefixes
            .iter()
            .map(|p| (&*p.name, [p.waiting, p.processing, p.memory, p.erred, p.done, p.mean_duration_us]))
            .collect();
        assert_eq!(prefixes, [("load", [0, 0, 0, 0, 1, 1]), ("sum", [0; 6]), ("once", [0; 6])]);
        let runs: Vec<(String, u32, u64, u64, bool)> = m
            .stream_after(0, 100)
            .into_iter()
            .map(|r| (r.key.as_str().to_owned(), r.worker, r.start_us, r.duration_us, r.ok))
            .collect();
        let run = |k: &str, w, start, d, ok| (k.to_owned(), w, start, d, ok);
        assert_eq!(
            runs,
            [run("load-1", 1, 10, 2, true), run("load-2", 1, 15, 0, false), run("load-1", 2, 17, 1, true)]
        );
        let story = |m: &Model, key: &str| {
            let (now, entries) = m.story(key);
            (now, entries.iter().map(|e| (e.at_us, e.cause, e.phase, e.worker)).collect::<Vec<_>>())
        };
        let client = Cause::Client { client: 7 };
        assert_eq!(
            story(&m, "load-1"),
            (
                Some(Phase::Released),
                vec![
                    (10, submitted, Phase::Processing, Some(1)),
                    (12, on1, Phase::Memory, Some(1)),
                    (16, Cause::WorkerLeft { worker: 1 }, Phase::Waiting, None),
                    (17, on2, Phase::Processing, Some(2)),
                    (18, on2, Phase::Memory, Some(2)),
                    (21, client, Phase::Released, None),
                ]
            )
        );
        assert_eq!(m.story("load-1").1[0].via, leaf_via);
        let load_2 = vec![
            (10, submitted, Phase::Queued, None),
            (12, on1, Phase::Processing, Some(1)),
            (15, on2, Phase::Erred, Some(1)),
            (20, client, Phase::Forgotten, None),
        ];
        assert_eq!(story(&m, "load-2"), (None, load_2));
        let sum = vec![
            (10, submitted, Phase::Waiting, None),
            (15, on2, Phase::Erred, None),
            (20, client, Phase::Forgotten, None),
        ];
        assert_eq!(story(&m, "sum-0a1b2c3d4e"), (None, sum));
        assert_eq!(story(&m, "once-1"), (None, vec![(18, on2, Phase::Forgotten, None)]));
    }

    #[test]
    fn progress_counts_follow_the_task_states_and_runs_fill_the_stream() {
        let mut m = Model::new();
        joined(&mut m, 1, "w1", 2);
        m.apply(FeedEvent::Tasks {
            at_us: 10,
            changes: vec![
                change(1, Some("inc-1"), Phase::Waiting, None),
                change(2, Some("inc-2"), Phase::Waiting, None),
                change(3, Some("sum"), Phase::Waiting, None),
                change(1, None, Phase::Processing, Some(1)),
            ],
        });
        let s = m.status();
        assert_eq!(
            s.prefixes[0],
            PrefixProgress { name: Arc::from("inc"), waiting: 1, processing: 1, ..Default::default() }
        );
        assert_eq!(s.workers[0].processing, 1);
        let finished = TaskChange { duration_us: Some(5), ..change(1, None, Phase::Memory, Some(1)) };
        m.apply(FeedEvent::Tasks {
            at_us: 20,
            changes: vec![finished, change(1, None, Phase::Released, None), change(1, None, Phase::Forgotten, None)],
        });
        let s = m.status();
        assert_eq!((s.prefixes[0].waiting, s.prefixes[0].processing, s.prefixes[0].done), (1, 0, 1));
        assert_eq!(s.prefixes[0].mean_duration_us, 5);
        assert_eq!(s.workers[0].processing, 0);
        assert_eq!(s.counts["waiting"], 2);
        let recount = |m: &Model, phase: Phase| m.tasks.iter().filter(|(_, t, _)| t.phase == phase).count() as u64;
        for phase in LIVE_PHASES {
            assert_eq!(s.counts[phase_name(phase)], recount(&m, phase), "{phase:?} counted as it changed");
        }
        assert_eq!(s.completed, 1);
        let runs = m.stream_after(0, 10);
        assert_eq!((runs.len(), runs[0].start_us, runs[0].duration_us, runs[0].key.as_str()), (1, 15, 5, "inc-1"));
        let (now, story) = m.story("inc-1");
        assert_eq!(now, None, "forgotten");
        let phases: Vec<Phase> = story.iter().map(|e| e.phase).collect();
        assert_eq!(phases, [Phase::Waiting, Phase::Processing, Phase::Memory, Phase::Released, Phase::Forgotten]);
        // A failure is a failed run on its worker.
        let failed = TaskChange {
            cause: Cause::Failed { worker: 1 },
            duration_us: Some(0),
            ..change(2, None, Phase::Erred, Some(1))
        };
        // A task that fails because its input did never ran: not a run.
        let inherited = TaskChange { cause: Cause::Failed { worker: 1 }, ..change(3, None, Phase::Erred, None) };
        m.apply(FeedEvent::Tasks { at_us: 30, changes: vec![failed, inherited] });
        let s = m.status();
        assert_eq!((s.failed, s.prefixes[0].erred, s.prefixes[0].waiting), (1, 1, 0));
        assert_eq!((s.prefixes[1].name.as_ref(), s.prefixes[1].erred), ("sum", 1));
        assert!(!m.stream_after(1, 10)[0].ok);
    }

    #[test]
    fn phases_passed_through_in_one_change_count_like_separate_changes() {
        let via = |p: &[Phase]| Via::from_phases(p.iter().copied()).unwrap_or_default();
        let mut m = Model::new();
        joined(&mut m, 1, "w1", 1);
        let new = TaskChange {
            via: via(&[Phase::Released, Phase::Waiting, Phase::Queued]),
            ..change(1, Some("x-1"), Phase::Processing, Some(1))
        };
        m.apply(FeedEvent::Tasks { at_us: 5, changes: vec![new] });
        let s = m.status();
        assert_eq!((s.prefixes[0].processing, s.workers[0].processing, s.counts["processing"]), (1, 1, 1));
        let done = TaskChange { duration_us: Some(3), ..change(1, None, Phase::Memory, Some(1)) };
        let gone = TaskChange { via: via(&[Phase::Released]), ..change(1, None, Phase::Forgotten, None) };
        m.apply(FeedEvent::Tasks { at_us: 9, changes: vec![done, gone] });
        let s = m.status();
        assert_eq!((s.prefixes[0].done, s.prefixes[0].processing, s.workers[0].processing), (1, 0, 0));
        assert_eq!(s.completed, 1);
        let (_, story) = m.story("x-1");
        let steps: Vec<(Vec<Phase>, Phase)> = story.iter().map(|e| (e.via.iter().collect(), e.phase)).collect();
        assert_eq!(
            steps,
            [
                (vec![Phase::Released, Phase::Waiting, Phase::Queued], Phase::Processing),
                (vec![], Phase::Memory),
                (vec![Phase::Released], Phase::Forgotten)
            ]
        );
        // A result released in the same event it was computed in is still done.
        let quick = TaskChange { via: via(&[Phase::Memory]), ..change(2, Some("x-2"), Phase::Released, None) };
        m.apply(FeedEvent::Tasks { at_us: 10, changes: vec![quick] });
        assert_eq!(m.status().prefixes[0].done, 2);
    }

    #[test]
    fn a_lost_result_computed_again_is_no_longer_done() {
        let mut m = Model::new();
        joined(&mut m, 1, "w1", 1);
        let done = TaskChange { duration_us: Some(1), ..change(1, Some("x-1"), Phase::Memory, Some(1)) };
        m.apply(FeedEvent::Tasks { at_us: 5, changes: vec![done, change(1, None, Phase::Released, None)] });
        assert_eq!(m.status().prefixes[0].done, 1);
        m.apply(FeedEvent::Tasks { at_us: 6, changes: vec![change(1, None, Phase::Waiting, None)] });
        let p = &m.status().prefixes[0];
        assert_eq!((p.done, p.waiting), (0, 1));
    }

    #[test]
    fn keys_that_do_not_group_share_one_prefix_beyond_the_cap() {
        let mut m = Model::new();
        let changes = (0..MAX_PREFIXES as u64 + 10)
            .map(|i| change(i + 1, Some(&format!("k{i}x")), Phase::Waiting, None))
            .collect();
        m.apply(FeedEvent::Tasks { at_us: 1, changes });
        let s = m.status();
        assert_eq!(s.prefixes.len(), MAX_PREFIXES + 1);
        assert_eq!((s.prefixes[MAX_PREFIXES].name.as_ref(), s.prefixes[MAX_PREFIXES].waiting), (OTHER_PREFIX, 10));
    }

    fn rec() -> TaskRec {
        TaskRec::new(Phase::Waiting, false, 0, None)
    }

    #[test]
    fn the_task_table_keeps_stragglers_without_pinning_its_window() {
        let (mut t, mut text) = (TaskTable::default(), KeyText::default());
        for s in 1..=200_000u64 {
            t.insert(s, rec(), text.push(&format!("k{s}")));
        }
        // All but the first finish: the window moves past it, and it moves to the map.
        for s in 2..=200_000u64 {
            assert!(t.remove(s).is_some());
        }
        assert_eq!(t.len(), 1);
        assert!(t.window.len() <= TaskTable::SPAN, "window {}", t.window.len());
        assert_eq!(t.slot(1).map(|(r, k)| (r.phase, text.get(*k))), Some((Phase::Waiting, "k1")));
        t.insert(200_001, rec(), text.push("late"));
        let live: Vec<(u64, &str)> = t.iter().map(|(s, _, k)| (s, text.get(k))).collect();
        assert_eq!(live, vec![(200_001, "late"), (1, "k1")]);
        assert!(t.remove(1).is_some() && t.remove(200_001).is_some() && t.is_empty());
        assert!(t.remove(7).is_none());
    }

    #[test]
    fn a_run_keeps_its_key_however_long_ago_its_task_was_forgotten() {
        let mut m = Model::new();
        joined(&mut m, 1, "w1", 1);
        let finished = TaskChange { duration_us: Some(5), ..change(1, Some("first-1"), Phase::Memory, Some(1)) };
        m.apply(FeedEvent::Tasks { at_us: 10, changes: vec![finished, change(1, None, Phase::Forgotten, None)] });
        // More tasks are forgotten (cancelled before they ran) than the model keeps stories of.
        let n = STORY_LIMIT as u64 / 4 + 1;
        let changes = (2..n + 2)
            .flat_map(|t| {
                [change(t, Some(&format!("x-{t}")), Phase::Waiting, None), change(t, None, Phase::Forgotten, None)]
            })
            .collect();
        m.apply(FeedEvent::Tasks { at_us: 20, changes });
        let runs = m.stream_after(0, 10);
        assert_eq!((runs.len(), runs[0].key.as_str(), runs[0].duration_us), (1, "first-1", 5));
    }

    #[test]
    fn key_text_holds_keys_of_any_length() {
        let mut text = KeyText::default();
        let keys: Vec<String> = [0, 1, 127, 128, 16_383, 16_384, 20_000].iter().map(|n| "é".repeat(n / 2)).collect();
        let refs: Vec<KeyRef> = keys.iter().map(|k| text.push(k)).collect();
        for (k, r) in keys.iter().zip(&refs) {
            assert_eq!(text.get(*r), k.as_str(), "a key of {} bytes", k.len());
        }
        let mut copy = KeyText::default();
        for (k, r) in keys.iter().zip(&refs).rev() {
            let moved = copy.copy_from(&text, *r);
            assert_eq!(copy.get(moved), k.as_str());
        }
        assert_eq!(copy.text.len(), text.text.len(), "the same entries, length prefixes included");
    }

    #[test]
    fn compacting_the_key_text_keeps_each_key_still_referred_to_once_and_drops_the_rest() {
        let mut m = Model::new();
        joined(&mut m, 1, "w1", 1);
        // A straggler: live while everything after it comes and goes, so it leaves the window.
        m.apply(FeedEvent::Tasks { at_us: 1, changes: vec![change(1, Some("straggler-1"), Phase::Waiting, None)] });
        // A live task that ran: its key is held by the table and by its run.
        let ran = TaskChange { duration_us: Some(2), ..change(2, Some("ran-2"), Phase::Memory, Some(1)) };
        m.apply(FeedEvent::Tasks { at_us: 2, changes: vec![ran] });
        // More forgotten tasks than the model remembers, with long keys: dead text.
        let n = (STORY_LIMIT / 4 + TaskTable::SPAN) as u64;
        let filler = (10..n + 10).flat_map(|t| {
            let key = format!("filler-{t}-{}", "x".repeat(40));
            [change(t, Some(&key), Phase::Waiting, None), change(t, None, Phase::Forgotten, None)]
        });
        m.apply(FeedEvent::Tasks { at_us: 3, changes: filler.collect() });
        assert!(m.tasks.old.contains_key(&1), "the straggler moved out of the window");
        m.compact_keys();
        // Exactly the keys still referred to, each once (one length byte each).
        let forgotten: usize = m.forgotten.iter().map(|(_, k)| 1 + m.key_text(*k).len()).sum();
        let live = 1 + "straggler-1".len() + 1 + "ran-2".len();
        assert_eq!(m.keys.text.len(), live + forgotten);
        assert_eq!(m.stream_after(0, 1)[0].key.as_str(), "ran-2");
        assert_eq!(m.story("ran-2").0, Some(Phase::Memory));
        assert_eq!(m.story("straggler-1").0, Some(Phase::Waiting));
        let latest = format!("filler-{}-{}", n + 9, "x".repeat(40));
        let (now, story) = m.story(&latest);
        assert_eq!((now, story.len()), (None, 2), "the latest forgotten task is still found");
        assert_eq!(m.story(&format!("filler-10-{}", "x".repeat(40))).1.len(), 0, "no longer remembered");
        // It compacts by itself once the text has doubled.
        assert!(m.keys.text.len() + 100 < KeyText::MIN_COMPACT, "a limit below what a compaction sets");
        m.keys.compact_at = m.keys.text.len() + 100;
        let changes =
            (0..10).map(|i| change(n + 20 + i, Some(&format!("after-{i}-{}", "y".repeat(20))), Phase::Queued, None));
        m.apply(FeedEvent::Tasks { at_us: 4, changes: changes.collect() });
        assert!(m.keys.compact_at >= KeyText::MIN_COMPACT, "compacted, the next compaction set");
        assert_eq!(m.story(&format!("after-9-{}", "y".repeat(20))).0, Some(Phase::Queued));
        assert_eq!(m.story("straggler-1").0, Some(Phase::Waiting));
    }

    #[test]
    fn a_task_seen_only_when_it_was_forgotten_has_a_story() {
        let mut m = Model::new();
        m.apply(FeedEvent::Tasks { at_us: 7, changes: vec![change(1, Some("brief-1"), Phase::Forgotten, None)] });
        let (now, story) = m.story("brief-1");
        assert_eq!((now, story.len(), story[0].phase), (None, 1, Phase::Forgotten));
        assert_eq!(m.status().counts.values().sum::<u64>(), 0, "never counted as live");
    }

    #[test]
    fn a_story_keeps_each_change_with_its_own_cause_and_time_after_older_ones_are_dropped() {
        let mut m = Model::new();
        joined(&mut m, 4, "w4", 1);
        let first =
            TaskChange { cause: Cause::Submitted { client: 2 }, ..change(1, Some("t-1"), Phase::Waiting, None) };
        m.apply(FeedEvent::Tasks { at_us: 1, changes: vec![first] });
        // Enough changes of other tasks, under other causes, to push the first out.
        let others = (0..STORY_LIMIT as u64).map(|i| TaskChange {
            cause: Cause::Worker { worker: (i % 3) as u32 },
            ..change(i + 2, Some(&format!("o-{i}")), Phase::Waiting, None)
        });
        m.apply(FeedEvent::Tasks { at_us: 2, changes: others.collect() });
        let via = Via::from_phases([Phase::Queued]).unwrap_or_default();
        let sent =
            TaskChange { via, cause: Cause::Finished { worker: 4 }, ..change(1, None, Phase::Processing, Some(4)) };
        m.apply(FeedEvent::Tasks { at_us: 3, changes: vec![sent] });
        let (now, story) = m.story("t-1");
        assert_eq!(now, Some(Phase::Processing));
        let expected = StoryEntry {
            at_us: 3,
            task: 1,
            via,
            phase: Phase::Processing,
            worker: Some(4),
            cause: Cause::Finished { worker: 4 },
        };
        assert_eq!(story, [expected], "the first change was dropped, the latest kept whole");
        let (_, other) = m.story(&format!("o-{}", STORY_LIMIT - 1));
        assert_eq!((other[0].at_us, other[0].cause), (2, Cause::Worker { worker: ((STORY_LIMIT - 1) % 3) as u32 }));
        assert!(m.story.causes.len() <= STORY_LIMIT + 1);
    }

    #[test]
    fn a_run_of_changes_under_one_cause_keeps_its_cause_when_its_start_is_dropped() {
        let mut m = Model::new();
        // One event's changes, more than the stories keep: the run of its cause starts before
        // the oldest change kept.
        let many = (0..STORY_LIMIT as u64 + 10).map(|t| TaskChange {
            cause: Cause::Submitted { client: 4 },
            ..change(t + 1, Some(&format!("m-{t}")), Phase::Waiting, None)
        });
        m.apply(FeedEvent::Tasks { at_us: 11, changes: many.collect() });
        m.apply(FeedEvent::Tasks { at_us: 12, changes: vec![change(1, None, Phase::Queued, None)] });
        let (_, first_kept) = m.story("m-11");
        assert_eq!((first_kept[0].at_us, first_kept[0].cause), (11, Cause::Submitted { client: 4 }));
        let log = &m.story;
        assert_eq!(log.recs.len(), STORY_LIMIT);
        assert!(log.causes.len() == 2 && log.causes[0].0 <= log.front, "{:?}", log.causes);
        let (_, later) = m.story("m-0");
        assert_eq!(later.iter().map(|e| (e.at_us, e.phase)).collect::<Vec<_>>(), [(12, Phase::Queued)]);
    }

    #[test]
    fn overlapping_runs_get_separate_lanes() {
        let mut lanes = vec![0, 0];
        assert_eq!(lane_for(&mut lanes, 0, 10), 0);
        assert_eq!(lane_for(&mut lanes, 5, 10), 1);
        assert_eq!(lane_for(&mut lanes, 12, 1), 0);
    }
}
