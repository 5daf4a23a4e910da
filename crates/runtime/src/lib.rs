//! rask's distributed runtime: the scheduler and worker processes (thin tokio shells around the
//! pure cores) and the client.
//!
//! The three share their connection plumbing (`conn`: dial/accept with the versioned handshake,
//! batching writers, the peer data pool), which is why they live in one crate with one module
//! each rather than three crates: fewer compilation units, one place for the I/O code. None of
//! them makes a scheduling decision — that is `rask-scheduler-core`'s job — and none of them
//! knows the bytes on the wire — that is `rask-protocol`'s.

mod client;
mod conn;
pub mod feed;
mod local_cluster;
mod memory;
mod scheduler;
mod store;
mod worker;

pub use client::{
    AsCompleted, BlockingClient, CallArg, Client, ClientError, Departed, RemoteFuture, WorkerMemory, task_progress_bar,
};
pub use local_cluster::{
    ENV_NAME, ENV_NTHREADS, ENV_RESOURCES, ENV_SCHEDULER, LocalCluster, LocalClusterConfig, LocalClusterError,
    run_worker_if_requested,
};
pub use scheduler::{SchedulerConfig, SchedulerHandle, start_scheduler};
pub use worker::{WorkerConfig, WorkerExit, WorkerStats, run_worker};

/// Securing a cluster from a program: every connection this process makes or accepts uses the
/// token and TLS set here (the `rask` commands' `--token` and `--tls-*` flags do the same).
pub mod security {
    pub use rask_protocol::handshake::{Token, set_process_token};
    pub use rask_protocol::tls::{Tls, TlsFiles, set_process_tls};
}

/// Errors of the scheduler and worker processes.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// An address could not be bound.
    #[error("cannot listen on {0}: {1}")]
    Bind(String, String),
    /// The scheduler could not be reached or refused us.
    #[error("cannot connect to the scheduler at {0}: {1}")]
    Connect(String, String),
    /// A peer misbehaved or the connection broke.
    #[error(transparent)]
    Protocol(#[from] rask_protocol::ProtocolError),
}
