//! What folding the scheduler's feed into the dashboard's model costs per task, without the
//! scheduler: the changes a tree reduction makes (intake, runs on two workers, release, and
//! the cascade that forgets it), fed to [`Model::apply_change_ref`] as the dashboard thread does.
//!
//! `cargo run --release -p rask-dashboard --example model_apply [-- DEPTH [REPEAT]]`

use std::time::Instant;

use rask_dashboard::Model;
use rask_runtime::feed::{Cause, ChangeRef, FeedEvent, Phase, Via};

fn change(
    task: u64,
    key: Option<&str>,
    phase: Phase,
    worker: Option<u32>,
    duration_us: Option<u64>,
    cause: Cause,
) -> ChangeRef<'_> {
    ChangeRef { task, key, via: Via::EMPTY, phase, worker, duration_us, cause }
}

/// Feeds one tree of `2^depth - 1` tasks whose serials start at `base`; returns the tasks.
fn feed(m: &mut Model, depth: u32, base: u64, names: &[String], clock: &mut u64) -> u64 {
    let leaves = 1u64 << (depth - 1);
    let n = 2 * leaves - 1;
    let submitted = Cause::Submitted { client: 1 };
    // Intake: every task's first change carries its key, borrowed, as `Published::visit` hands it.
    for s in 0..n {
        let phase = if s < leaves { Phase::Queued } else { Phase::Waiting };
        m.apply_change_ref(*clock, change(base + s, Some(names[s as usize].as_str()), phase, None, None, submitted));
    }
    // Runs, level by level, alternating two workers; a finished level releases its inputs.
    let (mut start, mut width) = (0u64, leaves);
    while width >= 1 {
        for i in 0..width {
            let s = base + start + i;
            let w = (i % 2) as u32;
            *clock += 3;
            m.apply_change_ref(
                *clock,
                change(s, None, Phase::Processing, Some(w), None, Cause::Finished { worker: w }),
            );
            m.apply_change_ref(
                *clock + 1,
                change(s, None, Phase::Memory, Some(w), Some(1), Cause::Finished { worker: w }),
            );
        }
        if start > 0 {
            let below = 2 * width;
            for i in 0..below {
                let s = base + start - below + i;
                m.apply_change_ref(*clock, change(s, None, Phase::Released, None, None, Cause::Finished { worker: 0 }));
            }
        }
        start += width;
        width /= 2;
    }
    // The client releases the root: everything is forgotten, root first.
    for s in (0..n).rev() {
        m.apply_change_ref(*clock, change(base + s, None, Phase::Forgotten, None, None, Cause::Client { client: 1 }));
    }
    n
}

fn main() {
    let mut args = std::env::args().skip(1);
    let depth: u32 = args.next().and_then(|a| a.parse().ok()).unwrap_or(16);
    let repeat: u32 = args.next().and_then(|a| a.parse().ok()).unwrap_or(10);
    let n = (1usize << depth) - 1;
    let names: Vec<String> =
        (0..n).map(|i| format!("t-{}-{i}", depth - (usize::BITS - (i + 1).leading_zeros()))).collect();
    let mut m = Model::new();
    for w in 0..2 {
        m.apply(FeedEvent::WorkerJoined {
            at_us: 0,
            worker: w,
            name: format!("w{w}"),
            address: String::new(),
            nthreads: 1,
            memory_limit: None,
        });
    }
    let mut clock = 1;
    let mut base = 0;
    let mut best = f64::MAX;
    for _ in 0..repeat {
        let t0 = Instant::now();
        let tasks = feed(&mut m, depth, base, &names, &mut clock);
        best = best.min(t0.elapsed().as_secs_f64() * 1e9 / tasks as f64);
        base += tasks;
    }
    println!("dashboard model, tree of {n} tasks: {best:.0} ns/task (best of {repeat})");
}
