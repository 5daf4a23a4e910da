//! Values that flow between tasks, and the errors tasks produce.
//!
//! A [`Value`] is what a task returns and what its dependents receive. Every heap-allocated variant
//! is reference counted (`Arc` or [`Bytes`]), so handing a result to ten dependents costs ten
//! reference-count increments and never a copy: the scheduler can keep one result and share it.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use sha2::{Digest, Sha256};

use crate::Key;

/// A value produced or consumed by a task: the JSON data model plus binary blobs.
///
/// Cloning is cheap (at most one atomic increment), which is what lets schedulers share one result
/// among all of its dependents.
#[derive(Clone, Debug, PartialEq, Default)]
pub enum Value {
    /// JSON `null`; also what side-effect-only ops return.
    #[default]
    Null,
    /// A boolean.
    Bool(bool),
    /// A signed 64-bit integer. Arithmetic on it is checked: overflow is a task error.
    Int(i64),
    /// A 64-bit float.
    Float(f64),
    /// A UTF-8 string.
    Str(Arc<str>),
    /// A binary blob. Only ops produce these; JSON output shows their length and SHA-256.
    Bytes(Bytes),
    /// A list of values.
    List(Arc<Vec<Value>>),
    /// A JSON object. Keys are sorted, so equal objects print identically everywhere.
    Map(Arc<BTreeMap<String, Value>>),
}

impl Value {
    /// The name of this value's kind, as used in error messages ("expected a number, got string").
    #[must_use]
    pub fn kind(&self) -> &'static str {
        match self {
            Value::Null => "null",
            Value::Bool(_) => "bool",
            Value::Int(_) => "integer",
            Value::Float(_) => "float",
            Value::Str(_) => "string",
            Value::Bytes(_) => "bytes",
            Value::List(_) => "list",
            Value::Map(_) => "object",
        }
    }

    /// Builds a list value.
    #[must_use]
    pub fn list(items: Vec<Value>) -> Self {
        Value::List(Arc::new(items))
    }

    /// Builds a string value.
    #[must_use]
    pub fn str(s: &str) -> Self {
        Value::Str(Arc::from(s))
    }

    /// Converts to the JSON form `rask run --json` prints: bytes become
    /// `{"$bytes": LENGTH, "sha256": "HEX"}`, non-finite floats (which JSON cannot hold) become
    /// `null` — ops never produce them, see the README.
    #[must_use]
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::Value as J;
        match self {
            Value::Null => J::Null,
            Value::Bool(b) => J::Bool(*b),
            Value::Int(i) => J::from(*i),
            Value::Float(f) => serde_json::Number::from_f64(*f).map_or(J::Null, J::Number),
            Value::Str(s) => J::String(s.to_string()),
            Value::Bytes(b) => {
                let mut m = serde_json::Map::new();
                m.insert("$bytes".into(), J::from(b.len()));
                m.insert("sha256".into(), J::String(sha256_hex(b)));
                J::Object(m)
            }
            Value::List(items) => J::Array(items.iter().map(Value::to_json).collect()),
            Value::Map(m) => J::Object(m.iter().map(|(k, v)| (k.clone(), v.to_json())).collect()),
        }
    }

    /// Rough number of bytes this value keeps alive (for memory accounting and benchmarks).
    #[must_use]
    pub fn nbytes(&self) -> usize {
        let own = std::mem::size_of::<Value>();
        match self {
            Value::Str(s) => own + s.len(),
            Value::Bytes(b) => own + b.len(),
            Value::List(items) => own + items.iter().map(Value::nbytes).sum::<usize>(),
            Value::Map(m) => own + m.iter().map(|(k, v)| k.len() + v.nbytes()).sum::<usize>(),
            _ => own,
        }
    }
}

/// Lower-case hex SHA-256 of a byte string.
#[must_use]
pub fn sha256_hex(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

/// Lower-case hex encoding.
pub(crate) fn hex(data: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(data.len() * 2);
    for b in data {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 15)] as char);
    }
    s
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.to_json())
    }
}

impl From<i64> for Value {
    fn from(v: i64) -> Self {
        Value::Int(v)
    }
}
impl From<f64> for Value {
    fn from(v: f64) -> Self {
        Value::Float(v)
    }
}
impl From<bool> for Value {
    fn from(v: bool) -> Self {
        Value::Bool(v)
    }
}
impl From<&str> for Value {
    fn from(v: &str) -> Self {
        Value::str(v)
    }
}
impl From<String> for Value {
    fn from(v: String) -> Self {
        Value::Str(Arc::from(v))
    }
}
impl From<Bytes> for Value {
    fn from(v: Bytes) -> Self {
        Value::Bytes(v)
    }
}
impl From<Vec<Value>> for Value {
    fn from(v: Vec<Value>) -> Self {
        Value::list(v)
    }
}

/// Why a task attempt failed. Kept structured so clients and `rask run` can say what happened.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FailureKind {
    /// The op returned an error (bad argument, non-zero exit, `fail` op, ...).
    Error,
    /// The op panicked; the message is the panic payload.
    Panic,
    /// The attempt ran longer than the task's `timeout_s`.
    Timeout,
    /// The task names an op that the executing process does not know.
    UnknownOp,
    /// The executor could not run the task at all (e.g. no worker can satisfy its constraints).
    Unrunnable,
    /// Workers kept dying while running it (more often than the allowed failures): the task
    /// itself is the likely cause (Dask's `KilledWorker`). The message names the workers and
    /// why each was lost.
    KilledWorker,
}

/// A task's failure, shared (behind an `Arc`) by every dependent that inherits it.
///
/// `key` is the root cause: the task whose own attempt failed. Dependents that never ran carry the
/// same error, which is how `rask run` reports `{"$error": {"key": ROOT_KEY, ...}}`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("task {key} failed: {message}")]
pub struct TaskError {
    /// The task whose failure caused this error.
    pub key: Key,
    /// Human-readable description, naming the op and argument where relevant.
    pub message: String,
    /// Structured cause.
    pub kind: FailureKind,
    /// How many attempts were made (1 + retries used).
    pub attempts: u32,
}

/// What a task produced: a value, or the (shared) failure that prevented it.
pub type TaskResult = Result<Value, Arc<TaskError>>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_print_as_length_and_sha256() {
        let v = Value::Bytes(Bytes::from_static(b"abc"));
        assert_eq!(
            v.to_json().to_string(),
            r#"{"$bytes":3,"sha256":"ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"}"#
        );
    }

    #[test]
    fn cloning_a_list_shares_its_storage() {
        let v = Value::list(vec![Value::Int(1); 1000]);
        let w = v.clone();
        match (&v, &w) {
            (Value::List(a), Value::List(b)) => assert!(Arc::ptr_eq(a, b)),
            _ => unreachable!("both are lists"),
        }
    }
}
