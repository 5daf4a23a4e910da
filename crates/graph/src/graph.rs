//! The graph arena: tasks in a dense vector, dependencies in compressed (CSR) adjacency lists.
//!
//! A [`Graph`] is immutable once built and is only ever built through [`GraphBuilder`], which
//! validates it: every reference resolves, no key is defined twice, and there is no cycle. So any
//! `Graph` a scheduler receives is a DAG whose ids are all in range — executors rely on that.

use std::sync::Arc;

use crate::error::{GraphError, GraphErrors};
use crate::{Annotations, Arg, ArgSpec, FxHashMap, Key, OpId, TaskId, TaskSpec};

/// A call of one op with resolved arguments.
#[derive(Clone, Debug, PartialEq)]
pub struct Call {
    /// Which op (index into [`Graph::op_name`]).
    pub op: OpId,
    /// Positional arguments.
    pub args: Box<[Arg]>,
}

/// One step of a fused chain.
#[derive(Clone, Debug, PartialEq)]
pub struct Link {
    /// The key the step had before fusion (errors name it).
    pub key: Key,
    /// What the step calls; its arguments may use [`Arg::Link`] to read earlier steps.
    pub call: Call,
}

/// What running a task means.
#[derive(Clone, Debug, PartialEq)]
pub enum Body {
    /// Call one op.
    Call(Call),
    /// Run a fused linear chain; the task's value is the last link's value.
    Chain(Box<[Link]>),
}

/// One task of a graph.
#[derive(Clone, Debug, PartialEq)]
pub struct Task {
    /// What to run.
    pub body: Body,
    /// Non-default annotations (`None` means all defaults, the common case).
    pub annotations: Option<Box<Annotations>>,
}

impl Task {
    /// The annotations, defaults included.
    #[must_use]
    pub fn annotations(&self) -> &Annotations {
        static DEFAULT: std::sync::OnceLock<Annotations> = std::sync::OnceLock::new();
        self.annotations.as_deref().unwrap_or_else(|| DEFAULT.get_or_init(Annotations::default))
    }
}

/// Compressed adjacency lists: the neighbours of node `i` are `items[offsets[i]..offsets[i+1]]`.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct Csr {
    offsets: Vec<u32>,
    items: Vec<TaskId>,
}

impl Csr {
    fn get(&self, t: TaskId) -> &[TaskId] {
        let (a, b) = (self.offsets[t.idx()], self.offsets[t.idx() + 1]);
        &self.items[a as usize..b as usize]
    }

    /// Reverses the edges of a graph with `n` nodes.
    fn reverse(&self, n: usize) -> Csr {
        let mut counts = vec![0u32; n + 1];
        for d in &self.items {
            counts[d.idx() + 1] += 1;
        }
        for i in 0..n {
            counts[i + 1] += counts[i];
        }
        let mut fill = counts.clone();
        let mut items = vec![TaskId(0); self.items.len()];
        for t in 0..n {
            for d in self.get(TaskId(t as u32)) {
                let slot = &mut fill[d.idx()];
                items[*slot as usize] = TaskId(t as u32);
                *slot += 1;
            }
        }
        Csr { offsets: counts, items }
    }
}

/// A validated, immutable task graph (a DAG).
#[derive(Clone, Debug, PartialEq)]
pub struct Graph {
    keys: Vec<Key>,
    index: FxHashMap<Key, TaskId>,
    ops: Vec<Arc<str>>,
    tasks: Vec<Task>,
    deps: Csr,
    dependents: Csr,
}

impl Graph {
    /// Number of tasks.
    #[must_use]
    pub fn len(&self) -> usize {
        self.tasks.len()
    }

    /// Whether the graph has no task.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }

    /// All task ids, in insertion order.
    pub fn ids(&self) -> impl ExactSizeIterator<Item = TaskId> + use<> {
        (0..self.tasks.len() as u32).map(TaskId)
    }

    /// The id of the task with this key.
    #[must_use]
    pub fn id(&self, key: &str) -> Option<TaskId> {
        self.index.get(key).copied()
    }

    /// The key of a task.
    #[must_use]
    pub fn key(&self, t: TaskId) -> &Key {
        &self.keys[t.idx()]
    }

    /// A task.
    #[must_use]
    pub fn task(&self, t: TaskId) -> &Task {
        &self.tasks[t.idx()]
    }

    /// The tasks `t` needs (data references first, in argument order, then `after` keys), each once.
    #[must_use]
    pub fn deps(&self, t: TaskId) -> &[TaskId] {
        self.deps.get(t)
    }

    /// The tasks that need `t`, in id order.
    #[must_use]
    pub fn dependents(&self, t: TaskId) -> &[TaskId] {
        self.dependents.get(t)
    }

    /// The interned op names; [`OpId`] indexes this slice.
    #[must_use]
    pub fn op_names(&self) -> &[Arc<str>] {
        &self.ops
    }

    /// The name of an op.
    #[must_use]
    pub fn op_name(&self, op: OpId) -> &str {
        &self.ops[op.idx()]
    }

    /// Tasks no other task depends on, in id order (the default outputs of a workflow).
    #[must_use]
    pub fn sinks(&self) -> Vec<TaskId> {
        self.ids().filter(|t| self.dependents(*t).is_empty()).collect()
    }

    /// A topological order (dependencies first); ties broken by id, so it is deterministic.
    #[must_use]
    pub fn topo_order(&self) -> Vec<TaskId> {
        let n = self.len();
        let mut missing: Vec<u32> = (0..n).map(|i| self.deps(TaskId(i as u32)).len() as u32).collect();
        let mut out: Vec<TaskId> = self.ids().filter(|t| missing[t.idx()] == 0).collect();
        let mut i = 0;
        while i < out.len() {
            for d in self.dependents(out[i]) {
                missing[d.idx()] -= 1;
                if missing[d.idx()] == 0 {
                    out.push(*d);
                }
            }
            i += 1;
        }
        out
    }

    /// The subgraph needed to compute `outputs` (they and everything they transitively depend
    /// on). Returns it with the outputs' ids in the new graph, in the same order, or `None` when
    /// every task is needed (so callers keep the original without copying it).
    #[must_use]
    pub fn cull(&self, outputs: &[TaskId]) -> Option<(Graph, Vec<TaskId>)> {
        let mut keep = vec![false; self.len()];
        let mut stack: Vec<TaskId> = outputs.to_vec();
        while let Some(t) = stack.pop() {
            if !std::mem::replace(&mut keep[t.idx()], true) {
                stack.extend_from_slice(self.deps(t));
            }
        }
        if keep.iter().all(|k| *k) {
            return None;
        }
        let mut remap = vec![TaskId(u32::MAX); self.len()];
        let mut next = 0u32;
        for (i, k) in keep.iter().enumerate() {
            if *k {
                remap[i] = TaskId(next);
                next += 1;
            }
        }
        let mut parts = Parts::default();
        for t in self.ids().filter(|t| keep[t.idx()]) {
            let task = self.task(t);
            let body = match &task.body {
                Body::Call(c) => Body::Call(remap_call(c, &remap)),
                Body::Chain(links) => Body::Chain(
                    links.iter().map(|l| Link { key: l.key.clone(), call: remap_call(&l.call, &remap) }).collect(),
                ),
            };
            let deps = self.deps(t).iter().map(|d| remap[d.idx()]);
            parts.push(self.key(t).clone(), Task { body, annotations: task.annotations.clone() }, deps);
        }
        let graph = parts.finish(self.ops.clone());
        Some((graph, outputs.iter().map(|o| remap[o.idx()]).collect()))
    }
}

fn remap_call(c: &Call, remap: &[TaskId]) -> Call {
    Call { op: c.op, args: c.args.iter().map(|a| remap_arg(a, remap)).collect() }
}

fn remap_arg(a: &Arg, remap: &[TaskId]) -> Arg {
    match a {
        Arg::Lit(_) | Arg::Link(_) => a.clone(),
        Arg::Ref(t) => Arg::Ref(remap[t.idx()]),
        Arg::List(items) => Arg::List(items.iter().map(|a| remap_arg(a, remap)).collect()),
        Arg::Map(entries) => Arg::Map(entries.iter().map(|(k, a)| (k.clone(), remap_arg(a, remap))).collect()),
    }
}

/// Accumulates tasks whose dependencies are already resolved, then assembles a [`Graph`].
/// Shared by the builder, culling and fusion so the CSR layout is produced in one place.
#[derive(Default)]
pub(crate) struct Parts {
    keys: Vec<Key>,
    tasks: Vec<Task>,
    offsets: Vec<u32>,
    items: Vec<TaskId>,
}

impl Parts {
    pub(crate) fn push(&mut self, key: Key, task: Task, deps: impl IntoIterator<Item = TaskId>) {
        if self.offsets.is_empty() {
            self.offsets.push(0);
        }
        self.keys.push(key);
        self.tasks.push(task);
        self.items.extend(deps);
        self.offsets.push(self.items.len() as u32);
    }

    pub(crate) fn finish(mut self, ops: Vec<Arc<str>>) -> Graph {
        if self.offsets.is_empty() {
            self.offsets.push(0);
        }
        let deps = Csr { offsets: self.offsets, items: self.items };
        let dependents = deps.reverse(self.tasks.len());
        let index = self.keys.iter().enumerate().map(|(i, k)| (k.clone(), TaskId(i as u32))).collect();
        Graph { keys: self.keys, index, ops, tasks: self.tasks, deps, dependents }
    }
}

/// Builds and validates a [`Graph`] from [`TaskSpec`]s.
///
/// Tasks may be added in any order (references are resolved in [`GraphBuilder::build`]).
/// Validation reports every problem it finds, not just the first.
#[derive(Default)]
pub struct GraphBuilder {
    specs: Vec<TaskSpec>,
    index: FxHashMap<Key, TaskId>,
    errors: Vec<GraphError>,
}

impl GraphBuilder {
    /// An empty builder.
    #[must_use]
    pub fn new() -> Self {
        GraphBuilder::default()
    }

    /// An empty builder with room for `n` tasks.
    #[must_use]
    pub fn with_capacity(n: usize) -> Self {
        GraphBuilder {
            specs: Vec::with_capacity(n),
            index: FxHashMap::with_capacity_and_hasher(n, Default::default()),
            errors: Vec::new(),
        }
    }

    /// Whether a task with this key was added.
    #[must_use]
    pub fn contains(&self, key: &str) -> bool {
        self.index.contains_key(key)
    }

    /// Number of tasks added.
    #[must_use]
    pub fn len(&self) -> usize {
        self.specs.len()
    }

    /// Whether no task was added.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.specs.is_empty()
    }

    /// Adds a task. A second task with the same key is recorded as an error.
    pub fn add(&mut self, spec: TaskSpec) -> &mut Self {
        let id = TaskId(self.specs.len() as u32);
        if self.index.contains_key(&spec.key) {
            self.errors.push(GraphError::DuplicateKey { key: spec.key });
            return self;
        }
        self.index.insert(spec.key.clone(), id);
        self.specs.push(spec);
        self
    }

    /// Resolves references and checks the graph is a DAG.
    ///
    /// # Errors
    /// Every duplicate key, every reference to a missing key (naming both keys) and one dependency
    /// cycle (listing its keys), if any.
    pub fn build(self) -> Result<Graph, GraphErrors> {
        let GraphBuilder { specs, index, mut errors } = self;
        let n = specs.len();
        let mut op_index: FxHashMap<Arc<str>, OpId> = FxHashMap::default();
        let mut ops: Vec<Arc<str>> = Vec::new();
        let mut parts = Parts::default();
        // `seen[d] == t + 1` marks d as already listed among t's dependencies: O(1) dedup, no hashing.
        let mut seen = vec![0u32; n];
        let mut deps: Vec<TaskId> = Vec::new();
        for (i, spec) in specs.into_iter().enumerate() {
            let TaskSpec { key, op, args, after, annotations } = spec;
            let stamp = i as u32 + 1;
            deps.clear();
            let mut resolve = |k: &Key, errors: &mut Vec<GraphError>| match index.get(k) {
                Some(d) => {
                    if seen[d.idx()] != stamp {
                        seen[d.idx()] = stamp;
                        deps.push(*d);
                    }
                    *d
                }
                None => {
                    errors.push(GraphError::MissingDependency { key: key.clone(), missing: k.clone() });
                    TaskId(u32::MAX)
                }
            };
            let args: Box<[Arg]> = args.into_iter().map(|a| resolve_arg(a, &mut resolve, &mut errors)).collect();
            for k in &after {
                resolve(k, &mut errors);
            }
            let op = *op_index.entry(op.clone()).or_insert_with(|| {
                ops.push(op);
                OpId(ops.len() as u32 - 1)
            });
            let annotations = (!annotations.is_default()).then(|| Box::new(annotations));
            parts.push(key, Task { body: Body::Call(Call { op, args }), annotations }, deps.iter().copied());
        }
        if !errors.is_empty() {
            return Err(GraphErrors(errors));
        }
        let graph = parts.finish(ops);
        if let Some(cycle) = find_cycle(&graph) {
            return Err(GraphErrors(vec![GraphError::Cycle { keys: cycle }]));
        }
        Ok(graph)
    }
}

fn resolve_arg(
    a: ArgSpec,
    resolve: &mut impl FnMut(&Key, &mut Vec<GraphError>) -> TaskId,
    errors: &mut Vec<GraphError>,
) -> Arg {
    match a {
        ArgSpec::Lit(v) => Arg::Lit(v),
        ArgSpec::Ref(k) => Arg::Ref(resolve(&k, errors)),
        ArgSpec::List(items) => Arg::List(items.into_iter().map(|a| resolve_arg(a, resolve, errors)).collect()),
        ArgSpec::Map(entries) => {
            Arg::Map(entries.into_iter().map(|(k, a)| (k, resolve_arg(a, resolve, errors))).collect())
        }
    }
}

/// Finds one dependency cycle, listed so that each key depends on the next and the last on the
/// first. `None` when the graph is acyclic.
fn find_cycle(g: &Graph) -> Option<Vec<Key>> {
    let n = g.len();
    let order = g.topo_order();
    if order.len() == n {
        return None;
    }
    let mut done = vec![false; n];
    for t in order {
        done[t.idx()] = true;
    }
    // Every task left over has at least one dependency left over: walk those until one repeats.
    let start = g.ids().find(|t| !done[t.idx()])?;
    let mut pos_in_walk = vec![u32::MAX; n];
    let mut walk = Vec::new();
    let mut t = start;
    loop {
        if pos_in_walk[t.idx()] != u32::MAX {
            let from = pos_in_walk[t.idx()] as usize;
            return Some(walk[from..].iter().map(|t: &TaskId| g.key(*t).clone()).collect());
        }
        pos_in_walk[t.idx()] = walk.len() as u32;
        walk.push(t);
        t = *g.deps(t).iter().find(|d| !done[d.idx()])?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Value;

    fn r(k: &str) -> ArgSpec {
        ArgSpec::Ref(Key::new(k))
    }

    fn build(specs: Vec<TaskSpec>) -> Result<Graph, GraphErrors> {
        let mut b = GraphBuilder::new();
        for s in specs {
            b.add(s);
        }
        b.build()
    }

    #[test]
    fn nested_references_become_dependencies_once() {
        let g = build(vec![
            TaskSpec::new("a", "identity", vec![ArgSpec::Lit(Value::Int(1))]),
            TaskSpec::new("b", "sum", vec![ArgSpec::list(vec![r("a"), ArgSpec::map(vec![("x".into(), r("a"))])])]),
        ])
        .expect("valid graph");
        let b = g.id("b").expect("b exists");
        assert_eq!(g.deps(b), &[g.id("a").expect("a exists")]);
        assert_eq!(g.dependents(TaskId(0)), &[b]);
    }

    #[test]
    fn missing_dependency_names_both_keys() {
        let err = build(vec![TaskSpec::new("b", "identity", vec![r("nope")])]).expect_err("missing dep");
        assert_eq!(err.to_string(), r#"task "b" depends on missing key "nope""#);
    }

    #[test]
    fn duplicate_keys_are_reported() {
        let err =
            build(vec![TaskSpec::new("a", "noop", vec![]), TaskSpec::new("a", "noop", vec![])]).expect_err("duplicate");
        assert_eq!(err.to_string(), r#"duplicate task key "a""#);
    }

    #[test]
    fn cycle_lists_its_keys_in_dependency_order() {
        //  x (independent)   a -> b -> c -> a
        let err = build(vec![
            TaskSpec::new("x", "noop", vec![]),
            TaskSpec::new("a", "identity", vec![r("b")]),
            TaskSpec::new("b", "identity", vec![r("c")]),
            TaskSpec::new("c", "noop", vec![]).after("a"),
        ])
        .expect_err("cycle");
        assert_eq!(err.0, vec![GraphError::Cycle { keys: vec!["a".into(), "b".into(), "c".into()] }]);
        assert_eq!(err.to_string(), r#"dependency cycle: "a" -> "b" -> "c" -> "a""#);
    }

    #[test]
    fn self_reference_is_a_cycle() {
        let err = build(vec![TaskSpec::new("a", "identity", vec![r("a")])]).expect_err("cycle");
        assert_eq!(err.0, vec![GraphError::Cycle { keys: vec!["a".into()] }]);
    }

    #[test]
    fn cull_keeps_only_what_outputs_need() {
        //  a   b      c
        //   \ /       |
        //    d        e
        let g = build(vec![
            TaskSpec::new("a", "noop", vec![]),
            TaskSpec::new("b", "noop", vec![]),
            TaskSpec::new("c", "noop", vec![]),
            TaskSpec::new("d", "add", vec![r("a"), r("b")]),
            TaskSpec::new("e", "identity", vec![r("c")]),
        ])
        .expect("valid");
        let (culled, outs) = g.cull(&[g.id("d").expect("d")]).expect("something to cull");
        assert_eq!(culled.len(), 3);
        assert_eq!(culled.key(outs[0]).as_str(), "d");
        let d = culled.id("d").expect("d kept");
        let dep_keys: Vec<&str> = culled.deps(d).iter().map(|t| culled.key(*t).as_str()).collect();
        assert_eq!(dep_keys, ["a", "b"]);
        assert!(culled.id("e").is_none() && culled.id("c").is_none());
        assert!(g.cull(&g.sinks()).is_none(), "nothing to cull when every sink is wanted");
    }

    #[test]
    fn topo_order_puts_dependencies_first() {
        let g = build(vec![
            TaskSpec::new("d", "add", vec![r("b"), r("c")]),
            TaskSpec::new("b", "identity", vec![r("a")]),
            TaskSpec::new("c", "identity", vec![r("a")]),
            TaskSpec::new("a", "noop", vec![]),
        ])
        .expect("valid");
        let order: Vec<&str> = g.topo_order().iter().map(|t| g.key(*t).as_str()).collect();
        assert_eq!(order, ["a", "b", "c", "d"]);
    }
}
