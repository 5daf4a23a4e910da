//! The single-threaded scheduler: the reference behaviour every other executor must match.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use rask_graph::{Executor, Graph, TaskId, TaskResult};

use crate::exec::Plan;
use crate::{LocalConfig, LocalError, prepare};

/// Runs tasks one at a time on the calling thread, in rank order (user priority, then the
/// memory-aware order). Deterministic: the same graph always runs in the same sequence.
#[derive(Clone, Debug, Default)]
pub struct SyncScheduler {
    cfg: LocalConfig,
}

impl SyncScheduler {
    /// A sync scheduler with this configuration (threads are ignored).
    #[must_use]
    pub fn new(cfg: LocalConfig) -> Self {
        SyncScheduler { cfg }
    }
}

impl Executor for SyncScheduler {
    type Error = LocalError;

    fn run(&self, graph: &Graph, outputs: &[TaskId]) -> Result<Vec<TaskResult>, LocalError> {
        let (g, outs, _capacity) = prepare(graph, outputs, &self.cfg)?;
        let plan = Plan::new(&g, &outs, &self.cfg.registry);
        let n = g.len();
        let mut slots: Vec<Option<TaskResult>> = vec![None; n];
        let mut waiting: Vec<u32> = g.ids().map(|t| g.deps(t).len() as u32).collect();
        let mut consumers: Vec<u32> = g.ids().map(|t| plan.consumers(t)).collect();
        let mut ready: BinaryHeap<Reverse<u32>> =
            g.ids().filter(|t| waiting[t.idx()] == 0).map(|t| Reverse(plan.rank[t.idx()])).collect();
        let mut buf = Vec::new();
        while let Some(Reverse(r)) = ready.pop() {
            let t = plan.by_rank[r as usize];
            let result = {
                let slots = &slots;
                let dep = |d: TaskId| slots[d.idx()].clone().unwrap_or_else(|| Ok(Default::default()));
                plan.execute(t, &dep, &mut buf)
            };
            slots[t.idx()] = Some(result);
            if let Some(p) = &self.cfg.progress {
                p.add(1);
            }
            for d in g.deps(t) {
                consumers[d.idx()] -= 1;
                if consumers[d.idx()] == 0 {
                    slots[d.idx()] = None;
                }
            }
            for d in g.dependents(t) {
                waiting[d.idx()] -= 1;
                if waiting[d.idx()] == 0 {
                    ready.push(Reverse(plan.rank[d.idx()]));
                }
            }
        }
        Ok(outs.iter().map(|o| slots[o.idx()].clone().unwrap_or_else(|| Ok(Default::default()))).collect())
    }
}
