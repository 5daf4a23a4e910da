//! Running one task: argument resolution, retries, panics, timeouts and failure propagation.
//! Shared by both schedulers so they cannot disagree on what a task's result is.

use std::sync::Arc;
use std::time::Duration;

use rask_graph::{Arg, Body, Call, Graph, Key, TaskError, TaskId, TaskResult, Value};
use rask_ops::{OpFn, Registry};

/// Everything about a graph that executing it needs, computed once per run.
pub(crate) struct Plan<'g> {
    pub(crate) graph: &'g Graph,
    /// The function of each op (by `OpId`); `None` when this process does not know the op.
    fns: Vec<Option<OpFn>>,
    /// Scheduling rank of each task (lower runs first).
    pub(crate) rank: Vec<u32>,
    /// Task at each rank.
    pub(crate) by_rank: Vec<TaskId>,
    /// Outputs stay in memory until the run ends.
    pub(crate) pinned: Vec<bool>,
}

impl<'g> Plan<'g> {
    pub(crate) fn new(graph: &'g Graph, outputs: &[TaskId], registry: &Registry) -> Self {
        let fns = graph.op_names().iter().map(|name| registry.get(name).cloned()).collect();
        let rank = rask_graph::execution_ranks(graph, outputs);
        let mut by_rank = vec![TaskId(0); graph.len()];
        for t in graph.ids() {
            by_rank[rank[t.idx()] as usize] = t;
        }
        let mut pinned = vec![false; graph.len()];
        for o in outputs {
            pinned[o.idx()] = true;
        }
        Plan { graph, fns, rank, by_rank, pinned }
    }

    /// Number of results that must be released before `t`'s own result can be freed.
    pub(crate) fn consumers(&self, t: TaskId) -> u32 {
        self.graph.dependents(t).len() as u32 + u32::from(self.pinned[t.idx()])
    }

    /// Runs task `t` (all attempts) given access to its dependencies' results.
    ///
    /// `dep` returns a finished dependency's result; it is only called for `t`'s dependencies.
    pub(crate) fn execute(&self, t: TaskId, dep: &impl Fn(TaskId) -> TaskResult, buf: &mut Vec<Value>) -> TaskResult {
        // A failed dependency fails this task without running it; the first failed dependency
        // (in argument order) is the reported cause, so every executor reports the same one.
        for d in self.graph.deps(t) {
            dep(*d)?;
        }
        let value_of = |d: TaskId| dep(d).unwrap_or_default();
        let task = self.graph.task(t);
        match &task.body {
            Body::Call(call) => {
                let ann = task.annotations();
                self.call(self.graph.key(t), call, ann.retries, ann.timeout, buf, |buf| {
                    buf.extend(call.args.iter().map(|a| resolve(a, &value_of, &[])));
                })
                .map_err(Arc::new)
            }
            Body::Chain(links) => {
                let mut values: Vec<Value> = Vec::with_capacity(links.len());
                for link in links.iter() {
                    let v = self
                        .call(&link.key, &link.call, 0, None, buf, |buf| {
                            buf.extend(link.call.args.iter().map(|a| resolve(a, &value_of, &values)));
                        })
                        .map_err(Arc::new)?;
                    values.push(v);
                }
                Ok(values.pop().unwrap_or_default())
            }
        }
    }

    fn call(
        &self,
        key: &Key,
        call: &Call,
        retries: u32,
        timeout: Option<Duration>,
        buf: &mut Vec<Value>,
        args: impl FnMut(&mut Vec<Value>),
    ) -> Result<Value, TaskError> {
        let f = self.fns[call.op.idx()].as_ref();
        let policy = rask_ops::CallPolicy {
            op: self.graph.op_name(call.op),
            key,
            retries,
            timeout,
            location: "in this process",
        };
        rask_ops::run_call(f, &policy, buf, args)
    }
}

/// Evaluates an argument tree. Reference-free subtrees are one clone (an `Arc` increment).
fn resolve(a: &Arg, dep: &impl Fn(TaskId) -> Value, links: &[Value]) -> Value {
    match a {
        Arg::Lit(v) => v.clone(),
        Arg::Ref(t) => dep(*t),
        Arg::Link(i) => links.get(*i as usize).cloned().unwrap_or_default(),
        Arg::List(items) => Value::list(items.iter().map(|a| resolve(a, dep, links)).collect()),
        Arg::Map(entries) => {
            Value::Map(Arc::new(entries.iter().map(|(k, a)| (k.clone(), resolve(a, dep, links))).collect()))
        }
    }
}
