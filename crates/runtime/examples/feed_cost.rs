//! What publishing to an observer costs the scheduler's thread, without sockets or workers (whose
//! noise hides a cost of a few per cent in `rask bench distributed --only dashboard`): the core
//! runs tree reductions as in `rask-scheduler-core`'s `core_tree` example, handled the way the
//! scheduler's shell handles events, in three configurations taking turns:
//!
//! - `off`: the core records nothing (no observer);
//! - `local`: the core records, and its records are taken after every event and dropped (the
//!   recording alone, in a buffer that stays in cache);
//! - `feed`: the core records and a [`Publisher`] hands the records to an observer thread that
//!   reads every change (what the dashboard's thread does before folding it).
//!
//! Prints, per configuration, the median and best of the wall time per task of the core's
//! thread (the observer runs on another core). Three cores' states take turns in the caches:
//! compare the configurations with each other, not with `core_tree`.
//!
//! `cargo run --release -p rask-runtime --example feed_cost [-- DEPTH [ROUNDS]]`

use std::collections::VecDeque;
use std::time::Instant;

use rask_graph::Key;
use rask_runtime::feed::{Cause, Publisher};
use rask_scheduler_core::{ClientId, Command, Config, Core, Event, Ticket, WorkerId};

/// The allocator the `rask` binary uses: the scheduler's allocation costs are part of what this
/// measures.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[path = "../../scheduler-core/examples/support/tree.rs"]
mod support;
use support::{tree, worker};

/// How a configuration's recorded changes leave the core.
enum Sink {
    Off,
    Local(Vec<rask_scheduler_core::Transition>, String),
    Feed(Publisher),
}

struct Setup {
    name: &'static str,
    core: Core<u32>,
    sink: Sink,
    micros: Vec<f64>,
    clock: Instant,
}

impl Setup {
    fn new(name: &'static str, sink: Sink) -> Self {
        let record = !matches!(sink, Sink::Off);
        let core = Core::new(Config { record_transitions: record, ..Config::default() });
        let mut s = Setup { name, core, sink, micros: Vec::new(), clock: Instant::now() };
        s.handle(Event::ClientConnected { client: ClientId(1) }, &mut Vec::new());
        for w in 0..2 {
            s.handle(Event::WorkerConnected { worker: WorkerId(w), spec: worker(w) }, &mut Vec::new());
        }
        s
    }

    /// Handles `ev` as the scheduler's shell does for this configuration.
    fn handle(&mut self, ev: Event<u32>, out: &mut Vec<Command<u32>>) {
        let Setup { core, sink, clock, .. } = self;
        let before = core.transitions_pending();
        core.handle_into(ev, out);
        match sink {
            Sink::Off => {}
            Sink::Local(records, keys) => {
                core.take_transitions(records, keys);
                records.clear();
                keys.clear();
            }
            Sink::Feed(p) => {
                // The shell reads its clock once per turn, for the changes' time and this.
                let at_us = clock.elapsed().as_micros() as u64;
                p.caused(core, before, Cause::Tick, at_us);
                let _ = p.send(core, false, at_us);
            }
        }
    }

    /// One tree, start to finish and forgotten; returns µs per task.
    fn run(&mut self, depth: u32) -> f64 {
        let graph = tree(depth);
        let n = graph.len();
        let root = graph.last().map(|t| t.key.clone()).expect("a tree has a root");
        let client = ClientId(1);
        let mut out = Vec::new();
        let mut queue: VecDeque<(WorkerId, Key, Ticket)> = VecDeque::new();
        let started = Instant::now();
        self.handle(Event::GraphSubmitted { client, tasks: graph, wanted: Vec::new() }, &mut out);
        loop {
            for cmd in out.drain(..) {
                if let Command::Compute { worker, key, ticket, .. } = cmd {
                    queue.push_back((worker, key, ticket));
                }
            }
            let Some((worker, key, ticket)) = queue.pop_front() else { break };
            let finished = Event::TaskFinished { worker, key, ticket: Some(ticket), nbytes: 8, duration_us: 1 };
            self.handle(finished, &mut out);
        }
        self.handle(Event::KeysReleased { client, keys: vec![root] }, &mut out);
        if let Sink::Feed(p) = &mut self.sink {
            let _ = p.send(&mut self.core, true, 0);
        }
        let micros = started.elapsed().as_secs_f64() * 1e6 / n as f64;
        assert_eq!(self.core.task_count(), 0, "everything was forgotten");
        micros
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let depth: u32 = args.next().and_then(|a| a.parse().ok()).unwrap_or(15);
    let rounds: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(30);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<rask_runtime::feed::Published>();
    // The observer: reads every change, as the dashboard's thread does before folding it.
    let observer = std::thread::spawn(move || {
        let (mut changes, mut sum) = (0u64, 0u64);
        while let Some(p) = rx.blocking_recv() {
            let _ = p.visit(|at_us, c| {
                changes += 1;
                sum = sum.wrapping_add(c.task ^ at_us).wrapping_add(c.key.map_or(0, |k| k.len() as u64));
            });
        }
        (changes, sum)
    });
    let mut setups = [
        Setup::new("off", Sink::Off),
        Setup::new("local", Sink::Local(Vec::new(), String::new())),
        Setup::new("feed", Sink::Feed(Publisher::new(tx))),
    ];
    for s in &mut setups {
        s.run(depth);
    }
    for round in 0..rounds {
        for k in 0..setups.len() {
            let s = &mut setups[(round + k) % setups.len()];
            let us = s.run(depth);
            s.micros.push(us);
        }
    }
    let median = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let off = median(&setups[0].micros);
    println!("feed cost, tree-{depth}, {rounds} rounds taking turns: µs per task on the core's thread");
    for s in &setups {
        let (m, best) = (median(&s.micros), s.micros.iter().copied().fold(f64::MAX, f64::min));
        println!("{:>6}: median {m:.3} ({:+.1}% over off), best {best:.3}", s.name, (m / off - 1.0) * 100.0);
    }
    drop(setups);
    let (changes, _) = observer.join().expect("the observer thread ends");
    println!("the observer read {changes} changes");
}
