//! Scenario tests of both schedulers, and property tests against a direct recursive evaluation.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use proptest::prelude::*;
use rask_graph::{
    Annotations, Arg, ArgSpec, Body, Executor, FailureKind, Graph, GraphBuilder, Key, TaskId, TaskResult, TaskSpec,
    Value,
};
use rask_ops::{OpEntry, OpError, Registry, TaskCtx};

use crate::{LocalConfig, LocalError, SyncScheduler, ThreadedScheduler};

fn r(k: &str) -> ArgSpec {
    ArgSpec::Ref(Key::new(k))
}
fn i(v: i64) -> ArgSpec {
    ArgSpec::Lit(Value::Int(v))
}

fn cfg(registry: Registry, threads: usize) -> LocalConfig {
    LocalConfig { threads_per_worker: threads, registry: Arc::new(registry), ..LocalConfig::default() }
}

/// A named way of running a graph.
type Runner = (String, Box<dyn Fn(&Graph, &[TaskId]) -> Vec<TaskResult>>);

/// Both schedulers (threaded with 1, 2 and 4 threads), each with fusion on and off.
fn all_schedulers(registry: &Registry) -> Vec<Runner> {
    let mut v: Vec<Runner> = Vec::new();
    for fuse in [true, false] {
        let s = SyncScheduler::new(LocalConfig { fuse, ..cfg(registry.clone(), 1) });
        v.push((format!("sync fuse={fuse}"), Box::new(move |g, o| s.run(g, o).expect("runs"))));
        for threads in [1, 2, 4] {
            let s = ThreadedScheduler::new(LocalConfig { fuse, ..cfg(registry.clone(), threads) });
            v.push((format!("threaded x{threads} fuse={fuse}"), Box::new(move |g, o| s.run(g, o).expect("runs"))));
        }
    }
    v
}

fn build(specs: Vec<TaskSpec>) -> Graph {
    let mut b = GraphBuilder::new();
    for s in specs {
        b.add(s);
    }
    b.build().expect("valid graph")
}

fn ids(g: &Graph, keys: &[&str]) -> Vec<TaskId> {
    keys.iter().map(|k| g.id(k).expect("key exists")).collect()
}

#[test]
fn failure_fails_only_its_dependents_and_names_the_root() {
    //  a(fail) -> b -> c        x -> y
    let g = build(vec![
        TaskSpec::new("a", "fail", vec![ArgSpec::Lit(Value::str("boom"))]),
        TaskSpec::new("b", "identity", vec![r("a")]),
        TaskSpec::new("c", "add", vec![r("b"), i(1)]),
        TaskSpec::new("x", "identity", vec![i(41)]),
        TaskSpec::new("y", "add", vec![r("x"), i(1)]),
    ]);
    for (name, run) in all_schedulers(&Registry::with_builtins()) {
        let out = run(&g, &ids(&g, &["c", "y"]));
        let err = out[0].as_ref().expect_err("c fails");
        assert_eq!((err.key.as_str(), err.message.as_str()), ("a", "boom"), "{name}");
        assert_eq!(out[1], Ok(Value::Int(42)), "{name}");
    }
}

#[test]
fn after_dependency_failure_skips_the_task() {
    let g = build(vec![
        TaskSpec::new("a", "fail", vec![ArgSpec::Lit(Value::str("no"))]),
        TaskSpec::new("s", "identity", vec![i(1)]).after("a"),
    ]);
    for (name, run) in all_schedulers(&Registry::with_builtins()) {
        let out = run(&g, &ids(&g, &["s"]));
        assert_eq!(out[0].as_ref().expect_err("skipped").key.as_str(), "a", "{name}");
    }
}

fn flaky(registry: &mut Registry, name: &str, failures: usize) -> Arc<AtomicUsize> {
    let calls = Arc::new(AtomicUsize::new(0));
    let c = Arc::clone(&calls);
    let func = Arc::new(move |_: &TaskCtx<'_>, _: &[Value]| {
        let n = c.fetch_add(1, Ordering::SeqCst);
        if n < failures { Err(OpError(format!("attempt {} failed", n + 1))) } else { Ok(Value::Int(n as i64 + 1)) }
    });
    registry.register_raw(name, OpEntry { func, check: None, quick: false }).expect("fresh name");
    calls
}

#[test]
fn retries_rerun_failed_attempts() {
    for threaded in [false, true] {
        let mut reg = Registry::with_builtins();
        let calls = flaky(&mut reg, "flaky", 2);
        let ann = |retries| Annotations { retries, ..Default::default() };
        let g = build(vec![TaskSpec::new("t", "flaky", vec![]).with_annotations(ann(2))]);
        let out = if threaded {
            ThreadedScheduler::new(cfg(reg.clone(), 2)).run(&g, &[TaskId(0)])
        } else {
            SyncScheduler::new(cfg(reg.clone(), 1)).run(&g, &[TaskId(0)])
        }
        .expect("runs");
        assert_eq!(out[0], Ok(Value::Int(3)));
        assert_eq!(calls.load(Ordering::SeqCst), 3);

        let mut reg = Registry::with_builtins();
        let calls = flaky(&mut reg, "flaky", 5);
        let g = build(vec![TaskSpec::new("t", "flaky", vec![]).with_annotations(ann(1))]);
        let out = SyncScheduler::new(cfg(reg, 1)).run(&g, &[TaskId(0)]).expect("runs");
        let err = out[0].as_ref().expect_err("retries exhausted");
        assert_eq!((err.attempts, err.message.as_str()), (2, "attempt 2 failed"));
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }
}

#[test]
fn panic_becomes_a_task_error_and_work_goes_on() {
    let mut reg = Registry::with_builtins();
    reg.register("explode", |x: i64| -> i64 { panic!("exploded on {x}") }).expect("fresh");
    let g = build(vec![TaskSpec::new("p", "explode", vec![i(7)]), TaskSpec::new("q", "identity", vec![i(1)])]);
    for (name, run) in all_schedulers(&reg) {
        let out = run(&g, &ids(&g, &["p", "q"]));
        let err = out[0].as_ref().expect_err("panicked");
        assert_eq!(err.kind, FailureKind::Panic, "{name}");
        assert_eq!(err.message, "panicked: exploded on 7", "{name}");
        assert_eq!(out[1], Ok(Value::Int(1)), "{name}");
    }
}

#[test]
fn timeout_fails_the_attempt_without_waiting_for_it() {
    let ann = Annotations { timeout: Some(Duration::from_millis(200)), ..Default::default() };
    let g = build(vec![
        TaskSpec::new("slow", "sleep", vec![i(20_000)]).with_annotations(ann),
        TaskSpec::new("fast", "identity", vec![i(5)]),
    ]);
    for (name, run) in all_schedulers(&Registry::with_builtins()) {
        let t0 = Instant::now();
        let out = run(&g, &ids(&g, &["slow", "fast"]));
        assert!(t0.elapsed() < Duration::from_secs(5), "{name}: took {:?}", t0.elapsed());
        let err = out[0].as_ref().expect_err("timed out");
        assert_eq!((err.kind.clone(), err.message.as_str()), (FailureKind::Timeout, "timed out after 0.2 s"), "{name}");
        assert_eq!(out[1], Ok(Value::Int(5)), "{name}");
    }
}

#[test]
fn priorities_decide_among_runnable_tasks() {
    let log = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut reg = Registry::with_builtins();
    let l = Arc::clone(&log);
    let func = Arc::new(move |ctx: &TaskCtx<'_>, _: &[Value]| {
        l.lock().expect("log").push(ctx.key().as_str().to_owned());
        Ok(Value::Null)
    });
    reg.register_raw("log", OpEntry { func, check: None, quick: false }).expect("fresh");
    let p = |k: &str, priority| {
        TaskSpec::new(k, "log", vec![]).with_annotations(Annotations { priority, ..Default::default() })
    };
    let g = build(vec![p("low", -5), p("mid", 0), p("high", 10), p("higher", 11)]);
    let outs = g.sinks();
    for threaded in [false, true] {
        log.lock().expect("log").clear();
        if threaded {
            ThreadedScheduler::new(cfg(reg.clone(), 1)).run(&g, &outs).expect("runs");
        } else {
            SyncScheduler::new(cfg(reg.clone(), 1)).run(&g, &outs).expect("runs");
        }
        assert_eq!(*log.lock().expect("log"), ["higher", "high", "mid", "low"], "threaded={threaded}");
    }
}

#[test]
fn intermediate_is_freed_once_its_last_dependent_has_run() {
    //  big -> use         check (after use): is big's value gone?
    let watch: Arc<Mutex<Weak<Vec<Value>>>> = Arc::new(Mutex::new(Weak::new()));
    let mut reg = Registry::with_builtins();
    let w = Arc::clone(&watch);
    let make = Arc::new(move |_: &TaskCtx<'_>, _: &[Value]| {
        let v = Arc::new(vec![Value::Int(1); 1000]);
        *w.lock().expect("watch") = Arc::downgrade(&v);
        Ok(Value::List(v))
    });
    reg.register_raw("make", OpEntry { func: make, check: None, quick: false }).expect("fresh");
    let w = Arc::clone(&watch);
    let check =
        Arc::new(move |_: &TaskCtx<'_>, _: &[Value]| Ok(Value::Bool(w.lock().expect("watch").upgrade().is_none())));
    reg.register_raw("freed", OpEntry { func: check, check: None, quick: false }).expect("fresh");
    let g = build(vec![
        TaskSpec::new("big", "make", vec![]),
        TaskSpec::new("use", "len", vec![r("big")]),
        TaskSpec::new("check", "freed", vec![]).after("use"),
    ]);
    for (name, run) in all_schedulers(&reg) {
        let out = run(&g, &ids(&g, &["use", "check"]));
        assert_eq!(out, vec![Ok(Value::Int(1000)), Ok(Value::Bool(true))], "{name}");
    }
}

#[test]
fn resources_are_never_overcommitted() {
    let running = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let mut reg = Registry::with_builtins();
    let (ru, pk) = (Arc::clone(&running), Arc::clone(&peak));
    let func = Arc::new(move |_: &TaskCtx<'_>, _: &[Value]| {
        let now = ru.fetch_add(1, Ordering::SeqCst) + 1;
        pk.fetch_max(now, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(15));
        ru.fetch_sub(1, Ordering::SeqCst);
        Ok(Value::Null)
    });
    reg.register_raw("gpu", OpEntry { func, check: None, quick: false }).expect("fresh");
    let gpu = Annotations { resources: vec![(Arc::from("GPU"), 1.0)], ..Default::default() };
    let mut specs: Vec<TaskSpec> =
        (0..8).map(|k| TaskSpec::new(format!("g{k}"), "gpu", vec![]).with_annotations(gpu.clone())).collect();
    specs.extend((0..8).map(|k| TaskSpec::new(format!("free{k}"), "sleep", vec![i(5)])));
    let g = build(specs);
    let outs = g.sinks();
    // Inferred: each worker advertises GPU=1 (the largest request).
    let out = ThreadedScheduler::new(cfg(reg.clone(), 4)).run(&g, &outs).expect("runs");
    assert!(out.iter().all(Result::is_ok));
    assert_eq!(peak.load(Ordering::SeqCst), 1);
    // Two workers advertising GPU=1 each: at most two at once.
    peak.store(0, Ordering::SeqCst);
    let mut res = std::collections::BTreeMap::new();
    res.insert("GPU".to_owned(), 1.0);
    let two = LocalConfig { workers: 2, threads_per_worker: 2, resources: Some(res), ..cfg(reg.clone(), 2) };
    ThreadedScheduler::new(two).run(&g, &outs).expect("runs");
    assert!(peak.load(Ordering::SeqCst) <= 2 && peak.load(Ordering::SeqCst) >= 1);
}

#[test]
fn unsatisfiable_constraints_are_refused_before_running() {
    let gpu2 = Annotations { resources: vec![(Arc::from("GPU"), 2.0)], ..Default::default() };
    let g = build(vec![TaskSpec::new("t", "noop", vec![]).with_annotations(gpu2)]);
    let mut res = std::collections::BTreeMap::new();
    res.insert("GPU".to_owned(), 1.0);
    let c = LocalConfig { resources: Some(res), ..cfg(Registry::with_builtins(), 1) };
    let err = ThreadedScheduler::new(c).run(&g, &[TaskId(0)]).expect_err("refused");
    assert_eq!(
        err.to_string(),
        "task \"t\" cannot run on the embedded cluster: it needs GPU=2 and each local worker advertises GPU=1"
    );
    let only = Annotations { workers: vec![Arc::from("gpu-node")], ..Default::default() };
    let g = build(vec![TaskSpec::new("t", "noop", vec![]).with_annotations(only.clone())]);
    assert!(matches!(
        SyncScheduler::new(cfg(Registry::with_builtins(), 1)).run(&g, &[TaskId(0)]),
        Err(LocalError::Unrunnable { .. })
    ));
    let fallback = Annotations { allow_other_workers: true, ..only };
    let g = build(vec![TaskSpec::new("t", "noop", vec![]).with_annotations(fallback)]);
    assert_eq!(SyncScheduler::new(cfg(Registry::with_builtins(), 1)).run(&g, &[TaskId(0)]), Ok(vec![Ok(Value::Null)]));
}

#[test]
fn unknown_op_is_a_task_error_naming_the_op() {
    let g = build(vec![TaskSpec::new("t", "nope", vec![]), TaskSpec::new("u", "noop", vec![])]);
    for (name, run) in all_schedulers(&Registry::with_builtins()) {
        let out = run(&g, &ids(&g, &["t", "u"]));
        let err = out[0].as_ref().expect_err("unknown");
        assert_eq!(err.kind, FailureKind::UnknownOp, "{name}");
        assert!(err.message.contains("unknown op `nope`"), "{name}: {}", err.message);
        assert_eq!(out[1], Ok(Value::Null));
    }
}

#[test]
fn failure_inside_a_fused_chain_names_the_failing_link() {
    // a -> b(fails: overflow) -> c, fused into one task
    let g = build(vec![
        TaskSpec::new("a", "identity", vec![i(i64::MAX)]),
        TaskSpec::new("b", "add", vec![r("a"), i(1)]),
        TaskSpec::new("c", "add", vec![r("b"), i(1)]),
    ]);
    for (name, run) in all_schedulers(&Registry::with_builtins()) {
        let out = run(&g, &ids(&g, &["c"]));
        let err = out[0].as_ref().expect_err("overflow");
        assert_eq!((err.key.as_str(), err.message.as_str()), ("b", "op `add`: integer overflow"), "{name}");
    }
}

#[test]
fn only_what_the_outputs_need_runs() {
    let mut reg = Registry::with_builtins();
    let calls = flaky(&mut reg, "count", 0);
    let g = build(vec![TaskSpec::new("unneeded", "count", vec![]), TaskSpec::new("wanted", "noop", vec![])]);
    for (_, run) in all_schedulers(&reg) {
        run(&g, &ids(&g, &["wanted"]));
    }
    assert_eq!(calls.load(Ordering::SeqCst), 0);
}

#[test]
fn large_tree_reduction_gives_the_exact_sum() {
    let depth = 14;
    let mut specs = Vec::new();
    for k in 0..(1 << depth) {
        specs.push(TaskSpec::new(format!("t-{depth}-{k}"), "identity", vec![i(k)]));
    }
    for level in (0..depth).rev() {
        for k in 0..(1 << level) {
            let (a, b) = (format!("t-{}-{}", level + 1, 2 * k), format!("t-{}-{}", level + 1, 2 * k + 1));
            specs.push(TaskSpec::new(format!("t-{level}-{k}"), "add", vec![r(&a), r(&b)]));
        }
    }
    let g = build(specs);
    let n: i64 = 1 << depth;
    for (name, run) in all_schedulers(&Registry::with_builtins()) {
        assert_eq!(run(&g, &ids(&g, &["t-0-0"])), vec![Ok(Value::Int(n * (n - 1) / 2))], "{name}");
    }
}

// ---------------------------------------------------------------------------------------------
// Property tests: random graphs with random failures agree on every scheduler, and the sync
// scheduler agrees with a direct recursive evaluation of the graph.

/// Direct recursive evaluation: the definition of what a graph means.
fn eval_recursive(g: &Graph, reg: &Registry, t: TaskId, memo: &mut HashMap<TaskId, TaskResult>) -> TaskResult {
    if let Some(v) = memo.get(&t) {
        return v.clone();
    }
    let mut dep_values = HashMap::new();
    let mut result = None;
    for d in g.deps(t) {
        let v = eval_recursive(g, reg, *d, memo);
        if let (Err(e), None) = (&v, &result) {
            result = Some(Err(Arc::clone(e)));
        }
        dep_values.insert(*d, v.unwrap_or_default());
    }
    let result = result.unwrap_or_else(|| {
        let Body::Call(call) = &g.task(t).body else { unreachable!("builder graphs have no chains") };
        fn go(a: &Arg, vals: &HashMap<TaskId, Value>) -> Value {
            match a {
                Arg::Lit(v) => v.clone(),
                Arg::Ref(t) => vals[t].clone(),
                Arg::Link(_) => unreachable!("no chains"),
                Arg::List(items) => Value::list(items.iter().map(|a| go(a, vals)).collect()),
                Arg::Map(e) => Value::Map(Arc::new(e.iter().map(|(k, a)| (k.clone(), go(a, vals))).collect())),
            }
        }
        let args: Vec<Value> = call.args.iter().map(|a| go(a, &dep_values)).collect();
        let key = g.key(t);
        let f = reg.get(g.op_name(call.op)).expect("builtin");
        f(&TaskCtx::new(key, 1, None, None), &args).map_err(|e| {
            Arc::new(rask_graph::TaskError { key: key.clone(), message: e.0, kind: FailureKind::Error, attempts: 1 })
        })
    });
    memo.insert(t, result.clone());
    result
}

#[derive(Debug, Clone)]
struct RandomTask {
    op: u8,
    deps: Vec<prop::sample::Index>,
    lit: i64,
    after: Option<prop::sample::Index>,
}

fn random_graph() -> impl Strategy<Value = (Vec<RandomTask>, Vec<prop::sample::Index>)> {
    let task = (
        0u8..6,
        prop::collection::vec(any::<prop::sample::Index>(), 0..4),
        -50i64..50,
        prop::option::weighted(0.2, any::<prop::sample::Index>()),
    )
        .prop_map(|(op, deps, lit, after)| RandomTask { op, deps, lit, after });
    (prop::collection::vec(task, 1..60), prop::collection::vec(any::<prop::sample::Index>(), 0..5))
}

fn to_graph(tasks: &[RandomTask], outs: &[prop::sample::Index]) -> (Graph, Vec<TaskId>) {
    let mut specs = Vec::new();
    for (n, t) in tasks.iter().enumerate() {
        let refs: Vec<ArgSpec> =
            if n == 0 { vec![] } else { t.deps.iter().map(|d| r(&format!("k{}", d.index(n)))).collect() };
        let (op, args) = match t.op {
            // fail sometimes, so failures propagate through random shapes
            0 if t.lit % 3 == 0 => ("fail", vec![ArgSpec::Lit(Value::str(&format!("f{n}")))]),
            0 | 1 => ("add", refs.into_iter().chain([i(t.lit)]).collect()),
            2 => ("sum", vec![ArgSpec::list(refs.into_iter().chain([i(t.lit)]).collect())]),
            3 => ("mul", refs.into_iter().chain([i(t.lit % 3)]).collect()),
            4 => ("identity", vec![refs.into_iter().next().unwrap_or(i(t.lit))]),
            _ => ("max", vec![ArgSpec::list(refs.into_iter().chain([i(t.lit)]).collect())]),
        };
        let mut spec = TaskSpec::new(format!("k{n}"), op, args);
        if let (Some(a), true) = (&t.after, n > 0) {
            spec = spec.after(format!("k{}", a.index(n)));
        }
        specs.push(spec);
    }
    let g = build(specs);
    let mut outputs: Vec<TaskId> = outs.iter().map(|o| TaskId(o.index(g.len()) as u32)).collect();
    if outputs.is_empty() {
        outputs = g.sinks();
    }
    (g, outputs)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn every_scheduler_matches_the_recursive_evaluation((tasks, outs) in random_graph()) {
        let (g, outputs) = to_graph(&tasks, &outs);
        let reg = Registry::with_builtins();
        let mut memo = HashMap::new();
        let expected: Vec<TaskResult> = outputs.iter().map(|o| eval_recursive(&g, &reg, *o, &mut memo)).collect();
        for (name, run) in all_schedulers(&reg) {
            prop_assert_eq!(&run(&g, &outputs), &expected, "{}", name);
        }
    }
}
