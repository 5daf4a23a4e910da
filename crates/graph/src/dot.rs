//! Graphviz export, so a graph can be looked at (`dot -Tsvg`), like `dask.visualize`.

use std::fmt::Write;

use crate::graph::Body;
use crate::{Arg, Graph, TaskId};

/// Renders the graph in Graphviz `dot` syntax: one box per task labelled with its key and op,
/// solid edges for data dependencies and dashed edges for ordering-only (`after`) ones.
#[must_use]
pub fn to_dot(graph: &Graph) -> String {
    let mut s = String::from("digraph rask {\n  rankdir=BT;\n  node [shape=box, fontname=\"monospace\"];\n");
    for t in graph.ids() {
        let op = match &graph.task(t).body {
            Body::Call(c) => graph.op_name(c.op).to_owned(),
            Body::Chain(links) => links.iter().map(|l| graph.op_name(l.call.op)).collect::<Vec<_>>().join(" > "),
        };
        let _ = writeln!(s, "  n{} [label={}];", t.0, quote(&format!("{}\n{op}", graph.key(t).as_str())));
    }
    for t in graph.ids() {
        let mut data: Vec<TaskId> = Vec::new();
        let mut collect = |a: &Arg| a.for_each_ref(&mut |d| data.push(d));
        match &graph.task(t).body {
            Body::Call(c) => c.args.iter().for_each(&mut collect),
            Body::Chain(links) => links.iter().flat_map(|l| l.call.args.iter()).for_each(&mut collect),
        }
        for d in graph.deps(t) {
            let style = if data.contains(d) { "" } else { " [style=dashed]" };
            let _ = writeln!(s, "  n{} -> n{}{style};", d.0, t.0);
        }
    }
    s.push_str("}\n");
    s
}

fn quote(s: &str) -> String {
    let mut q = String::with_capacity(s.len() + 2);
    q.push('"');
    for c in s.chars() {
        match c {
            '"' => q.push_str("\\\""),
            '\\' => q.push_str("\\\\"),
            '\n' => q.push_str("\\n"),
            c => q.push(c),
        }
    }
    q.push('"');
    q
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ArgSpec, GraphBuilder, Key, TaskSpec};

    #[test]
    fn dot_shows_data_edges_solid_and_after_edges_dashed() {
        let mut b = GraphBuilder::new();
        b.add(TaskSpec::new("a", "noop", vec![]));
        b.add(TaskSpec::new("b \"q\"", "identity", vec![ArgSpec::Ref(Key::new("a"))]));
        b.add(TaskSpec::new("c", "noop", vec![]).after("a"));
        let dot = to_dot(&b.build().expect("valid"));
        assert!(dot.contains("n0 -> n1;"), "{dot}");
        assert!(dot.contains("n0 -> n2 [style=dashed];"), "{dot}");
        assert!(dot.contains(r#"label="b \"q\"\nidentity""#), "{dot}");
    }
}
