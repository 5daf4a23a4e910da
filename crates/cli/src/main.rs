//! The `rask` command.
//!
//! This is the only crate that knows about command-line parsing and exit statuses; everything it
//! does is a thin layer over the library crates.

mod bench;
mod bench_dist;
mod cluster;
mod dashboard;
mod nanny;
mod run;
mod security;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// mimalloc instead of the system allocator: the scheduler and workers allocate small objects
/// (keys, messages, task records) at a high rate, and glibc's malloc spent about a fifth of the
/// scheduler's CPU time in consolidation and free-list upkeep under the distributed benchmark.
///
/// Built without asking for transparent huge pages (its `no_thp` feature). Otherwise mimalloc
/// asks for them on all the memory it maps, so every first touch of a 2 MiB range faults in and
/// zeroes all of it: rask's processes allocate a graph's worth of small records and free them
/// when it is done, and with huge pages a scheduler and two idle workers held 69, 34 and 35 MB
/// resident after tree-15 (53, 18 and 23 MB of it in huge pages), the kernel spent 4–8% of the
/// machine's time zeroing pages, and a worker's resident size, which its memory limit watches,
/// overstated what it holds. Without them tree-15 in `rask bench distributed` ran faster in 7
/// of 8 alternating pairs (median +7%; scheduler CPU per task −18%, workers' −10%).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// rask: parallel task graphs, Dask's model with a fraction of its overhead.
#[derive(Parser)]
#[command(name = "rask", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a workflow file (see the README for the format) and print its outputs.
    Run(run::RunArgs),
    /// Validate a workflow file and print its task graph in Graphviz dot syntax.
    Graph(run::GraphArgs),
    /// Benchmarks, side by side with Dask.
    Bench(bench::BenchArgs),
    /// Start a scheduler; prints its address (tcp://HOST:PORT, or tls:// with TLS) on standard
    /// output.
    Scheduler(cluster::SchedulerArgs),
    /// Start workers connected to a scheduler.
    Worker(cluster::WorkerArgs),
    /// Serve the dashboard of a finished run from its journal (`rask scheduler --journal`).
    Dashboard(dashboard::DashboardArgs),
    /// Write a development TLS certificate set (a CA and a node certificate) to a directory.
    DevCerts(security::DevCertsArgs),
}

fn main() -> ExitCode {
    // Started as a worker of a LocalCluster: run it and exit.
    rask_runtime::run_worker_if_requested();
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => run::run(&args),
        Command::Graph(args) => run::graph(&args),
        Command::Bench(args) => bench::bench(&args),
        Command::Scheduler(args) => cluster::scheduler(&args),
        Command::Worker(args) => cluster::worker(&args),
        Command::DevCerts(args) => security::dev_certs(&args),
        Command::Dashboard(args) => dashboard::dashboard(&args),
    }
}
