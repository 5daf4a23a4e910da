//! What folding the scheduler's feed into the dashboard's model costs per task, without the
//! scheduler: the changes a tree reduction makes (intake, runs on two workers, release, and
//! the cascade that forgets it), in the core's records, fed to [`Model::apply_batch`] in
//! batches of 1 024 as the dashboard thread receives them (built beforehand, not timed).
//! A task is sent in one scheduler turn and reported finished in a later one, 16 at a time.
//!
//! `cargo run --release -p rask-dashboard --example model_apply [-- DEPTH [REPEAT]]`

use std::time::Instant;

use rask_dashboard::Model;
use rask_runtime::feed::{BatchBuilder, Cause, ChangeRef, FeedEvent, Phase, Via};

/// Changes gathered into batches the way the scheduler's publisher cuts them.
#[derive(Default)]
struct Batcher {
    done: Vec<BatchBuilder>,
    current: BatchBuilder,
}

impl Batcher {
    const CHUNK: usize = 1024;

    fn push(&mut self, at_us: u64, cause: Cause, task: u64, key: Option<&str>, phase: Phase, worker: Option<u32>) {
        let duration_us = (phase == Phase::Memory).then_some(1);
        self.current.push(at_us, ChangeRef { task, key, via: Via::EMPTY, phase, worker, duration_us, cause });
        if self.current.len() == Self::CHUNK {
            self.flush();
        }
    }

    fn flush(&mut self) {
        self.done.push(std::mem::take(&mut self.current));
    }
}

/// Feeds one tree of `2^depth - 1` tasks whose serials start at `base`; returns the tasks.
fn feed(b: &mut Batcher, depth: u32, base: u64, names: &[String], clock: &mut u64) -> u64 {
    let leaves = 1u64 << (depth - 1);
    let n = 2 * leaves - 1;
    let submitted = Cause::Submitted { client: 1 };
    // Intake: every task's first change carries its key.
    for s in 0..n {
        let phase = if s < leaves { Phase::Queued } else { Phase::Waiting };
        b.push(*clock, submitted, base + s, Some(names[s as usize].as_str()), phase, None);
    }
    // Runs, level by level, on two workers, 16 tasks at a time: the scheduler sends them in one
    // turn and learns they finished in a later one (one time and one cause each, as a worker's
    // frame of reports makes them); a finished level releases its inputs.
    let (mut start, mut width) = (0u64, leaves);
    while width >= 1 {
        for group in (0..width).step_by(16) {
            let w = ((group / 16) % 2) as u32;
            let finished = Cause::Finished { worker: w };
            let tasks = (group..(group + 16).min(width)).map(|i| base + start + i);
            *clock += 1;
            for s in tasks.clone() {
                b.push(*clock, finished, s, None, Phase::Processing, Some(w));
            }
            *clock += 1;
            for s in tasks {
                b.push(*clock, finished, s, None, Phase::Memory, Some(w));
            }
        }
        if start > 0 {
            let below = 2 * width;
            for i in 0..below {
                let s = base + start - below + i;
                b.push(*clock, Cause::Finished { worker: 0 }, s, None, Phase::Released, None);
            }
        }
        start += width;
        width /= 2;
    }
    // The client releases the root: everything is forgotten, root first.
    for s in (0..n).rev() {
        b.push(*clock, Cause::Client { client: 1 }, base + s, None, Phase::Forgotten, None);
    }
    b.flush();
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
        let mut b = Batcher::default();
        let tasks = feed(&mut b, depth, base, &names, &mut clock);
        // The batches come from memory, not from a cache: the dashboard's thread reads what
        // the scheduler's thread wrote on another core.
        let mut elapsed = std::time::Duration::ZERO;
        for batch in &b.done {
            let t0 = Instant::now();
            m.apply_batch(batch.batch());
            elapsed += t0.elapsed();
        }
        best = best.min(elapsed.as_secs_f64() * 1e9 / tasks as f64);
        base += tasks;
    }
    println!("dashboard model, tree of {n} tasks: {best:.0} ns/task (best of {repeat})");
}
