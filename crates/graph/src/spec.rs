//! Task specifications: what a task calls, with which arguments, under which annotations.
//!
//! Two forms exist. [`ArgSpec`] is the *unresolved* form that front ends produce (references are
//! keys); [`Arg`] is the *resolved* form stored in a [`crate::Graph`] (references are
//! [`TaskId`]s). Arguments are trees: a reference may sit at any depth inside lists and objects,
//! and a subtree without references is collapsed into one literal [`Value`] so evaluating it is a
//! single cheap clone.

use std::sync::Arc;
use std::time::Duration;

use crate::{Key, TaskId, Value};

/// An argument before resolution: literals, references by key, and containers of them.
#[derive(Clone, Debug, PartialEq)]
pub enum ArgSpec {
    /// A literal value.
    Lit(Value),
    /// The value of another task; makes that task a dependency.
    Ref(Key),
    /// A list with at least one reference inside.
    List(Vec<ArgSpec>),
    /// An object with at least one reference inside (sorted by key).
    Map(Vec<(String, ArgSpec)>),
}

impl ArgSpec {
    /// Builds a list argument, collapsing it to a literal when no reference is inside.
    #[must_use]
    pub fn list(items: Vec<ArgSpec>) -> Self {
        if items.iter().all(|a| matches!(a, ArgSpec::Lit(_))) {
            ArgSpec::Lit(Value::list(
                items
                    .into_iter()
                    .map(|a| match a {
                        ArgSpec::Lit(v) => v,
                        _ => Value::Null,
                    })
                    .collect(),
            ))
        } else {
            ArgSpec::List(items)
        }
    }

    /// Builds an object argument, collapsing it to a literal when no reference is inside.
    #[must_use]
    pub fn map(mut entries: Vec<(String, ArgSpec)>) -> Self {
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        entries.dedup_by(|later, earlier| later.0 == earlier.0);
        if entries.iter().all(|(_, a)| matches!(a, ArgSpec::Lit(_))) {
            ArgSpec::Lit(Value::Map(Arc::new(
                entries
                    .into_iter()
                    .map(|(k, a)| match a {
                        ArgSpec::Lit(v) => (k, v),
                        _ => (k, Value::Null),
                    })
                    .collect(),
            )))
        } else {
            ArgSpec::Map(entries)
        }
    }

    /// Calls `f` on every key referenced at any depth, in argument order.
    pub fn for_each_ref(&self, f: &mut impl FnMut(&Key)) {
        match self {
            ArgSpec::Lit(_) => {}
            ArgSpec::Ref(k) => f(k),
            ArgSpec::List(items) => items.iter().for_each(|a| a.for_each_ref(f)),
            ArgSpec::Map(entries) => entries.iter().for_each(|(_, a)| a.for_each_ref(f)),
        }
    }
}

/// A resolved argument, as stored in a graph.
#[derive(Clone, Debug, PartialEq)]
pub enum Arg {
    /// A literal value (a whole reference-free subtree).
    Lit(Value),
    /// The value of task `TaskId`.
    Ref(TaskId),
    /// Inside a fused task: the value of an earlier link of the same chain.
    Link(u32),
    /// A list with references inside.
    List(Box<[Arg]>),
    /// An object with references inside, sorted by key.
    Map(Box<[(String, Arg)]>),
}

impl Arg {
    /// Calls `f` on every task referenced at any depth.
    pub fn for_each_ref(&self, f: &mut impl FnMut(TaskId)) {
        match self {
            Arg::Lit(_) | Arg::Link(_) => {}
            Arg::Ref(t) => f(*t),
            Arg::List(items) => items.iter().for_each(|a| a.for_each_ref(f)),
            Arg::Map(entries) => entries.iter().for_each(|(_, a)| a.for_each_ref(f)),
        }
    }
}

/// How a task wants to be scheduled. Defaults cost nothing: graphs store `None` for them.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Annotations {
    /// Among runnable tasks, higher runs first.
    pub priority: i64,
    /// Re-run a failed attempt up to this many times.
    pub retries: u32,
    /// Resources each attempt holds while it runs (name, amount > 0), sorted by name.
    pub resources: Vec<(Arc<str>, f64)>,
    /// Restrict to these workers (empty: any worker).
    pub workers: Vec<Arc<str>>,
    /// With `workers`, fall back to any worker if none of them can run it.
    pub allow_other_workers: bool,
    /// An attempt running longer than this fails with a timeout error.
    pub timeout: Option<Duration>,
}

impl Annotations {
    /// Whether every field has its default value.
    #[must_use]
    pub fn is_default(&self) -> bool {
        *self == Annotations::default()
    }
}

/// A task as front ends describe it (before it is placed into a graph).
#[derive(Clone, Debug, PartialEq)]
pub struct TaskSpec {
    /// The task's unique key.
    pub key: Key,
    /// The op (builtin or registered function) name.
    pub op: Arc<str>,
    /// Positional arguments.
    pub args: Vec<ArgSpec>,
    /// Keys that must finish successfully first, with no data passed.
    pub after: Vec<Key>,
    /// Scheduling annotations.
    pub annotations: Annotations,
}

impl TaskSpec {
    /// A task calling `op` with `args` and default annotations.
    #[must_use]
    pub fn new(key: impl Into<Key>, op: &str, args: Vec<ArgSpec>) -> Self {
        TaskSpec { key: key.into(), op: Arc::from(op), args, after: Vec::new(), annotations: Annotations::default() }
    }

    /// Adds an ordering-only dependency.
    #[must_use]
    pub fn after(mut self, key: impl Into<Key>) -> Self {
        self.after.push(key.into());
        self
    }

    /// Replaces the annotations.
    #[must_use]
    pub fn with_annotations(mut self, annotations: Annotations) -> Self {
        self.annotations = annotations;
        self
    }
}
