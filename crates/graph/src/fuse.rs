//! Fusion of linear chains.
//!
//! A chain `a -> b -> c` where each task has exactly one dependency and its dependency has exactly
//! one dependent costs three scheduler round-trips for work that can only ever run in sequence.
//! [`fuse`] turns it into one task whose body runs the links in order, passing values directly.
//! Link keys are kept, so a failure inside the chain still names the link that failed.
//!
//! Only tasks with default annotations are fused (a retry, timeout or resource request belongs to
//! one task and must not silently widen to its neighbours), and outputs are never fused away.

use crate::graph::{Body, Call, Link, Parts, Task};
use crate::{Arg, Graph, TaskId};

/// Fuses linear chains. Returns the new graph and the outputs' ids in it (same order), or `None`
/// when there is nothing to fuse (so callers keep the original without copying it).
#[must_use]
pub fn fuse(graph: &Graph, outputs: &[TaskId]) -> Option<(Graph, Vec<TaskId>)> {
    let n = graph.len();
    let mut is_output = vec![false; n];
    for o in outputs {
        is_output[o.idx()] = true;
    }
    let plain = |t: TaskId| graph.task(t).annotations.is_none() && matches!(graph.task(t).body, Body::Call(_));
    // `absorbed_into_next[p]`: p is folded into its single dependent.
    let mut absorbed = vec![false; n];
    let mut any = false;
    for t in graph.ids() {
        if let [p] = graph.deps(t) {
            if graph.dependents(*p).len() == 1 && !is_output[p.idx()] && plain(*p) && plain(t) {
                absorbed[p.idx()] = true;
                any = true;
            }
        }
    }
    if !any {
        return None;
    }
    // New ids: one per task that is not absorbed, in the old id order.
    let mut remap = vec![TaskId(u32::MAX); n];
    let mut next = 0u32;
    for t in graph.ids() {
        if !absorbed[t.idx()] {
            remap[t.idx()] = TaskId(next);
            next += 1;
        }
    }
    let mut parts = Parts::default();
    let mut chain: Vec<TaskId> = Vec::new();
    for t in graph.ids().filter(|t| !absorbed[t.idx()]) {
        // Walk back to the head of t's chain.
        chain.clear();
        let mut cur = t;
        chain.push(cur);
        while let [p] = graph.deps(cur) {
            if !absorbed[p.idx()] {
                break;
            }
            cur = *p;
            chain.push(cur);
        }
        chain.reverse();
        let head = chain[0];
        let body = if chain.len() == 1 {
            match &graph.task(t).body {
                Body::Call(c) => Body::Call(relink(c, &remap, None)),
                Body::Chain(links) => Body::Chain(
                    links.iter().map(|l| Link { key: l.key.clone(), call: relink(&l.call, &remap, None) }).collect(),
                ),
            }
        } else {
            let links = chain
                .iter()
                .enumerate()
                .map(|(i, link)| {
                    let Body::Call(c) = &graph.task(*link).body else { unreachable!("only plain calls are fused") };
                    let prev = (i > 0).then(|| (chain[i - 1], i as u32 - 1));
                    Link { key: graph.key(*link).clone(), call: relink(c, &remap, prev) }
                })
                .collect();
            Body::Chain(links)
        };
        let deps = graph.deps(head).iter().map(|d| remap[d.idx()]);
        parts.push(graph.key(t).clone(), Task { body, annotations: graph.task(t).annotations.clone() }, deps);
    }
    let fused = parts.finish(graph.op_names().to_vec());
    Some((fused, outputs.iter().map(|o| remap[o.idx()]).collect()))
}

/// Rewrites a call's references: to the previous link (`prev`) as [`Arg::Link`], others remapped.
fn relink(c: &Call, remap: &[TaskId], prev: Option<(TaskId, u32)>) -> Call {
    fn go(a: &Arg, remap: &[TaskId], prev: Option<(TaskId, u32)>) -> Arg {
        match a {
            Arg::Lit(_) | Arg::Link(_) => a.clone(),
            Arg::Ref(t) => match prev {
                Some((p, link)) if p == *t => Arg::Link(link),
                _ => Arg::Ref(remap[t.idx()]),
            },
            Arg::List(items) => Arg::List(items.iter().map(|a| go(a, remap, prev)).collect()),
            Arg::Map(entries) => Arg::Map(entries.iter().map(|(k, a)| (k.clone(), go(a, remap, prev))).collect()),
        }
    }
    Call { op: c.op, args: c.args.iter().map(|a| go(a, remap, prev)).collect() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Annotations, ArgSpec, GraphBuilder, Key, TaskSpec, Value};

    fn r(k: &str) -> ArgSpec {
        ArgSpec::Ref(Key::new(k))
    }

    #[test]
    fn linear_chain_becomes_one_task_keeping_link_keys() {
        // a -> b -> c -> d(output)   and  x -> d
        let mut b = GraphBuilder::new();
        b.add(TaskSpec::new("a", "identity", vec![ArgSpec::Lit(Value::Int(1))]));
        b.add(TaskSpec::new("b", "add", vec![r("a"), r("a")]));
        b.add(TaskSpec::new("c", "add", vec![r("b"), ArgSpec::Lit(Value::Int(1))]));
        b.add(TaskSpec::new("x", "noop", vec![]));
        b.add(TaskSpec::new("d", "add", vec![r("c"), r("x")]));
        let g = b.build().expect("valid");
        let (f, outs) = fuse(&g, &[g.id("d").expect("d")]).expect("a chain to fuse");
        assert_eq!(f.len(), 3, "a, b, c fuse into one task keyed c");
        let c = f.id("c").expect("chain keeps its last key");
        let Body::Chain(links) = &f.task(c).body else { panic!("c should be a chain") };
        let keys: Vec<&str> = links.iter().map(|l| l.key.as_str()).collect();
        assert_eq!(keys, ["a", "b", "c"]);
        assert_eq!(&*links[1].call.args, &[Arg::Link(0), Arg::Link(0)]);
        assert_eq!(f.key(outs[0]).as_str(), "d");
        assert_eq!(f.deps(outs[0]).len(), 2);
    }

    #[test]
    fn outputs_and_annotated_tasks_are_not_fused() {
        let mut b = GraphBuilder::new();
        b.add(TaskSpec::new("a", "noop", vec![]));
        b.add(TaskSpec::new("b", "identity", vec![r("a")]));
        let retry = Annotations { retries: 2, ..Default::default() };
        b.add(TaskSpec::new("c", "identity", vec![r("b")]).with_annotations(retry));
        let g = b.build().expect("valid");
        let outs = [g.id("a").expect("a"), g.id("c").expect("c")];
        assert!(fuse(&g, &outs).is_none());
    }

    #[test]
    fn fan_out_is_not_fused() {
        let mut b = GraphBuilder::new();
        b.add(TaskSpec::new("a", "noop", vec![]));
        b.add(TaskSpec::new("b", "identity", vec![r("a")]));
        b.add(TaskSpec::new("c", "identity", vec![r("a")]));
        let g = b.build().expect("valid");
        let outs = g.sinks();
        assert!(fuse(&g, &outs).is_none());
    }
}
