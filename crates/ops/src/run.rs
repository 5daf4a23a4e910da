//! Running calls: one attempt (panics caught, optional timeout), and the retry loop around it.
//!
//! Every executor — the embedded schedulers and the distributed workers — runs tasks through
//! these two functions, so a task fails the same way wherever it runs.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rask_graph::{FailureKind, Key, TaskError, Value};

use crate::{OpError, OpFn, TaskCtx};

/// How long a timed-out attempt may take to acknowledge cancellation.
const CANCEL_GRACE: Duration = Duration::from_millis(500);

/// What to run and how: the call's identity and its retry and timeout policy.
#[derive(Clone, Copy, Debug)]
pub struct CallPolicy<'a> {
    /// The op's name (for the unknown-op message).
    pub op: &'a str,
    /// The task (or fused link) key.
    pub key: &'a Key,
    /// Re-runs allowed after a failed attempt.
    pub retries: u32,
    /// Per-attempt time limit.
    pub timeout: Option<Duration>,
    /// Where this runs, for the unknown-op message ("in this process", "on worker tcp://...").
    pub location: &'a str,
}

/// Runs a call with up to `policy.retries` re-runs of failed attempts.
///
/// `args` fills the argument buffer for an attempt (it is called once per attempt, so inputs are
/// resolved afresh). `f` is `None` when the op is unknown here; an unknown op is not retried.
///
/// # Errors
/// The last attempt's failure, with the number of attempts made.
pub fn run_call(
    f: Option<&OpFn>,
    policy: &CallPolicy<'_>,
    buf: &mut Vec<Value>,
    mut args: impl FnMut(&mut Vec<Value>),
) -> Result<Value, TaskError> {
    let CallPolicy { op, key, retries, timeout, location } = *policy;
    let Some(f) = f else {
        return Err(TaskError {
            key: key.clone(),
            message: format!("unknown op `{op}`: no function of this name is registered {location}"),
            kind: FailureKind::UnknownOp,
            attempts: 1,
        });
    };
    let mut attempt = 1;
    loop {
        buf.clear();
        args(buf);
        match attempt_once(f, key, buf, attempt, timeout) {
            Ok(v) => return Ok(v),
            Err((kind, message)) if attempt > retries => {
                return Err(TaskError { key: key.clone(), message, kind, attempts: attempt });
            }
            Err(_) => attempt += 1,
        }
    }
}

/// One attempt: calls `f`, turning a panic into a failure; with a timeout, on its own thread.
///
/// # Errors
/// The failure's kind and message.
pub fn attempt_once(
    f: &OpFn,
    key: &Key,
    args: &[Value],
    attempt: u32,
    timeout: Option<Duration>,
) -> Result<Value, (FailureKind, String)> {
    match timeout {
        None => {
            let ctx = TaskCtx::new(key, attempt, None, None);
            match catch_unwind(AssertUnwindSafe(|| f(&ctx, args))) {
                Ok(Ok(v)) => Ok(v),
                Ok(Err(OpError(m))) => Err((FailureKind::Error, m)),
                Err(payload) => Err((FailureKind::Panic, panic_message(&*payload))),
            }
        }
        Some(limit) => with_timeout(f, key, args, attempt, limit),
    }
}

/// Runs an attempt on its own thread so the caller can give up at the deadline. The abandoned
/// thread is told to stop (ops such as `shell` and `sleep` honour that; `shell` kills its
/// process group) and its late result is dropped.
fn with_timeout(
    f: &OpFn,
    key: &Key,
    args: &[Value],
    attempt: u32,
    limit: Duration,
) -> Result<Value, (FailureKind, String)> {
    let deadline = Instant::now() + limit;
    let cancel = Arc::new(AtomicBool::new(false));
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    let (f2, key2, args2, cancel2) = (Arc::clone(f), key.clone(), args.to_vec(), Arc::clone(&cancel));
    let spawned = std::thread::Builder::new().name(format!("rask-timed {}", key.as_str())).spawn(move || {
        let ctx = TaskCtx::new(&key2, attempt, Some(deadline), Some(&cancel2));
        let r = catch_unwind(AssertUnwindSafe(|| f2(&ctx, &args2)));
        let _ = tx.send(r.map_err(|p| panic_message(&*p)));
    });
    if let Err(e) = spawned {
        return Err((FailureKind::Error, format!("cannot start a thread for a timed task: {e}")));
    }
    let timed_out = || Err((FailureKind::Timeout, format!("timed out after {}", fmt_secs(limit))));
    match rx.recv_timeout(limit) {
        Ok(Ok(Ok(v))) => Ok(v),
        // A cooperative op that stops at the deadline reports an error of its own at the same
        // moment the wait expires; it is the timeout either way, whichever arrives first.
        Ok(_) if Instant::now() >= deadline => timed_out(),
        Ok(Ok(Err(OpError(m)))) => Err((FailureKind::Error, m)),
        Ok(Err(m)) => Err((FailureKind::Panic, m)),
        Err(_) => {
            cancel.store(true, Ordering::Relaxed);
            // Give a cooperative op (`shell`, `sleep`) a moment to stop and clean up — `shell`
            // kills its process group — so nothing outlives the run. A function that ignores
            // cancellation is abandoned after the grace period; its late result is dropped.
            let _ = rx.recv_timeout(CANCEL_GRACE);
            timed_out()
        }
    }
}

fn fmt_secs(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s.fract() == 0.0 { format!("{s:.0} s") } else { format!("{s} s") }
}

/// The panic payload as text.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    let text = payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(non-string panic payload)".to_owned());
    format!("panicked: {text}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Registry;

    #[test]
    fn a_cooperative_op_stopping_at_its_deadline_is_always_a_timeout() {
        // `sleep` notices the deadline itself and returns an error at the very moment the
        // caller's wait expires; whichever wins, the outcome must be the same timeout.
        let r = Registry::with_builtins();
        let f = r.get("sleep").expect("builtin");
        let key = Key::new("k");
        for _ in 0..40 {
            let got = attempt_once(f, &key, &[Value::Int(10_000)], 1, Some(Duration::from_millis(5)));
            assert_eq!(got, Err((FailureKind::Timeout, "timed out after 0.005 s".to_owned())));
        }
    }

    #[test]
    fn an_error_reported_right_at_the_deadline_is_a_timeout() {
        // The op gives up exactly at its deadline (as `shell` and `sleep` do); its error then
        // races the caller's own timer, which expires a moment later.
        let f: OpFn = std::sync::Arc::new(|ctx: &TaskCtx<'_>, _: &[Value]| {
            let deadline = ctx.deadline().unwrap_or_else(Instant::now);
            while Instant::now() < deadline {
                std::hint::spin_loop();
            }
            Err(OpError::new("gave up"))
        });
        let key = Key::new("k");
        for _ in 0..20 {
            let got = attempt_once(&f, &key, &[], 1, Some(Duration::from_millis(2)));
            assert_eq!(got, Err((FailureKind::Timeout, "timed out after 0.002 s".to_owned())));
        }
    }

    #[test]
    fn retries_stop_at_the_first_success() {
        let r = Registry::with_builtins();
        let key = Key::new("k");
        let policy = CallPolicy { op: "add", key: &key, retries: 3, timeout: None, location: "here" };
        let mut buf = Vec::new();
        let v = run_call(r.get("add"), &policy, &mut buf, |b| b.extend([Value::Int(2), Value::Int(3)]));
        assert_eq!(v, Ok(Value::Int(5)));
        let unknown = run_call(None, &CallPolicy { op: "nope", ..policy }, &mut buf, |_| {});
        let err = unknown.expect_err("unknown op");
        assert_eq!((err.kind, err.attempts), (FailureKind::UnknownOp, 1));
        assert!(err.message.contains("registered here"), "{}", err.message);
    }
}
