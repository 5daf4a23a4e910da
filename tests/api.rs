//! The public Rust API as a user sees it: lazy calls, compute, failures, persist, async.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, Wake, Waker};

use rask::{Delayed, Error, Executor, SyncScheduler};

#[test]
fn lazy_calls_compute_on_both_schedulers() {
    let inc = rask::function("api-inc", |x: i64| x + 1).expect("fresh name");
    let add = rask::function("api-add", |x: i64, y: i64| x + y).expect("fresh name");
    let ten = inc.call(10);
    let total = add.call(inc.call(1), &ten);
    assert_eq!(total.compute().expect("computes"), 13);
    assert_eq!(total.compute_with(&SyncScheduler::default()).expect("computes"), 13);
}

#[test]
fn quick_functions_compute_like_others_and_say_so_to_workers() {
    let double = rask::quick_function("api-quick-double", |x: i64| x * 2).expect("fresh name");
    let slow = rask::function("api-not-quick", |x: i64| x + 1).expect("fresh name");
    assert_eq!(slow.call(double.call(20)).compute().expect("computes"), 41);
    let registry = rask_ops::global();
    assert!(registry.is_quick("api-quick-double"));
    assert!(!registry.is_quick("api-not-quick"), "plain functions promise nothing");
    assert!(rask::quick_function("api-quick-double", |x: i64| x).is_err(), "names stay unique");
}

#[test]
fn same_call_twice_is_one_task() {
    let calls = Arc::new(AtomicUsize::new(0));
    let c = Arc::clone(&calls);
    let load = rask::function("api-load-once", move |x: i64| {
        c.fetch_add(1, Ordering::SeqCst);
        x * 2
    })
    .expect("fresh name");
    let add = rask::function("api-add-dedup", |x: i64, y: i64| x + y).expect("fresh name");
    let sum = add.call(load.call(21), load.call(21));
    assert_eq!(sum.graph().len(), 2, "load(21) appears once");
    assert_eq!(sum.compute().expect("computes"), 84);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[test]
fn compute_many_shares_work_and_keeps_order() {
    let sq = rask::function("api-sq", |x: i64| x * x).expect("fresh name");
    let sum = rask::function("api-sum", |xs: Vec<i64>| xs.iter().sum::<i64>()).expect("fresh name");
    let squares: Vec<Delayed<i64>> = (1..=4).map(|x| sq.call(x)).collect();
    let total = sum.call(&squares[..]);
    let (first, t) = rask::compute((&squares[0], &total)).expect("computes");
    assert_eq!((first, t), (1, 30));
    assert_eq!(rask::compute(&squares[..]).expect("computes"), vec![1, 4, 9, 16]);
}

#[test]
fn failure_reports_root_task_and_message() {
    let check = rask::function("api-check", |x: i64| if x < 0 { Err(format!("negative: {x}")) } else { Ok(x) })
        .expect("fresh name");
    let inc = rask::function("api-inc2", |x: i64| x + 1).expect("fresh name");
    let bad = check.call(-5);
    let downstream = inc.call(&bad);
    match downstream.compute() {
        Err(Error::Task(e)) => {
            assert_eq!(&e.key, bad.key());
            assert_eq!(e.message, "negative: -5");
        }
        other => panic!("expected a task error, got {other:?}"),
    }
}

#[test]
fn panicking_function_is_a_task_error() {
    let boom = rask::function("api-boom", |x: i64| -> i64 { panic!("boom {x}") }).expect("fresh name");
    match boom.call(1).compute() {
        Err(Error::Task(e)) => assert_eq!(e.message, "panicked: boom 1"),
        other => panic!("expected a task error, got {other:?}"),
    }
}

#[test]
fn persist_computes_once_and_later_graphs_reuse_it() {
    let calls = Arc::new(AtomicUsize::new(0));
    let c = Arc::clone(&calls);
    let expensive = rask::function("api-expensive", move |x: i64| {
        c.fetch_add(1, Ordering::SeqCst);
        x + 100
    })
    .expect("fresh name");
    let inc = rask::function("api-inc3", |x: i64| x + 1).expect("fresh name");
    let kept = expensive.call(1).persist().expect("computes");
    assert_eq!(inc.call(&kept).compute().expect("computes"), 102);
    assert_eq!(inc.call(&kept).compute().expect("computes"), 102);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[test]
fn compute_async_resolves_without_blocking_the_poller() {
    struct Flag(AtomicUsize);
    impl Wake for Flag {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
    let sq = rask::function("api-sq-async", |x: i64| x * x).expect("fresh name");
    let mut fut = Box::pin(sq.call(12).compute_async());
    let flag = Arc::new(Flag(AtomicUsize::new(0)));
    let waker = Waker::from(Arc::clone(&flag));
    let mut cx = Context::from_waker(&waker);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let v = loop {
        if let Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
            break v;
        }
        assert!(std::time::Instant::now() < deadline, "compute_async never resolved");
        std::thread::sleep(std::time::Duration::from_millis(1));
    };
    assert_eq!(v.expect("computes"), 144);
}

#[test]
fn deep_chain_builds_computes_and_drops_without_stack_overflow() {
    let inc = rask::function("api-inc-deep", |x: i64| x + 1).expect("fresh name");
    let mut d = rask::value(0i64);
    for _ in 0..100_000 {
        d = inc.call(&d);
    }
    assert_eq!(d.compute().expect("computes"), 100_000);
    drop(d);
}

#[test]
fn annotations_reach_the_graph_and_dot_shows_it() {
    let f = rask::function("api-annotated", |x: i64| x).expect("fresh name");
    let d = f.call(1).with_priority(5).with_retries(2).with_resource("GPU", 1.0);
    let g = d.graph();
    let t = g.id(d.key().as_str()).expect("task in graph");
    let ann = g.task(t).annotations();
    assert_eq!((ann.priority, ann.retries), (5, 2));
    assert_eq!(ann.resources.len(), 1);
    assert!(d.to_dot().contains("api-annotated"));
    assert_eq!(rask::ThreadedScheduler::default().run(&g, &[t]).expect("runs"), vec![Ok(rask::Value::Int(1))]);
}

#[test]
fn duplicate_function_name_is_refused() {
    rask::function("api-dup", |x: i64| x).expect("fresh name");
    assert!(matches!(rask::function("api-dup", |x: i64| x), Err(Error::Registry(_))));
}
