//! Wire forms of values, task specs and task errors, and their conversion to and from the core
//! types. Conversion happens here, at the boundary; no core crate sees these types.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rask_graph::{Annotations, Arg, Body, FailureKind, Graph, Key, TaskError, TaskId, Value};
use serde::{Deserialize, Serialize};

use crate::ProtocolError;

/// Binary values at least this large travel as out-of-band blobs (no copy); smaller ones inline.
pub const BLOB_THRESHOLD: usize = 4096;

/// A [`Value`] on the wire.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum WireValue {
    /// `null`.
    Null,
    /// A boolean.
    Bool(bool),
    /// An integer.
    Int(i64),
    /// A float.
    Float(f64),
    /// A string.
    Str(String),
    /// Small binary data, inline.
    Bytes(Bytes),
    /// Large binary data: index into the frame's blobs.
    Blob(u32),
    /// A list.
    List(#[serde(deserialize_with = "nested")] Vec<WireValue>),
    /// An object (sorted by key).
    Map(#[serde(deserialize_with = "nested")] Vec<(String, WireValue)>),
}

/// Deepest nesting of lists and objects accepted on the wire. Decoding recurses once per level,
/// so without a bound a small frame of deeply nested lists would overflow the stack and abort
/// the process; with it, such a frame is a decoding error that closes one connection.
pub const MAX_NESTING: u32 = 256;

thread_local! {
    static DEPTH: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// Deserializes a nested container, failing past [`MAX_NESTING`] levels.
fn nested<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    let depth = DEPTH.with(|c| {
        let v = c.get() + 1;
        c.set(v);
        v
    });
    let result = if depth > MAX_NESTING {
        Err(serde::de::Error::custom(format_args!("values nested deeper than {MAX_NESTING} levels")))
    } else {
        T::deserialize(d)
    };
    DEPTH.with(|c| c.set(c.get() - 1));
    result
}

/// Most elements a sequence is pre-sized for from its announced length. Reserving is virtual
/// memory only (pages are touched as elements arrive), so a peer announcing a huge length costs
/// address space, not memory, and this bound keeps even that modest.
const MAX_PRESIZE: usize = 1 << 22;

/// Deserializes a long sequence (a graph's tasks) into a vector sized from the announced
/// length, instead of serde's default of at most 1 MiB up front and doubling from there, which
/// copies a million-task submission several times and touches twice its memory.
pub(crate) fn presized<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    struct V<T>(std::marker::PhantomData<T>);
    impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for V<T> {
        type Value = Vec<T>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a sequence")
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
            let mut v = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(MAX_PRESIZE));
            while let Some(x) = seq.next_element()? {
                v.push(x);
            }
            Ok(v)
        }
    }
    d.deserialize_seq(V(std::marker::PhantomData))
}

/// A value as one self-contained byte string (for spilling to disk): a length-prefixed
/// postcard header, then its binary parts, as on the wire.
///
/// # Errors
/// If the value cannot be encoded.
pub fn value_to_bytes(v: &Value) -> Result<Vec<u8>, ProtocolError> {
    let mut blobs = Vec::new();
    let wire = value_to_wire(v, &mut blobs);
    let lens: Vec<u64> = blobs.iter().map(|b| b.len() as u64).collect();
    let mut out = vec![0u8; 4];
    out =
        postcard::to_extend(&(wire, lens), out).map_err(|e| ProtocolError::Malformed(format!("cannot encode: {e}")))?;
    let hlen = u32::try_from(out.len() - 4).map_err(|_| ProtocolError::Malformed("header too large".into()))?;
    out[..4].copy_from_slice(&hlen.to_be_bytes());
    for b in &blobs {
        out.extend_from_slice(b);
    }
    Ok(out)
}

/// Reads back a value written by [`value_to_bytes`]; binary parts share `bytes` (no copy).
///
/// # Errors
/// If the bytes are not such a value (truncated, corrupted).
pub fn value_from_bytes(mut bytes: Bytes) -> Result<Value, ProtocolError> {
    let bad = |what: &str| ProtocolError::Malformed(format!("stored value: {what}"));
    if bytes.len() < 4 {
        return Err(bad("too short"));
    }
    let hlen = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize;
    let _ = bytes.split_to(4);
    if bytes.len() < hlen {
        return Err(bad("truncated header"));
    }
    let header = bytes.split_to(hlen);
    let (wire, lens): (WireValue, Vec<u64>) = postcard::from_bytes(&header).map_err(|e| bad(&e.to_string()))?;
    let blobs = crate::frame::split_blobs(&mut bytes, &lens).map_err(bad)?;
    value_from_wire(wire, &blobs)
}

/// Converts a value, moving large binary parts into `blobs` (zero-copy: `Bytes` clones).
#[must_use]
pub fn value_to_wire(v: &Value, blobs: &mut Vec<Bytes>) -> WireValue {
    match v {
        Value::Null => WireValue::Null,
        Value::Bool(b) => WireValue::Bool(*b),
        Value::Int(i) => WireValue::Int(*i),
        Value::Float(f) => WireValue::Float(*f),
        Value::Str(s) => WireValue::Str(s.to_string()),
        Value::Bytes(b) if b.len() >= BLOB_THRESHOLD => {
            blobs.push(b.clone());
            WireValue::Blob(blobs.len() as u32 - 1)
        }
        Value::Bytes(b) => WireValue::Bytes(b.clone()),
        Value::List(items) => WireValue::List(items.iter().map(|v| value_to_wire(v, blobs)).collect()),
        Value::Map(m) => WireValue::Map(m.iter().map(|(k, v)| (k.clone(), value_to_wire(v, blobs))).collect()),
    }
}

/// Converts back, taking blobs from the frame (zero-copy).
///
/// # Errors
/// When a blob index is out of range.
pub fn value_from_wire(w: WireValue, blobs: &[Bytes]) -> Result<Value, ProtocolError> {
    Ok(match w {
        WireValue::Null => Value::Null,
        WireValue::Bool(b) => Value::Bool(b),
        WireValue::Int(i) => Value::Int(i),
        WireValue::Float(f) => Value::Float(f),
        WireValue::Str(s) => Value::from(s),
        WireValue::Bytes(b) => Value::Bytes(b),
        WireValue::Blob(i) => Value::Bytes(
            blobs.get(i as usize).cloned().ok_or_else(|| ProtocolError::Malformed(format!("blob {i} missing")))?,
        ),
        WireValue::List(items) => {
            Value::list(items.into_iter().map(|v| value_from_wire(v, blobs)).collect::<Result<_, _>>()?)
        }
        WireValue::Map(entries) => Value::Map(Arc::new(
            entries
                .into_iter()
                .map(|(k, v)| Ok((k, value_from_wire(v, blobs)?)))
                .collect::<Result<BTreeMap<_, _>, ProtocolError>>()?,
        )),
    })
}

/// An argument tree on the wire; references are by key.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum WireArg {
    /// A literal (binary data inline).
    Lit(WireValue),
    /// The value of the task with this key.
    Ref(Key),
    /// Inside a fused chain: the value of an earlier link.
    Link(u32),
    /// A list with references inside.
    List(#[serde(deserialize_with = "nested")] Vec<WireArg>),
    /// An object with references inside.
    Map(#[serde(deserialize_with = "nested")] Vec<(String, WireArg)>),
}

/// One call: op name and arguments.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WireCall {
    /// Op name, resolved by the worker's registry.
    pub op: String,
    /// Arguments.
    pub args: Vec<WireArg>,
}

/// What a task runs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum WireBody {
    /// One call.
    Call(WireCall),
    /// A fused chain of (link key, call).
    Chain(Vec<(Key, WireCall)>),
}

/// What a task runs, as it travels from the client through the scheduler to a worker: encoded
/// once (a [`WireBody`] in postcard, sent as a byte string), kept and forwarded by the
/// scheduler without being decoded, and decoded by the worker that runs it.
///
/// The scheduler needs a task's key, inputs and annotations, never its function and arguments;
/// decoding those cost it several allocations per task (the function's name, the argument list,
/// each argument's key), as many frees when the task was forgotten, and an encoding per
/// dispatch. Now a body costs it one allocation, and a copy of its bytes to dispatch it. A
/// body that does not decode fails its task only (see [`TaskBody::decode`]), not the message
/// that carried it.
#[derive(Clone, Debug)]
pub enum TaskBody {
    /// Built by this process (a client's submission, a test), encoded when sent.
    Plain(Arc<WireBody>),
    /// As received: the encoded bytes.
    Encoded(Arc<[u8]>),
}

impl TaskBody {
    /// The body, decoding it if it came encoded.
    ///
    /// # Errors
    /// [`ProtocolError::BadBody`] when the bytes are not exactly one postcard-encoded
    /// [`WireBody`] (bytes left over count as garbage too).
    pub fn decode(&self) -> Result<Arc<WireBody>, ProtocolError> {
        match self {
            TaskBody::Plain(b) => Ok(Arc::clone(b)),
            TaskBody::Encoded(bytes) => match postcard::take_from_bytes::<WireBody>(bytes) {
                Ok((body, [])) => Ok(Arc::new(body)),
                Ok((_, rest)) => Err(ProtocolError::BadBody(format!("{} bytes follow the call", rest.len()))),
                Err(e) => Err(ProtocolError::BadBody(e.to_string())),
            },
        }
    }
}

impl From<WireBody> for TaskBody {
    fn from(b: WireBody) -> Self {
        TaskBody::Plain(Arc::new(b))
    }
}

/// Two plain bodies compare as calls; otherwise, equal when they encode to the same bytes.
impl PartialEq for TaskBody {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (TaskBody::Plain(a), TaskBody::Plain(b)) => a == b,
            (TaskBody::Encoded(a), TaskBody::Encoded(b)) => a == b,
            (TaskBody::Plain(p), TaskBody::Encoded(e)) | (TaskBody::Encoded(e), TaskBody::Plain(p)) => {
                postcard::to_allocvec(&**p).is_ok_and(|v| *v == **e)
            }
        }
    }
}

/// The encoding buffer of [`TaskBody`] is kept for the next body up to this size.
const BODY_SCRATCH_KEPT: usize = 64 << 10;

thread_local! {
    /// Reused to encode plain bodies (one per task of a submission) without an allocation each.
    static BODY_SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl Serialize for TaskBody {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            TaskBody::Encoded(bytes) => s.serialize_bytes(bytes),
            TaskBody::Plain(body) => BODY_SCRATCH.with(|scratch| {
                // Taken out of the cell while in use, so no borrow is held across the
                // serializer (and a body serialized within a body would just allocate).
                let mut buf = scratch.take();
                buf.clear();
                let result = match postcard::to_extend(&**body, buf) {
                    Ok(b) => {
                        let r = s.serialize_bytes(&b);
                        buf = b;
                        r
                    }
                    Err(e) => return Err(serde::ser::Error::custom(format_args!("cannot encode a task body: {e}"))),
                };
                // A body with large literals is not worth keeping the room for.
                if buf.capacity() <= BODY_SCRATCH_KEPT {
                    scratch.replace(buf);
                }
                result
            }),
        }
    }
}

impl<'de> Deserialize<'de> for TaskBody {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = TaskBody;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an encoded task body (bytes)")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<TaskBody, E> {
                Ok(TaskBody::Encoded(Arc::from(v)))
            }
        }
        d.deserialize_bytes(V)
    }
}

/// Scheduling annotations on the wire.
#[derive(Clone, Debug, PartialEq, Default, Serialize, Deserialize)]
pub struct WireAnnotations {
    /// Higher runs first.
    pub priority: i64,
    /// Re-runs after a failed attempt (done by the worker).
    pub retries: u32,
    /// Resources held while running.
    pub resources: Vec<(String, f64)>,
    /// Restrict to these worker names or addresses.
    pub workers: Vec<String>,
    /// Fall back to any worker.
    pub allow_other_workers: bool,
    /// Per-attempt time limit in microseconds.
    pub timeout_us: Option<u64>,
}

/// An input of a submitted task.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum WireDep {
    /// A task named by its key (submitted earlier, or anywhere in this message).
    Key(Key),
    /// The task at this position in the same message's task list: a varint instead of a key
    /// to encode, decode and look up, for every edge inside a submitted graph (or part).
    Position(u32),
}

/// Names one assignment of a task to a worker, which echoes it when the task finishes so the
/// scheduler finds the task without hashing its key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireTicket {
    /// The task's slot in the scheduler.
    pub slot: u32,
    /// The task's serial number (tells a reused slot apart).
    pub serial: u64,
}

/// A task as a client submits it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WireTask {
    /// Unique key.
    pub key: Key,
    /// The tasks it needs (data and ordering), in argument order, each once.
    pub deps: Vec<WireDep>,
    /// What to run.
    pub body: TaskBody,
    /// Non-default annotations (boxed: most tasks have none, and a million-task submission
    /// should not carry 80 empty bytes per task in memory).
    pub annotations: Option<Box<WireAnnotations>>,
    /// Position in the graph's memory-friendly order (lower first), from `rask_graph::order`.
    pub order: u32,
    /// The client holds a future for this task (instead of repeating its key in the
    /// submission's wanted list).
    pub wanted: bool,
}

/// A task failure on the wire.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WireError {
    /// Root key.
    pub key: Key,
    /// Message.
    pub message: String,
    /// Cause.
    pub kind: WireFailure,
    /// Attempts made.
    pub attempts: u32,
}

/// [`FailureKind`] on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum WireFailure {
    /// Op error.
    Error,
    /// Panic.
    Panic,
    /// Timeout.
    Timeout,
    /// Unknown op.
    UnknownOp,
    /// Could not be scheduled.
    Unrunnable,
    /// Workers kept dying while running it.
    KilledWorker,
}

impl From<&TaskError> for WireError {
    fn from(e: &TaskError) -> Self {
        let kind = match e.kind {
            FailureKind::Error => WireFailure::Error,
            FailureKind::Panic => WireFailure::Panic,
            FailureKind::Timeout => WireFailure::Timeout,
            FailureKind::UnknownOp => WireFailure::UnknownOp,
            FailureKind::Unrunnable => WireFailure::Unrunnable,
            FailureKind::KilledWorker => WireFailure::KilledWorker,
        };
        WireError { key: e.key.clone(), message: e.message.clone(), kind, attempts: e.attempts }
    }
}

impl From<WireError> for TaskError {
    fn from(e: WireError) -> Self {
        let kind = match e.kind {
            WireFailure::Error => FailureKind::Error,
            WireFailure::Panic => FailureKind::Panic,
            WireFailure::Timeout => FailureKind::Timeout,
            WireFailure::UnknownOp => FailureKind::UnknownOp,
            WireFailure::Unrunnable => FailureKind::Unrunnable,
            WireFailure::KilledWorker => FailureKind::KilledWorker,
        };
        TaskError { key: e.key, message: e.message, kind, attempts: e.attempts }
    }
}

fn arg_to_wire(g: &Graph, a: &Arg) -> WireArg {
    match a {
        Arg::Lit(v) => WireArg::Lit(inline(v)),
        Arg::Ref(t) => WireArg::Ref(g.key(*t).clone()),
        Arg::Link(i) => WireArg::Link(*i),
        Arg::List(items) => WireArg::List(items.iter().map(|a| arg_to_wire(g, a)).collect()),
        Arg::Map(e) => WireArg::Map(e.iter().map(|(k, a)| (k.clone(), arg_to_wire(g, a))).collect()),
    }
}

/// A value with all binary data inline (task specs carry no blobs).
fn inline(v: &Value) -> WireValue {
    match v {
        Value::Bytes(b) => WireValue::Bytes(b.clone()),
        Value::List(items) => WireValue::List(items.iter().map(inline).collect()),
        Value::Map(m) => WireValue::Map(m.iter().map(|(k, v)| (k.clone(), inline(v))).collect()),
        other => value_to_wire(other, &mut Vec::new()),
    }
}

/// Converts a graph's tasks to their wire form; `rank` is each task's order position.
#[must_use]
pub fn graph_to_wire(g: &Graph, rank: &[u32]) -> Vec<WireTask> {
    tasks_to_wire(g, rank, g.ids(), &[])
}

/// Where each task of a message sits in it, by task id (`u32::MAX`: not in it), for naming
/// inputs by position.
fn positions(g: &Graph, ids: &[TaskId]) -> Vec<u32> {
    let mut at = vec![u32::MAX; g.len()];
    for (i, t) in ids.iter().enumerate() {
        at[t.idx()] = i as u32;
    }
    at
}

/// Converts some of a graph's tasks to their wire form (one part of a submission sent in
/// parts, or one message); `rank` is each task's order position in the whole graph, `wanted`
/// (by task id; may be shorter) flags the tasks the client holds futures for. Inputs among
/// the converted tasks are named by their position in the returned list, others by key.
pub fn tasks_to_wire(g: &Graph, rank: &[u32], ids: impl Iterator<Item = TaskId>, wanted: &[bool]) -> Vec<WireTask> {
    let ids: Vec<TaskId> = ids.collect();
    let at = positions(g, &ids);
    ids.into_iter()
        .map(|t: TaskId| {
            let task = g.task(t);
            let call = |c: &rask_graph::Call| WireCall {
                op: g.op_name(c.op).to_owned(),
                args: c.args.iter().map(|a| arg_to_wire(g, a)).collect(),
            };
            let body = match &task.body {
                Body::Call(c) => WireBody::Call(call(c)),
                Body::Chain(links) => WireBody::Chain(links.iter().map(|l| (l.key.clone(), call(&l.call))).collect()),
            }
            .into();
            let annotations = task.annotations.as_deref().map(|a| Box::new(annotations_to_wire(a)));
            WireTask {
                key: g.key(t).clone(),
                deps: g
                    .deps(t)
                    .iter()
                    .map(|d| match at[d.idx()] {
                        u32::MAX => WireDep::Key(g.key(*d).clone()),
                        i => WireDep::Position(i),
                    })
                    .collect(),
                body,
                annotations,
                order: rank.get(t.idx()).copied().unwrap_or(0),
                wanted: wanted.get(t.idx()).copied().unwrap_or(false),
            }
        })
        .collect()
}

/// Annotations to their wire form.
#[must_use]
pub fn annotations_to_wire(a: &Annotations) -> WireAnnotations {
    WireAnnotations {
        priority: a.priority,
        retries: a.retries,
        resources: a.resources.iter().map(|(n, v)| (n.to_string(), *v)).collect(),
        workers: a.workers.iter().map(ToString::to_string).collect(),
        allow_other_workers: a.allow_other_workers,
        timeout_us: a.timeout.map(|d| d.as_micros().min(u128::from(u64::MAX)) as u64),
    }
}

impl WireAnnotations {
    /// The per-attempt time limit.
    #[must_use]
    pub fn timeout(&self) -> Option<Duration> {
        self.timeout_us.map(Duration::from_micros)
    }
}

/// Resolves an argument tree against values looked up by key (`link` for fused chains).
///
/// # Errors
/// When a referenced key has no value (a scheduler bug or a lost input).
pub fn resolve_arg(
    a: &WireArg,
    lookup: &impl Fn(&str) -> Option<Value>,
    links: &[Value],
) -> Result<Value, ProtocolError> {
    Ok(match a {
        WireArg::Lit(v) => value_from_wire(v.clone(), &[])?,
        WireArg::Ref(k) => {
            lookup(k.as_str()).ok_or_else(|| ProtocolError::Malformed(format!("input {k:?} is not available")))?
        }
        WireArg::Link(i) => links.get(*i as usize).cloned().unwrap_or_default(),
        WireArg::List(items) => {
            Value::list(items.iter().map(|a| resolve_arg(a, lookup, links)).collect::<Result<_, _>>()?)
        }
        WireArg::Map(e) => Value::Map(Arc::new(
            e.iter()
                .map(|(k, a)| Ok((k.clone(), resolve_arg(a, lookup, links)?)))
                .collect::<Result<BTreeMap<_, _>, ProtocolError>>()?,
        )),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_body(i: i64) -> WireBody {
        WireBody::Chain(vec![
            (Key::new("a"), WireCall { op: "add".into(), args: vec![WireArg::Ref(Key::new("x")), WireArg::Link(0)] }),
            (
                Key::new("b"),
                WireCall {
                    op: "concat".into(),
                    args: vec![WireArg::List(vec![WireArg::Lit(WireValue::Int(i)), WireArg::Lit(WireValue::Null)])],
                },
            ),
        ])
    }

    #[test]
    fn a_body_reaches_the_worker_as_the_client_built_it_and_the_scheduler_forwards_its_bytes() {
        let tasks: Vec<TaskBody> = (0..3).map(|i| sample_body(i).into()).collect();
        // Client → scheduler: what arrives is the encoded bytes, never decoded.
        let sent = postcard::to_allocvec(&tasks).expect("encodes");
        let received: Vec<TaskBody> = postcard::from_bytes(&sent).expect("decodes");
        assert!(received.iter().all(|b| matches!(b, TaskBody::Encoded(_))));
        // Scheduler → worker: forwarding sends exactly the bytes the client sent.
        assert_eq!(postcard::to_allocvec(&received).expect("encodes"), sent);
        for (i, b) in received.iter().enumerate() {
            assert_eq!(*b.decode().expect("a valid body decodes"), sample_body(i as i64));
            assert_eq!(*b, tasks[i], "equal across forms when the bytes match");
            assert_ne!(*b, tasks[(i + 1) % 3]);
        }
    }

    #[test]
    fn a_body_that_does_not_decode_fails_alone_and_says_so() {
        // The enclosing message decodes (the body is a well-formed byte string)...
        let junk = TaskBody::Encoded(Arc::from(&[0xff_u8, 0xff, 0xff, 0x07][..]));
        let sent = postcard::to_allocvec(&vec![junk, sample_body(1).into()]).expect("encodes");
        let received: Vec<TaskBody> = postcard::from_bytes(&sent).expect("decodes");
        // ...and only decoding that one body fails, with a message naming what it was.
        let err = received[0].decode().expect_err("junk is not a body");
        assert!(matches!(err, ProtocolError::BadBody(_)), "{err}");
        // Nor is a body with bytes after it.
        let mut trailing = postcard::to_allocvec(&sample_body(2)).expect("encodes");
        trailing.push(0);
        let err = TaskBody::Encoded(Arc::from(trailing)).decode().expect_err("garbage after a body");
        assert_eq!(err.to_string(), "its body is not an encoded function call (1 bytes follow the call)");
        assert_eq!(*received[1].decode().expect("decodes"), sample_body(1));
    }

    #[test]
    fn deeply_nested_values_are_refused_not_a_stack_overflow() {
        // Hand-made postcard for 1,000,000 nested one-element lists: variant 7 (List), length 1,
        // repeated. Cheap to send; decoding it without a bound would overflow the stack.
        let list = 7u8; // index of `List` in `WireValue`
        let mut bytes = Vec::new();
        for _ in 0..1_000_000 {
            bytes.push(list);
            bytes.push(1);
        }
        bytes.push(0); // innermost: Null
        let r: Result<WireValue, _> = postcard::from_bytes(&bytes);
        assert!(r.is_err());
        // Moderate nesting still works.
        let mut v = WireValue::Null;
        for _ in 0..100 {
            v = WireValue::List(vec![v]);
        }
        let enc = postcard::to_stdvec(&v).expect("encode");
        assert_eq!(postcard::from_bytes::<WireValue>(&enc).expect("decode"), v);
    }

    #[test]
    fn values_round_trip_with_large_bytes_as_blobs() {
        let big = Bytes::from(vec![1u8; 10_000]);
        let v = Value::list(vec![
            Value::Int(1),
            Value::Bytes(big.clone()),
            Value::Bytes(Bytes::from_static(b"small")),
            Value::str("s"),
            Value::Float(1.5),
        ]);
        let mut blobs = Vec::new();
        let w = value_to_wire(&v, &mut blobs);
        assert_eq!(blobs.len(), 1);
        assert_eq!(blobs[0].as_ptr(), big.as_ptr(), "no copy");
        let encoded = postcard::to_stdvec(&w).expect("encode");
        let decoded: WireValue = postcard::from_bytes(&encoded).expect("decode");
        assert_eq!(value_from_wire(decoded, &blobs).expect("blobs present"), v);
        assert!(value_from_wire(WireValue::Blob(5), &blobs).is_err());
    }

    #[test]
    fn values_round_trip_through_their_stored_form() {
        let big = Value::Bytes(Bytes::from(vec![9u8; 100_000]));
        let v = Value::list(vec![Value::Int(3), Value::str("x"), big, Value::Float(1.5)]);
        let stored = value_to_bytes(&v).expect("encodes");
        assert_eq!(value_from_bytes(Bytes::from(stored.clone())).expect("decodes"), v);
        assert!(value_from_bytes(Bytes::from(stored[..stored.len() - 1].to_vec())).is_err(), "truncated");
    }
}
