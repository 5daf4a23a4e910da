//! The `shell` op: run a program, return its standard output.
//!
//! The child gets its own process group, so a timeout kills everything it started (a `sh -c`
//! pipeline included), not just the direct child; otherwise a grandchild would keep the output
//! pipes open and the task would hang past its deadline. Output is read on helper threads so a
//! chatty child never blocks on a full pipe.

use std::io::{Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, Stdio};
use std::time::Duration;

use rask_graph::Value;

use crate::{OpError, TaskCtx};

/// How many trailing lines of standard error a failure message carries.
const STDERR_TAIL_LINES: usize = 10;

pub(crate) fn shell(ctx: &TaskCtx<'_>, args: &[Value]) -> Result<Value, OpError> {
    let argv: Vec<&str> = match &args[0] {
        Value::List(items) => items
            .iter()
            .map(|v| match v {
                Value::Str(s) => &**s,
                _ => "",
            })
            .collect(),
        _ => Vec::new(),
    };
    let program = argv.first().copied().unwrap_or_default();
    let mut cmd = Command::new(program);
    cmd.args(&argv[1..]).stdout(Stdio::piped()).stderr(Stdio::piped()).process_group(0);
    let mut stdin_data: Option<Vec<u8>> = None;
    if let Some(Value::Map(opts)) = args.get(1) {
        if let Some(Value::Map(env)) = opts.get("env") {
            for (k, v) in env.iter() {
                if let Value::Str(v) = v {
                    cmd.env(k, &**v);
                }
            }
        }
        if let Some(Value::Str(cwd)) = opts.get("cwd") {
            cmd.current_dir(&**cwd);
        }
        stdin_data = match opts.get("stdin") {
            Some(Value::Str(s)) => Some(s.as_bytes().to_vec()),
            Some(Value::Bytes(b)) => Some(b.to_vec()),
            _ => None,
        };
    }
    cmd.stdin(if stdin_data.is_some() { Stdio::piped() } else { Stdio::null() });
    let mut child = cmd.spawn().map_err(|e| OpError(format!("op `shell`: cannot run {program:?}: {e}")))?;
    let pgid = child.id() as i32;
    let writer = child.stdin.take().zip(stdin_data).map(|(mut pipe, data)| {
        std::thread::spawn(move || {
            // A child that exits without reading its input is not an error of ours.
            let _ = pipe.write_all(&data);
        })
    });
    let read_all = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut buf);
            }
            buf
        })
    };
    let out = read_all(child.stdout.take().map(|p| Box::new(p) as Box<dyn Read + Send>));
    let err = read_all(child.stderr.take().map(|p| Box::new(p) as Box<dyn Read + Send>));

    let mut poll = Duration::from_millis(1);
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) => {}
            Err(e) => return Err(OpError(format!("op `shell`: waiting for {program:?}: {e}"))),
        }
        if ctx.cancelled() {
            kill_group(pgid);
            let _ = child.wait();
            return Err(OpError(format!("op `shell`: {program:?} killed: the attempt timed out or was cancelled")));
        }
        std::thread::sleep(poll);
        poll = (poll * 2).min(Duration::from_millis(20));
    };
    let stdout = out.join().unwrap_or_default();
    let stderr = err.join().unwrap_or_default();
    if let Some(w) = writer {
        let _ = w.join();
    }
    if status.success() {
        return Ok(Value::from(String::from_utf8_lossy(&stdout).into_owned()));
    }
    let how = match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(sig)) => format!("was killed by signal {sig}"),
        _ => "failed".to_owned(),
    };
    let text = String::from_utf8_lossy(&stderr);
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(STDERR_TAIL_LINES)..].join("\n");
    let msg = if tail.trim().is_empty() {
        format!("op `shell`: {program:?} {how}")
    } else {
        format!("op `shell`: {program:?} {how}; stderr:\n{tail}")
    };
    Err(OpError(msg))
}

/// Kills a whole process group.
#[allow(unsafe_code)]
fn kill_group(pgid: i32) {
    // SAFETY: kill(2) takes plain integers and has no memory-safety preconditions; a negative pid
    // addresses the process group the child leads (we created it with `process_group(0)`).
    unsafe {
        libc::kill(-pgid, libc::SIGKILL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rask_graph::Key;
    use std::sync::Arc;
    use std::time::Instant;

    fn argv(a: &[&str]) -> Value {
        Value::list(a.iter().map(|s| Value::str(s)).collect())
    }

    fn run(args: &[Value], deadline: Option<Instant>) -> Result<Value, OpError> {
        let key = Key::new("k");
        shell(&TaskCtx::new(&key, 1, deadline, None), args)
    }

    #[test]
    fn returns_stdout_and_passes_stdin_env_cwd() {
        let mut opts = std::collections::BTreeMap::new();
        opts.insert("stdin".to_owned(), Value::str("in"));
        let mut env = std::collections::BTreeMap::new();
        env.insert("RASK_T".to_owned(), Value::str("e"));
        opts.insert("env".to_owned(), Value::Map(Arc::new(env)));
        opts.insert("cwd".to_owned(), Value::str("/"));
        let out = run(&[argv(&["sh", "-c", "cat; echo $RASK_T; pwd"]), Value::Map(Arc::new(opts))], None);
        assert_eq!(out, Ok(Value::str("ine\n/\n")));
    }

    #[test]
    fn nonzero_exit_reports_code_and_stderr_tail() {
        let err = run(&[argv(&["sh", "-c", "echo one >&2; echo two >&2; exit 3"])], None).expect_err("fails");
        assert_eq!(err.0, "op `shell`: \"sh\" exited with status 3; stderr:\none\ntwo");
    }

    #[test]
    fn missing_program_is_an_error_not_a_panic() {
        let err = run(&[argv(&["/nonexistent/prog"])], None).expect_err("fails");
        assert!(err.0.starts_with("op `shell`: cannot run \"/nonexistent/prog\""), "{}", err.0);
    }

    #[test]
    fn deadline_kills_the_whole_process_group() {
        let t = Instant::now();
        let err = run(&[argv(&["sh", "-c", "sleep 30; echo late"])], Some(Instant::now() + Duration::from_millis(200)))
            .expect_err("times out");
        assert!(t.elapsed() < Duration::from_secs(5), "took {:?}", t.elapsed());
        assert!(err.0.contains("killed"), "{}", err.0);
    }
}
