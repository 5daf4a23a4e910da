//! Typed adapters: ordinary Rust closures become ops.
//!
//! `|a: i64, b: i64| a + b` registered under `"add2"` becomes an [`OpFn`] that checks its arity,
//! converts each [`Value`] argument with [`FromValue`] (an error names the function and the
//! argument), calls the closure, catches nothing (executors catch panics), and converts the
//! result with [`IntoOpResult`] — so a closure may return `T` or `Result<T, E>`.

use std::collections::BTreeMap;
use std::fmt::Display;
use std::sync::Arc;

use bytes::Bytes;
use rask_graph::Value;

use crate::{OpError, OpFn, TaskCtx};

/// A value could not be converted to the Rust type a function expects.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("expected {expected}, got {got}")]
pub struct TypeError {
    /// What was expected ("an integer").
    pub expected: &'static str,
    /// What was found (a value kind, or a description such as "integer out of range").
    pub got: String,
}

impl TypeError {
    fn new(expected: &'static str, v: &Value) -> Self {
        TypeError { expected, got: v.kind().to_owned() }
    }
}

/// Conversion of a Rust value into a task [`Value`].
pub trait IntoValue {
    /// Converts.
    fn into_value(self) -> Value;
}

/// Conversion of a task [`Value`] into a Rust value (borrowing: values are shared).
pub trait FromValue: Sized {
    /// Converts, or says what was expected.
    ///
    /// # Errors
    /// When the value has another kind or is out of range.
    fn from_value(v: &Value) -> Result<Self, TypeError>;
}

macro_rules! int_conv {
    ($($t:ty => $name:literal),*) => {$(
        impl IntoValue for $t {
            fn into_value(self) -> Value {
                i64::try_from(self).map_or(Value::Float(self as f64), Value::Int)
            }
        }
        impl FromValue for $t {
            fn from_value(v: &Value) -> Result<Self, TypeError> {
                match v {
                    Value::Int(i) => <$t>::try_from(*i)
                        .map_err(|_| TypeError { expected: $name, got: format!("{i} (out of range)") }),
                    _ => Err(TypeError::new($name, v)),
                }
            }
        }
    )*};
}
int_conv!(i64 => "an integer", i32 => "a 32-bit integer", u32 => "a non-negative 32-bit integer",
          u64 => "a non-negative integer", usize => "a non-negative integer", u8 => "an integer 0..=255");

impl IntoValue for f64 {
    fn into_value(self) -> Value {
        Value::Float(self)
    }
}
impl FromValue for f64 {
    fn from_value(v: &Value) -> Result<Self, TypeError> {
        match v {
            Value::Float(f) => Ok(*f),
            Value::Int(i) => Ok(*i as f64),
            _ => Err(TypeError::new("a number", v)),
        }
    }
}
impl IntoValue for bool {
    fn into_value(self) -> Value {
        Value::Bool(self)
    }
}
impl FromValue for bool {
    fn from_value(v: &Value) -> Result<Self, TypeError> {
        match v {
            Value::Bool(b) => Ok(*b),
            _ => Err(TypeError::new("a bool", v)),
        }
    }
}
impl IntoValue for String {
    fn into_value(self) -> Value {
        Value::from(self)
    }
}
impl IntoValue for &str {
    fn into_value(self) -> Value {
        Value::str(self)
    }
}
impl FromValue for String {
    fn from_value(v: &Value) -> Result<Self, TypeError> {
        match v {
            Value::Str(s) => Ok(s.to_string()),
            _ => Err(TypeError::new("a string", v)),
        }
    }
}
impl IntoValue for Arc<str> {
    fn into_value(self) -> Value {
        Value::Str(self)
    }
}
impl FromValue for Arc<str> {
    fn from_value(v: &Value) -> Result<Self, TypeError> {
        match v {
            Value::Str(s) => Ok(Arc::clone(s)),
            _ => Err(TypeError::new("a string", v)),
        }
    }
}
impl IntoValue for Bytes {
    fn into_value(self) -> Value {
        Value::Bytes(self)
    }
}
impl FromValue for Bytes {
    fn from_value(v: &Value) -> Result<Self, TypeError> {
        match v {
            Value::Bytes(b) => Ok(b.clone()),
            _ => Err(TypeError::new("bytes", v)),
        }
    }
}
impl IntoValue for () {
    fn into_value(self) -> Value {
        Value::Null
    }
}
impl FromValue for () {
    fn from_value(v: &Value) -> Result<Self, TypeError> {
        match v {
            Value::Null => Ok(()),
            _ => Err(TypeError::new("null", v)),
        }
    }
}
impl IntoValue for Value {
    fn into_value(self) -> Value {
        self
    }
}
impl FromValue for Value {
    fn from_value(v: &Value) -> Result<Self, TypeError> {
        Ok(v.clone())
    }
}
impl<T: IntoValue> IntoValue for Vec<T> {
    fn into_value(self) -> Value {
        Value::list(self.into_iter().map(IntoValue::into_value).collect())
    }
}
impl<T: FromValue> FromValue for Vec<T> {
    fn from_value(v: &Value) -> Result<Self, TypeError> {
        match v {
            Value::List(items) => items.iter().map(T::from_value).collect(),
            _ => Err(TypeError::new("a list", v)),
        }
    }
}
impl<T: IntoValue> IntoValue for Option<T> {
    fn into_value(self) -> Value {
        self.map_or(Value::Null, IntoValue::into_value)
    }
}
impl<T: FromValue> FromValue for Option<T> {
    fn from_value(v: &Value) -> Result<Self, TypeError> {
        match v {
            Value::Null => Ok(None),
            v => T::from_value(v).map(Some),
        }
    }
}
impl<T: IntoValue> IntoValue for BTreeMap<String, T> {
    fn into_value(self) -> Value {
        Value::Map(Arc::new(self.into_iter().map(|(k, v)| (k, v.into_value())).collect()))
    }
}
impl<T: FromValue> FromValue for BTreeMap<String, T> {
    fn from_value(v: &Value) -> Result<Self, TypeError> {
        match v {
            Value::Map(m) => m.iter().map(|(k, v)| Ok((k.clone(), T::from_value(v)?))).collect(),
            _ => Err(TypeError::new("an object", v)),
        }
    }
}

/// What a typed function may return: a value, or `Result<value, error>` whose error message
/// becomes the task's failure message.
pub trait IntoOpResult {
    /// The value type on success (what a typed handle to the task's result holds).
    type Output;

    /// Converts.
    ///
    /// # Errors
    /// When the function returned an error.
    fn into_op_result(self) -> Result<Value, OpError>;
}

impl<T: IntoValue> IntoOpResult for T {
    type Output = T;

    fn into_op_result(self) -> Result<Value, OpError> {
        Ok(self.into_value())
    }
}

impl<T: IntoValue, E: Display> IntoOpResult for Result<T, E> {
    type Output = T;

    fn into_op_result(self) -> Result<Value, OpError> {
        self.map(IntoValue::into_value).map_err(|e| OpError(e.to_string()))
    }
}

/// A Rust closure that can become an op; `Args` is the tuple of its argument types.
pub trait IntoOp<Args>: Send + Sync + 'static {
    /// What the function produces on success.
    type Output;

    /// Wraps the closure into an [`OpFn`]; `name` appears in its error messages.
    fn into_op(self, name: &str) -> OpFn;
}

macro_rules! into_op {
    ($n:literal; $($a:ident $i:tt),*) => {
        impl<F, R, $($a),*> IntoOp<($($a,)*)> for F
        where
            F: Fn($($a),*) -> R + Send + Sync + 'static,
            R: IntoOpResult,
            $($a: FromValue,)*
        {
            type Output = R::Output;

            fn into_op(self, name: &str) -> OpFn {
                let name: Arc<str> = Arc::from(name);
                Arc::new(move |_ctx: &TaskCtx<'_>, args: &[Value]| {
                    if args.len() != $n {
                        return Err(OpError(format!(
                            "function `{name}` takes {} argument{}, got {}",
                            $n, if $n == 1 { "" } else { "s" }, args.len()
                        )));
                    }
                    (self)($(
                        $a::from_value(&args[$i]).map_err(|e| {
                            OpError(format!("function `{name}`: argument {}: {e}", $i + 1))
                        })?
                    ),*)
                    .into_op_result()
                })
            }
        }
    };
}
into_op!(0;);
into_op!(1; A0 0);
into_op!(2; A0 0, A1 1);
into_op!(3; A0 0, A1 1, A2 2);
into_op!(4; A0 0, A1 1, A2 2, A3 3);
into_op!(5; A0 0, A1 1, A2 2, A3 3, A4 4);
into_op!(6; A0 0, A1 1, A2 2, A3 3, A4 4, A5 5);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fallible_function_error_becomes_op_error() {
        let f = (|x: i64| if x < 0 { Err("negative") } else { Ok(x) }).into_op("pos");
        let key = rask_graph::Key::new("k");
        let ctx = TaskCtx::new(&key, 1, None, None);
        assert_eq!(f(&ctx, &[Value::Int(-1)]), Err(OpError("negative".into())));
        assert_eq!(f(&ctx, &[Value::Int(4)]), Ok(Value::Int(4)));
    }

    #[test]
    fn conversions_round_trip_and_check_ranges() {
        let v = vec![Some(1u32), None].into_value();
        assert_eq!(Vec::<Option<u32>>::from_value(&v), Ok(vec![Some(1), None]));
        assert!(u8::from_value(&Value::Int(300)).is_err());
        assert_eq!(f64::from_value(&Value::Int(2)), Ok(2.0));
        assert_eq!(u64::MAX.into_value(), Value::Float(u64::MAX as f64));
    }
}
