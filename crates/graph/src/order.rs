//! Memory-aware execution order, in the spirit of `dask.order`.
//!
//! The goal: when tasks run in this order, few intermediate results are alive at once. The
//! strategy is a post-order depth-first walk from the outputs: a task is placed right after the
//! last of its dependencies, so one branch of a reduction is finished (and its inputs freed)
//! before the next branch starts. Among a task's dependencies, the one with the larger upstream
//! subgraph goes first, so the long-running branch is not held up while a cheap sibling's result
//! waits in memory.
//!
//! The result is a *rank* per task (lower runs first). Schedulers combine it with the user
//! priority; [`execution_ranks`] does that combination once, for everyone.

use crate::{Graph, TaskId};

/// Position of each task (indexed by [`TaskId`]) in a memory-friendly sequential order.
///
/// `outputs` are visited first, in the given order; tasks not needed by any output come last.
#[must_use]
pub fn order(graph: &Graph, outputs: &[TaskId]) -> Vec<u32> {
    let n = graph.len();
    // Approximate upstream size: 1 + sum over dependencies (saturating; shared parts count twice,
    // which only matters for tie-breaking).
    let mut weight = vec![0u64; n];
    for t in graph.topo_order() {
        weight[t.idx()] = graph.deps(t).iter().fold(1u64, |acc, d| acc.saturating_add(weight[d.idx()]));
    }
    let mut rank = vec![u32::MAX; n];
    let mut next = 0u32;
    let mut stack: Vec<(TaskId, u32)> = Vec::new();
    let mut children: Vec<TaskId> = Vec::new();
    let mut sorted_deps: Vec<Vec<TaskId>> = Vec::new();
    let roots = outputs.iter().copied().chain(graph.sinks()).chain(graph.ids());
    for root in roots {
        if rank[root.idx()] != u32::MAX {
            continue;
        }
        stack.push((root, 0));
        while let Some((t, child)) = stack.last_mut() {
            let deps = graph.deps(*t);
            // Visit dependencies heaviest first; sort once per task, only when it matters.
            let dep = if deps.len() > 1 {
                if *child == 0 {
                    children.clear();
                    children.extend_from_slice(deps);
                    children.sort_by_key(|d| std::cmp::Reverse(weight[d.idx()]));
                    sorted_deps.push(std::mem::take(&mut children));
                }
                let list = sorted_deps.last().map_or(&[][..], Vec::as_slice);
                list.get(*child as usize).copied()
            } else {
                deps.get(*child as usize).copied()
            };
            match dep {
                Some(d) => {
                    *child += 1;
                    if rank[d.idx()] == u32::MAX {
                        stack.push((d, 0));
                    }
                }
                None => {
                    let t = *t;
                    if deps.len() > 1 {
                        if let Some(v) = sorted_deps.pop() {
                            children = v;
                        }
                    }
                    stack.pop();
                    if rank[t.idx()] == u32::MAX {
                        rank[t.idx()] = next;
                        next += 1;
                    }
                }
            }
        }
    }
    rank
}

/// Final scheduling ranks: user priority first (higher runs first), then [`order`].
///
/// Ranks are dense `0..n`; a scheduler runs the runnable task with the smallest rank.
#[must_use]
pub fn execution_ranks(graph: &Graph, outputs: &[TaskId]) -> Vec<u32> {
    let base = order(graph, outputs);
    let prioritised = graph.ids().any(|t| graph.task(t).annotations().priority != 0);
    if !prioritised {
        return base;
    }
    let mut ids: Vec<TaskId> = graph.ids().collect();
    ids.sort_by_key(|t| (std::cmp::Reverse(graph.task(*t).annotations().priority), base[t.idx()]));
    let mut rank = vec![0u32; graph.len()];
    for (i, t) in ids.into_iter().enumerate() {
        rank[t.idx()] = i as u32;
    }
    rank
}

/// The largest number of results alive at once when tasks run one at a time by `rank`.
///
/// A result is alive from when its task runs until its last dependent has run; outputs stay alive
/// to the end. This is the quantity [`order`] keeps small, so tests use it to pin the behaviour.
#[must_use]
pub fn peak_live(graph: &Graph, rank: &[u32], outputs: &[TaskId]) -> usize {
    let mut seq: Vec<TaskId> = graph.ids().collect();
    seq.sort_by_key(|t| rank[t.idx()]);
    let mut waiting: Vec<usize> = graph.ids().map(|t| graph.dependents(t).len()).collect();
    let mut pinned = vec![false; graph.len()];
    for o in outputs {
        pinned[o.idx()] = true;
    }
    let (mut live, mut peak) = (0usize, 0usize);
    for t in seq {
        live += 1;
        peak = peak.max(live);
        for d in graph.deps(t) {
            waiting[d.idx()] -= 1;
            if waiting[d.idx()] == 0 && !pinned[d.idx()] {
                live -= 1;
            }
        }
        if waiting[t.idx()] == 0 && !pinned[t.idx()] {
            live -= 1;
        }
    }
    peak
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ArgSpec, GraphBuilder, Key, TaskSpec};

    fn r(k: &str) -> ArgSpec {
        ArgSpec::Ref(Key::new(k))
    }

    /// Tree reduction of 2^depth leaves, keys listed level by level (the worst order to run in).
    fn tree(depth: u32) -> (Graph, TaskId) {
        let mut b = GraphBuilder::new();
        for i in 0..(1u32 << depth) {
            b.add(TaskSpec::new(format!("t-{depth}-{i}"), "noop", vec![]));
        }
        for level in (0..depth).rev() {
            for i in 0..(1u32 << level) {
                let (l, rr) = (format!("t-{}-{}", level + 1, 2 * i), format!("t-{}-{}", level + 1, 2 * i + 1));
                b.add(TaskSpec::new(format!("t-{level}-{i}"), "add", vec![r(&l), r(&rr)]));
            }
        }
        let g = b.build().expect("valid tree");
        let root = g.id("t-0-0").expect("root");
        (g, root)
    }

    fn ranks_by_key(g: &Graph, rank: &[u32]) -> Vec<String> {
        let mut ids: Vec<TaskId> = g.ids().collect();
        ids.sort_by_key(|t| rank[t.idx()]);
        ids.iter().map(|t| g.key(*t).as_str().to_owned()).collect()
    }

    #[test]
    fn tree_reduction_finishes_each_branch_before_the_next() {
        //        t-0-0
        //       /     \
        //   t-1-0     t-1-1
        //   /  \      /   \
        // t-2-0 t-2-1 t-2-2 t-2-3
        let (g, root) = tree(2);
        let rank = order(&g, &[root]);
        assert_eq!(ranks_by_key(&g, &rank), ["t-2-0", "t-2-1", "t-1-0", "t-2-2", "t-2-3", "t-1-1", "t-0-0"]);
    }

    #[test]
    fn tree_reduction_keeps_memory_proportional_to_depth() {
        let (g, root) = tree(12);
        let rank = order(&g, &[root]);
        assert!(peak_live(&g, &rank, &[root]) <= 12 + 2, "peak {}", peak_live(&g, &rank, &[root]));
        // Level order (the insertion order) holds half of all leaves at once.
        let level: Vec<u32> = g.ids().map(|t| t.0).collect();
        assert!(peak_live(&g, &level, &[root]) >= 1 << 11);
    }

    #[test]
    fn diamond_runs_both_sides_before_the_join() {
        //   a
        //  / \
        // b   c
        //  \ /
        //   d
        let mut b = GraphBuilder::new();
        b.add(TaskSpec::new("a", "noop", vec![]));
        b.add(TaskSpec::new("b", "identity", vec![r("a")]));
        b.add(TaskSpec::new("c", "identity", vec![r("a")]));
        b.add(TaskSpec::new("d", "add", vec![r("b"), r("c")]));
        let g = b.build().expect("valid");
        let d = g.id("d").expect("d");
        let rank = order(&g, &[d]);
        assert_eq!(ranks_by_key(&g, &rank), ["a", "b", "c", "d"]);
        assert_eq!(peak_live(&g, &rank, &[d]), 3);
    }

    #[test]
    fn halo_graph_keeps_a_constant_window_alive() {
        // map_overlap-like: chunk c-i, halo h-i = f(c-(i-1), c-i, c-(i+1)), then a running
        // reduction acc-i = acc-(i-1) + h-i.
        //  c-0  c-1  c-2  c-3 ...
        //   | \/ | \/ | \/ |
        //  h-0  h-1  h-2  h-3 ...
        //   |    |    |    |
        //  acc-0-acc-1-acc-2-acc-3 ...
        let n: usize = 200;
        let mut b = GraphBuilder::new();
        for i in 0..n {
            b.add(TaskSpec::new(format!("c-{i}"), "noop", vec![]));
        }
        for i in 0..n {
            let lo = i.saturating_sub(1);
            let hi = (i + 1).min(n - 1);
            let args = (lo..=hi).map(|j| r(&format!("c-{j}"))).collect();
            b.add(TaskSpec::new(format!("h-{i}"), "add", args));
        }
        b.add(TaskSpec::new("acc-0", "identity", vec![r("h-0")]));
        for i in 1..n {
            b.add(TaskSpec::new(format!("acc-{i}"), "add", vec![r(&format!("acc-{}", i - 1)), r(&format!("h-{i}"))]));
        }
        let g = b.build().expect("valid");
        let last = g.id(&format!("acc-{}", n - 1)).expect("last");
        let rank = order(&g, &[last]);
        let peak = peak_live(&g, &rank, &[last]);
        assert!(peak <= 6, "peak {peak}");
        let level: Vec<u32> = g.ids().map(|t| t.0).collect();
        assert!(peak_live(&g, &level, &[last]) >= n);
    }

    #[test]
    fn user_priority_overrides_graph_order() {
        let mut b = GraphBuilder::new();
        b.add(TaskSpec::new("low", "noop", vec![]));
        let ann = crate::Annotations { priority: 10, ..Default::default() };
        b.add(TaskSpec::new("high", "noop", vec![]).with_annotations(ann));
        let g = b.build().expect("valid");
        let outs = [g.id("low").expect("low"), g.id("high").expect("high")];
        let rank = execution_ranks(&g, &outs);
        assert_eq!(ranks_by_key(&g, &rank), ["high", "low"]);
    }

    #[test]
    fn every_task_gets_a_distinct_rank_even_off_the_outputs() {
        let (g, _) = tree(5);
        let rank = order(&g, &[]);
        let mut seen = rank.clone();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.len(), g.len());
        assert!(seen.iter().all(|r| (*r as usize) < g.len()));
    }
}

#[cfg(test)]
mod proptests {
    use super::*;
    use crate::{ArgSpec, GraphBuilder, Key, TaskSpec};
    use proptest::prelude::*;

    /// Random DAG: task i depends on up to 3 earlier tasks.
    fn random_dag() -> impl Strategy<Value = Graph> {
        prop::collection::vec(prop::collection::vec(any::<prop::sample::Index>(), 0..4), 1..80).prop_map(|deps| {
            let mut b = GraphBuilder::new();
            for (i, ds) in deps.iter().enumerate() {
                let args = if i == 0 {
                    vec![]
                } else {
                    ds.iter().map(|d| ArgSpec::Ref(Key::from(format!("k{}", d.index(i))))).collect()
                };
                b.add(TaskSpec::new(format!("k{i}"), "f", args));
            }
            b.build().expect("random DAG is valid")
        })
    }

    proptest! {
        #[test]
        fn order_is_a_permutation_that_respects_dependencies(g in random_dag(), pick in any::<prop::sample::Index>()) {
            let outputs = [TaskId(pick.index(g.len()) as u32)];
            let rank = order(&g, &outputs);
            let mut sorted = rank.clone();
            sorted.sort_unstable();
            prop_assert_eq!(sorted, (0..g.len() as u32).collect::<Vec<_>>());
            for t in g.ids() {
                for d in g.deps(t) {
                    prop_assert!(rank[d.idx()] < rank[t.idx()], "{:?} before its dependency {:?}", t, d);
                }
            }
        }

        #[test]
        fn topo_order_respects_dependencies_and_cull_keeps_the_closure(g in random_dag(), pick in any::<prop::sample::Index>()) {
            let topo = g.topo_order();
            prop_assert_eq!(topo.len(), g.len());
            let mut pos = vec![0; g.len()];
            for (i, t) in topo.iter().enumerate() {
                pos[t.idx()] = i;
            }
            for t in g.ids() {
                for d in g.deps(t) {
                    prop_assert!(pos[d.idx()] < pos[t.idx()]);
                }
            }
            let out = TaskId(pick.index(g.len()) as u32);
            let (culled, outs) = g.cull(&[out]).unwrap_or_else(|| (g.clone(), vec![out]));
            prop_assert_eq!(culled.key(outs[0]), g.key(out));
            // Every kept task's dependencies are kept, with the same keys.
            for t in culled.ids() {
                let orig = g.id(culled.key(t).as_str()).expect("kept keys exist in the original");
                let mut a: Vec<&Key> = culled.deps(t).iter().map(|d| culled.key(*d)).collect();
                let mut b: Vec<&Key> = g.deps(orig).iter().map(|d| g.key(*d)).collect();
                a.sort();
                b.sort();
                prop_assert_eq!(a, b);
            }
        }
    }
}
