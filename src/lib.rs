//! # rask: parallel task graphs — Dask's model, rebuilt in Rust
//!
//! This facade crate is the public API. Build lazy computations from ordinary Rust functions,
//! then compute them on the embedded threaded scheduler (no server to start):
//!
//! ```
//! let inc = rask::function("doc-inc", |x: i64| x + 1)?;
//! let add = rask::function("doc-add", |x: i64, y: i64| x + y)?;
//!
//! let a = inc.call(1);          // nothing runs yet: `a` is a Delayed<i64>
//! let b = inc.call(2);
//! let total = add.call(&a, &b); // depends on a and b
//!
//! assert_eq!(total.compute()?, 5);
//! let (x, y) = rask::compute((&a, &total))?;   // several results, one graph, shared work
//! assert_eq!((x, y), (2, 5));
//! # Ok::<(), rask::Error>(())
//! ```
//!
//! - Functions are registered under a **stable name** ([`function`]), so the same graph can later
//!   run on remote workers started from the same binary.
//! - Calls get **content-hash keys** ([`tokenize`]): the same call made twice is one task.
//! - Graphs can be exported to Graphviz with [`Delayed::to_dot`].
//! - Workflow files (the JSON format `rask run` reads) are parsed by [`workflow::parse`].
//!
//! The crates behind it: `rask-graph` (pure graph core), `rask-ops` (function registry and
//! builtin ops), `rask-local` (embedded schedulers).

mod delayed;

/// The distributed runtime: connect to a cluster ([`distributed::Client`],
/// [`distributed::BlockingClient`]), start one on this machine ([`distributed::LocalCluster`]),
/// or make this program a worker for its registered functions
/// ([`distributed::run_worker_if_requested`]). A `BlockingClient` is an [`Executor`], so
/// `Delayed::compute_with(&client)` runs lazy graphs on the cluster.
pub mod distributed {
    pub use rask_runtime::security;
    pub use rask_runtime::{
        AsCompleted, BlockingClient, CallArg, Client, ClientError, LocalCluster, LocalClusterConfig, LocalClusterError,
        RemoteFuture, SchedulerConfig, SchedulerHandle, WorkerConfig, WorkerExit, run_worker, run_worker_if_requested,
        start_scheduler,
    };
}

pub use delayed::{ArgParts, Computable, Delayed, Function, IntoArg, compute, function, op, quick_function, value};
pub use rask_graph::{
    Annotations, Arg, ArgSpec, Executor, FailureKind, Graph, GraphBuilder, GraphError, GraphErrors, Key, TaskError,
    TaskId, TaskResult, TaskSpec, Value, execution_ranks, fuse, order, to_dot, tokenize, workflow,
};
pub use rask_local::{LocalConfig, LocalError, SyncScheduler, ThreadedScheduler};
pub use rask_ops::{FromValue, IntoValue, OpError, Registry, RegistryError, TaskCtx, TypeError};

use std::sync::Arc;

/// Everything that can go wrong when computing through this API.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A task failed (or a task it depends on did); carries the root cause.
    #[error(transparent)]
    Task(Arc<TaskError>),
    /// The graph is invalid (cannot happen for graphs built with this API, but can for others).
    #[error(transparent)]
    Graph(#[from] GraphErrors),
    /// The executor could not run the graph at all.
    #[error("executor error: {0}")]
    Executor(Box<dyn std::error::Error + Send + Sync>),
    /// A result does not have the type the handle promised.
    #[error("result of task {key} has an unexpected type: {source}")]
    Type {
        /// The task.
        key: Key,
        /// What was expected and found.
        source: TypeError,
    },
    /// A function name is already taken.
    #[error(transparent)]
    Registry(#[from] RegistryError),
}
