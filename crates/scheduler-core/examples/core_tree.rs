//! The scheduler core alone on a tree reduction: how many microseconds of scheduler CPU each
//! task costs before any I/O. Two simulated 1-thread workers finish every task they are sent
//! at once, one `TaskFinished` event per task, as the shell delivers them.
//!
//! `cargo run --release -p rask-scheduler-core --example core_tree [-- DEPTH [REPEAT [record]]]`

use std::collections::VecDeque;
use std::time::Instant;

use rask_graph::Key;
use rask_scheduler_core::{ClientId, Command, Config, Core, Event, Ticket, WorkerId};

#[path = "support/tree.rs"]
mod support;
use support::{tree, worker};

fn main() {
    let mut args = std::env::args().skip(1);
    let depth: u32 = args.next().and_then(|a| a.parse().ok()).unwrap_or(15);
    let repeat: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(10);
    // `record`: record every state change, as the scheduler does for its dashboard, and copy
    // them out in batches the way its shell does (into a reused buffer).
    let record = args.next().is_some_and(|a| a == "record");
    let mut core: Core<u32> = Core::new(Config { record_transitions: record, ..Config::default() });
    const CHUNK: usize = 1024;
    let (mut spare, mut spare_keys) = (Vec::with_capacity(CHUNK), String::with_capacity(16 * CHUNK));
    let mut recorded = 0usize;
    // After each event, as the shell does: batches of 1 024 once the core holds as many.
    let mut take = |core: &mut Core<u32>, recorded: &mut usize| {
        let n = core.transitions_pending();
        if n >= CHUNK {
            for start in (0..n).step_by(CHUNK) {
                core.copy_transitions(start..(start + CHUNK).min(n), &mut spare, &mut spare_keys);
                *recorded += spare.len();
                spare.clear();
                spare_keys.clear();
            }
            core.clear_transitions();
        }
    };
    let client = ClientId(1);
    let mut out = Vec::new();
    core.handle_into(Event::ClientConnected { client }, &mut out);
    for w in 0..2 {
        core.handle_into(Event::WorkerConnected { worker: WorkerId(w), spec: worker(w) }, &mut out);
    }
    out.clear();
    // µs per task of every run: the best is the fastest run, the median what a table whose
    // slots have been freed and reused many times over does.
    let mut runs = Vec::with_capacity(repeat);
    let mut submit_best = f64::MAX;
    for _ in 0..repeat {
        let graph = tree(depth);
        let n = graph.len();
        let root = graph.last().map(|t| t.key.clone()).expect("a tree has a root");
        let started = Instant::now();
        let mut queue: VecDeque<(WorkerId, Key, Ticket)> = VecDeque::new();
        let t_sub = Instant::now();
        core.handle_into(Event::GraphSubmitted { client, tasks: graph, wanted: Vec::new() }, &mut out);
        take(&mut core, &mut recorded);
        submit_best = submit_best.min(t_sub.elapsed().as_secs_f64() * 1e6 / n as f64);
        let mut done = false;
        loop {
            for cmd in out.drain(..) {
                match cmd {
                    Command::Compute { worker, key, ticket, .. } => queue.push_back((worker, key, ticket)),
                    Command::KeyInMemory { .. } => done = true,
                    _ => {}
                }
            }
            let Some((worker, key, ticket)) = queue.pop_front() else { break };
            let ticket = Some(ticket);
            core.handle_into(Event::TaskFinished { worker, key, ticket, nbytes: 8, duration_us: 1 }, &mut out);
            take(&mut core, &mut recorded);
        }
        core.handle_into(Event::KeysReleased { client, keys: vec![root] }, &mut out);
        take(&mut core, &mut recorded);
        out.clear();
        let secs = started.elapsed().as_secs_f64();
        assert!(done, "the root was computed");
        assert_eq!(core.task_count(), 0, "everything was forgotten");
        runs.push(secs * 1e6 / n as f64);
    }
    runs.sort_by(f64::total_cmp);
    let (best, median) =
        (runs.first().copied().unwrap_or(f64::NAN), runs.get(runs.len() / 2).copied().unwrap_or(f64::NAN));
    let (mut rest, mut rest_keys) = (Vec::new(), String::new());
    core.take_transitions(&mut rest, &mut rest_keys);
    recorded += rest.len();
    let changes = if record { format!(", recording changes ({recorded} in all)") } else { String::new() };
    println!(
        "core tree-{depth}: {best:.3} µs/task (best of {repeat}, median {median:.3}; the submission alone {submit_best:.3}){changes}"
    );
}
