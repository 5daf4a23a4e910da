//! rask's embedded local schedulers: run a [`Graph`] inside this process, no server needed.
//!
//! - [`ThreadedScheduler`] (the default): a pool of threads, one per core unless configured.
//!   Scheduling is decentralised — the thread that finishes a task releases its dependents and
//!   usually runs the best of them next — so the per-task overhead is a few atomic operations,
//!   not a trip through a central loop. Priorities are honoured through a shared ready heap whose
//!   best rank every thread can read without locking.
//! - [`SyncScheduler`]: one thread, fully deterministic. It is the oracle the tests compare
//!   everything else against, and the easiest to debug.
//!
//! Both share the per-task logic in `exec` (argument resolution, retries, panics caught as task
//! errors, timeouts, failure propagation), and both follow the same contract:
//! - only what the outputs need runs (the graph is culled), linear chains are fused by default;
//! - a value is shared by all of its dependents, never copied, and freed as soon as its last
//!   dependent has run (outputs are kept for the caller);
//! - a failing task fails only what depends on it; everything else still runs.

mod exec;
mod sync;
mod threaded;

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use rask_graph::{Graph, Key, TaskId, TaskResult};
use rask_ops::Registry;

pub use sync::SyncScheduler;
pub use threaded::ThreadedScheduler;

/// Why a graph could not be run at all by the embedded cluster. Nothing ran.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum LocalError {
    /// A task's constraints (resources, worker restrictions) cannot be met by this cluster.
    #[error("task {key} cannot run on the embedded cluster: {reason}")]
    Unrunnable {
        /// The task.
        key: Key,
        /// Which constraint, and what the cluster has instead.
        reason: String,
    },
    /// An output id is not a task of the graph.
    #[error("output {0:?} is not a task of the graph")]
    BadOutput(TaskId),
    /// The operating system refused to start a scheduler thread.
    #[error("cannot start scheduler thread: {0}")]
    Thread(String),
}

/// Shape of the embedded cluster: how many (virtual) workers, threads and resources.
///
/// In one process every worker shares memory, so a "worker" here is a name and a share of the
/// resources: it exists so that workflow files written for a distributed cluster (worker
/// restrictions, per-worker resources) mean the same thing locally.
#[derive(Clone, Debug)]
pub struct LocalConfig {
    /// Number of workers, named `local-0`, `local-1`, ...
    pub workers: usize,
    /// Threads per worker; the pool has `workers * threads_per_worker` threads.
    pub threads_per_worker: usize,
    /// Resources each worker advertises. `None`: each worker advertises, for every resource a
    /// task asks for, the largest amount any single task asks for — so every task can run and
    /// tasks sharing a scarce resource are serialised.
    pub resources: Option<BTreeMap<String, f64>>,
    /// Fuse linear chains into single tasks before running (on by default).
    pub fuse: bool,
    /// The functions tasks call.
    pub registry: Arc<Registry>,
    /// Where to publish progress (tasks finished / total), e.g. for a progress bar.
    pub progress: Option<Arc<Progress>>,
}

/// Progress of a run, readable from any thread while it runs.
///
/// Counts are published in small batches (the threaded scheduler does not touch a shared
/// counter per task), so a reader sees them advance smoothly but slightly behind.
#[derive(Debug, Default)]
pub struct Progress {
    total: AtomicUsize,
    done: AtomicUsize,
}

impl Progress {
    /// Tasks the current run will execute (after culling and fusion).
    #[must_use]
    pub fn total(&self) -> usize {
        self.total.load(Ordering::Relaxed)
    }

    /// Tasks finished so far (succeeded or failed).
    #[must_use]
    pub fn done(&self) -> usize {
        self.done.load(Ordering::Relaxed)
    }

    pub(crate) fn start(&self, total: usize) {
        self.total.store(total, Ordering::Relaxed);
        self.done.store(0, Ordering::Relaxed);
    }

    pub(crate) fn add(&self, n: usize) {
        self.done.fetch_add(n, Ordering::Relaxed);
    }
}

impl Default for LocalConfig {
    fn default() -> Self {
        LocalConfig {
            workers: 1,
            threads_per_worker: std::thread::available_parallelism().map_or(1, std::num::NonZero::get),
            resources: None,
            fuse: true,
            registry: rask_ops::global(),
            progress: None,
        }
    }
}

impl LocalConfig {
    /// Worker names of this cluster.
    #[must_use]
    pub fn worker_names(&self) -> Vec<String> {
        (0..self.workers.max(1)).map(|i| format!("local-{i}")).collect()
    }
}

/// Total capacity of each resource across the cluster, after checking that every task fits on
/// one worker and that worker restrictions can be met.
pub(crate) type Capacity = Vec<(Arc<str>, f64)>;

/// Culls to the outputs, fuses chains, and checks constraints. Returns the graph to run, the
/// outputs in it, and the cluster-wide resource capacity (empty when no task uses resources).
pub(crate) fn prepare<'g>(
    graph: &'g Graph,
    outputs: &[TaskId],
    cfg: &LocalConfig,
) -> Result<(Cow<'g, Graph>, Vec<TaskId>, Capacity), LocalError> {
    if let Some(bad) = outputs.iter().find(|o| o.idx() >= graph.len()) {
        return Err(LocalError::BadOutput(*bad));
    }
    let mut g = Cow::Borrowed(graph);
    let mut outs = outputs.to_vec();
    if let Some((culled, o)) = g.cull(&outs) {
        g = Cow::Owned(culled);
        outs = o;
    }
    if cfg.fuse {
        if let Some((fused, o)) = rask_graph::fuse(&g, &outs) {
            g = Cow::Owned(fused);
            outs = o;
        }
    }
    let names = cfg.worker_names();
    let mut per_worker: BTreeMap<Arc<str>, f64> = BTreeMap::new();
    for t in g.ids() {
        let Some(ann) = g.task(t).annotations.as_deref() else { continue };
        if !ann.workers.is_empty()
            && !ann.allow_other_workers
            && !ann.workers.iter().any(|w| names.iter().any(|n| **n == **w))
        {
            return Err(LocalError::Unrunnable {
                key: g.key(t).clone(),
                reason: format!(
                    "it is restricted to workers {:?} and the embedded cluster's workers are {:?} (set allow_other_workers, or run on a cluster with --scheduler)",
                    ann.workers, names
                ),
            });
        }
        for (name, amount) in &ann.resources {
            match &cfg.resources {
                Some(adv) => {
                    let have = adv.get(&**name).copied().unwrap_or(0.0);
                    if have < *amount {
                        return Err(LocalError::Unrunnable {
                            key: g.key(t).clone(),
                            reason: format!("it needs {name}={amount} and each local worker advertises {name}={have}"),
                        });
                    }
                    per_worker.insert(Arc::clone(name), have);
                }
                None => {
                    let e = per_worker.entry(Arc::clone(name)).or_insert(0.0);
                    *e = e.max(*amount);
                }
            }
        }
    }
    let workers = cfg.workers.max(1) as f64;
    let capacity = per_worker.into_iter().map(|(n, a)| (n, a * workers)).collect();
    if let Some(p) = &cfg.progress {
        p.start(g.len());
    }
    Ok((g, outs, capacity))
}

/// Results of the outputs, re-keyed for callers that lost track of ids (e.g. after culling).
#[must_use]
pub fn results_by_key(graph: &Graph, outputs: &[TaskId], results: Vec<TaskResult>) -> Vec<(Key, TaskResult)> {
    outputs.iter().map(|o| graph.key(*o).clone()).zip(results).collect()
}

#[cfg(test)]
mod tests;
