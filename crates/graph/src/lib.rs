//! rask's task-graph core: pure data structures and algorithms, no I/O.
//!
//! Everything a scheduler needs to know about *what* to run lives here: [`Value`]s, task specs
//! ([`TaskSpec`], [`ArgSpec`]), the validated graph arena ([`Graph`], built by [`GraphBuilder`]),
//! memory-aware ordering ([`order`]), culling ([`Graph::cull`]), chain fusion ([`fuse`]),
//! content-hash keys ([`tokenize`]), Graphviz export ([`to_dot`]) and the workflow file format
//! ([`workflow`]). *How* to run it is the executors' business (`rask-local`, later the
//! distributed scheduler); they all consume the same `Graph`, which is why it is immutable and
//! validated on construction.
//!
//! Architecture invariant: this crate does no I/O, reads no clock and uses no randomness.

mod dot;
mod error;
mod fuse;
mod fxhash;
mod graph;
mod key;
mod order;
mod spec;
mod tokenize;
mod value;
pub mod workflow;

pub use dot::to_dot;
pub use error::{GraphError, GraphErrors};
pub use fuse::fuse;
pub use fxhash::{FxHashMap, FxHashSet, FxHasher};
pub use graph::{Body, Call, Graph, GraphBuilder, Link, Task};
pub use key::{Key, OpId, TaskId};
pub use order::{execution_ranks, order, peak_live};
pub use spec::{Annotations, Arg, ArgSpec, TaskSpec};
pub use tokenize::tokenize;
pub use value::{FailureKind, TaskError, TaskResult, Value, sha256_hex};

/// What an executor (the local schedulers, a distributed client) must offer so that front ends —
/// lazy calls, workflow files, collections — can run graphs without knowing where they run.
pub trait Executor {
    /// Why an executor could not run a graph at all (task failures are results, not this).
    type Error: std::error::Error + Send + Sync + 'static;

    /// Runs `graph` and returns the result of each output, in the order given.
    ///
    /// # Errors
    /// When the graph cannot be run at all (for example an op is unknown to the executor);
    /// failures of individual tasks are reported in the returned results instead.
    fn run(&self, graph: &Graph, outputs: &[TaskId]) -> Result<Vec<TaskResult>, Self::Error>;
}
