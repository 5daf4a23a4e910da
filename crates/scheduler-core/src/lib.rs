//! rask's distributed scheduler, as a pure, deterministic state machine.
//!
//! [`Core::handle`] takes an [`Event`] (a past-tense fact: a graph was submitted, a worker
//! joined, a task finished) and returns the [`Command`]s that follow (run this task there, free
//! that value, tell this client its key is ready). It does no I/O, reads no clock and uses no
//! randomness, so every decision is unit-testable without sockets and reproducible; the tokio
//! shell in `rask-runtime` only moves events in and commands out. [`Core::validate`] checks every
//! invariant and is run after each event in tests.
//!
//! The task payload `P` (what the worker will run) is opaque here: the core decides *where* and
//! *when*, never *what*.
//!
//! Policies:
//! - **Task lifecycle.** `Released` (spec only) → `Waiting` (inputs pending) → `Ready` (queued
//!   here) → `Processing` (on a worker) → `Memory` / `Erred`; `NoWorker` when no connected worker
//!   could ever run it. A task is *forgotten* (removed) when no client wants it and no task
//!   depends on it; its *data* is released as soon as no client wants it and no pending
//!   dependent needs it. Released specs are kept while dependents exist, so lost data can be
//!   recomputed.
//! - **Reference counting by clients.** Each key records which clients hold futures to it; two
//!   clients share a key, and it lives until the last one releases it.
//! - **Priorities.** User priority first, then submission order (FIFO between graphs), then the
//!   graph's memory-friendly order.
//! - **Queuing with a saturation factor.** Ready tasks wait here, not on workers. A worker gets
//!   at most `ceil(nthreads × saturation)` tasks (default 1.1) — raised for workers whose tasks
//!   are short, so that roughly [`Config::target_busy_us`] of work is in flight and tiny tasks
//!   are not throttled by round-trips. This keeps load→reduce graphs from flooding workers and
//!   makes the scheduler, not the worker queue, the place where placement decisions are made.
//! - **Placement.** Among workers with a free slot that satisfy the task's restrictions and
//!   resources, the one minimising (bytes to fetch ÷ bandwidth + expected wait) — data locality
//!   first, then load; ties go to the lowest worker id.
//! - **Work stealing.** When a worker has idle threads and nothing is queued, busy workers are
//!   asked to give back tasks they hold but have not started: only slow ones (unknown or ≥1 ms on
//!   average), never restricted ones, and only if their inputs are cheap to move; a worker gives
//!   back a task only if it has not started it. Since ready tasks queue here rather than on the
//!   workers, this only ever concerns the few tasks pipelined beyond each worker's threads.
//! - **Resources** are reserved when a task is assigned and returned when the worker reports it
//!   done (or gives it back), so they are never over-committed.
//! - **Failures** propagate deterministically: a task whose inputs are all finished but some
//!   failed inherits the failure of its first failed input in argument order (as in the local
//!   schedulers).

mod core;
#[cfg(test)]
mod tests;

pub use crate::core::{
    ClientId, Command, Config, Core, Dep, Departure, Event, Holders, LossCause, NewTask, Phase, Prio, Restrictions,
    Ticket, Transition, Via, WorkerId, WorkerSpec,
};
