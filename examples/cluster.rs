//! A program that is its own cluster: it registers a function, starts a `LocalCluster` whose
//! worker *processes* are this same program, and computes on it.
//!
//! `cargo run --example cluster`. The same pattern makes any program a worker for
//! `rask scheduler`: start it with `RASK_WORKER_SCHEDULER=tcp://HOST:PORT` (and optionally
//! `RASK_WORKER_NAME`, `RASK_WORKER_NTHREADS`, `RASK_WORKER_RESOURCES`).

use rask::distributed::{LocalCluster, LocalClusterConfig, run_worker_if_requested};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Register functions first: workers started from this program need them too.
    let collatz = rask::function("example-collatz-steps", |mut n: i64| {
        let mut steps = 0i64;
        while n > 1 {
            n = if n % 2 == 0 { n / 2 } else { 3 * n + 1 };
            steps += 1;
        }
        steps
    })?;
    let longest = rask::function("example-max", |xs: Vec<i64>| xs.into_iter().max().unwrap_or(0))?;
    // In a worker process this runs the worker and never returns.
    run_worker_if_requested();

    let cluster = LocalCluster::start(&LocalClusterConfig { n_workers: 2, ..LocalClusterConfig::default() })?;
    let client = cluster.client()?;
    println!("cluster at {}", cluster.address());

    let steps: Vec<rask::Delayed<i64>> = (1..=2000).map(|n| collatz.call(n)).collect();
    let answer = longest.call(&steps[..]).compute_with(&client)?;
    println!("longest Collatz trajectory below 2000: {answer} steps");
    assert_eq!(answer, 181);
    Ok(())
}
