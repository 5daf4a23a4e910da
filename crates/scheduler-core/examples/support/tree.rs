//! A tree reduction as clients submit it, and simulated workers, shared by the examples that drive a core directly
//! (`core_tree` here, `feed_cost` in `rask-runtime`), included with `#[path]`.

use std::sync::Arc;

use rask_graph::Key;
use rask_scheduler_core::{Dep, NewTask, WorkerSpec};

/// Simulated worker `w`: one thread, nothing else.
pub(crate) fn worker(w: u32) -> WorkerSpec {
    WorkerSpec {
        name: Arc::from(format!("w{w}")),
        address: Arc::from(format!("tcp://127.0.0.1:{}", 9000 + w)),
        nthreads: 1,
        resources: Vec::new(),
        restarted_after: None,
    }
}

/// A binary tree of sums: `2^depth - 1` tasks, the root wanted; inputs named by position, as
/// clients send them.
pub(crate) fn tree(depth: u32) -> Vec<NewTask<u32>> {
    let mut tasks = Vec::new();
    let mut level: Vec<u32> = Vec::new();
    let mut order = 0u32;
    for i in 0..(1u32 << (depth - 1)) {
        let key = Key::from(format!("leaf-{i}"));
        tasks.push(NewTask {
            key,
            deps: Vec::new(),
            payload: i,
            priority: 0,
            order,
            restrictions: None,
            wanted: false,
        });
        level.push(order);
        order += 1;
    }
    let mut d = 0;
    while level.len() > 1 {
        d += 1;
        let mut next = Vec::new();
        for (i, pair) in level.chunks(2).enumerate() {
            let key = Key::from(format!("sum-{d}-{i}"));
            let wanted = level.len() == 2;
            let deps = pair.iter().map(|p| Dep::Position(*p)).collect();
            tasks.push(NewTask { key, deps, payload: 0, priority: 0, order, restrictions: None, wanted });
            next.push(order);
            order += 1;
        }
        level = next;
    }
    tasks
}
