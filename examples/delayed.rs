//! Lazy computations with `rask::function` and `Delayed`, computed on the embedded scheduler.
//!
//! Run it with `cargo run --example delayed` (add a path to also write the graph as Graphviz dot:
//! `cargo run --example delayed -- graph.dot && dot -Tsvg graph.dot > graph.svg`).

use std::time::Duration;

fn main() -> Result<(), rask::Error> {
    // Register functions under stable names: tasks refer to functions by name, so a worker
    // started from this same binary could run them too.
    let load = rask::function("example-load", |part: i64| -> Vec<i64> { (part * 1000..(part + 1) * 1000).collect() })?;
    let clean = rask::function("example-clean", |xs: Vec<i64>| -> Vec<i64> {
        xs.into_iter().filter(|x| x % 3 != 0).collect()
    })?;
    let total = rask::function("example-total", |xs: Vec<i64>| xs.iter().sum::<i64>())?;
    let add = rask::function("example-add", |a: i64, b: i64| a + b)?;
    let check = rask::function("example-check", |x: i64| -> Result<i64, String> {
        if x >= 0 { Ok(x) } else { Err(format!("negative total {x}")) }
    })?;

    // Nothing runs while the graph is built.
    let partials: Vec<rask::Delayed<i64>> = (0..16).map(|p| total.call(clean.call(load.call(p)))).collect();

    // A tree reduction: pairwise sums until one is left.
    let mut level = partials.clone();
    while level.len() > 1 {
        level = level.chunks(2).map(|c| if c.len() == 2 { add.call(&c[0], &c[1]) } else { c[0].clone() }).collect();
    }
    let grand_total = check.call(&level[0]).with_retries(1).with_timeout(Duration::from_secs(10));

    // One result ...
    let value = grand_total.compute()?;
    let expected: i64 = (0..16_000).filter(|x| x % 3 != 0).sum();
    assert_eq!(value, expected);
    println!("grand total = {value} ({} tasks)", grand_total.graph().len());

    // ... or several at once, sharing the work they have in common.
    let (first, all) = rask::compute((&partials[0], &grand_total))?;
    println!("first partial = {first}, grand total again = {all}");

    // The same call twice is the same task (content-hash keys).
    assert_eq!(load.call(3).key(), load.call(3).key());

    // Failures carry the failing task's key and message.
    let bad = check.call(-1);
    match bad.compute() {
        Err(rask::Error::Task(e)) => println!("as expected, {} failed: {}", e.key, e.message),
        other => println!("unexpected: {other:?}"),
    }

    if let Some(path) = std::env::args().nth(1) {
        std::fs::write(&path, grand_total.to_dot()).map_err(|e| rask::Error::Executor(Box::new(e)))?;
        println!("graph written to {path}");
    }
    Ok(())
}
