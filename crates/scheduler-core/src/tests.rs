//! Table-style scenario tests and a simulated cluster driven by proptest. `validate()` runs after
//! every event.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use proptest::prelude::*;
use rask_graph::{FailureKind, Key, TaskError};

use crate::{
    ClientId, Command, Config, Core, Dep, Event, Holders, LossCause, NewTask, Phase, Restrictions, Ticket, Transition,
    WorkerId, WorkerSpec,
};

const C1: ClientId = ClientId(1);
const C2: ClientId = ClientId(2);
const W1: WorkerId = WorkerId(1);
const W2: WorkerId = WorkerId(2);

/// Test payload: the key's name (what the "worker" runs is irrelevant to the core).
type P = &'static str;

struct Env {
    core: Core<P>,
    log: Vec<Command<P>>,
    /// Every task's key and state as the published transitions tell it (recording is on in
    /// tests), by serial.
    phases: HashMap<u64, (Key, Phase)>,
    transitions: Vec<Transition>,
    /// Events handled: says how their transitions are taken.
    events: usize,
}

impl Env {
    fn new() -> Self {
        Env::with(Config::default())
    }
    fn with(cfg: Config) -> Self {
        let cfg = Config { record_transitions: true, ..cfg };
        Env { core: Core::new(cfg), log: Vec::new(), phases: HashMap::new(), transitions: Vec::new(), events: 0 }
    }
    fn ev(&mut self, e: Event<P>) -> Vec<Command<P>> {
        let out = self.core.handle(e);
        if let Err(m) = self.core.validate() {
            panic!("invariant broken: {m}");
        }
        // Observers replaying the transitions see exactly the core's states: taken whole after
        // one event, copied out in pieces of 1 to 4 records (as the shell does, with records
        // that carry a key and records that do not mixed) after the next.
        let mut text = String::new();
        self.events += 1;
        if self.events % 2 == 0 {
            self.core.take_transitions(&mut self.transitions, &mut text);
        } else {
            let (n, piece) = (self.core.transitions_pending(), 1 + self.events / 2 % 4);
            for start in (0..n).step_by(piece) {
                self.core.copy_transitions(start..(start + piece).min(n), &mut self.transitions, &mut text);
            }
            self.core.clear_transitions();
        }
        // Each task's previous record in this event: whether it was full or ended a run.
        let mut closed: HashMap<u64, bool> = HashMap::new();
        for tr in self.transitions.drain(..) {
            // One record per task per event, unless a record filled up or ended a run.
            if let Some(previous_closed) = closed.insert(tr.task(), false) {
                assert!(previous_closed, "changes of one task in one event were split: {tr:?}");
            }
            closed.insert(tr.task(), tr.via().len() == crate::Via::CAPACITY || tr.duration_us().is_some());
            assert!(
                tr.duration_us().is_none() || matches!(tr.phase(), Phase::Memory | Phase::Erred),
                "only the end of a run has a duration"
            );
            let path: Vec<Phase> = tr.via().iter().chain([tr.phase()]).collect();
            let mut known = match tr.key().map(|(s, e)| Key::new(&text[s as usize..e as usize])) {
                Some(key) => {
                    assert!(!self.phases.contains_key(&tr.task()), "a serial is given once");
                    (key, path[0])
                }
                None => {
                    let (key, was) = self.phases.get(&tr.task()).cloned().expect("the key came with the first change");
                    assert_ne!(was, path[0], "{key}: a change to the state it already had");
                    (key, path[0])
                }
            };
            for p in &path[1..] {
                assert_ne!(known.1, *p, "{}: a change to the state it already had: {path:?}", known.0);
                assert_ne!(known.1, Phase::Forgotten, "{}: a change after being forgotten", known.0);
                known.1 = *p;
            }
            if tr.phase() == Phase::Forgotten {
                self.phases.remove(&tr.task());
            } else {
                self.phases.insert(tr.task(), known);
            }
        }
        assert_eq!(self.phases.len(), self.core.task_count(), "every known task was published");
        for (k, phase) in self.phases.values() {
            assert_eq!(self.core.phase(k.as_str()), Some(*phase), "published state of {k}");
        }
        self.log.extend(out.iter().cloned());
        out
    }
    fn worker(&mut self, w: WorkerId, name: &str, nthreads: u32, resources: &[(&str, f64)]) -> Vec<Command<P>> {
        let spec = WorkerSpec {
            name: Arc::from(name),
            address: Arc::from(format!("tcp://127.0.0.1:{}", 9000 + w.0)),
            nthreads,
            resources: resources.iter().map(|(n, a)| (Arc::from(*n), *a)).collect(),
            restarted_after: None,
        };
        self.ev(Event::WorkerConnected { worker: w, spec })
    }
    fn submit(&mut self, c: ClientId, tasks: Vec<NewTask<P>>, wanted: &[&str]) -> Vec<Command<P>> {
        self.ev(Event::ClientConnected { client: c });
        self.ev(Event::GraphSubmitted { client: c, tasks, wanted: wanted.iter().map(|k| Key::new(k)).collect() })
    }
    /// A worker's report that the run `ticket` names finished (1 byte, 5 µs).
    fn finish_run(&mut self, w: WorkerId, key: &str, ticket: Ticket) -> Vec<Command<P>> {
        let key = Key::new(key);
        self.ev(Event::TaskFinished { worker: w, key, ticket: Some(ticket), nbytes: 1, duration_us: 5 })
    }
    fn finish(&mut self, w: WorkerId, key: &str, nbytes: u64) -> Vec<Command<P>> {
        self.ev(Event::TaskFinished { worker: w, key: Key::new(key), ticket: None, nbytes, duration_us: 1000 })
    }
    fn fail(&mut self, w: WorkerId, key: &str, msg: &str) -> Vec<Command<P>> {
        let error =
            Arc::new(TaskError { key: Key::new(key), message: msg.into(), kind: FailureKind::Error, attempts: 1 });
        self.ev(Event::TaskFailed { worker: w, key: Key::new(key), ticket: None, error })
    }
}

fn task(key: &'static str, deps: &[&str]) -> NewTask<P> {
    NewTask {
        key: Key::new(key),
        deps: deps.iter().map(|d| Dep::Key(Key::new(d))).collect(),
        payload: key,
        priority: 0,
        order: 0,
        restrictions: None,
        wanted: false,
    }
}

/// The ticket of the first task sent to a worker.
fn ticket_in(cmds: &[Command<P>]) -> Option<Ticket> {
    cmds.iter().find_map(|c| match c {
        Command::Compute { ticket, .. } => Some(*ticket),
        _ => None,
    })
}

fn computes(cmds: &[Command<P>]) -> Vec<(WorkerId, &str)> {
    cmds.iter()
        .filter_map(|c| match c {
            Command::Compute { worker, key, .. } => Some((*worker, key.as_str())),
            _ => None,
        })
        .collect()
}

fn frees(cmds: &[Command<P>]) -> Vec<(WorkerId, String)> {
    cmds.iter()
        .flat_map(|c| match c {
            Command::Free { worker, key } => vec![(*worker, key.as_str().to_owned())],
            _ => Vec::new(),
        })
        .collect()
}

#[test]
fn chain_runs_in_order_and_frees_intermediates() {
    // a -> b (wanted)
    let mut env = Env::new();
    env.worker(W1, "w1", 1, &[]);
    let out = env.submit(C1, vec![task("a", &[]), task("b", &["a"])], &["b"]);
    assert_eq!(computes(&out), [(W1, "a")]);
    let out = env.finish(W1, "a", 8);
    assert_eq!(computes(&out), [(W1, "b")]);
    let out = env.finish(W1, "b", 8);
    assert!(out.contains(&Command::KeyInMemory { client: C1, key: Key::new("b"), workers: vec![W1], nbytes: 8 }));
    assert_eq!(frees(&out), [(W1, "a".to_owned())], "a is freed once b has run");
    let out = env.ev(Event::KeysReleased { client: C1, keys: vec![Key::new("b")] });
    assert_eq!(frees(&out), [(W1, "b".to_owned())]);
    assert_eq!(env.core.task_count(), 0, "everything forgotten");
}

#[test]
fn a_new_graph_fills_the_slots_of_forgotten_tasks_lowest_first_in_submission_order() {
    let mut env = Env::new();
    env.worker(W1, "w1", 8, &[]);
    let slots = |out: &[Command<P>]| -> Vec<(String, u32)> {
        let mut v: Vec<(String, u32)> = out
            .iter()
            .filter_map(|c| match c {
                Command::Compute { key, ticket, .. } => Some((key.as_str().to_owned(), ticket.slot)),
                _ => None,
            })
            .collect();
        v.sort();
        v
    };
    let first = ["a0", "a1", "a2", "a3", "a4", "a5"];
    let out = env.submit(C1, first.iter().map(|k| task(k, &[])).collect(), &first);
    assert_eq!(slots(&out).len(), 6);
    // Finished and forgotten in a scrambled order: the slots are freed in that order.
    for k in ["a5", "a3", "a1", "a4", "a0", "a2"] {
        env.finish(W1, k, 1);
        env.ev(Event::KeysReleased { client: C1, keys: vec![Key::new(k)] });
    }
    assert_eq!(env.core.task_count(), 0);
    let second = ["b0", "b1", "b2", "b3", "b4", "b5"];
    let out = env.submit(C1, second.iter().map(|k| task(k, &[])).collect(), &second);
    let got: Vec<u32> = slots(&out).into_iter().map(|(_, s)| s).collect();
    assert_eq!(got, [0, 1, 2, 3, 4, 5], "neighbours in the submission are neighbours in the table");
    // Some freed again, scrambled, while lower slots of the first graph wait: the new graph
    // fills the newly freed ones lowest first.
    for k in ["b4", "b1", "b3"] {
        env.finish(W1, k, 1);
        env.ev(Event::KeysReleased { client: C1, keys: vec![Key::new(k)] });
    }
    let third = ["c0", "c1", "c2"];
    let out = env.submit(C1, third.iter().map(|k| task(k, &[])).collect(), &third);
    let got: Vec<u32> = slots(&out).into_iter().map(|(_, s)| s).collect();
    assert_eq!(got, [1, 3, 4]);
    // One task at a time takes the slot freed last (no reordering for it).
    for k in ["b0", "b5"] {
        env.finish(W1, k, 1);
        env.ev(Event::KeysReleased { client: C1, keys: vec![Key::new(k)] });
    }
    let out = env.submit(C1, vec![task("d", &[])], &["d"]);
    assert_eq!(slots(&out), [("d".to_owned(), 5)]);
}

#[test]
fn shared_key_survives_one_client_releasing_it() {
    let mut env = Env::new();
    env.worker(W1, "w1", 1, &[]);
    env.submit(C1, vec![task("k", &[])], &["k"]);
    let out = env.submit(C2, vec![task("k", &[])], &["k"]);
    assert!(computes(&out).is_empty(), "same key is one task");
    env.finish(W1, "k", 1);
    let out = env.ev(Event::ClientDisconnected { client: C1 });
    assert!(frees(&out).is_empty());
    assert_eq!(env.core.state_of("k"), Some("memory"));
    let out = env.ev(Event::KeysReleased { client: C2, keys: vec![Key::new("k")] });
    assert_eq!(frees(&out), [(W1, "k".to_owned())]);
}

#[test]
fn task_runs_where_its_large_input_lives() {
    let mut env = Env::new();
    env.worker(W1, "w1", 1, &[]);
    env.worker(W2, "w2", 1, &[]);
    let mut big = task("big", &[]);
    big.restrictions = Some(Box::new(Restrictions { workers: vec![Arc::from("w2")], ..Default::default() }));
    let out = env.submit(C1, vec![big, task("use", &["big"])], &["use"]);
    assert_eq!(computes(&out), [(W2, "big")]);
    let out = env.finish(W2, "big", 500_000_000);
    assert_eq!(computes(&out), [(W2, "use")], "locality beats the idle worker");
}

#[test]
fn adjacent_root_tasks_share_a_worker_and_their_reduction_runs_there() {
    let mut env = Env::new();
    env.worker(W1, "w1", 1, &[]);
    env.worker(W2, "w2", 1, &[]);
    // Both workers have run a short task, so their speed is known (10 µs a task).
    env.submit(C1, vec![task("warm1", &[]), task("warm2", &[])], &["warm1", "warm2"]);
    for (w, k) in computes(&std::mem::take(&mut env.log)) {
        env.ev(Event::TaskFinished { worker: w, key: Key::new(k), ticket: None, nbytes: 1, duration_us: 10 });
    }
    env.log.clear();
    env.submit(C1, vec![task("r0", &[]), task("r1", &[]), task("sum", &["r0", "r1"])], &["sum"]);
    let placed = computes(&env.log).into_iter().map(|(w, k)| (k.to_owned(), w)).collect::<BTreeMap<_, _>>();
    assert_eq!(placed["r0"], placed["r1"], "both leaves of one reduction on one worker: {placed:?}");
    let w = placed["r0"];
    env.finish(w, "r0", 8);
    let out = env.finish(w, "r1", 8);
    assert_eq!(computes(&out), [(w, "sum")], "no input has to move");
}

#[test]
fn small_inputs_move_only_when_the_holder_is_busier_than_a_fetch_costs() {
    // A high in-flight limit, so the holder always has a free slot and only cost decides.
    let mut env = Env::with(Config { target_busy_us: 10_000.0, ..Config::default() });
    env.worker(W1, "w1", 1, &[]);
    env.worker(W2, "w2", 1, &[]);
    let on = |name: &str, mut t: NewTask<P>| {
        t.restrictions = Some(Box::new(Restrictions { workers: vec![Arc::from(name)], ..Default::default() }));
        t
    };
    // w1 holds `a` and then gets two slow pinned tasks (1 ms each, from the finish below).
    let tasks = vec![on("w1", task("a", &[])), on("w1", task("slow1", &[])), on("w1", task("slow2", &[]))];
    env.submit(C1, tasks, &["a", "slow1", "slow2"]);
    env.finish(W1, "a", 8);
    // w1 now has about 1-2 ms of queued work; fetching 8 bytes costs a round-trip (100 µs).
    let out = env.submit(C2, vec![task("use_a", &["a"])], &["use_a"]);
    assert_eq!(computes(&out), [(W2, "use_a")], "the idle worker fetches rather than wait 1 ms");
    env.finish(W1, "slow1", 8);
    env.finish(W1, "slow2", 8);
    // w1 is idle again and w2 has a task in flight: the next user of `a` stays with it.
    let out = env.submit(C2, vec![task("use_a_again", &["a"])], &["use_a_again"]);
    assert_eq!(computes(&out), [(W1, "use_a_again")]);
}

#[test]
fn graph_sent_in_parts_runs_like_one_submission() {
    let mut env = Env::new();
    env.worker(W1, "w1", 1, &[]);
    env.ev(Event::ClientConnected { client: C1 });
    // Part 1: a and b; nothing runs or is forgotten before the graph is complete.
    let out = env.ev(Event::GraphPart { client: C1, tasks: vec![task("a", &[]), task("b", &["a"])] });
    assert!(computes(&out).is_empty());
    assert_eq!(env.core.state_of("a"), Some("released"));
    // Part 2 depends on part 1; the last part says what is wanted.
    let out = env.submit(C1, vec![task("c", &["b"])], &["c"]);
    assert_eq!(computes(&out), [(W1, "a")]);
    env.finish(W1, "a", 1);
    env.finish(W1, "b", 1);
    let out = env.finish(W1, "c", 1);
    assert!(out.contains(&Command::KeyInMemory { client: C1, key: Key::new("c"), workers: vec![W1], nbytes: 1 }));
    assert_eq!(frees(&env.log), [(W1, "a".to_owned()), (W1, "b".to_owned())], "intermediates freed as usual");
    env.ev(Event::KeysReleased { client: C1, keys: vec![Key::new("c")] });
    assert_eq!(env.core.task_count(), 0);
}

#[test]
fn client_leaving_mid_submission_leaves_no_tasks_behind() {
    let mut env = Env::new();
    env.worker(W1, "w1", 1, &[]);
    env.ev(Event::ClientConnected { client: C1 });
    env.ev(Event::GraphPart { client: C1, tasks: vec![task("a", &[]), task("b", &["a"])] });
    // Another client shares `a`, then releases it: the open submission still holds it.
    env.submit(C2, vec![task("a", &[])], &["a"]);
    env.finish(W1, "a", 1);
    let out = env.ev(Event::KeysReleased { client: C2, keys: vec![Key::new("a")] });
    assert_eq!(frees(&out), [(W1, "a".to_owned())], "its value is not needed now");
    assert_eq!(env.core.state_of("a"), Some("released"), "but the unfinished submission still holds the task");
    env.ev(Event::ClientDisconnected { client: C1 });
    assert_eq!(env.core.task_count(), 0, "nothing half-registered is left");
}

#[test]
fn part_referring_to_a_later_part_fails_with_a_clear_error() {
    let mut env = Env::new();
    env.worker(W1, "w1", 1, &[]);
    env.ev(Event::ClientConnected { client: C1 });
    env.ev(Event::GraphPart { client: C1, tasks: vec![task("b", &["a"])] });
    let out = env.submit(C1, vec![task("a", &[])], &["b"]);
    let err = out.iter().find_map(|c| match c {
        Command::KeyErred { key, error, .. } if key.as_str() == "b" => Some(error.message.clone()),
        _ => None,
    });
    assert!(err.as_deref().is_some_and(|m| m.contains("not known")), "{out:?}");
    assert_eq!(env.core.state_of("a"), None, "the orphan `a` is dropped");
    assert_eq!(env.core.state_of("b"), Some("erred"));
}

#[test]
fn silent_worker_is_dropped_after_the_ttl_and_its_work_moves() {
    let mut env = Env::with(Config { worker_ttl_us: Some(2_000_000), ..Config::default() });
    env.worker(W1, "w1", 1, &[]);
    env.worker(W2, "w2", 1, &[]);
    env.submit(C1, vec![task("a", &[])], &["a"]);
    let on = computes(&env.log)[0].0;
    let other = if on == W1 { W2 } else { W1 };
    env.ev(Event::WorkerHeard { worker: other, at_us: 1_500_000 });
    let out = env.ev(Event::Tick { now_us: 1_900_000 });
    assert!(!out.iter().any(|c| matches!(c, Command::DropWorker { .. })), "nobody silent for 2 s yet: {out:?}");
    env.ev(Event::WorkerHeard { worker: other, at_us: 2_400_000 });
    let out = env.ev(Event::Tick { now_us: 2_500_000 });
    let cause = LossCause::HeartbeatTimeout { silent_ms: 2_500 };
    assert!(out.contains(&Command::DropWorker { worker: on, cause: cause.clone() }), "{out:?}");
    assert_eq!(computes(&out), [(other, "a")], "its task runs on the worker still heard from");
    let gone: Vec<_> = env.core.departures().map(|d| (d.name.to_string(), d.cause.clone())).collect();
    let name = if on == W1 { "w1" } else { "w2" };
    assert_eq!(gone, [(name.to_owned(), cause)]);
    assert!(LossCause::HeartbeatTimeout { silent_ms: 2_500 }.to_string().contains("2.5 s"));
}

#[test]
fn task_that_keeps_killing_workers_fails_as_killed_worker_naming_them() {
    let mut env = Env::new(); // allowed failures: 3
    env.submit(C1, vec![task("bomb", &[]), task("fine", &[])], &["bomb", "fine"]);
    let mut names = Vec::new();
    for i in 1..=4u32 {
        let w = WorkerId(10 + i);
        let name = format!("n{i}");
        env.worker(w, &name, 1, &[]);
        names.push(name);
        // "bomb" has the better priority, so it is what the worker runs when it dies.
        let running: Vec<_> = computes(&std::mem::take(&mut env.log)).into_iter().map(|(_, k)| k.to_owned()).collect();
        assert!(running.contains(&"bomb".to_owned()), "{running:?}");
        let cause =
            if i == 2 { LossCause::HeartbeatTimeout { silent_ms: 31_000 } } else { LossCause::ConnectionClosed };
        env.ev(Event::WorkerDisconnected { worker: w, cause });
    }
    let err = env.log.iter().find_map(|c| match c {
        Command::KeyErred { key, error, .. } if key.as_str() == "bomb" => Some(Arc::clone(error)),
        _ => None,
    });
    let err = err.expect("bomb fails after the 4th death");
    assert_eq!(err.kind, FailureKind::KilledWorker);
    for n in &names {
        assert!(err.message.contains(n.as_str()), "{}", err.message);
    }
    assert!(err.message.contains("heartbeat timeout"), "{}", err.message);
    // The innocent task still runs on the next worker.
    let out = env.worker(WorkerId(20), "n5", 1, &[]);
    assert_eq!(computes(&out), [(WorkerId(20), "fine")]);
}

#[test]
fn retiring_worker_hands_over_its_unique_results_before_it_is_let_go() {
    let mut env = Env::new();
    env.worker(W1, "w1", 1, &[]);
    env.submit(C1, vec![task("a", &[]), task("b", &[])], &["a", "b"]);
    env.finish(W1, "a", 8);
    env.worker(W2, "w2", 1, &[]);
    // w1 still runs b; it asks to leave.
    let out = env.ev(Event::WorkerRetiring { worker: W1 });
    let acquire = |out: &[Command<P>]| -> Vec<String> {
        out.iter()
            .filter_map(|c| match c {
                Command::Acquire { worker: W2, key, from: W1 } => Some(key.as_str().to_owned()),
                _ => None,
            })
            .collect()
    };
    assert_eq!(acquire(&out), ["a"], "{out:?}");
    assert!(!out.iter().any(|c| matches!(c, Command::Retired { .. })), "b still runs there");
    // New work does not go to the retiring worker.
    let out = env.submit(C1, vec![task("c", &[])], &["c"]);
    assert_eq!(computes(&out), [(W2, "c")]);
    let out = env.finish(W1, "b", 8);
    assert_eq!(acquire(&out), ["b"]);
    env.ev(Event::DataAcquired { worker: W2, key: Key::new("a"), nbytes: 8 });
    let out = env.ev(Event::DataAcquired { worker: W2, key: Key::new("b"), nbytes: 8 });
    assert!(out.contains(&Command::Retired { worker: W1 }), "{out:?}");
    assert_eq!(env.core.who_has("a"), [W2]);
    assert_eq!(env.core.who_has("b"), [W2]);
    assert!(
        computes(&out).is_empty() && !out.iter().any(|c| matches!(c, Command::KeyLost { .. })),
        "nothing recomputed"
    );
    let gone: Vec<String> = env.core.departures().map(|d| d.cause.to_string()).collect();
    assert_eq!(gone, ["retired gracefully (SIGTERM)"]);
}

#[test]
fn paused_worker_gets_no_new_work_until_it_resumes() {
    let mut env = Env::new();
    env.worker(W1, "w1", 1, &[]);
    env.ev(Event::WorkerPaused { worker: W1, paused: true });
    let out = env.submit(C1, vec![task("a", &[])], &["a"]);
    assert!(computes(&out).is_empty(), "paused: {out:?}");
    assert_eq!(env.core.state_of("a"), Some("queued"));
    let out = env.ev(Event::WorkerPaused { worker: W1, paused: false });
    assert_eq!(computes(&out), [(W1, "a")]);
}

#[test]
fn a_restarted_worker_refines_why_its_previous_process_was_lost() {
    let mut env = Env::with(Config { allowed_failures: 1, ..Config::default() });
    env.submit(C1, vec![task("hog", &[])], &["hog"]);
    let restart = |env: &mut Env, id: u32, why: Option<&str>| {
        let spec = WorkerSpec {
            name: Arc::from("w"),
            address: Arc::from(format!("tcp://127.0.0.1:{id}")),
            nthreads: 1,
            resources: Vec::new(),
            restarted_after: why.map(str::to_owned),
        };
        env.ev(Event::WorkerConnected { worker: WorkerId(id), spec });
    };
    restart(&mut env, 1, None);
    env.ev(Event::WorkerDisconnected { worker: WorkerId(1), cause: LossCause::ConnectionClosed });
    restart(&mut env, 2, Some("was terminated by its supervisor for memory"));
    let gone: Vec<String> = env.core.departures().map(|d| d.cause.to_string()).collect();
    assert_eq!(gone, ["was terminated by its supervisor for memory; restarted by its supervisor"]);
    let out = env.ev(Event::WorkerDisconnected { worker: WorkerId(2), cause: LossCause::ConnectionClosed });
    let message = out
        .iter()
        .find_map(|c| match c {
            Command::KeyErred { error, .. } => Some(error.message.clone()),
            _ => None,
        })
        .expect("killed worker after 2 deaths");
    assert!(message.contains("for memory"), "{message}");
}

#[test]
fn workers_leaving_on_purpose_do_not_count_against_their_tasks() {
    let mut env = Env::with(Config { allowed_failures: 0, ..Config::default() });
    env.submit(C1, vec![task("long", &[])], &["long"]);
    env.worker(W1, "w1", 1, &[]);
    env.ev(Event::WorkerDisconnected { worker: W1, cause: LossCause::Said("worker w1 stopped".into()) });
    let out = env.worker(W2, "w2", 1, &[]);
    assert_eq!(computes(&out), [(W2, "long")], "requeued, not failed");
}

#[test]
fn a_stalled_scheduler_does_not_drop_its_workers() {
    let mut env = Env::with(Config { worker_ttl_us: Some(2_000_000), ..Config::default() });
    env.worker(W1, "w1", 1, &[]);
    env.ev(Event::Tick { now_us: 250_000 });
    // Nothing processed for 10 s (this process was stopped), then a tick first.
    let out = env.ev(Event::Tick { now_us: 10_250_000 });
    assert!(!out.iter().any(|c| matches!(c, Command::DropWorker { .. })), "{out:?}");
    // Real silence after that still counts (ticks come every 250 ms).
    let mut dropped = false;
    for i in 1..=10 {
        let out = env.ev(Event::Tick { now_us: 10_250_000 + i * 250_000 });
        dropped |= out.iter().any(|c| matches!(c, Command::DropWorker { .. }));
    }
    assert!(dropped, "silent for 2.5 s with a 2 s TTL");
}

#[test]
fn a_value_that_cannot_be_copied_does_not_hold_a_retirement_forever() {
    let mut env = Env::new();
    env.worker(W1, "w1", 1, &[]);
    env.submit(C1, vec![task("a", &[])], &["a"]);
    env.finish(W1, "a", 8);
    env.worker(W2, "w2", 1, &[]);
    let out = env.ev(Event::WorkerRetiring { worker: W1 });
    assert!(out.iter().any(|c| matches!(c, Command::Acquire { .. })), "{out:?}");
    let out = env.ev(Event::AcquireFailed { key: Key::new("a") });
    assert!(out.contains(&Command::Retired { worker: W1 }), "{out:?}");
    assert_eq!(computes(&out), [(W2, "a")], "recomputed where it can live");
}

#[test]
fn resources_limit_placement_and_concurrency() {
    let mut env = Env::new();
    env.worker(W1, "cpu", 4, &[]);
    env.worker(W2, "gpu", 4, &[("GPU", 1.0)]);
    let gpu = || Some(Box::new(Restrictions { resources: vec![(Arc::from("GPU"), 1.0)], ..Default::default() }));
    let mut tasks = Vec::new();
    for k in ["g1", "g2", "g3"] {
        let mut t = task(k, &[]);
        t.restrictions = gpu();
        tasks.push(t);
    }
    let out = env.submit(C1, tasks, &["g1", "g2", "g3"]);
    assert_eq!(computes(&out), [(W2, "g1")], "one GPU: one task at a time, only on the GPU worker");
    let out = env.finish(W2, "g1", 1);
    assert_eq!(computes(&out), [(W2, "g2")]);
}

#[test]
fn unsatisfiable_task_waits_for_a_suitable_worker() {
    let mut env = Env::new();
    env.worker(W1, "cpu", 1, &[]);
    let mut t = task("g", &[]);
    t.restrictions = Some(Box::new(Restrictions { resources: vec![(Arc::from("GPU"), 1.0)], ..Default::default() }));
    let out = env.submit(C1, vec![t], &["g"]);
    assert!(computes(&out).is_empty());
    assert_eq!(env.core.state_of("g"), Some("no-worker"));
    let out = env.worker(W2, "gpu", 1, &[("GPU", 2.0)]);
    assert_eq!(computes(&out), [(W2, "g")]);
}

#[test]
fn restriction_with_fallback_runs_elsewhere_when_named_worker_is_absent() {
    let mut env = Env::new();
    env.worker(W1, "w1", 1, &[]);
    let mut t = task("t", &[]);
    t.restrictions = Some(Box::new(Restrictions {
        workers: vec![Arc::from("gone")],
        allow_other_workers: true,
        ..Default::default()
    }));
    let out = env.submit(C1, vec![t], &["t"]);
    assert_eq!(computes(&out), [(W1, "t")]);
}

#[test]
fn root_tasks_are_queued_by_saturation() {
    let mut env = Env::new();
    env.worker(W1, "w1", 1, &[]);
    env.worker(W2, "w2", 1, &[]);
    let keys: Vec<&'static str> = (0..20).map(|i| &*Box::leak(format!("r{i}").into_boxed_str())).collect();
    let out = env.submit(C1, keys.iter().map(|k| task(k, &[])).collect(), &keys);
    // ceil(1 thread * 1.1) = 2 per worker.
    assert_eq!(computes(&out).len(), 4);
}

#[test]
fn short_tasks_raise_the_in_flight_limit() {
    let mut env = Env::with(Config { target_busy_us: 100.0, ..Config::default() });
    env.worker(W1, "w1", 1, &[]);
    let keys: Vec<&'static str> = (0..50).map(|i| &*Box::leak(format!("s{i}").into_boxed_str())).collect();
    let out = env.submit(C1, keys.iter().map(|k| task(k, &[])).collect(), &keys);
    assert_eq!(computes(&out).len(), 2);
    // A 10 µs task: target 100 µs of work → 10 in flight.
    let out = env.ev(Event::TaskFinished { worker: W1, ticket: None, key: Key::new("s0"), nbytes: 1, duration_us: 10 });
    assert_eq!(computes(&out).len(), 9, "10 in flight minus the one still running");
}

#[test]
fn priority_first_then_submission_order() {
    let mut env = Env::new();
    env.worker(W1, "w1", 1, &[]); // 2 slots
    env.submit(C1, vec![task("busy1", &[]), task("busy2", &[])], &["busy1", "busy2"]);
    env.submit(C1, vec![task("first", &[])], &["first"]);
    let mut urgent = task("urgent", &[]);
    urgent.priority = 5;
    env.submit(C1, vec![task("second", &[]), urgent], &["second", "urgent"]);
    let out = env.finish(W1, "busy1", 1);
    assert_eq!(computes(&out), [(W1, "urgent")]);
    let out = env.finish(W1, "busy2", 1);
    assert_eq!(computes(&out), [(W1, "first")], "FIFO between submissions");
}

#[test]
fn failure_root_is_the_first_failed_input_whatever_the_timing() {
    // a   b
    //  \ /
    //   d      (b fails first, then a; d reports a)
    let mut env = Env::new();
    env.worker(W1, "w1", 2, &[]);
    env.submit(C1, vec![task("a", &[]), task("b", &[]), task("d", &["a", "b"])], &["d"]);
    env.fail(W1, "b", "b broke");
    let out = env.fail(W1, "a", "a broke");
    let err = out
        .iter()
        .find_map(|c| match c {
            Command::KeyErred { key, error, .. } if key.as_str() == "d" => Some(error.clone()),
            _ => None,
        })
        .expect("d erred");
    assert_eq!((err.key.as_str(), err.message.as_str()), ("a", "a broke"));
}

#[test]
fn lost_worker_work_is_rescheduled_and_lost_data_recomputed() {
    // a -> b ; a finished on W1, b running on W1 when W1 dies
    let mut env = Env::new();
    env.worker(W1, "w1", 1, &[]);
    env.submit(C1, vec![task("a", &[]), task("b", &["a"])], &["b"]);
    env.finish(W1, "a", 1);
    env.worker(W2, "w2", 1, &[]);
    let out = env.ev(Event::WorkerDisconnected { worker: W1, cause: LossCause::ConnectionClosed });
    assert_eq!(computes(&out), [(W2, "a")], "a's value was lost with W1: recompute it");
    assert!(!out.iter().any(|c| matches!(c, Command::KeyLost { .. })), "a is not wanted by a client");
    let out = env.finish(W2, "a", 1);
    assert_eq!(computes(&out), [(W2, "b")]);
    let out = env.finish(W2, "b", 1);
    assert!(out.iter().any(|c| matches!(c, Command::KeyInMemory { key, .. } if key.as_str() == "b")));
}

#[test]
fn clients_hear_when_a_wanted_value_is_lost_and_again_when_it_is_back() {
    let mut env = Env::new();
    env.worker(W1, "w1", 1, &[]);
    env.worker(W2, "w2", 1, &[]);
    env.submit(C1, vec![task("k", &[])], &["k"]);
    env.finish(W1, "k", 1);
    let out = env.ev(Event::WorkerDisconnected { worker: W1, cause: LossCause::ConnectionClosed });
    assert!(out.contains(&Command::KeyLost { client: C1, key: Key::new("k") }));
    assert_eq!(computes(&out), [(W2, "k")]);
    let out = env.finish(W2, "k", 1);
    assert!(out.contains(&Command::KeyInMemory { client: C1, key: Key::new("k"), workers: vec![W2], nbytes: 1 }));
}

#[test]
fn cancel_forgets_pending_work_and_frees_the_worker_copy() {
    let mut env = Env::new();
    env.worker(W1, "w1", 1, &[]);
    env.submit(C1, vec![task("a", &[]), task("b", &["a"])], &["b"]);
    let out = env.ev(Event::KeysCancelled { client: C1, keys: vec![Key::new("b")] });
    assert!(out.contains(&Command::KeyCancelled { client: C1, key: Key::new("b") }));
    assert!(frees(&out).contains(&(W1, "a".to_owned())), "running input told to drop its result");
    assert_eq!(env.core.task_count(), 0);
    // The late result of the cancelled run is dropped, and the slot is reusable.
    let out = env.finish(W1, "a", 1);
    assert_eq!(frees(&out), [(W1, "a".to_owned())]);
}

#[test]
fn unknown_input_and_unknown_wanted_key_fail_instead_of_hanging() {
    let mut env = Env::new();
    env.worker(W1, "w1", 1, &[]);
    let out = env.submit(C1, vec![task("x", &["ghost"])], &["x", "nope"]);
    let erred: Vec<&str> = out
        .iter()
        .filter_map(|c| match c {
            Command::KeyErred { key, .. } => Some(key.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(erred, ["x", "nope"]);
}

#[test]
fn scattered_data_is_used_in_place_and_fails_as_lost_when_its_worker_goes() {
    let mut env = Env::new();
    env.worker(W1, "w1", 1, &[]);
    env.worker(W2, "w2", 1, &[]);
    env.ev(Event::ClientConnected { client: C1 });
    let out = env.ev(Event::DataScattered { client: C1, items: vec![(Key::new("s"), 100, vec![W2])] });
    assert!(out.contains(&Command::KeyInMemory { client: C1, key: Key::new("s"), workers: vec![W2], nbytes: 100 }));
    let out = env.submit(C1, vec![task("use", &["s"])], &["use"]);
    assert_eq!(computes(&out), [(W2, "use")], "runs where the data was put");
    let out = env.ev(Event::WorkerDisconnected { worker: W2, cause: LossCause::ConnectionClosed });
    let lost: Vec<&str> = out
        .iter()
        .filter_map(|c| match c {
            Command::KeyErred { key, error, .. } if error.message.starts_with("lost") && error.key.as_str() == "s" => {
                Some(key.as_str())
            }
            _ => None,
        })
        .collect();
    assert_eq!(lost, ["s", "use"], "scattered data cannot be recomputed; its dependent fails with the cause");
}

#[test]
fn fire_and_forget_task_whose_input_fails_is_cleaned_up_without_panicking() {
    // t -> d ; d is fire-and-forget only, t fails.
    let mut env = Env::new();
    env.worker(W1, "w1", 1, &[]);
    env.submit(C1, vec![task("t", &[]), task("d", &["t"])], &["d"]);
    env.ev(Event::KeysFireAndForget { keys: vec![Key::new("d")] });
    env.ev(Event::KeysReleased { client: C1, keys: vec![Key::new("d")] });
    assert_eq!(env.core.state_of("d"), Some("waiting"), "kept alive by fire-and-forget");
    env.fail(W1, "t", "boom");
    assert_eq!(env.core.task_count(), 0, "both forgotten once finished");
}

#[test]
fn fire_and_forget_task_runs_after_its_client_leaves_and_is_then_released() {
    let mut env = Env::new();
    env.submit(C1, vec![task("side", &[])], &["side"]);
    env.ev(Event::KeysFireAndForget { keys: vec![Key::new("side")] });
    env.ev(Event::ClientDisconnected { client: C1 });
    let out = env.worker(W1, "w1", 1, &[]);
    assert_eq!(computes(&out), [(W1, "side")]);
    let out = env.finish(W1, "side", 1);
    assert_eq!(frees(&out), [(W1, "side".to_owned())]);
    assert_eq!(env.core.task_count(), 0);
}

#[test]
fn dropped_task_returns_its_slot_and_resources() {
    let mut env = Env::new();
    env.worker(W1, "gpu", 1, &[("GPU", 1.0)]);
    let mut g = task("g", &[]);
    g.restrictions = Some(Box::new(Restrictions { resources: vec![(Arc::from("GPU"), 1.0)], ..Default::default() }));
    env.submit(C1, vec![g], &["g"]);
    env.ev(Event::KeysCancelled { client: C1, keys: vec![Key::new("g")] });
    // The worker had not started it: it says so, and the GPU is free again.
    env.ev(Event::TaskDropped { worker: W1, key: Key::new("g"), ticket: None });
    let mut h = task("h", &[]);
    h.restrictions = Some(Box::new(Restrictions { resources: vec![(Arc::from("GPU"), 1.0)], ..Default::default() }));
    let out = env.submit(C1, vec![h], &["h"]);
    assert_eq!(computes(&out), [(W1, "h")]);
}

#[test]
fn idle_worker_steals_a_slow_task_the_busy_worker_has_not_started() {
    let mut env = Env::new();
    env.worker(W1, "w1", 1, &[]); // takes 2 (saturation), runs 1
    env.submit(C1, vec![task("a", &[]), task("b", &[]), task("c", &[])], &["a", "b", "c"]);
    // Slow tasks: 1 s each keeps the in-flight limit at ceil(1.1).
    env.ev(Event::TaskFinished { worker: W1, ticket: None, key: Key::new("a"), nbytes: 1, duration_us: 1_000_000 });
    // W1 holds b and c now; nothing is queued when W2 joins.
    let out = env.worker(W2, "w2", 1, &[]);
    let steals: Vec<(WorkerId, &str)> = out
        .iter()
        .filter_map(|c| match c {
            Command::Steal { worker, key } => Some((*worker, key.as_str())),
            _ => None,
        })
        .collect();
    assert_eq!(steals, [(W1, "c")], "the later of W1's two tasks is asked back");
    let out = env.ev(Event::TaskDropped { worker: W1, key: Key::new("c"), ticket: None });
    assert_eq!(computes(&out), [(W2, "c")]);
}

#[test]
fn fast_or_restricted_tasks_are_not_stolen() {
    // Known-fast tasks: not worth a round-trip.
    let mut env = Env::new();
    env.worker(W1, "w1", 1, &[]);
    env.submit(C1, vec![task("a", &[]), task("b", &[]), task("c", &[])], &["a", "b", "c"]);
    env.ev(Event::TaskFinished { worker: W1, ticket: None, key: Key::new("a"), nbytes: 1, duration_us: 10 });
    let out = env.worker(W2, "w2", 1, &[]);
    assert!(!out.iter().any(|c| matches!(c, Command::Steal { .. })), "10 µs tasks are not worth a round-trip");
    // Restricted tasks stay where their restriction put them.
    let mut env = Env::new();
    env.worker(W1, "w1", 1, &[]);
    let pinned = |k: &'static str| {
        let mut t = task(k, &[]);
        t.restrictions = Some(Box::new(Restrictions {
            workers: vec![Arc::from("w1")],
            allow_other_workers: true,
            ..Default::default()
        }));
        t
    };
    env.submit(C1, vec![pinned("p"), pinned("q")], &["p", "q"]);
    let out = env.worker(W2, "w2", 1, &[]);
    assert!(!out.iter().any(|c| matches!(c, Command::Steal { .. })), "restricted tasks are never stolen");
}

#[test]
fn a_task_forgotten_while_running_keeps_its_resources_until_the_worker_reports() {
    let mut env = Env::new();
    env.worker(W1, "gpu", 4, &[("GPU", 1.0)]);
    let gpu = |k: &'static str| {
        let mut t = task(k, &[]);
        t.restrictions =
            Some(Box::new(Restrictions { resources: vec![(Arc::from("GPU"), 1.0)], ..Default::default() }));
        t
    };
    env.submit(C1, vec![gpu("g1")], &["g1"]);
    let out = env.ev(Event::KeysCancelled { client: C1, keys: vec![Key::new("g1")] });
    assert_eq!(frees(&out), [(W1, "g1".to_owned())]);
    assert_eq!(env.core.task_count(), 0, "forgotten");
    let out = env.submit(C1, vec![gpu("g2")], &["g2"]);
    assert!(computes(&out).is_empty(), "g1 may still be running: its GPU is not free yet");
    let out = env.finish(W1, "g1", 1);
    assert_eq!(frees(&out), [(W1, "g1".to_owned())], "the late result is dropped");
    assert_eq!(computes(&out), [(W1, "g2")], "and the GPU goes to the next task");
}

#[test]
fn a_key_forgotten_twice_while_running_keeps_both_runs_resources_until_each_reports() {
    let mut env = Env::new();
    env.worker(W1, "gpu", 4, &[("GPU", 2.0)]);
    let gpu = || {
        let mut t = task("g", &[]);
        t.restrictions =
            Some(Box::new(Restrictions { resources: vec![(Arc::from("GPU"), 1.0)], ..Default::default() }));
        t
    };
    let first = ticket_in(&env.submit(C1, vec![gpu()], &["g"])).expect("runs");
    env.ev(Event::KeysCancelled { client: C1, keys: vec![Key::new("g")] });
    let second = ticket_in(&env.submit(C1, vec![gpu()], &["g"])).expect("the second GPU");
    env.ev(Event::KeysCancelled { client: C1, keys: vec![Key::new("g")] });
    let out = env.submit(C1, vec![gpu()], &["g"]);
    assert!(computes(&out).is_empty(), "both GPUs are taken by runs that may still go on");
    // The second run fails, then the first finishes: each frees its own GPU (validate checks
    // the books after every event).
    let error =
        Arc::new(TaskError { key: Key::new("g"), message: "boom".into(), kind: FailureKind::Error, attempts: 1 });
    let out = env.ev(Event::TaskFailed { worker: W1, key: Key::new("g"), ticket: Some(second), error });
    assert_eq!(computes(&out), [(W1, "g")], "a GPU came back");
    let third = ticket_in(&out).expect("sent");
    let out = env.finish_run(W1, "g", first);
    assert_eq!(env.core.state_of("g"), Some("processing"), "the first run's report is not the third's: {out:?}");
    let out = env.finish_run(W1, "g", third);
    assert!(out.contains(&Command::KeyInMemory { client: C1, key: Key::new("g"), workers: vec![W1], nbytes: 1 }));
}

#[test]
fn a_report_with_a_stale_ticket_is_not_taken_for_the_task_now_in_its_slot() {
    let mut env = Env::new();
    env.worker(W1, "w1", 1, &[]);
    let out = env.submit(C1, vec![task("a", &[])], &["a"]);
    let old = ticket_in(&out);
    env.ev(Event::KeysCancelled { client: C1, keys: vec![Key::new("a")] });
    let out = env.submit(C1, vec![task("b", &[])], &["b"]);
    let new = ticket_in(&out);
    let (Some(old), Some(new)) = (old, new) else { panic!("both were sent: {out:?}") };
    assert_eq!(old.slot, new.slot, "b reuses a's slot");
    let out = env.finish_run(W1, "a", old);
    assert_eq!(frees(&out), [(W1, "a".to_owned())], "a's late result is dropped");
    assert_eq!(env.core.state_of("b"), Some("processing"), "b is not taken as finished");
    let out = env.finish_run(W1, "b", new);
    assert!(out.contains(&Command::KeyInMemory { client: C1, key: Key::new("b"), workers: vec![W1], nbytes: 1 }));
}

#[test]
fn inputs_named_by_position_link_within_the_submission_and_a_bad_position_fails_the_task() {
    let mut env = Env::new();
    env.worker(W1, "w1", 1, &[]);
    let mut sum = task("sum", &[]);
    sum.deps = vec![Dep::Position(0), Dep::Position(1), Dep::Position(0)];
    let mut bad = task("bad", &[]);
    bad.deps = vec![Dep::Position(9)];
    let out = env.submit(C1, vec![task("x", &[]), task("y", &[]), sum, bad], &["sum", "bad"]);
    let erred = out.iter().find_map(|c| match c {
        Command::KeyErred { key, error, .. } if key.as_str() == "bad" => Some(error.message.clone()),
        _ => None,
    });
    assert_eq!(erred.as_deref(), Some("input #9 of the submission does not exist (it has 4 tasks)"));
    env.finish(W1, "x", 1);
    let out = env.finish(W1, "y", 1);
    assert_eq!(computes(&out), [(W1, "sum")], "both inputs linked, the repeated one once");
    let mut p = task("p", &[]);
    p.deps = vec![Dep::Position(1)];
    let mut q = task("q", &[]);
    q.deps = vec![Dep::Position(0)];
    let out = env.submit(C1, vec![p, q], &["p"]);
    assert!(out.iter().any(|c| matches!(c, Command::KeyErred { error, .. } if error.message.contains("cycle"))));
}

fn progress(cmds: &[Command<P>]) -> Vec<(u64, u64)> {
    cmds.iter()
        .filter_map(|c| match c {
            Command::Progress { client: C1, done, total } => Some((*done, *total)),
            _ => None,
        })
        .collect()
}

#[test]
fn clients_are_told_on_ticks_how_far_their_tasks_have_come() {
    let mut env = Env::new();
    env.worker(W1, "w1", 1, &[]);
    let tick = |env: &mut Env, at: u64| env.ev(Event::Tick { now_us: at });
    // A failed input counts as finished, and so does what fails because of it.
    env.submit(C1, vec![task("a", &[]), task("b", &["a"]), task("c", &["b"]), task("unused", &[])], &["c"]);
    assert_eq!(progress(&tick(&mut env, 1)), [(0, 3)], "the unneeded task was dropped, not counted");
    assert!(progress(&tick(&mut env, 2)).is_empty(), "nothing new, nothing sent");
    env.finish(W1, "a", 1);
    assert_eq!(progress(&tick(&mut env, 3)), [(1, 3)]);
    let out = env.fail(W1, "b", "boom");
    assert_eq!(progress(&out), [(3, 3)], "the end is told at once");
    assert!(progress(&tick(&mut env, 4)).is_empty());
    // The next submission starts from zero; a cancelled task leaves the total.
    env.submit(C1, vec![task("d", &[]), task("e", &[])], &["d", "e"]);
    assert_eq!(progress(&tick(&mut env, 5)), [(0, 2)]);
    env.ev(Event::KeysCancelled { client: C1, keys: vec![Key::new("e")] });
    let out = env.finish(W1, "d", 1);
    assert_eq!(progress(&out), [(1, 1)]);
    // Recomputing lost data does not count twice.
    env.worker(W2, "w2", 1, &[]);
    env.ev(Event::WorkerDisconnected { worker: W1, cause: LossCause::ConnectionClosed });
    env.finish(W2, "d", 1);
    assert!(progress(&tick(&mut env, 7)).is_empty());
}

#[test]
fn transitions_taken_into_buffers_in_use_are_appended_with_their_key_spans_moved() {
    let mut core: Core<P> = Core::new(Config { record_transitions: true, ..Config::default() });
    core.handle(Event::ClientConnected { client: C1 });
    core.handle(Event::GraphSubmitted { client: C1, tasks: vec![task("ab", &[])], wanted: vec![Key::new("ab")] });
    // Empty buffers: swapped.
    let (mut out, mut text) = (Vec::new(), String::new());
    core.take_transitions(&mut out, &mut text);
    assert_eq!((out.len(), out[0].key(), text.as_str()), (1, Some((0, 2)), "ab"));
    core.handle(Event::GraphSubmitted { client: C1, tasks: vec![task("cde", &[])], wanted: vec![Key::new("cde")] });
    // Buffers holding an earlier batch: appended, the new key's span past the old text.
    core.take_transitions(&mut out, &mut text);
    assert_eq!((out.len(), out[1].key(), text.as_str()), (2, Some((2, 5)), "abcde"));
    assert_eq!(core.transitions_pending(), 0);
}

#[test]
fn transitions_copied_in_pieces_carry_the_text_of_their_own_keys_until_cleared() {
    let mut core: Core<P> = Core::new(Config { record_transitions: true, ..Config::default() });
    core.handle(Event::ClientConnected { client: C1 });
    let submit = |core: &mut Core<P>, names: &[&'static str]| {
        let tasks = names.iter().map(|k| task(k, &[])).collect();
        core.handle(Event::GraphSubmitted { client: C1, tasks, wanted: names.iter().map(|k| Key::new(k)).collect() });
    };
    submit(&mut core, &["old"]);
    core.clear_transitions();
    // New tasks, a change without a key (the old task forgotten), more new tasks.
    submit(&mut core, &["ab"]);
    core.handle(Event::KeysReleased { client: C1, keys: vec![Key::new("old")] });
    submit(&mut core, &["cde", "f", "ghij"]);
    // Each task's changes in an event make one record.
    assert_eq!(core.transitions_pending(), 5);
    let key_of = |records: &[Transition], text: &str, i: usize| {
        records[i].key().map(|(s, e)| text[s as usize..e as usize].to_owned())
    };
    // A buffer in use: the spans move past its text.
    let (mut first, mut text) = (Vec::new(), String::from("xyz"));
    core.copy_transitions(0..1, &mut first, &mut text);
    assert_eq!((key_of(&first, &text, 0).as_deref(), text.as_str()), (Some("ab"), "xyzab"));
    // A piece that starts with a change without a key.
    let (mut rest, mut rest_text) = (Vec::new(), String::new());
    core.copy_transitions(1..4, &mut rest, &mut rest_text);
    assert_eq!((rest[0].key(), rest[0].phase()), (None, Phase::Forgotten));
    let keys: Vec<Option<String>> = (1..3).map(|i| key_of(&rest, &rest_text, i)).collect();
    assert_eq!(keys, [Some("cde".into()), Some("f".into())]);
    assert_eq!(rest_text, "cdef", "only the text of these records' keys");
    // A range reaching past the records copies those there are; the core still holds them all.
    core.copy_transitions(4..9, &mut rest, &mut rest_text);
    assert_eq!((key_of(&rest, &rest_text, 3).as_deref(), core.transitions_pending()), (Some("ghij"), 5));
    core.clear_transitions();
    assert_eq!(core.transitions_pending(), 0);
    // Cleared, key text included: a new task's record, taken whole, has its key alone.
    submit(&mut core, &["k"]);
    let (mut later, mut later_text) = (Vec::new(), String::new());
    core.take_transitions(&mut later, &mut later_text);
    assert_eq!((later.len(), later[0].key(), later_text.as_str()), (1, Some((0, 1)), "k"));
}

#[test]
fn changes_of_a_task_within_one_event_form_one_record() {
    let mut core: Core<P> = Core::new(Config { record_transitions: true, ..Config::default() });
    let spec = WorkerSpec {
        name: Arc::from("w1"),
        address: Arc::from("tcp://127.0.0.1:9001"),
        nthreads: 1,
        resources: Vec::new(),
        restarted_after: None,
    };
    core.handle(Event::WorkerConnected { worker: W1, spec });
    core.handle(Event::ClientConnected { client: C1 });
    let (mut out, mut text) = (Vec::new(), String::new());
    core.take_transitions(&mut out, &mut text);
    out.clear();
    text.clear();
    core.handle(Event::GraphSubmitted { client: C1, tasks: vec![task("a", &[])], wanted: vec![Key::new("a")] });
    core.take_transitions(&mut out, &mut text);
    assert_eq!(out.len(), 1, "{out:?}");
    assert_eq!(out[0].key(), Some((0, 1)));
    assert_eq!(text, "a");
    assert_eq!(out[0].via().iter().collect::<Vec<_>>(), [Phase::Released, Phase::Waiting, Phase::Queued]);
    assert_eq!((out[0].phase(), out[0].worker()), (Phase::Processing, Some(W1)));
    out.clear();
    // The end of a run keeps its own record (its time and worker); what follows at once is
    // the next one.
    let ticket = None;
    core.handle(Event::TaskFinished { worker: W1, key: Key::new("a"), ticket, nbytes: 1, duration_us: 7 });
    core.handle(Event::KeysReleased { client: C1, keys: vec![Key::new("a")] });
    core.take_transitions(&mut out, &mut text);
    let got: Vec<(Vec<Phase>, Phase, Option<u64>)> =
        out.iter().map(|t| (t.via().iter().collect(), t.phase(), t.duration_us())).collect();
    assert_eq!(got, [(vec![], Phase::Memory, Some(7)), (vec![Phase::Released], Phase::Forgotten, None)]);
}

#[test]
fn inputs_missing_because_their_holder_left_do_not_count_as_failures() {
    let mut env = Env::new();
    env.worker(W2, "w2", 1, &[]);
    let on = |key: &'static str, deps: &[&str], w: &'static str| {
        let mut t = task(key, deps);
        t.restrictions = Some(Box::new(Restrictions { workers: vec![Arc::from(w)], ..Default::default() }));
        t
    };
    env.submit(C1, vec![on("i", &[], "w1"), on("t", &["i"], "w2")], &["t"]);
    // More rounds than failures allowed: each time the holder of `i` leaves before `t`'s
    // worker reports that it could not fetch `i` (naming no holder the scheduler still knows).
    for round in 0..=Config::default().max_input_failures + 1 {
        let holder = WorkerId(10 + round);
        env.worker(holder, "w1", 1, &[]);
        env.finish(holder, "i", 8);
        assert_eq!(env.core.state_of("t"), Some("processing"), "round {round}");
        env.ev(Event::WorkerDisconnected { worker: holder, cause: LossCause::ConnectionClosed });
        env.ev(Event::InputsMissing { worker: W2, key: Key::new("t"), ticket: None, missing: Vec::new() });
        assert_ne!(env.core.state_of("t"), Some("erred"), "round {round}");
    }
}

#[test]
fn result_of_a_run_cancelled_meanwhile_is_not_adopted_when_the_key_is_back() {
    let mut env = Env::new();
    env.worker(W1, "w1", 1, &[]);
    env.worker(W2, "w2", 1, &[]);
    let on = |w: &'static str| {
        let mut t = task("a", &[]);
        t.restrictions = Some(Box::new(Restrictions { workers: vec![Arc::from(w)], ..Default::default() }));
        t
    };
    env.submit(C1, vec![on("w1")], &["a"]);
    // Cancelled while it runs on w1: w1 is told to free it (and may have run it already).
    let out = env.ev(Event::KeysReleased { client: C1, keys: vec![Key::new("a")] });
    assert_eq!(frees(&out), [(W1, "a".to_owned())]);
    // Wanted again, computed on w2.
    env.submit(C2, vec![on("w2")], &["a"]);
    env.finish(W2, "a", 8);
    // w1's late report: its copy is gone (or going), so it is not counted as a holder.
    let out = env.finish(W1, "a", 8);
    assert_eq!(env.core.who_has("a"), [W2]);
    assert_eq!(frees(&out), [(W1, "a".to_owned())], "told again, in case the result landed after the first");
    // A worker that runs the key anew is not told to free it by the old run's report.
    env.ev(Event::KeysReleased { client: C2, keys: vec![Key::new("a")] });
    let sent = env.submit(C1, vec![on("w1")], &["a"]);
    let old = ticket_in(&sent);
    assert!(old.is_some());
    let out = env.ev(Event::KeysReleased { client: C1, keys: vec![Key::new("a")] });
    assert_eq!(frees(&out), [(W1, "a".to_owned())]);
    env.submit(C2, vec![on("w1")], &["a"]);
    let late = Event::TaskFinished { worker: W1, key: Key::new("a"), ticket: old, nbytes: 8, duration_us: 1 };
    let out = env.ev(late);
    assert!(frees(&out).is_empty(), "the old run's report must not free the new run: {out:?}");
    assert_eq!(env.core.state_of("a"), Some("processing"));
}

#[test]
fn packed_records_keep_every_field() {
    const ALL: [Phase; 8] = [
        Phase::Released,
        Phase::Waiting,
        Phase::Queued,
        Phase::NoWorker,
        Phase::Processing,
        Phase::Memory,
        Phase::Erred,
        Phase::Forgotten,
    ];
    for (i, &p) in ALL.iter().enumerate() {
        let bare = Transition::new(u64::MAX - i as u64, None, p, None);
        assert_eq!((bare.task(), bare.key(), bare.phase()), (u64::MAX - i as u64, None, p));
        assert_eq!((bare.worker(), bare.duration_us(), bare.via().len()), (None, None, 0));
        // Zero and the largest values are values, not "unset".
        let full = Transition::new(7, Some((0, u32::MAX)), p, Some(WorkerId(u32::MAX))).with_duration_us(0);
        assert_eq!(
            (full.key(), full.worker(), full.duration_us()),
            (Some((0, u32::MAX)), Some(WorkerId(u32::MAX)), Some(0))
        );
        assert_eq!(Transition::new(7, Some((0, 0)), p, Some(WorkerId(0))).worker(), Some(WorkerId(0)));
    }
    // A path through every phase: four fit in `via`, then the record is full and unchanged.
    let mut tr = Transition::new(1, Some((3, 5)), ALL[0], None);
    for (i, &p) in ALL.iter().enumerate().skip(1) {
        let before = tr;
        let w = (i % 2 == 0).then_some(WorkerId(i as u32));
        if i <= crate::Via::CAPACITY {
            assert!(tr.extend(p, w));
            assert_eq!((tr.phase(), tr.worker(), tr.key()), (p, w, Some((3, 5))));
            assert_eq!(tr.via().iter().collect::<Vec<_>>(), ALL[..i]);
        } else {
            assert!(!tr.extend(p, w));
            assert_eq!(tr, before);
        }
    }
    // The end of a run is not extended.
    let mut ended = Transition::new(2, None, Phase::Memory, Some(WorkerId(1))).with_duration_us(9);
    assert!(!ended.extend(Phase::Released, None));
    assert_eq!((ended.phase(), ended.duration_us(), ended.via().len()), (Phase::Memory, Some(9), 0));
    ended.set_worker(None);
    assert_eq!(ended.worker(), None);
}

#[test]
fn cyclic_submission_fails_its_tasks() {
    let mut env = Env::new();
    env.worker(W1, "w1", 1, &[]);
    let out = env.submit(C1, vec![task("p", &["q"]), task("q", &["p"])], &["p"]);
    assert!(out.iter().any(|c| matches!(c, Command::KeyErred { error, .. } if error.message.contains("cycle"))));
}

// ---------------------------------------------------------------------------------------------
// A simulated cluster: workers "run" tasks by computing value = 1 + sum(inputs) (or failing when
// the task is marked), in a random order, while workers join and die at random. Every wanted key
// must end with the value a direct evaluation gives.

/// A compute the simulated cluster has not finished yet: (worker, key, inputs with holders).
type Outstanding = (WorkerId, String, Vec<(Key, Holders)>, Ticket);

#[derive(Clone, Debug)]
enum Step {
    /// Complete the i-th outstanding compute (modulo their number).
    Complete(prop::sample::Index),
    /// Kill a worker (modulo the live ones) if more than one is alive.
    Kill(prop::sample::Index),
    /// A new worker joins.
    Join,
    /// A worker (modulo the live ones) starts retiring gracefully, if more than one is alive.
    Retire(prop::sample::Index),
    /// Time passes (clients are told their progress).
    Tick,
    /// The client cancels a wanted key (modulo their number), then submits the whole graph
    /// again: runs of forgotten tasks may still report, with tickets gone stale.
    Resubmit(prop::sample::Index),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        8 => any::<prop::sample::Index>().prop_map(Step::Complete),
        1 => any::<prop::sample::Index>().prop_map(Step::Kill),
        1 => Just(Step::Join),
        1 => any::<prop::sample::Index>().prop_map(Step::Retire),
        1 => Just(Step::Tick),
        1 => any::<prop::sample::Index>().prop_map(Step::Resubmit),
    ]
}

fn expected(
    deps: &[Vec<usize>],
    fails: &[bool],
    i: usize,
    memo: &mut HashMap<usize, Result<i64, usize>>,
) -> Result<i64, usize> {
    if let Some(v) = memo.get(&i) {
        return *v;
    }
    let mut sum = 1i64;
    let mut result = None;
    for d in &deps[i] {
        match expected(deps, fails, *d, memo) {
            Ok(v) => sum += v,
            Err(root) => {
                if result.is_none() {
                    result = Some(Err(root));
                }
            }
        }
    }
    let r = result.unwrap_or(if fails[i] { Err(i) } else { Ok(sum) });
    memo.insert(i, r);
    r
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn simulated_cluster_matches_direct_evaluation(
        shape in prop::collection::vec((prop::collection::vec(any::<prop::sample::Index>(), 0..3), prop::bool::weighted(0.1)), 1..40),
        wanted in prop::collection::vec(any::<prop::sample::Index>(), 1..4),
        steps in prop::collection::vec(step(), 0..400),
        parts in 1usize..4,
        flag_wanted in any::<bool>(),
        by_position in any::<bool>(),
    ) {
        let n = shape.len();
        let keys: Vec<&'static str> = (0..n).map(|i| &*Box::leak(format!("k{i}").into_boxed_str())).collect();
        let deps: Vec<Vec<usize>> = shape.iter().enumerate().map(|(i, (ds, _))| {
            let mut v: Vec<usize> = if i == 0 { vec![] } else { ds.iter().map(|d| d.index(i)).collect() };
            v.dedup();
            let mut seen = Vec::new();
            v.retain(|x| if seen.contains(x) { false } else { seen.push(*x); true });
            v
        }).collect();
        let fails: Vec<bool> = shape.iter().map(|(_, f)| *f).collect();
        let wanted: Vec<usize> = wanted.iter().map(|w| w.index(n)).collect();

        // Blame for worker deaths is tested on its own; here every death is survivable.
        let mut env = Env::with(Config { allowed_failures: u32::MAX, ..Config::default() });
        let mut live: Vec<WorkerId> = Vec::new();
        let mut next_worker = 1u32;
        let mut join = |env: &mut Env, live: &mut Vec<WorkerId>| {
            let w = WorkerId(next_worker);
            next_worker += 1;
            live.push(w);
            env.worker(w, &format!("w{}", w.0), 1 + w.0 % 2, &[])
        };
        // Values held by each worker; outstanding computes.
        let mut held: BTreeMap<(WorkerId, String), i64> = BTreeMap::new();
        let mut outstanding: Vec<Outstanding> = Vec::new();
        let mut results: HashMap<String, Result<(Vec<WorkerId>, ()), String>> = HashMap::new();
        // Copies made for retiring workers (reported back), and workers that retired.
        let copies: std::cell::RefCell<Vec<(WorkerId, Key)>> = std::cell::RefCell::default();
        let gone: std::cell::RefCell<Vec<WorkerId>> = std::cell::RefCell::default();
        let last_progress: std::cell::RefCell<Option<(u64, u64)>> = std::cell::RefCell::default();
        let absorb = |cmds: Vec<Command<P>>, outstanding: &mut Vec<_>, held: &mut BTreeMap<(WorkerId, String), i64>, results: &mut HashMap<_, _>| {
            for c in cmds {
                match c {
                    Command::Compute { worker, key, inputs, ticket, .. } => outstanding.push((worker, key.as_str().to_owned(), inputs, ticket)),
                    Command::Free { worker, key } => { held.remove(&(worker, key.as_str().to_owned())); }
                    Command::KeyInMemory { key, workers, .. } => { results.insert(key.as_str().to_owned(), Ok((workers, ()))); }
                    Command::KeyErred { key, error, .. } => { results.insert(key.as_str().to_owned(), Err(error.key.as_str().to_owned())); }
                    Command::Acquire { worker, key, from } => {
                        // The copy is made at once (the value moves with it).
                        if let Some(v) = held.get(&(from, key.as_str().to_owned())).copied() {
                            held.insert((worker, key.as_str().to_owned()), v);
                            copies.borrow_mut().push((worker, key));
                        }
                    }
                    Command::Retired { worker } => {
                        held.retain(|(hw, _), _| *hw != worker);
                        gone.borrow_mut().push(worker);
                    }
                    Command::Progress { done, total, .. } => *last_progress.borrow_mut() = Some((done, total)),
                    Command::KeyCancelled { .. } | Command::Steal { .. } | Command::DropWorker { .. } => {}
                    Command::KeyLost { key, .. } => { results.remove(key.as_str()); }
                }
            }
        };
        let out = join(&mut env, &mut live);
        absorb(out, &mut outstanding, &mut held, &mut results);
        let graph = || -> Vec<NewTask<P>> { (0..n).map(|i| {
            let d: Vec<&str> = deps[i].iter().map(|d| keys[*d]).collect();
            let mut t = task(keys[i], &d);
            t.order = i as u32;
            t.wanted = flag_wanted && wanted.contains(&i);
            t
        }).collect() };
        let mut tasks = graph();
        let wanted_keys: Vec<&str> = if flag_wanted { Vec::new() } else { wanted.iter().map(|w| keys[*w]).collect() };
        // The graph in `parts` parts (inputs come before their users, as clients send them).
        // Inputs in the same part are named by position or by key.
        let per_part = n.div_ceil(parts);
        let positions = |part: &mut Vec<NewTask<P>>, start: usize| {
            let len = part.len();
            for t in part.iter_mut().filter(|_| by_position) {
                for d in &mut t.deps {
                    let Dep::Key(k) = d else { continue };
                    let i: usize = k.as_str()[1..].parse().expect("kN");
                    if (start..start + len).contains(&i) {
                        *d = Dep::Position((i - start) as u32);
                    }
                }
            }
        };
        env.ev(Event::ClientConnected { client: C1 });
        let mut start = 0;
        while tasks.len() > per_part {
            let rest = tasks.split_off(per_part);
            let mut part = std::mem::replace(&mut tasks, rest);
            positions(&mut part, start);
            start += part.len();
            let out = env.ev(Event::GraphPart { client: C1, tasks: part });
            absorb(out, &mut outstanding, &mut held, &mut results);
        }
        positions(&mut tasks, start);
        let out = env.submit(C1, tasks, &wanted_keys);
        absorb(out, &mut outstanding, &mut held, &mut results);

        let run_one = |env: &mut Env, i: usize, outstanding: &mut Vec<Outstanding>, held: &mut BTreeMap<(WorkerId, String), i64>| {
            let (w, key, inputs, ticket) = outstanding.swap_remove(i);
            let idx: usize = key[1..].parse().expect("kN");
            // Fetch inputs from the holders the scheduler named (any that still has it).
            let mut sum = 1i64;
            for (k, holders) in &inputs {
                let v = holders.iter().find_map(|h| held.get(&(*h, k.as_str().to_owned())).copied());
                match v {
                    Some(v) => sum += v,
                    None => {
                        let missing = vec![(k.clone(), holders.first().copied().unwrap_or(w))];
                        let ticket = Some(ticket);
                        return env.ev(Event::InputsMissing { worker: w, key: Key::from(key), ticket, missing });
                    }
                }
            }
            if fails[idx] {
                let error = Arc::new(TaskError { key: Key::from(key.clone()), message: "boom".into(), kind: FailureKind::Error, attempts: 1 });
                let ticket = (idx % 3 != 0).then_some(ticket);
                env.ev(Event::TaskFailed { worker: w, key: Key::from(key), ticket, error })
            } else {
                held.insert((w, key.clone()), sum);
                // Workers echo the ticket; reports without one are found by key.
                let ticket = (idx % 3 != 0).then_some(ticket);
                env.ev(Event::TaskFinished { worker: w, key: Key::from(key), ticket, nbytes: 8, duration_us: 5 })
            }
        };
        // Reports the copies made for retiring workers, and forgets the workers that retired.
        let settle = |env: &mut Env, live: &mut Vec<WorkerId>, outstanding: &mut Vec<Outstanding>, held: &mut BTreeMap<(WorkerId, String), i64>, results: &mut HashMap<_, _>| {
            loop {
                let pending: Vec<(WorkerId, Key)> = copies.borrow_mut().drain(..).collect();
                if pending.is_empty() {
                    break;
                }
                for (worker, key) in pending {
                    let out = env.ev(Event::DataAcquired { worker, key, nbytes: 8 });
                    absorb(out, outstanding, held, results);
                }
            }
            live.retain(|w| !gone.borrow().contains(w));
        };
        let mut now_us = 0;
        for s in steps {
            let out = match s {
                Step::Complete(i) if !outstanding.is_empty() => run_one(&mut env, i.index(outstanding.len()), &mut outstanding, &mut held),
                Step::Kill(i) if live.len() > 1 => {
                    let w = live.remove(i.index(live.len()));
                    outstanding.retain(|(ow, ..)| *ow != w);
                    held.retain(|(hw, _), _| *hw != w);
                    env.ev(Event::WorkerDisconnected { worker: w, cause: LossCause::ConnectionClosed })
                }
                Step::Join => join(&mut env, &mut live),
                Step::Tick => {
                    now_us += 1000;
                    env.ev(Event::Tick { now_us })
                }
                Step::Resubmit(i) => {
                    let key = Key::new(keys[wanted[i.index(wanted.len())]]);
                    let out = env.ev(Event::KeysCancelled { client: C1, keys: vec![key] });
                    absorb(out, &mut outstanding, &mut held, &mut results);
                    let wanted = wanted_keys.iter().map(|k| Key::new(k)).collect();
                    env.ev(Event::GraphSubmitted { client: C1, tasks: graph(), wanted })
                }
                Step::Retire(i) if live.len() > 1 => {
                    let w = live[i.index(live.len())];
                    env.ev(Event::WorkerRetiring { worker: w })
                }
                _ => Vec::new(),
            };
            absorb(out, &mut outstanding, &mut held, &mut results);
            settle(&mut env, &mut live, &mut outstanding, &mut held, &mut results);
        }
        // Drain: run everything left, with one more worker in case every other one is
        // retiring (they wait for somewhere to put their data).
        let out = join(&mut env, &mut live);
        absorb(out, &mut outstanding, &mut held, &mut results);
        settle(&mut env, &mut live, &mut outstanding, &mut held, &mut results);
        let mut guard = 0;
        while !outstanding.is_empty() {
            guard += 1;
            prop_assert!(guard < 100_000, "no progress");
            let out = run_one(&mut env, 0, &mut outstanding, &mut held);
            absorb(out, &mut outstanding, &mut held, &mut results);
            settle(&mut env, &mut live, &mut outstanding, &mut held, &mut results);
        }
        // Once everything ran, the client was last told all of it finished.
        let out = env.ev(Event::Tick { now_us: now_us + 1000 });
        absorb(out, &mut outstanding, &mut held, &mut results);
        let told = *last_progress.borrow();
        prop_assert!(told.is_some_and(|(done, total)| done == total), "progress after the run: {:?}", told);
        let mut memo = HashMap::new();
        for w in wanted {
            let got = results.get(keys[w]).cloned();
            match expected(&deps, &fails, w, &mut memo) {
                Ok(v) => {
                    let Some(Ok((holders, ()))) = got else { return Err(TestCaseError::fail(format!("{} not in memory: {got:?}", keys[w]))) };
                    // The value may have moved (recomputed); read it from the scheduler's holders.
                    let now = env.core.who_has(keys[w]);
                    let holder = now.first().or(holders.first()).copied();
                    let value = holder.and_then(|h| held.get(&(h, keys[w].to_owned())).copied());
                    prop_assert_eq!(value, Some(v), "value of {}", keys[w]);
                }
                Err(root) => prop_assert_eq!(got, Some(Err(keys[root].to_owned())), "failure of {}", keys[w]),
            }
        }
    }
}
