//! The code tasks run: a registry of named functions ("ops"), the builtin ops of the workflow
//! format, and typed adapters that turn ordinary Rust closures into ops.
//!
//! Tasks name their function by a stable string, never by a pointer, so that the same graph can
//! run in this process (the local schedulers) or on a remote worker started from the same binary
//! (the distributed runtime): each process builds its [`Registry`] at start-up by registering the
//! same functions under the same names. Executors resolve each op name to an [`OpFn`] once per
//! graph, so the hot path is one indirect call.

mod builtins;
mod run;
mod shell;
mod typed;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use rask_graph::workflow::{OpCatalog, OpCheckError};
use rask_graph::{ArgSpec, Key, Value};

pub use run::{CallPolicy, attempt_once, run_call};
pub use typed::{FromValue, IntoOp, IntoOpResult, IntoValue, TypeError};

/// An op: takes the task context and the resolved positional arguments, returns a value or an
/// error message. `Send + Sync` so every executor thread can call it.
pub type OpFn = Arc<dyn Fn(&TaskCtx<'_>, &[Value]) -> Result<Value, OpError> + Send + Sync>;

/// Checks the literal arguments of a call before anything runs (arity, literal types).
/// Returns a message naming the op and the argument.
pub type ArgCheck = fn(op: &str, args: &[ArgSpec]) -> Result<(), String>;

/// Why an op failed; the executor wraps it into a [`rask_graph::TaskError`] naming the task.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct OpError(pub String);

impl OpError {
    /// An error with this message.
    pub fn new(msg: impl Into<String>) -> Self {
        OpError(msg.into())
    }
}

/// What a running task may know about itself: its key, which attempt this is, its deadline, and
/// whether the executor has given up on it (after a timeout) so it should stop early.
pub struct TaskCtx<'a> {
    key: &'a Key,
    attempt: u32,
    deadline: Option<Instant>,
    cancel: Option<&'a AtomicBool>,
}

impl<'a> TaskCtx<'a> {
    /// A context for attempt `attempt` (1-based) of task `key`.
    #[must_use]
    pub fn new(key: &'a Key, attempt: u32, deadline: Option<Instant>, cancel: Option<&'a AtomicBool>) -> Self {
        TaskCtx { key, attempt, deadline, cancel }
    }

    /// The task's key.
    #[must_use]
    pub fn key(&self) -> &Key {
        self.key
    }

    /// Which attempt this is (1 for the first run, 2 for the first retry, ...).
    #[must_use]
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// When the executor will fail this attempt with a timeout, if the task has one.
    #[must_use]
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// Whether the executor has abandoned this attempt; long-running ops should return soon.
    #[must_use]
    pub fn cancelled(&self) -> bool {
        self.cancel.is_some_and(|c| c.load(Ordering::Relaxed)) || self.deadline.is_some_and(|d| Instant::now() >= d)
    }

    /// Sleeps for `d`, waking early (with an error) if the attempt is cancelled or times out.
    ///
    /// # Errors
    /// When the attempt was cancelled or passed its deadline while sleeping.
    pub fn sleep(&self, d: Duration) -> Result<(), OpError> {
        let end = Instant::now() + d;
        loop {
            if self.cancelled() {
                return Err(OpError::new("cancelled"));
            }
            let now = Instant::now();
            if now >= end {
                return Ok(());
            }
            let slice = if self.cancel.is_some() || self.deadline.is_some() {
                (end - now).min(Duration::from_millis(10))
            } else {
                end - now
            };
            std::thread::sleep(slice);
        }
    }
}

/// One registered op.
#[derive(Clone)]
pub struct OpEntry {
    /// The function.
    pub func: OpFn,
    /// Validation of literal arguments; `None` accepts anything (typed functions check at run time).
    pub check: Option<ArgCheck>,
    /// Promises that a call takes time in proportion to the size of its arguments, and no
    /// more: no I/O, no sleeping or waiting, no work set by an argument's value. A worker may
    /// then run a call with small inputs on its event loop instead of handing it to a task
    /// thread (which costs more than such a call). Arithmetic and small list builtins are
    /// quick; functions registered with [`Registry::register`] are not.
    pub quick: bool,
}

/// Errors of registration.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    /// A different function is already registered under this name.
    #[error("a function named {0:?} is already registered")]
    Duplicate(String),
}

/// Maps op names to functions. Cheap to clone (entries are `Arc`s).
#[derive(Clone, Default)]
pub struct Registry {
    ops: HashMap<Arc<str>, OpEntry>,
}

impl Registry {
    /// A registry with no op at all.
    #[must_use]
    pub fn empty() -> Self {
        Registry::default()
    }

    /// A registry holding the builtin ops of the workflow format.
    #[must_use]
    pub fn with_builtins() -> Self {
        let mut r = Registry::empty();
        builtins::install(&mut r);
        r
    }

    /// Registers a raw op.
    ///
    /// # Errors
    /// If the name is taken.
    pub fn register_raw(&mut self, name: &str, entry: OpEntry) -> Result<(), RegistryError> {
        if self.ops.contains_key(name) {
            return Err(RegistryError::Duplicate(name.to_owned()));
        }
        self.ops.insert(Arc::from(name), entry);
        Ok(())
    }

    /// Registers a typed Rust function (`|a: i64, b: i64| a + b`) under `name`.
    ///
    /// # Errors
    /// If the name is taken.
    pub fn register<Args, F: IntoOp<Args>>(&mut self, name: &str, f: F) -> Result<(), RegistryError> {
        self.register_raw(name, OpEntry { func: f.into_op(name), check: None, quick: false })
    }

    /// The function registered under `name`.
    #[must_use]
    pub fn get(&self, name: &str) -> Option<&OpFn> {
        self.ops.get(name).map(|e| &e.func)
    }

    /// Whether `name` is registered as quick (see [`OpEntry::quick`]).
    #[must_use]
    pub fn is_quick(&self, name: &str) -> bool {
        self.ops.get(name).is_some_and(|e| e.quick)
    }

    /// Whether `name` is registered.
    #[must_use]
    pub fn contains(&self, name: &str) -> bool {
        self.ops.contains_key(name)
    }

    /// Registered names, sorted.
    #[must_use]
    pub fn names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.ops.keys().map(|k| &**k).collect();
        v.sort_unstable();
        v
    }
}

impl OpCatalog for Registry {
    fn check(&self, op: &str, args: &[ArgSpec]) -> Result<(), OpCheckError> {
        let entry = self.ops.get(op).ok_or(OpCheckError::UnknownOp)?;
        match entry.check {
            Some(check) => check(op, args).map_err(OpCheckError::BadArgs),
            None => Ok(()),
        }
    }
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").field("ops", &self.names()).finish()
    }
}

static GLOBAL: RwLock<Option<Arc<Registry>>> = RwLock::new(None);

/// The process-wide registry: builtins plus everything registered with [`register_global`].
///
/// Returns a snapshot; registering later does not change it. Executors take one per run.
#[must_use]
pub fn global() -> Arc<Registry> {
    if let Some(r) = GLOBAL.read().unwrap_or_else(std::sync::PoisonError::into_inner).as_ref() {
        return Arc::clone(r);
    }
    let mut slot = GLOBAL.write().unwrap_or_else(std::sync::PoisonError::into_inner);
    Arc::clone(slot.get_or_insert_with(|| Arc::new(Registry::with_builtins())))
}

/// Adds an op to the process-wide registry (copy-on-write: snapshots already taken are unchanged).
///
/// # Errors
/// If the name is taken.
pub fn register_global(name: &str, entry: OpEntry) -> Result<(), RegistryError> {
    let mut slot = GLOBAL.write().unwrap_or_else(std::sync::PoisonError::into_inner);
    let current = slot.get_or_insert_with(|| Arc::new(Registry::with_builtins()));
    let mut next = Registry::clone(current);
    next.register_raw(name, entry)?;
    *slot = Some(Arc::new(next));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typed_function_registers_and_runs() {
        let mut r = Registry::empty();
        r.register("add2", |a: i64, b: i64| a + b).expect("fresh name");
        let key = Key::new("k");
        let ctx = TaskCtx::new(&key, 1, None, None);
        let f = r.get("add2").expect("registered");
        assert_eq!(f(&ctx, &[Value::Int(2), Value::Int(3)]), Ok(Value::Int(5)));
        let err = f(&ctx, &[Value::Int(2)]).expect_err("arity");
        assert_eq!(err.0, "function `add2` takes 2 arguments, got 1");
        let err = f(&ctx, &[Value::Int(2), Value::str("x")]).expect_err("type");
        assert_eq!(err.0, "function `add2`: argument 2: expected an integer, got string");
    }

    #[test]
    fn duplicate_names_are_refused() {
        let mut r = Registry::with_builtins();
        assert_eq!(r.register("add", |a: i64| a), Err(RegistryError::Duplicate("add".into())));
    }

    #[test]
    fn global_registry_is_copy_on_write() {
        let before = global();
        let f = |x: i64| x * 3;
        register_global("ops-test-triple", OpEntry { func: f.into_op("ops-test-triple"), check: None, quick: false })
            .expect("fresh name");
        assert!(!before.contains("ops-test-triple"));
        assert!(global().contains("ops-test-triple"));
        assert!(global().contains("add"));
    }

    #[test]
    fn sleep_stops_early_when_cancelled() {
        let key = Key::new("k");
        let flag = AtomicBool::new(true);
        let ctx = TaskCtx::new(&key, 1, None, Some(&flag));
        let t = Instant::now();
        assert!(ctx.sleep(Duration::from_secs(5)).is_err());
        assert!(t.elapsed() < Duration::from_secs(1));
    }
}
