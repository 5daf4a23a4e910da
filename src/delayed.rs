//! Lazy calls with typed handles, in the spirit of `dask.delayed`.
//!
//! A [`Delayed<T>`] is a handle to a value of type `T` that a graph will produce. It holds its
//! part of the graph (an `Arc` DAG of call nodes), so handles can be combined freely and cloned
//! cheaply; [`Delayed::compute`] collects the nodes into a [`Graph`], runs it and converts the
//! result. Keys are content hashes of the call, so equal calls collapse into one task.

use std::collections::HashSet;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use rask_graph::{Annotations, ArgSpec, Executor, Graph, GraphBuilder, Key, TaskId, TaskSpec, Value};
use rask_local::ThreadedScheduler;
use rask_ops::{FromValue, IntoOp, IntoValue, OpEntry};

use crate::Error;

/// One call in a lazy graph.
struct Node {
    key: Key,
    op: Arc<str>,
    args: Vec<ArgSpec>,
    deps: Vec<Arc<Node>>,
    annotations: Annotations,
    /// Keeps a value persisted on a cluster alive while this handle exists.
    pinned: Option<Arc<rask_runtime::RemoteFuture>>,
}

impl Drop for Node {
    // Dropping a long chain recursively would overflow the stack; unlink it iteratively.
    fn drop(&mut self) {
        let mut stack = std::mem::take(&mut self.deps);
        while let Some(node) = stack.pop() {
            if let Some(mut inner) = Arc::into_inner(node) {
                stack.append(&mut inner.deps);
            }
        }
    }
}

/// A lazily computed value of type `T`.
pub struct Delayed<T> {
    node: Arc<Node>,
    _t: PhantomData<fn() -> T>,
}

impl<T> Clone for Delayed<T> {
    fn clone(&self) -> Self {
        Delayed { node: Arc::clone(&self.node), _t: PhantomData }
    }
}

impl<T> std::fmt::Debug for Delayed<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Delayed({})", self.node.key)
    }
}

/// An argument ready to be placed in a call: the argument and the nodes producing its values.
/// Opaque: only [`IntoArg`] makes one.
pub struct ArgParts(ArgSpec, Vec<Arc<Node>>);

/// Something that can be an argument of type `T` in a call: a plain value, or a handle to one.
pub trait IntoArg<T> {
    /// The argument and, for handles, the nodes producing it.
    fn into_arg(self) -> ArgParts;
}

impl<T: IntoValue> IntoArg<T> for T {
    fn into_arg(self) -> ArgParts {
        ArgParts(ArgSpec::Lit(self.into_value()), Vec::new())
    }
}

impl<T> IntoArg<T> for Delayed<T> {
    fn into_arg(self) -> ArgParts {
        ArgParts(ArgSpec::Ref(self.node.key.clone()), vec![self.node])
    }
}

impl<T> IntoArg<T> for &Delayed<T> {
    fn into_arg(self) -> ArgParts {
        ArgParts(ArgSpec::Ref(self.node.key.clone()), vec![Arc::clone(&self.node)])
    }
}

/// A list of handles is an argument of type `Vec<T>` (like passing a list of delayed objects).
impl<T> IntoArg<Vec<T>> for Vec<Delayed<T>> {
    fn into_arg(self) -> ArgParts {
        (&self[..]).into_arg()
    }
}

impl<T> IntoArg<Vec<T>> for &[Delayed<T>] {
    fn into_arg(self) -> ArgParts {
        let refs = self.iter().map(|d| ArgSpec::Ref(d.node.key.clone())).collect();
        ArgParts(ArgSpec::list(refs), self.iter().map(|d| Arc::clone(&d.node)).collect())
    }
}

/// A registered function with typed arguments `Args` (a tuple) returning `R`.
pub struct Function<Args, R> {
    name: Arc<str>,
    _t: PhantomData<fn(Args) -> R>,
}

impl<Args, R> Clone for Function<Args, R> {
    fn clone(&self) -> Self {
        Function { name: Arc::clone(&self.name), _t: PhantomData }
    }
}

impl<Args, R> Function<Args, R> {
    /// The name the function is registered under.
    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    fn make(&self, parts: Vec<ArgParts>) -> Delayed<R> {
        let mut args = Vec::with_capacity(parts.len());
        let mut deps = Vec::new();
        for ArgParts(a, d) in parts {
            args.push(a);
            deps.extend(d);
        }
        let key = rask_graph::tokenize(&self.name, &args);
        Delayed {
            node: Arc::new(Node {
                key,
                op: Arc::clone(&self.name),
                args,
                deps,
                annotations: Annotations::default(),
                pinned: None,
            }),
            _t: PhantomData,
        }
    }
}

/// Registers `f` in the process-wide registry under `name` and returns a typed handle to call it.
///
/// Register every function at start-up, under the same name in every process that may run it:
/// the name is what tasks refer to. `f` may return `T` or `Result<T, E>` (the error's message
/// becomes the task's failure).
///
/// # Errors
/// If `name` is already registered (builtin op names included).
pub fn function<Args, F: IntoOp<Args>>(name: &str, f: F) -> Result<Function<Args, F::Output>, Error> {
    rask_ops::register_global(name, OpEntry { func: f.into_op(name), check: None, quick: false })?;
    Ok(Function { name: Arc::from(name), _t: PhantomData })
}

/// Like [`function`], for a function whose time is bounded by the size of its arguments: no
/// I/O, no sleeping or waiting, no work set by an argument's value (arithmetic, small reshaping).
/// A worker may then run a call of it on small inputs in place, on its event loop, instead of
/// handing it to a task thread and back — which costs more than such a call (see
/// [`rask_ops::OpEntry::quick`]). A call that breaks the promise holds up everything else the
/// worker does while it runs — its heartbeats (a worker silent for 30 s is dropped), serving
/// its results to peers, taking new tasks; a worker stops running a function in place once
/// one of its calls took over 5 ms.
///
/// # Errors
/// If `name` is already registered (builtin op names included).
pub fn quick_function<Args, F: IntoOp<Args>>(name: &str, f: F) -> Result<Function<Args, F::Output>, Error> {
    rask_ops::register_global(name, OpEntry { func: f.into_op(name), check: None, quick: true })?;
    Ok(Function { name: Arc::from(name), _t: PhantomData })
}

/// A typed handle to a function registered elsewhere — a builtin op (`"add"`, `"shell"`) or a
/// function only the cluster's workers register. Nothing is registered here and the types are
/// not checked until the function runs: a mismatch is a task error naming the function.
#[must_use]
pub fn op<Args, R>(name: &str) -> Function<Args, R> {
    Function { name: Arc::from(name), _t: PhantomData }
}

/// A literal value as a task (like `dask.delayed(value)`).
#[must_use]
pub fn value<T: IntoValue>(v: T) -> Delayed<T> {
    let f: Function<(T,), T> = Function { name: Arc::from("identity"), _t: PhantomData };
    f.make(vec![ArgParts(ArgSpec::Lit(v.into_value()), Vec::new())])
}

macro_rules! call_impl {
    ($($a:ident $arg:ident),*) => {
        impl<$($a,)* R> Function<($($a,)*), R> {
            /// Calls the function lazily: returns a handle, runs nothing.
            #[allow(clippy::too_many_arguments)]
            pub fn call(&self, $($arg: impl IntoArg<$a>),*) -> Delayed<R> {
                self.make(vec![$($arg.into_arg()),*])
            }
        }
    };
}
call_impl!();
call_impl!(A0 a0);
call_impl!(A0 a0, A1 a1);
call_impl!(A0 a0, A1 a1, A2 a2);
call_impl!(A0 a0, A1 a1, A2 a2, A3 a3);
call_impl!(A0 a0, A1 a1, A2 a2, A3 a3, A4 a4);
call_impl!(A0 a0, A1 a1, A2 a2, A3 a3, A4 a4, A5 a5);

impl<T> Delayed<T> {
    /// The task's key (a content hash of the call).
    #[must_use]
    pub fn key(&self) -> &Key {
        &self.node.key
    }

    fn annotate(self, f: impl FnOnce(&mut Annotations)) -> Self {
        let n = &self.node;
        let mut annotations = n.annotations.clone();
        f(&mut annotations);
        let node = Node {
            key: n.key.clone(),
            op: Arc::clone(&n.op),
            args: n.args.clone(),
            deps: n.deps.clone(),
            annotations,
            pinned: n.pinned.clone(),
        };
        Delayed { node: Arc::new(node), _t: PhantomData }
    }

    /// Among runnable tasks, higher priority runs first.
    #[must_use]
    pub fn with_priority(self, priority: i64) -> Self {
        self.annotate(|a| a.priority = priority)
    }

    /// Re-run a failed attempt up to `retries` times.
    #[must_use]
    pub fn with_retries(self, retries: u32) -> Self {
        self.annotate(|a| a.retries = retries)
    }

    /// Fail an attempt that runs longer than `timeout`.
    #[must_use]
    pub fn with_timeout(self, timeout: Duration) -> Self {
        self.annotate(|a| a.timeout = Some(timeout))
    }

    /// Hold `amount` of resource `name` while running.
    #[must_use]
    pub fn with_resource(self, name: &str, amount: f64) -> Self {
        self.annotate(|a| {
            a.resources.retain(|(n, _)| &**n != name);
            a.resources.push((Arc::from(name), amount));
            a.resources.sort_by(|x, y| x.0.cmp(&y.0));
        })
    }

    /// The graph needed to compute this value.
    #[must_use]
    pub fn graph(&self) -> Graph {
        collect(&[&self.node]).0
    }

    /// The graph in Graphviz dot syntax (like `dask.visualize`).
    #[must_use]
    pub fn to_dot(&self) -> String {
        rask_graph::to_dot(&self.graph())
    }
}

impl<T: FromValue> Delayed<T> {
    /// Computes the value on the default embedded threaded scheduler (one thread per core).
    ///
    /// # Errors
    /// The failure of this task or of one it depends on, or a type mismatch.
    pub fn compute(&self) -> Result<T, Error> {
        self.compute_with(&ThreadedScheduler::default())
    }

    /// Computes the value on `executor`.
    ///
    /// # Errors
    /// See [`Delayed::compute`]; also when the executor cannot run the graph.
    pub fn compute_with<E: Executor>(&self, executor: &E) -> Result<T, Error> {
        let (graph, outs) = collect(&[&self.node]);
        let results = executor.run(&graph, &outs).map_err(|e| Error::Executor(Box::new(e)))?;
        let v = results.into_iter().next().unwrap_or(Ok(Value::Null)).map_err(Error::Task)?;
        T::from_value(&v).map_err(|source| Error::Type { key: self.node.key.clone(), source })
    }

    /// Computes now and returns a handle to the result, so later graphs reuse it instead of
    /// recomputing it (like `dask.persist` on the local scheduler).
    ///
    /// # Errors
    /// See [`Delayed::compute`].
    pub fn persist(&self) -> Result<Delayed<T>, Error>
    where
        T: IntoValue + Clone,
    {
        let v = self.compute()?;
        let node = Node {
            key: self.node.key.clone(),
            op: Arc::from("identity"),
            args: vec![ArgSpec::Lit(v.into_value())],
            deps: Vec::new(),
            annotations: Annotations::default(),
            pinned: None,
        };
        Ok(Delayed { node: Arc::new(node), _t: PhantomData })
    }

    /// Starts computing on a cluster and keeps the result in the cluster's memory for as long
    /// as the returned handle (or a graph built from it) exists — like `client.persist`. Later
    /// graphs that use it, computed on the same cluster, reuse the value instead of
    /// recomputing it (the scheduler knows the key).
    #[must_use]
    pub fn persist_on(&self, client: &rask_runtime::BlockingClient) -> Delayed<T> {
        let (graph, outs) = collect(&[&self.node]);
        let future = client.submit_graph(&graph, &outs).pop();
        let n = &self.node;
        let node = Node {
            key: n.key.clone(),
            op: Arc::clone(&n.op),
            args: n.args.clone(),
            deps: n.deps.clone(),
            annotations: n.annotations.clone(),
            pinned: future.map(Arc::new),
        };
        Delayed { node: Arc::new(node), _t: PhantomData }
    }
}

impl<T: FromValue + Send + 'static> Delayed<T> {
    /// Async flavour of [`Delayed::compute`]: runs on a background thread and resolves when
    /// done, so an async caller's executor is never blocked. Works with any async runtime.
    pub fn compute_async(&self) -> impl Future<Output = Result<T, Error>> + Send + 'static {
        let this = self.clone();
        let slot: Arc<Mutex<Oneshot<Result<T, Error>>>> = Arc::new(Mutex::new(Oneshot { value: None, waker: None }));
        let tx = Arc::clone(&slot);
        let spawned = std::thread::Builder::new().name("rask-compute".into()).spawn(move || {
            let r = this.compute();
            let mut s = tx.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            s.value = Some(r);
            if let Some(w) = s.waker.take() {
                w.wake();
            }
        });
        if let Err(e) = spawned {
            slot.lock().unwrap_or_else(std::sync::PoisonError::into_inner).value =
                Some(Err(Error::Executor(Box::new(e))));
        }
        Receive { slot }
    }
}

struct Oneshot<T> {
    value: Option<T>,
    waker: Option<Waker>,
}

struct Receive<T> {
    slot: Arc<Mutex<Oneshot<T>>>,
}

impl<T> Future for Receive<T> {
    type Output = T;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        let mut s = self.slot.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match s.value.take() {
            Some(v) => Poll::Ready(v),
            None => {
                s.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

/// Gathers the nodes reachable from `roots` into a graph (each key once).
fn collect(roots: &[&Arc<Node>]) -> (Graph, Vec<TaskId>) {
    let mut seen: HashSet<Key> = HashSet::new();
    let mut b = GraphBuilder::new();
    let mut stack: Vec<&Arc<Node>> = roots.to_vec();
    while let Some(n) = stack.pop() {
        if !seen.insert(n.key.clone()) {
            continue;
        }
        b.add(TaskSpec {
            key: n.key.clone(),
            op: Arc::clone(&n.op),
            args: n.args.clone(),
            after: Vec::new(),
            annotations: n.annotations.clone(),
        });
        stack.extend(n.deps.iter());
    }
    // Content-hash keys cannot form cycles and every reference comes with its node.
    let graph = b.build().expect("invariant: graphs collected from handles are valid DAGs");
    let outs = roots.iter().map(|r| graph.id(r.key.as_str()).unwrap_or(TaskId(0))).collect();
    (graph, outs)
}

/// Several handles computed together, sharing common work (like `dask.compute(a, b)`).
pub trait Computable {
    /// The computed values.
    type Output;
    /// Computes on `executor`.
    ///
    /// # Errors
    /// The first failing output (in order), or a type mismatch.
    fn compute_with<E: Executor>(&self, executor: &E) -> Result<Self::Output, Error>;
}

macro_rules! computable_tuple {
    ($($t:ident $i:tt),*) => {
        impl<$($t: FromValue),*> Computable for ($(&Delayed<$t>,)*) {
            type Output = ($($t,)*);
            fn compute_with<X: Executor>(&self, executor: &X) -> Result<Self::Output, Error> {
                let roots = [$(&self.$i.node),*];
                let (graph, outs) = collect(&roots);
                let mut results = executor.run(&graph, &outs).map_err(|e| Error::Executor(Box::new(e)))?.into_iter();
                Ok(($({
                    let v = results.next().unwrap_or(Ok(Value::Null)).map_err(Error::Task)?;
                    $t::from_value(&v).map_err(|source| Error::Type { key: self.$i.node.key.clone(), source })?
                },)*))
            }
        }
    };
}
computable_tuple!(A 0);
computable_tuple!(A 0, B 1);
computable_tuple!(A 0, B 1, C 2);
computable_tuple!(A 0, B 1, C 2, D 3);
computable_tuple!(A 0, B 1, C 2, D 3, E 4);
computable_tuple!(A 0, B 1, C 2, D 3, E 4, F 5);

impl<T: FromValue> Computable for &[Delayed<T>] {
    type Output = Vec<T>;
    fn compute_with<E: Executor>(&self, executor: &E) -> Result<Vec<T>, Error> {
        let roots: Vec<&Arc<Node>> = self.iter().map(|d| &d.node).collect();
        let (graph, outs) = collect(&roots);
        let results = executor.run(&graph, &outs).map_err(|e| Error::Executor(Box::new(e)))?;
        results
            .into_iter()
            .zip(self.iter())
            .map(|(r, d)| {
                let v = r.map_err(Error::Task)?;
                T::from_value(&v).map_err(|source| Error::Type { key: d.node.key.clone(), source })
            })
            .collect()
    }
}

/// Computes several handles in one graph on the default threaded scheduler.
///
/// # Errors
/// The first failing output (in order), or a type mismatch.
pub fn compute<C: Computable>(c: C) -> Result<C::Output, Error> {
    c.compute_with(&ThreadedScheduler::default())
}
