//! Running one task: argument resolution, retries, panics, timeouts and failure propagation.
//! Shared by both schedulers so they cannot disagree on what a task's result is.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use rask_graph::{Arg, Body, Call, FailureKind, Graph, Key, TaskError, TaskId, TaskResult, Value};
use rask_ops::{OpError, OpFn, Registry, TaskCtx};

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
                let key = self.graph.key(t);
                let mut attempt = 1;
                loop {
                    buf.clear();
                    buf.extend(call.args.iter().map(|a| resolve(a, &value_of, &[])));
                    match self.call(key, call, buf, attempt, ann.timeout) {
                        Ok(v) => return Ok(v),
                        Err(e) if attempt > ann.retries || e.kind == FailureKind::UnknownOp => {
                            return Err(Arc::new(TaskError { attempts: attempt, ..e }));
                        }
                        Err(_) => attempt += 1,
                    }
                }
            }
            Body::Chain(links) => {
                let mut values: Vec<Value> = Vec::with_capacity(links.len());
                for link in links.iter() {
                    buf.clear();
                    buf.extend(link.call.args.iter().map(|a| resolve(a, &value_of, &values)));
                    let v = self.call(&link.key, &link.call, buf, 1, None).map_err(Arc::new)?;
                    values.push(v);
                }
                Ok(values.pop().unwrap_or_default())
            }
        }
    }

    /// One attempt of one call.
    fn call(
        &self,
        key: &Key,
        call: &Call,
        args: &[Value],
        attempt: u32,
        timeout: Option<Duration>,
    ) -> Result<Value, TaskError> {
        let fail = |kind, message| TaskError { key: key.clone(), message, kind, attempts: attempt };
        let Some(f) = &self.fns[call.op.idx()] else {
            let op = self.graph.op_name(call.op);
            return Err(fail(
                FailureKind::UnknownOp,
                format!("unknown op `{op}`: no function of this name is registered in this process"),
            ));
        };
        match timeout {
            None => {
                let ctx = TaskCtx::new(key, attempt, None, None);
                match catch_unwind(AssertUnwindSafe(|| f(&ctx, args))) {
                    Ok(Ok(v)) => Ok(v),
                    Ok(Err(OpError(m))) => Err(fail(FailureKind::Error, m)),
                    Err(payload) => Err(fail(FailureKind::Panic, panic_message(&*payload))),
                }
            }
            Some(limit) => call_with_timeout(f, key, args, attempt, limit).map_err(|(kind, m)| fail(kind, m)),
        }
    }
}

/// How long a timed-out attempt may take to acknowledge cancellation.
const CANCEL_GRACE: Duration = Duration::from_millis(500);

/// Runs an attempt on its own thread so the caller can give up at the deadline. The abandoned
/// thread is told to stop (ops such as `shell` and `sleep` honour that; `shell` kills its
/// process group) and its late result is dropped.
fn call_with_timeout(
    f: &OpFn,
    key: &Key,
    args: &[Value],
    attempt: u32,
    limit: Duration,
) -> Result<Value, (FailureKind, String)> {
    let deadline = Instant::now() + limit;
    let cancel = Arc::new(AtomicBool::new(false));
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    let (f2, key2, args2, cancel2) = (Arc::clone(f), key.clone(), args.to_vec(), Arc::clone(&cancel));
    let spawned = std::thread::Builder::new().name(format!("rask-timed {}", key.as_str())).spawn(move || {
        let ctx = TaskCtx::new(&key2, attempt, Some(deadline), Some(&cancel2));
        let r = catch_unwind(AssertUnwindSafe(|| f2(&ctx, &args2)));
        let _ = tx.send(r.map_err(|p| panic_message(&*p)));
    });
    if let Err(e) = spawned {
        return Err((FailureKind::Error, format!("cannot start a thread for a timed task: {e}")));
    }
    match rx.recv_timeout(limit) {
        Ok(Ok(Ok(v))) => Ok(v),
        Ok(Ok(Err(OpError(m)))) => Err((FailureKind::Error, m)),
        Ok(Err(m)) => Err((FailureKind::Panic, m)),
        Err(_) => {
            cancel.store(true, std::sync::atomic::Ordering::Relaxed);
            // Give a cooperative op (`shell`, `sleep`) a moment to stop and clean up — `shell`
            // kills its process group — so nothing outlives the run. A function that ignores
            // cancellation is abandoned after the grace period; its late result is dropped.
            let _ = rx.recv_timeout(CANCEL_GRACE);
            Err((FailureKind::Timeout, format!("timed out after {}", fmt_secs(limit))))
        }
    }
}

fn fmt_secs(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s.fract() == 0.0 { format!("{s:.0} s") } else { format!("{s} s") }
}

/// The panic payload as text.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    let text = payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(non-string panic payload)".to_owned());
    format!("panicked: {text}")
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
