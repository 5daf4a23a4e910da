//! The builtin ops of the workflow format (`../shared/spec/workflow.md` in the repository that
//! defines it). Each op has a [`Sig`]: its arity and the kind of each argument. The same
//! signature serves twice: before anything runs, literal arguments are checked against it (a
//! validation error); at run time, actual values are (a task error). Both name the op and the
//! argument.

use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use rask_graph::{ArgSpec, Value};

use crate::{OpEntry, OpError, OpFn, Registry, TaskCtx};

/// What an argument position accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Any,
    Number,
    Int,
    NonNegInt,
    NonNegNumber,
    NumList,
    NonEmptyNumList,
    List,
    Sized,
    Concat,
    Bytes,
    Argv,
    ShellOptions,
}

impl Kind {
    fn describe(self) -> &'static str {
        match self {
            Kind::Any => "any value",
            Kind::Number => "a number",
            Kind::Int => "an integer",
            Kind::NonNegInt => "a non-negative integer",
            Kind::NonNegNumber => "a non-negative number",
            Kind::NumList => "a list of numbers",
            Kind::NonEmptyNumList => "a non-empty list of numbers",
            Kind::List => "a list",
            Kind::Sized => "a list, string, object or bytes",
            Kind::Concat => "a list, string or bytes",
            Kind::Bytes => "bytes",
            Kind::Argv => "a non-empty list of strings",
            Kind::ShellOptions => "an object with optional fields stdin, env, cwd",
        }
    }

    /// Checks a value; `Err` carries what was found instead.
    fn check(self, v: &Value) -> Result<(), String> {
        let bad = || Err(v.kind().to_owned());
        match (self, v) {
            (Kind::Any, _) => Ok(()),
            (Kind::Number, Value::Int(_) | Value::Float(_)) => Ok(()),
            (Kind::Int, Value::Int(_)) => Ok(()),
            (Kind::NonNegInt, Value::Int(i)) if *i >= 0 => Ok(()),
            (Kind::NonNegInt, Value::Int(i)) => Err(format!("{i}")),
            (Kind::NonNegNumber, Value::Int(i)) if *i >= 0 => Ok(()),
            (Kind::NonNegNumber, Value::Float(f)) if *f >= 0.0 => Ok(()),
            (Kind::NonNegNumber, Value::Int(_) | Value::Float(_)) => Err(v.to_string()),
            (Kind::NumList | Kind::NonEmptyNumList, Value::List(items)) => {
                if self == Kind::NonEmptyNumList && items.is_empty() {
                    return Err("an empty list".into());
                }
                match items.iter().position(|x| !matches!(x, Value::Int(_) | Value::Float(_))) {
                    Some(i) => Err(format!("a list whose element {i} is {}", items[i].kind())),
                    None => Ok(()),
                }
            }
            (Kind::List, Value::List(_)) => Ok(()),
            (Kind::Sized, Value::List(_) | Value::Str(_) | Value::Map(_) | Value::Bytes(_)) => Ok(()),
            (Kind::Concat, Value::List(_) | Value::Str(_) | Value::Bytes(_)) => Ok(()),
            (Kind::Bytes, Value::Bytes(_)) => Ok(()),
            (Kind::Argv, Value::List(items)) => {
                if items.is_empty() {
                    return Err("an empty list".into());
                }
                match items.iter().position(|x| !matches!(x, Value::Str(_))) {
                    Some(i) => Err(format!("a list whose element {i} is {}", items[i].kind())),
                    None => Ok(()),
                }
            }
            (Kind::ShellOptions, Value::Map(m)) => {
                for (k, v) in m.iter() {
                    let ok = match k.as_str() {
                        "stdin" => matches!(v, Value::Str(_) | Value::Bytes(_)),
                        "cwd" => matches!(v, Value::Str(_)),
                        "env" => match v {
                            Value::Map(env) => env.values().all(|x| matches!(x, Value::Str(_))),
                            _ => false,
                        },
                        other => return Err(format!("an object with unknown field {other:?}")),
                    };
                    if !ok {
                        return Err(format!("an object whose field {k:?} is {}", v.kind()));
                    }
                }
                Ok(())
            }
            _ => bad(),
        }
    }

    /// Checks an unresolved argument: literals fully, containers with references as far as
    /// their literal parts go. References themselves are only known at run time.
    fn check_spec(self, a: &ArgSpec) -> Result<(), String> {
        match a {
            ArgSpec::Ref(_) => Ok(()),
            ArgSpec::Lit(v) => self.check(v),
            ArgSpec::List(items) => match self {
                Kind::Any | Kind::List | Kind::Sized | Kind::Concat => Ok(()),
                Kind::NumList | Kind::NonEmptyNumList | Kind::Argv => {
                    let elem = if self == Kind::Argv { "string" } else { "number" };
                    for (i, item) in items.iter().enumerate() {
                        if let ArgSpec::Lit(v) = item {
                            let ok = match v {
                                Value::Str(_) => elem == "string",
                                Value::Int(_) | Value::Float(_) => elem == "number",
                                _ => false,
                            };
                            if !ok {
                                return Err(format!("a list whose element {i} is {}", v.kind()));
                            }
                        } else if !matches!(item, ArgSpec::Ref(_)) {
                            return Err(format!("a list whose element {i} is a container"));
                        }
                    }
                    Ok(())
                }
                _ => Err("list".into()),
            },
            ArgSpec::Map(entries) => match self {
                Kind::Any | Kind::Sized => Ok(()),
                Kind::ShellOptions => {
                    for (k, _) in entries {
                        if !matches!(k.as_str(), "stdin" | "env" | "cwd") {
                            return Err(format!("an object with unknown field {k:?}"));
                        }
                    }
                    Ok(())
                }
                _ => Err("object".into()),
            },
        }
    }
}

/// Arity and argument kinds of a builtin.
pub(crate) struct Sig {
    min: usize,
    max: Option<usize>,
    kinds: &'static [Kind],
    rest: Kind,
}

impl Sig {
    fn kind(&self, i: usize) -> Kind {
        self.kinds.get(i).copied().unwrap_or(self.rest)
    }

    fn arity_error(&self, op: &str, got: usize) -> Option<String> {
        let plural = |n: usize| if n == 1 { "argument" } else { "arguments" };
        match self.max {
            Some(max) if max == self.min && got != max => {
                Some(format!("op `{op}` takes {max} {}, got {got}", plural(max)))
            }
            Some(max) if got < self.min || got > max => {
                Some(format!("op `{op}` takes {} to {max} arguments, got {got}", self.min))
            }
            None if got < self.min => {
                Some(format!("op `{op}` takes at least {} {}, got {got}", self.min, plural(self.min)))
            }
            _ => None,
        }
    }

    fn check_values(&self, op: &str, args: &[Value]) -> Result<(), OpError> {
        if let Some(e) = self.arity_error(op, args.len()) {
            return Err(OpError(e));
        }
        for (i, v) in args.iter().enumerate() {
            let kind = self.kind(i);
            kind.check(v).map_err(|got| {
                OpError(format!("op `{op}`: argument {} must be {}, got {got}", i + 1, kind.describe()))
            })?;
        }
        Ok(())
    }
}

fn sig(op: &str) -> Option<Sig> {
    use Kind::*;
    let s = |min, max, kinds, rest| Sig { min, max, kinds, rest };
    Some(match op {
        "identity" => s(1, Some(1), &[Any], Any),
        "add" | "mul" => s(1, None, &[], Number),
        "sub" | "div" => s(2, Some(2), &[Number, Number], Any),
        "sum" => s(1, Some(1), &[NumList], Any),
        "min" | "max" => s(1, Some(1), &[NonEmptyNumList], Any),
        "len" => s(1, Some(1), &[Sized], Any),
        "concat" => s(1, None, &[], Concat),
        "range" => s(1, Some(1), &[NonNegInt], Any),
        "index" => s(2, Some(2), &[List, Int], Any),
        "noop" => s(0, None, &[], Any),
        "sleep" => s(1, None, &[NonNegNumber], Any),
        "fail" => s(1, Some(1), &[Any], Any),
        "bytes" => s(1, Some(2), &[NonNegInt, Int], Any),
        "nbytes" => s(1, Some(1), &[Bytes], Any),
        "shell" => s(1, Some(2), &[Argv, ShellOptions], Any),
        _ => return None,
    })
}

/// Validation of a builtin's literal arguments (the [`crate::ArgCheck`] of every builtin).
fn check_builtin(op: &str, args: &[ArgSpec]) -> Result<(), String> {
    let Some(sig) = sig(op) else { return Ok(()) };
    if let Some(e) = sig.arity_error(op, args.len()) {
        return Err(e);
    }
    for (i, a) in args.iter().enumerate() {
        let kind = sig.kind(i);
        kind.check_spec(a)
            .map_err(|got| format!("op `{op}`: argument {} must be {}, got {got}", i + 1, kind.describe()))?;
    }
    if op == "concat" {
        let kinds: Vec<&str> = args
            .iter()
            .filter_map(|a| match a {
                ArgSpec::Lit(v) => Some(v.kind()),
                ArgSpec::List(_) => Some("list"),
                _ => None,
            })
            .collect();
        if let Some(other) = kinds.iter().find(|k| **k != kinds[0]) {
            return Err(format!("op `concat`: arguments must all be of one kind, got {} and {other}", kinds[0]));
        }
    }
    Ok(())
}

type Body = fn(&TaskCtx<'_>, &[Value]) -> Result<Value, OpError>;

/// Builtins whose time follows the size of their arguments (see [`crate::OpEntry::quick`]).
/// Not `range` or `bytes` (an argument's value sets how much they make), `sleep`, `shell`.
const QUICK: &[&str] =
    &["identity", "add", "mul", "sub", "div", "sum", "min", "max", "len", "concat", "index", "noop", "fail", "nbytes"];

pub(crate) fn install(r: &mut Registry) {
    let ops: &[(&str, Body)] = &[
        ("identity", |_, a| Ok(a[0].clone())),
        ("add", |_, a| fold_numbers("add", a.iter(), Num::I(0), Num::add)),
        ("mul", |_, a| fold_numbers("mul", a.iter(), Num::I(1), Num::mul)),
        ("sub", |_, a| finite("sub", Num::of(&a[0]).sub(Num::of(&a[1])))),
        ("div", div),
        ("sum", |_, a| fold_numbers("sum", list(&a[0]).iter(), Num::I(0), Num::add)),
        ("min", |_, a| extreme(list(&a[0]), std::cmp::Ordering::Less)),
        ("max", |_, a| extreme(list(&a[0]), std::cmp::Ordering::Greater)),
        ("len", len),
        ("concat", concat),
        ("range", range),
        ("index", index),
        ("noop", |_, _| Ok(Value::Null)),
        ("sleep", |ctx, a| {
            let ms = match a[0] {
                Value::Int(i) => i as f64,
                Value::Float(f) => f,
                _ => 0.0,
            };
            ctx.sleep(Duration::from_secs_f64(ms / 1000.0))?;
            Ok(Value::Null)
        }),
        ("fail", |_, a| {
            Err(OpError(match &a[0] {
                Value::Str(s) => s.to_string(),
                v => v.to_string(),
            }))
        }),
        ("bytes", make_bytes),
        ("nbytes", |_, a| match &a[0] {
            Value::Bytes(b) => Ok(Value::Int(b.len() as i64)),
            _ => Ok(Value::Null),
        }),
        ("shell", crate::shell::shell),
    ];
    for (name, body) in ops {
        let name_owned: Arc<str> = Arc::from(*name);
        let body = *body;
        // Looked up once here, not on every call.
        let signature = sig(name);
        let func: OpFn = Arc::new(move |ctx: &TaskCtx<'_>, args: &[Value]| {
            if let Some(sig) = &signature {
                sig.check_values(&name_owned, args)?;
            }
            body(ctx, args)
        });
        // Names are distinct literals above.
        let _ = r.register_raw(name, OpEntry { func, check: Some(check_builtin), quick: QUICK.contains(name) });
    }
}

fn list(v: &Value) -> &[Value] {
    match v {
        Value::List(items) => items,
        _ => &[],
    }
}

/// A number during arithmetic: integers stay exact (checked), any float makes the result float.
#[derive(Clone, Copy, Debug)]
enum Num {
    I(i64),
    F(f64),
}

impl Num {
    fn of(v: &Value) -> Num {
        match v {
            Value::Int(i) => Num::I(*i),
            Value::Float(f) => Num::F(*f),
            _ => Num::F(f64::NAN),
        }
    }
    fn f(self) -> f64 {
        match self {
            Num::I(i) => i as f64,
            Num::F(f) => f,
        }
    }
    fn add(self, o: Num) -> Option<Num> {
        match (self, o) {
            (Num::I(a), Num::I(b)) => a.checked_add(b).map(Num::I),
            _ => Some(Num::F(self.f() + o.f())),
        }
    }
    fn sub(self, o: Num) -> Option<Num> {
        match (self, o) {
            (Num::I(a), Num::I(b)) => a.checked_sub(b).map(Num::I),
            _ => Some(Num::F(self.f() - o.f())),
        }
    }
    fn mul(self, o: Num) -> Option<Num> {
        match (self, o) {
            (Num::I(a), Num::I(b)) => a.checked_mul(b).map(Num::I),
            _ => Some(Num::F(self.f() * o.f())),
        }
    }
}

fn finite(op: &str, n: Option<Num>) -> Result<Value, OpError> {
    match n {
        None => Err(OpError(format!("op `{op}`: integer overflow"))),
        Some(Num::I(i)) => Ok(Value::Int(i)),
        Some(Num::F(f)) if f.is_finite() => Ok(Value::Float(f)),
        Some(Num::F(_)) => Err(OpError(format!("op `{op}`: result is not a finite number"))),
    }
}

fn fold_numbers<'a>(
    op: &str,
    items: impl Iterator<Item = &'a Value>,
    init: Num,
    f: fn(Num, Num) -> Option<Num>,
) -> Result<Value, OpError> {
    let mut acc = Some(init);
    for v in items {
        acc = acc.and_then(|a| f(a, Num::of(v)));
        if acc.is_none() {
            break;
        }
    }
    finite(op, acc)
}

fn div(_: &TaskCtx<'_>, a: &[Value]) -> Result<Value, OpError> {
    let (x, y) = (Num::of(&a[0]).f(), Num::of(&a[1]).f());
    if y == 0.0 {
        return Err(OpError("op `div`: division by zero".into()));
    }
    finite("div", Some(Num::F(x / y)))
}

fn extreme(items: &[Value], want: std::cmp::Ordering) -> Result<Value, OpError> {
    let mut best = &items[0];
    for v in &items[1..] {
        let ord = match (v, best) {
            (Value::Int(a), Value::Int(b)) => a.cmp(b),
            _ => Num::of(v).f().total_cmp(&Num::of(best).f()),
        };
        if ord == want {
            best = v;
        }
    }
    Ok(best.clone())
}

fn len(_: &TaskCtx<'_>, a: &[Value]) -> Result<Value, OpError> {
    let n = match &a[0] {
        Value::List(items) => items.len(),
        Value::Str(s) => s.chars().count(),
        Value::Map(m) => m.len(),
        Value::Bytes(b) => b.len(),
        _ => 0,
    };
    Ok(Value::Int(n as i64))
}

fn concat(_: &TaskCtx<'_>, a: &[Value]) -> Result<Value, OpError> {
    let first = a[0].kind();
    if let Some(i) = a.iter().position(|v| v.kind() != first) {
        return Err(OpError(format!(
            "op `concat`: argument {} must be {first} like argument 1, got {}",
            i + 1,
            a[i].kind()
        )));
    }
    Ok(match &a[0] {
        Value::List(_) => {
            let mut out = Vec::with_capacity(a.iter().map(|v| list(v).len()).sum());
            a.iter().for_each(|v| out.extend_from_slice(list(v)));
            Value::list(out)
        }
        Value::Str(_) => {
            let mut out = String::new();
            for v in a {
                if let Value::Str(s) = v {
                    out.push_str(s);
                }
            }
            Value::from(out)
        }
        Value::Bytes(_) => {
            let mut out = BytesMut::new();
            for v in a {
                if let Value::Bytes(b) = v {
                    out.put_slice(b);
                }
            }
            Value::Bytes(out.freeze())
        }
        _ => Value::Null,
    })
}

fn alloc_error(op: &str, n: i64) -> OpError {
    OpError(format!("op `{op}`: cannot allocate {n} elements"))
}

fn range(_: &TaskCtx<'_>, a: &[Value]) -> Result<Value, OpError> {
    let n = match a[0] {
        Value::Int(n) => n,
        _ => 0,
    };
    let mut out: Vec<Value> = Vec::new();
    out.try_reserve_exact(n as usize).map_err(|_| alloc_error("range", n))?;
    out.extend((0..n).map(Value::Int));
    Ok(Value::list(out))
}

fn index(_: &TaskCtx<'_>, a: &[Value]) -> Result<Value, OpError> {
    let items = list(&a[0]);
    let i = match a[1] {
        Value::Int(i) => i,
        _ => 0,
    };
    let len = items.len() as i64;
    let pos = if i < 0 { i + len } else { i };
    if pos < 0 || pos >= len {
        return Err(OpError(format!("op `index`: index {i} out of range for a list of length {len}")));
    }
    Ok(items[pos as usize].clone())
}

fn make_bytes(_: &TaskCtx<'_>, a: &[Value]) -> Result<Value, OpError> {
    let n = match a[0] {
        Value::Int(n) => n,
        _ => 0,
    };
    let seed = match a.get(1) {
        Some(Value::Int(s)) => s.rem_euclid(256) as u8,
        _ => 0,
    };
    let mut out: Vec<u8> = Vec::new();
    out.try_reserve_exact(n as usize).map_err(|_| alloc_error("bytes", n))?;
    // The pattern repeats every 256 bytes: build one period, then copy it.
    let period: Vec<u8> = (0..=255u8).map(|i| seed.wrapping_add(i)).collect();
    let mut left = n as usize;
    while left > 0 {
        let take = left.min(256);
        out.extend_from_slice(&period[..take]);
        left -= take;
    }
    Ok(Value::Bytes(Bytes::from(out)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rask_graph::Key;

    #[test]
    fn only_builtins_bounded_by_their_arguments_size_are_quick() {
        let r = Registry::with_builtins();
        for op in QUICK {
            assert!(r.contains(op) && r.is_quick(op), "{op}");
        }
        for op in ["sleep", "shell", "range", "bytes", "no-such-op"] {
            assert!(!r.is_quick(op), "{op}");
        }
        let mut mine = Registry::empty();
        mine.register("mine", |x: i64| x).expect("fresh");
        assert!(!mine.is_quick("mine"), "user functions promise nothing");
    }

    fn run(op: &str, args: Vec<Value>) -> Result<Value, OpError> {
        let r = Registry::with_builtins();
        let key = Key::new("k");
        let ctx = TaskCtx::new(&key, 1, None, None);
        (r.get(op).expect("builtin"))(&ctx, &args)
    }
    fn l(v: Vec<Value>) -> Value {
        Value::list(v)
    }
    use Value::{Float as F, Int as I};

    #[test]
    fn arithmetic_is_checked_and_floats_are_contagious() {
        assert_eq!(run("add", vec![I(20), I(22)]), Ok(I(42)));
        assert_eq!(run("add", vec![I(1), F(0.5)]), Ok(F(1.5)));
        assert_eq!(run("add", vec![I(i64::MAX), I(1)]), Err(OpError("op `add`: integer overflow".into())));
        assert_eq!(run("mul", vec![I(6), I(7)]), Ok(I(42)));
        assert_eq!(run("sub", vec![I(1), I(3)]), Ok(I(-2)));
        assert_eq!(run("div", vec![I(1), I(4)]), Ok(F(0.25)));
        assert_eq!(run("div", vec![I(1), I(0)]), Err(OpError("op `div`: division by zero".into())));
        assert!(run("mul", vec![F(1e300), F(1e300)]).is_err());
        assert_eq!(run("sum", vec![l(vec![])]), Ok(I(0)));
        assert_eq!(run("sum", vec![l(vec![I(1), F(1.5)])]), Ok(F(2.5)));
        assert_eq!(run("min", vec![l(vec![I(3), F(-1.5), I(2)])]), Ok(F(-1.5)));
        assert_eq!(run("max", vec![l(vec![I(3), F(-1.5), I(2)])]), Ok(I(3)));
    }

    #[test]
    fn wrong_argument_types_name_op_and_position() {
        assert_eq!(
            run("add", vec![I(1), Value::str("x")]),
            Err(OpError("op `add`: argument 2 must be a number, got string".into()))
        );
        assert_eq!(run("sub", vec![I(1)]), Err(OpError("op `sub` takes 2 arguments, got 1".into())));
        assert_eq!(run("add", vec![]), Err(OpError("op `add` takes at least 1 argument, got 0".into())));
        assert_eq!(
            run("sum", vec![l(vec![I(1), Value::Null])]),
            Err(OpError("op `sum`: argument 1 must be a list of numbers, got a list whose element 1 is null".into()))
        );
        assert_eq!(
            run("min", vec![l(vec![])]),
            Err(OpError("op `min`: argument 1 must be a non-empty list of numbers, got an empty list".into()))
        );
    }

    #[test]
    fn list_and_string_ops() {
        assert_eq!(run("len", vec![Value::str("héllo")]), Ok(I(5)));
        assert_eq!(run("range", vec![I(3)]), Ok(l(vec![I(0), I(1), I(2)])));
        assert_eq!(run("index", vec![l(vec![I(5), I(6)]), I(-1)]), Ok(I(6)));
        assert!(run("index", vec![l(vec![I(5)]), I(1)]).is_err());
        assert_eq!(run("concat", vec![Value::str("a"), Value::str("b")]), Ok(Value::str("ab")));
        assert_eq!(run("concat", vec![l(vec![I(1)]), l(vec![I(2)])]), Ok(l(vec![I(1), I(2)])));
        assert!(run("concat", vec![l(vec![I(1)]), Value::str("b")]).is_err());
        assert_eq!(run("noop", vec![I(1), I(2)]), Ok(Value::Null));
        assert_eq!(run("fail", vec![Value::str("boom")]), Err(OpError("boom".into())));
    }

    #[test]
    fn bytes_follow_the_seeded_pattern() {
        let Ok(Value::Bytes(b)) = run("bytes", vec![I(600), I(250)]) else { panic!("bytes") };
        assert_eq!(b.len(), 600);
        assert!(b.iter().enumerate().all(|(i, x)| usize::from(*x) == (250 + i) % 256));
        assert_eq!(run("nbytes", vec![Value::Bytes(b)]), Ok(I(600)));
        assert_eq!(run("len", vec![Value::Bytes(Bytes::from_static(b"xy"))]), Ok(I(2)));
    }

    #[test]
    fn literal_checks_catch_arity_and_types_before_running() {
        let lit = |v| ArgSpec::Lit(v);
        assert_eq!(check_builtin("sub", &[lit(I(1))]), Err("op `sub` takes 2 arguments, got 1".into()));
        assert_eq!(
            check_builtin("range", &[lit(Value::str("x"))]),
            Err("op `range`: argument 1 must be a non-negative integer, got string".into())
        );
        assert!(check_builtin("add", &[ArgSpec::Ref(Key::new("a")), lit(I(1))]).is_ok());
        assert!(check_builtin("shell", &[lit(l(vec![]))]).is_err());
        assert!(check_builtin("shell", &[lit(l(vec![Value::str("true")])), lit(I(1))]).is_err());
        assert!(check_builtin("concat", &[lit(Value::str("a")), lit(l(vec![]))]).is_err());
        assert!(check_builtin("sum", &[ArgSpec::List(vec![ArgSpec::Ref(Key::new("a")), lit(Value::Null)])]).is_err());
    }
}
