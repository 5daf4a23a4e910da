//! The threaded scheduler.
//!
//! Design, for a per-task overhead well under a microsecond:
//! - The graph is pre-analysed into plain vectors (ranks, dependency counters); the hot path
//!   indexes them by `TaskId` and never hashes or allocates.
//! - There is no scheduler thread. The thread that finishes a task decrements its dependents'
//!   counters and keeps the newly runnable ones in a thread-local heap, so chains and reduction
//!   branches continue on the same thread without any lock (and with their inputs in its cache).
//! - A shared heap holds the rest (initially, every root). Its best rank is mirrored in an
//!   atomic, so a thread can tell without locking whether its local work is still the best; when
//!   it is not, or when it has none, it takes a small batch from the shared heap under one lock.
//! - When another thread is idle, a busy thread hands over its surplus local work.
//! - Completed-task counts are kept per thread and published only when a thread runs out of work,
//!   which is the only time termination can be decided.
//! - Resource-constrained tasks take a slower path through a mutex-protected pool; tasks that do
//!   not fit yet are parked and re-queued when resources are released.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

use rask_graph::{Executor, Graph, TaskId, TaskResult, Value};

use crate::exec::Plan;
use crate::{Capacity, LocalConfig, LocalError, prepare};

/// Runs tasks on a pool of threads (by default one per core), honouring priorities, resources,
/// retries and timeouts, sharing values between tasks and freeing them as early as possible.
#[derive(Clone, Debug, Default)]
pub struct ThreadedScheduler {
    cfg: LocalConfig,
}

impl ThreadedScheduler {
    /// A threaded scheduler with this configuration.
    #[must_use]
    pub fn new(cfg: LocalConfig) -> Self {
        ThreadedScheduler { cfg }
    }

    /// The configuration.
    #[must_use]
    pub fn config(&self) -> &LocalConfig {
        &self.cfg
    }

    /// Number of threads the pool runs.
    #[must_use]
    pub fn threads(&self) -> usize {
        (self.cfg.workers.max(1) * self.cfg.threads_per_worker.max(1)).max(1)
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic inside a task is caught before it can poison anything; tolerate poison anyway.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

struct Queue {
    heap: BinaryHeap<Reverse<u32>>,
    sleepers: usize,
    finished: bool,
}

struct Pool {
    free: Capacity,
    parked: BinaryHeap<Reverse<u32>>,
}

struct Shared<'p, 'g> {
    plan: &'p Plan<'g>,
    slots: Vec<Mutex<Option<TaskResult>>>,
    waiting: Vec<AtomicU32>,
    consumers: Vec<AtomicU32>,
    queue: Mutex<Queue>,
    cv: Condvar,
    /// Best rank in `queue.heap`, or `u32::MAX` when it is empty. Read without the lock.
    top: AtomicU32,
    /// Mirror of `queue.sleepers`, read without the lock to decide whether to share work.
    idle: AtomicUsize,
    done: AtomicUsize,
    threads: usize,
    pool: Option<Mutex<Pool>>,
    progress: Option<Arc<crate::Progress>>,
}

/// Tasks a thread finishes before it publishes them to [`crate::Progress`].
const PROGRESS_BATCH: usize = 64;

impl Executor for ThreadedScheduler {
    type Error = LocalError;

    fn run(&self, graph: &Graph, outputs: &[TaskId]) -> Result<Vec<TaskResult>, LocalError> {
        let (g, outs, capacity) = prepare(graph, outputs, &self.cfg)?;
        let plan = Plan::new(&g, &outs, &self.cfg.registry);
        let n = g.len();
        let threads = self.threads().min(n.max(1));
        let roots: BinaryHeap<Reverse<u32>> =
            g.ids().filter(|t| g.deps(*t).is_empty()).map(|t| Reverse(plan.rank[t.idx()])).collect();
        let top = roots.peek().map_or(u32::MAX, |r| r.0);
        let shared = Shared {
            plan: &plan,
            slots: (0..n).map(|_| Mutex::new(None)).collect(),
            waiting: g.ids().map(|t| AtomicU32::new(g.deps(t).len() as u32)).collect(),
            consumers: g.ids().map(|t| AtomicU32::new(plan.consumers(t))).collect(),
            queue: Mutex::new(Queue { heap: roots, sleepers: 0, finished: n == 0 }),
            cv: Condvar::new(),
            top: AtomicU32::new(top),
            idle: AtomicUsize::new(0),
            done: AtomicUsize::new(0),
            threads,
            pool: (!capacity.is_empty()).then(|| Mutex::new(Pool { free: capacity, parked: BinaryHeap::new() })),
            progress: self.cfg.progress.clone(),
        };
        if n > 0 {
            std::thread::scope(|s| -> Result<(), LocalError> {
                let mut handles = Vec::with_capacity(threads);
                for i in 0..threads {
                    let shared = &shared;
                    let h = std::thread::Builder::new()
                        .name(format!("rask-local-{i}"))
                        .spawn_scoped(s, move || shared.work())
                        .map_err(|e| LocalError::Thread(e.to_string()));
                    match h {
                        Ok(h) => handles.push(h),
                        Err(e) if handles.is_empty() => return Err(e),
                        // Fewer threads than asked is still correct; the others share the work.
                        Err(_) => break,
                    }
                }
                for h in handles {
                    // Task panics are caught inside; a panic here would be a scheduler bug.
                    if h.join().is_err() {
                        return Err(LocalError::Thread("a scheduler thread panicked".into()));
                    }
                }
                Ok(())
            })?;
        }
        Ok(outs.iter().map(|o| lock(&shared.slots[o.idx()]).clone().unwrap_or(Ok(Value::Null))).collect())
    }
}

impl Shared<'_, '_> {
    fn work(&self) {
        let mut local: BinaryHeap<Reverse<u32>> = BinaryHeap::new();
        let mut buf: Vec<Value> = Vec::new();
        let mut finished = 0usize;
        let mut unreported = 0usize;
        loop {
            let r = match local.peek() {
                Some(&Reverse(r)) if r <= self.top.load(Ordering::Relaxed) => {
                    local.pop();
                    r
                }
                _ => match self.take(&mut local, &mut finished) {
                    Some(r) => r,
                    None => return,
                },
            };
            if local.len() > 1 && self.idle.load(Ordering::Relaxed) > 0 {
                self.share(&mut local);
            }
            let t = self.plan.by_rank[r as usize];
            let constrained = self.pool.is_some() && !self.plan.graph.task(t).annotations().resources.is_empty();
            if constrained && !self.acquire(t, r) {
                continue; // parked until resources are released
            }
            let result = {
                let dep = |d: TaskId| lock(&self.slots[d.idx()]).clone().unwrap_or(Ok(Value::Null));
                self.plan.execute(t, &dep, &mut buf)
            };
            buf.clear();
            self.finish(t, result, &mut local);
            if constrained {
                self.release(t);
            }
            finished += 1;
            if let Some(p) = &self.progress {
                unreported += 1;
                if unreported == PROGRESS_BATCH || local.is_empty() {
                    p.add(std::mem::take(&mut unreported));
                }
            }
        }
    }

    /// Stores a result, frees inputs nobody needs any more, and makes dependents runnable.
    fn finish(&self, t: TaskId, result: TaskResult, local: &mut BinaryHeap<Reverse<u32>>) {
        let g = self.plan.graph;
        *lock(&self.slots[t.idx()]) = Some(result);
        for d in g.deps(t) {
            if self.consumers[d.idx()].fetch_sub(1, Ordering::AcqRel) == 1 {
                let freed = lock(&self.slots[d.idx()]).take();
                drop(freed);
            }
        }
        for d in g.dependents(t) {
            if self.waiting[d.idx()].fetch_sub(1, Ordering::AcqRel) == 1 {
                local.push(Reverse(self.plan.rank[d.idx()]));
            }
        }
    }

    /// Gets work from the shared heap (a batch of it), or waits for some; `None` when all is done.
    fn take(&self, local: &mut BinaryHeap<Reverse<u32>>, finished: &mut usize) -> Option<u32> {
        let total = self.plan.graph.len();
        let mut q = lock(&self.queue);
        loop {
            if !q.heap.is_empty() {
                let batch = (q.heap.len() / (2 * self.threads)).clamp(1, 32);
                for _ in 0..batch {
                    match q.heap.pop() {
                        Some(r) => local.push(r),
                        None => break,
                    }
                }
                self.top.store(q.heap.peek().map_or(u32::MAX, |r| r.0), Ordering::Relaxed);
                return local.pop().map(|r| r.0);
            }
            if let Some(Reverse(r)) = local.pop() {
                return Some(r);
            }
            if *finished > 0 {
                self.done.fetch_add(std::mem::take(finished), Ordering::AcqRel);
            }
            if q.finished || self.done.load(Ordering::Acquire) == total {
                q.finished = true;
                self.cv.notify_all();
                return None;
            }
            q.sleepers += 1;
            self.idle.store(q.sleepers, Ordering::Relaxed);
            q = self.cv.wait(q).unwrap_or_else(PoisonError::into_inner);
            q.sleepers -= 1;
            self.idle.store(q.sleepers, Ordering::Relaxed);
        }
    }

    /// Moves all but the best local task to the shared heap and wakes sleepers.
    fn share(&self, local: &mut BinaryHeap<Reverse<u32>>) {
        let keep = local.pop();
        let mut q = lock(&self.queue);
        let n = local.len();
        q.heap.extend(local.drain());
        if let Some(k) = keep {
            local.push(k);
        }
        self.top.store(q.heap.peek().map_or(u32::MAX, |r| r.0), Ordering::Relaxed);
        for _ in 0..n.min(q.sleepers) {
            self.cv.notify_one();
        }
    }

    fn push_shared(&self, ranks: impl Iterator<Item = u32>) {
        let mut q = lock(&self.queue);
        let before = q.heap.len();
        q.heap.extend(ranks.map(Reverse));
        let added = q.heap.len() - before;
        self.top.store(q.heap.peek().map_or(u32::MAX, |r| r.0), Ordering::Relaxed);
        for _ in 0..added.min(q.sleepers) {
            self.cv.notify_one();
        }
    }

    /// Takes `t`'s resources, or parks it. Returns whether it may run now.
    fn acquire(&self, t: TaskId, rank: u32) -> bool {
        let Some(pool) = &self.pool else { return true };
        let need = &self.plan.graph.task(t).annotations().resources;
        let mut p = lock(pool);
        if fits(&p.free, need) {
            take_resources(&mut p.free, need, -1.0);
            true
        } else {
            p.parked.push(Reverse(rank));
            false
        }
    }

    /// Returns `t`'s resources and re-queues the parked tasks that now fit, best rank first.
    fn release(&self, t: TaskId) {
        let Some(pool) = &self.pool else { return };
        let need = &self.plan.graph.task(t).annotations().resources;
        let mut ready = Vec::new();
        {
            let mut p = lock(pool);
            take_resources(&mut p.free, need, 1.0);
            let mut still = BinaryHeap::new();
            let mut free = p.free.clone();
            while let Some(Reverse(r)) = p.parked.pop() {
                let pt = self.plan.by_rank[r as usize];
                let pneed = &self.plan.graph.task(pt).annotations().resources;
                // Reserve tentatively so we do not wake more tasks than can run.
                if fits(&free, pneed) {
                    take_resources(&mut free, pneed, -1.0);
                    ready.push(r);
                } else {
                    still.push(Reverse(r));
                }
            }
            p.parked = still;
        }
        if !ready.is_empty() {
            self.push_shared(ready.into_iter());
        }
    }
}

fn fits(free: &Capacity, need: &[(Arc<str>, f64)]) -> bool {
    need.iter().all(|(n, a)| free.iter().any(|(fname, f)| fname == n && *f >= *a))
}

fn take_resources(free: &mut Capacity, need: &[(Arc<str>, f64)], sign: f64) {
    for (n, a) in need {
        if let Some((_, f)) = free.iter_mut().find(|(fname, _)| fname == n) {
            *f += sign * a;
        }
    }
}
