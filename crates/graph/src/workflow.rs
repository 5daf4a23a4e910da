//! Workflow files: the language-neutral JSON form of a task graph (format version 1).
//!
//! The parser streams the file straight into a [`GraphBuilder`] (no intermediate JSON tree), so a
//! million-task file is parsed in one pass with a few hundred bytes per task. Problems are
//! reported precisely: JSON syntax and structure errors (including unknown fields, which are
//! usually typos) with line and column and the task they are in; everything else — unknown ops,
//! bad arity or literal types, missing references, cycles, unknown outputs — all at once, each
//! naming the offending key(s). Nothing in this module runs anything.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use crate::{Annotations, ArgSpec, Graph, GraphBuilder, GraphError, Key, TaskId, TaskSpec, Value};

/// The only format version this parser reads.
pub const VERSION: u64 = 1;

/// Answers, for the workflow parser, which ops exist and whether literal arguments fit them.
pub trait OpCatalog {
    /// Checks `op` and its literal arguments.
    ///
    /// # Errors
    /// When the op is unknown or an argument cannot fit it.
    fn check(&self, op: &str, args: &[ArgSpec]) -> Result<(), OpCheckError>;
}

/// Why an op call was refused by an [`OpCatalog`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OpCheckError {
    /// No op of this name.
    UnknownOp,
    /// The arguments do not fit; the message names the op and the argument.
    BadArgs(String),
}

/// A parsed and validated workflow.
#[derive(Debug)]
pub struct Workflow {
    /// The tasks.
    pub graph: Graph,
    /// The requested outputs, in the file's order (or every sink, in file order, if absent).
    pub outputs: Vec<TaskId>,
}

/// Why a workflow file was refused. Every variant means nothing ran.
#[derive(Debug, thiserror::Error)]
pub enum WorkflowError {
    /// The text is not valid JSON, or does not have the workflow's shape.
    #[error("line {line}, column {column}: {message}")]
    Syntax {
        /// 1-based line of the problem.
        line: usize,
        /// 1-based column of the problem.
        column: usize,
        /// What is wrong (names the task when inside one).
        message: String,
    },
    /// The file is well-formed but describes an invalid graph; every problem found is listed.
    #[error("{}", .0.join("\n"))]
    Invalid(Vec<String>),
}

/// Parses and validates a workflow from its text.
///
/// # Errors
/// See [`WorkflowError`].
pub fn parse(text: &str, catalog: &dyn OpCatalog) -> Result<Workflow, WorkflowError> {
    let mut problems = Vec::new();
    let mut inner_pos = None;
    let seed = FileSeed { catalog, problems: &mut problems, inner_pos: &mut inner_pos };
    let mut de = serde_json::Deserializer::from_str(text);
    let raw = seed.deserialize(&mut de).and_then(|raw| de.end().map(|()| raw));
    let raw = match raw {
        Ok(raw) => raw,
        Err(e) => {
            let (line, column) = inner_pos.unwrap_or((e.line(), e.column()));
            return Err(WorkflowError::Syntax { line, column, message: strip_position(&e) });
        }
    };
    let graph = match raw.builder.build() {
        Ok(g) => Some(g),
        Err(errors) => {
            problems.extend(errors.0.iter().map(ToString::to_string));
            None
        }
    };
    let mut outputs = Vec::new();
    if let Some(g) = &graph {
        match raw.outputs {
            Some(keys) => {
                let mut seen = std::collections::HashSet::new();
                for k in keys {
                    match g.id(&k) {
                        Some(t) => {
                            if seen.insert(t) {
                                outputs.push(t);
                            }
                        }
                        None => problems.push(GraphError::UnknownOutput { key: Key::from(k) }.to_string()),
                    }
                }
            }
            None => outputs = g.sinks(),
        }
    }
    match graph {
        Some(graph) if problems.is_empty() => Ok(Workflow { graph, outputs }),
        _ => Err(WorkflowError::Invalid(problems)),
    }
}

/// serde_json appends " at line L column C"; we report the position separately.
fn strip_position(e: &serde_json::Error) -> String {
    let s = e.to_string();
    match s.rfind(" at line ") {
        Some(i) => s[..i].to_owned(),
        None => s,
    }
}

struct RawFile {
    builder: GraphBuilder,
    outputs: Option<Vec<String>>,
}

struct FileSeed<'a> {
    catalog: &'a dyn OpCatalog,
    problems: &'a mut Vec<String>,
    inner_pos: &'a mut Option<(usize, usize)>,
}

impl<'de> DeserializeSeed<'de> for FileSeed<'_> {
    type Value = RawFile;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<RawFile, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for FileSeed<'_> {
    type Value = RawFile;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a workflow object with `version`, `tasks` and optional `outputs`")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawFile, A::Error> {
        let mut version = None;
        let mut builder = None;
        let mut outputs = None;
        while let Some(field) = map.next_key::<String>()? {
            match field.as_str() {
                "version" => {
                    if version.is_some() {
                        return Err(de::Error::duplicate_field("version"));
                    }
                    let v: serde_json::Value = map.next_value()?;
                    if v.as_u64() != Some(VERSION) {
                        return Err(de::Error::custom(format_args!(
                            "unsupported workflow version {v} (this rask reads version {VERSION})"
                        )));
                    }
                    version = Some(());
                }
                "tasks" => {
                    if builder.is_some() {
                        return Err(de::Error::duplicate_field("tasks"));
                    }
                    builder = Some(map.next_value_seed(TasksSeed {
                        catalog: self.catalog,
                        problems: &mut *self.problems,
                        inner_pos: &mut *self.inner_pos,
                    })?);
                }
                "outputs" => {
                    if outputs.is_some() {
                        return Err(de::Error::duplicate_field("outputs"));
                    }
                    outputs = Some(map.next_value::<Vec<String>>()?);
                }
                other => return Err(de::Error::unknown_field(other, &["version", "tasks", "outputs"])),
            }
        }
        version.ok_or_else(|| de::Error::missing_field("version"))?;
        let builder = builder.ok_or_else(|| de::Error::missing_field("tasks"))?;
        Ok(RawFile { builder, outputs })
    }
}

struct TasksSeed<'a> {
    catalog: &'a dyn OpCatalog,
    problems: &'a mut Vec<String>,
    inner_pos: &'a mut Option<(usize, usize)>,
}

impl<'de> DeserializeSeed<'de> for TasksSeed<'_> {
    type Value = GraphBuilder;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<GraphBuilder, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for TasksSeed<'_> {
    type Value = GraphBuilder;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object mapping task keys to tasks")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<GraphBuilder, A::Error> {
        let mut builder = GraphBuilder::with_capacity(map.size_hint().unwrap_or(0));
        let mut ops: HashMap<String, Arc<str>> = HashMap::new();
        while let Some(key) = map.next_key::<String>()? {
            let raw: RawTask = match map.next_value() {
                Ok(raw) => raw,
                Err(e) => {
                    // Keep the position of the real problem; the wrapper error is reported at
                    // the end of the task instead.
                    let msg = e.to_string();
                    if let Some((line, column)) = parse_position(&msg) {
                        *self.inner_pos = Some((line, column));
                    }
                    let text = msg.rfind(" at line ").map_or(msg.as_str(), |i| &msg[..i]);
                    return Err(de::Error::custom(format_args!("task {key:?}: {text}")));
                }
            };
            let key = Key::from(key);
            let annotations = match raw.annotations() {
                Ok(a) => a,
                Err(m) => {
                    self.problems.push(format!("task {key}: {m}"));
                    Annotations::default()
                }
            };
            let op = match ops.get(raw.op.as_str()) {
                Some(op) => Arc::clone(op),
                None => {
                    let op: Arc<str> = Arc::from(raw.op.as_str());
                    ops.insert(raw.op, Arc::clone(&op));
                    op
                }
            };
            match self.catalog.check(&op, &raw.args) {
                Ok(()) => {}
                Err(OpCheckError::UnknownOp) => self.problems.push(format!("task {key}: unknown op {:?}", &*op)),
                Err(OpCheckError::BadArgs(m)) => self.problems.push(format!("task {key}: {m}")),
            }
            builder.add(TaskSpec {
                key,
                op,
                args: raw.args,
                after: raw.after.into_iter().map(Key::from).collect(),
                annotations,
            });
        }
        Ok(builder)
    }
}

fn parse_position(msg: &str) -> Option<(usize, usize)> {
    let rest = &msg[msg.rfind(" at line ")? + " at line ".len()..];
    let (line, col) = rest.split_once(" column ")?;
    Some((line.parse().ok()?, col.parse().ok()?))
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTask {
    op: String,
    #[serde(default)]
    args: Vec<ArgSpec>,
    #[serde(default)]
    after: Vec<String>,
    #[serde(default)]
    retries: Option<i64>,
    #[serde(default)]
    priority: Option<i64>,
    #[serde(default)]
    resources: Option<BTreeMap<String, f64>>,
    #[serde(default)]
    workers: Option<Vec<String>>,
    #[serde(default)]
    allow_other_workers: Option<bool>,
    #[serde(default)]
    timeout_s: Option<f64>,
}

impl RawTask {
    fn annotations(&self) -> Result<Annotations, String> {
        let retries = match self.retries {
            None => 0,
            Some(r) => u32::try_from(r).map_err(|_| format!("`retries` must be an integer >= 0, got {r}"))?,
        };
        let mut resources = Vec::new();
        for (name, amount) in self.resources.iter().flatten() {
            if !amount.is_finite() || *amount <= 0.0 {
                return Err(format!("resource {name:?} must be a number > 0, got {amount}"));
            }
            resources.push((Arc::from(name.as_str()), *amount));
        }
        let timeout = match self.timeout_s {
            None => None,
            Some(t) if t > 0.0 && t.is_finite() => Some(Duration::from_secs_f64(t)),
            Some(t) => return Err(format!("`timeout_s` must be a number > 0, got {t}")),
        };
        let workers: Vec<Arc<str>> = self.workers.iter().flatten().map(|w| Arc::from(w.as_str())).collect();
        let allow_other_workers = self.allow_other_workers.unwrap_or(false);
        if allow_other_workers && workers.is_empty() {
            return Err("`allow_other_workers` needs a `workers` list".to_owned());
        }
        Ok(Annotations {
            priority: self.priority.unwrap_or(0),
            retries,
            resources,
            workers,
            allow_other_workers,
            timeout,
        })
    }
}

// --- Arguments: JSON values where {"$ref": k} is a reference and {"$lit": v} a literal. ---

impl<'de> serde::Deserialize<'de> for ArgSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ArgVisitor { literal: false }).map(|a| a.0)
    }
}

/// The result of one visit: the argument (literal subtrees already collapsed).
struct Visited(ArgSpec);

struct ArgVisitor {
    /// Inside `$lit`: objects are plain objects, never references.
    literal: bool,
}

impl<'de> DeserializeSeed<'de> for ArgVisitor {
    type Value = Visited;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Visited, D::Error> {
        d.deserialize_any(self)
    }
}

fn lit(v: Value) -> Result<Visited, String> {
    Ok(Visited(ArgSpec::Lit(v)))
}

impl<'de> Visitor<'de> for ArgVisitor {
    type Value = Visited;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_unit<E: de::Error>(self) -> Result<Visited, E> {
        lit(Value::Null).map_err(E::custom)
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Visited, E> {
        lit(Value::Bool(v)).map_err(E::custom)
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Visited, E> {
        lit(Value::Int(v)).map_err(E::custom)
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Visited, E> {
        let i = i64::try_from(v)
            .map_err(|_| E::custom(format_args!("integer {v} does not fit in a signed 64-bit integer")))?;
        lit(Value::Int(i)).map_err(E::custom)
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Visited, E> {
        lit(Value::Float(v)).map_err(E::custom)
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Visited, E> {
        lit(Value::str(v)).map_err(E::custom)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Visited, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
        while let Some(Visited(a)) = seq.next_element_seed(ArgVisitor { literal: self.literal })? {
            items.push(a);
        }
        Ok(Visited(ArgSpec::list(items)))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Visited, A::Error> {
        let mut entries: Vec<(String, ArgSpec)> = Vec::new();
        while let Some(k) = map.next_key::<String>()? {
            if !self.literal && (k == "$ref" || k == "$lit") {
                if !entries.is_empty() {
                    return Err(de::Error::custom(format_args!(
                        "an object with a {k:?} field must have no other field (use {{\"$lit\": ...}} for such data)"
                    )));
                }
                let a = if k == "$ref" {
                    let target: String = map.next_value()?;
                    ArgSpec::Ref(Key::from(target))
                } else {
                    map.next_value_seed(ArgVisitor { literal: true })?.0
                };
                if let Some(extra) = map.next_key::<String>()? {
                    let _: IgnoredAny = map.next_value()?;
                    return Err(de::Error::custom(format_args!(
                        "an object with a {k:?} field must have no other field, found {extra:?}"
                    )));
                }
                return Ok(Visited(a));
            }
            let v = map.next_value_seed(ArgVisitor { literal: self.literal })?.0;
            entries.push((k, v));
        }
        Ok(Visited(ArgSpec::map(entries)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A catalog knowing a few ops; `sub` must have exactly two arguments.
    struct Ops;
    impl OpCatalog for Ops {
        fn check(&self, op: &str, args: &[ArgSpec]) -> Result<(), OpCheckError> {
            match op {
                "identity" | "add" | "noop" | "sum" => Ok(()),
                "sub" if args.len() == 2 => Ok(()),
                "sub" => Err(OpCheckError::BadArgs(format!("op `sub` takes 2 arguments, got {}", args.len()))),
                _ => Err(OpCheckError::UnknownOp),
            }
        }
    }

    fn err(text: &str) -> String {
        parse(text, &Ops).expect_err("invalid").to_string()
    }

    #[test]
    fn parses_refs_at_any_depth_and_literals() {
        let w = parse(
            r#"{"version": 1, "tasks": {
                "a": {"op": "identity", "args": [20]},
                "b": {"op": "add", "args": [{"$ref": "a"}, 22]},
                "c": {"op": "sum", "args": [[{"x": {"$ref": "b"}}, {"$lit": {"$ref": "a"}}]], "priority": 3}
            }}"#,
            &Ops,
        )
        .expect("valid");
        let g = &w.graph;
        assert_eq!(w.outputs, vec![g.id("c").expect("c")]);
        let c = g.id("c").expect("c");
        assert_eq!(g.deps(c), &[g.id("b").expect("b")]);
        assert_eq!(g.task(c).annotations().priority, 3);
    }

    #[test]
    fn syntax_error_has_line_and_column() {
        assert_eq!(err("{\"version\": 1,\n \"tasks\": {,}}"), "line 2, column 12: key must be a string");
    }

    #[test]
    fn unknown_task_field_names_task_and_field_with_its_position() {
        let e = err("{\"version\": 1, \"tasks\": {\n \"a\": {\"op\": \"noop\", \"retires\": 2}}}");
        assert!(e.starts_with("line 2, column "), "{e}");
        assert!(e.contains("task \"a\": unknown field `retires`"), "{e}");
    }

    #[test]
    fn unknown_top_level_field_is_an_error() {
        assert!(err(r#"{"version": 1, "tasks": {}, "output": []}"#).contains("unknown field `output`"));
    }

    #[test]
    fn version_must_be_one() {
        assert!(err(r#"{"version": 2, "tasks": {}}"#).contains("unsupported workflow version 2"));
        assert!(err(r#"{"tasks": {}}"#).contains("missing field `version`"));
    }

    #[test]
    fn every_semantic_problem_is_listed_with_its_keys() {
        let e = err(r#"{"version": 1, "tasks": {
                "a": {"op": "frobnicate"},
                "b": {"op": "sub", "args": [1, 2, 3]},
                "c": {"op": "identity", "args": [{"$ref": "zz"}]},
                "d": {"op": "noop", "retries": -1}
            }, "outputs": ["a", "nope"]}"#);
        assert_eq!(
            e,
            "task \"a\": unknown op \"frobnicate\"\n\
             task \"b\": op `sub` takes 2 arguments, got 3\n\
             task \"d\": `retries` must be an integer >= 0, got -1\n\
             task \"c\" depends on missing key \"zz\""
        );
    }

    #[test]
    fn cycle_is_reported_with_its_keys() {
        let e = err(r#"{"version": 1, "tasks": {
                "a": {"op": "identity", "args": [{"$ref": "b"}]},
                "b": {"op": "noop", "after": ["a"]}
            }}"#);
        assert_eq!(e, "dependency cycle: \"a\" -> \"b\" -> \"a\"");
    }

    #[test]
    fn unknown_output_is_reported() {
        let e = err(r#"{"version": 1, "tasks": {"a": {"op": "noop"}}, "outputs": ["a", "b"]}"#);
        assert_eq!(e, "unknown output key \"b\"");
    }

    #[test]
    fn ref_objects_must_be_alone_and_integers_must_fit() {
        assert!(
            err(r#"{"version": 1, "tasks": {"a": {"op": "noop", "args": [{"$ref": "a", "x": 1}]}}}"#)
                .contains("must have no other field")
        );
        assert!(
            err(r#"{"version": 1, "tasks": {"a": {"op": "noop", "args": [18446744073709551615]}}}"#)
                .contains("does not fit in a signed 64-bit integer")
        );
    }

    #[test]
    fn bad_annotations_are_reported() {
        let e = err(
            r#"{"version": 1, "tasks": {"a": {"op": "noop", "resources": {"GPU": 0}}, "b": {"op": "noop", "timeout_s": -1}}}"#,
        );
        assert_eq!(
            e,
            "task \"a\": resource \"GPU\" must be a number > 0, got 0\ntask \"b\": `timeout_s` must be a number > 0, got -1"
        );
    }

    #[test]
    fn duplicate_task_keys_in_the_file_are_reported() {
        let e = err(r#"{"version": 1, "tasks": {"a": {"op": "noop"}, "a": {"op": "noop"}}}"#);
        assert_eq!(e, "duplicate task key \"a\"");
    }
}
