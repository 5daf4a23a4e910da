//! Black-box tests of the `rask` binary: the workflow-file contract as a user sees it.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A scratch directory removed at the end of the test.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("rask-cli-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create scratch dir");
        Scratch(dir)
    }
    fn file(&self, name: &str, text: &str) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, text).expect("write file");
        p
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs `rask` with a hard time bound (a hung run fails the test instead of hanging CI).
fn rask(args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_rask"))
        .args(args)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start rask");
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes()).expect("write stdin");
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().expect("poll child").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("rask {args:?} did not finish within 60 s");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child.wait_with_output().expect("collect output")
}

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}
fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn spec_example_prints_exact_json() {
    let o = rask(&["run", examples().join("hello.json").to_str().expect("utf-8 path"), "--json"], None);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(stdout(&o), "{\"b\":42,\"n\":1048576,\"s\":\"hello\\n\",\"t\":1048619.5}\n");
}

#[test]
fn every_example_workflow_runs_and_is_identical_on_both_schedulers() {
    for (file, code) in [("hello.json", 0), ("pipeline.json", 0), ("failures.json", 1)] {
        let path = examples().join(file);
        let p = path.to_str().expect("utf-8 path");
        let threaded = rask(&["run", p, "--json"], None);
        let sync = rask(&["run", p, "--json", "--sync"], None);
        let many = rask(&["run", p, "--json", "--workers", "3", "--threads-per-worker", "2"], None);
        assert_eq!(threaded.status.code(), Some(code), "{file}: {}", stderr(&threaded));
        assert_eq!(stdout(&threaded), stdout(&sync), "{file}");
        assert_eq!(stdout(&threaded), stdout(&many), "{file}");
        serde_json::from_str::<serde_json::Value>(&stdout(&threaded)).expect("stdout is one JSON object");
    }
}

#[test]
fn task_failure_exits_1_and_reports_every_other_output() {
    let dir = Scratch::new("fail");
    let f = dir.file(
        "w.json",
        r#"{"version": 1, "tasks": {
            "a": {"op": "fail", "args": ["boom"]},
            "b": {"op": "add", "args": [{"$ref": "a"}, 1]},
            "c": {"op": "range", "args": [3]},
            "d": {"op": "div", "args": [1, 0]},
            "e": {"op": "bytes", "args": [3]}
        }}"#,
    );
    let o = rask(&["run", f.to_str().expect("utf-8"), "--json"], None);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        stdout(&o),
        concat!(
            r#"{"b":{"$error":{"key":"a","message":"boom"}},"c":[0,1,2],"#,
            r#""d":{"$error":{"key":"d","message":"op `div`: division by zero"}},"#,
            r#""e":{"$bytes":3,"sha256":"ae4b3280e56e2faf83f414a6e3dabe9d5fbe18976544c05fed121accb85b53fc"}}"#,
            "\n"
        )
    );
}

#[test]
fn workflow_can_come_from_stdin() {
    let o = rask(&["run", "-", "--json"], Some(r#"{"version": 1, "tasks": {"x": {"op": "mul", "args": [6, 7]}}}"#));
    assert_eq!((o.status.code(), stdout(&o)), (Some(0), "{\"x\":42}\n".to_owned()));
}

/// Every invalid-file case of the specification: exit 2, a message naming the problem, nothing run.
#[test]
fn invalid_files_exit_2_name_the_problem_and_run_nothing() {
    let dir = Scratch::new("invalid");
    let marker = dir.0.join("ran");
    let touch = format!(r#""m": {{"op": "shell", "args": [["touch", "{}"]]}}"#, marker.display());
    let cases: Vec<(&str, String, Vec<&str>)> = vec![
        (
            "syntax",
            format!("{{\"version\": 1, \"tasks\": {{{touch},\n \"x\": {{\"op\": \"noop\",}}}}}}"),
            vec!["line 2, column"],
        ),
        (
            "unknown task field",
            format!(r#"{{"version": 1, "tasks": {{{touch}, "x": {{"op": "noop", "retires": 1}}}}}}"#),
            vec!["task \"x\"", "unknown field `retires`"],
        ),
        (
            "unknown top field",
            format!(r#"{{"version": 1, "tasks": {{{touch}}}, "extra": 1}}"#),
            vec!["unknown field `extra`"],
        ),
        (
            "unknown op",
            format!(r#"{{"version": 1, "tasks": {{{touch}, "x": {{"op": "frobnicate"}}}}}}"#),
            vec!["task \"x\": unknown op \"frobnicate\""],
        ),
        (
            "missing ref",
            format!(
                r#"{{"version": 1, "tasks": {{{touch}, "x": {{"op": "identity", "args": [{{"$ref": "ghost"}}]}}}}}}"#
            ),
            vec!["task \"x\" depends on missing key \"ghost\""],
        ),
        (
            "missing after",
            format!(r#"{{"version": 1, "tasks": {{{touch}, "x": {{"op": "noop", "after": ["ghost"]}}}}}}"#),
            vec!["task \"x\" depends on missing key \"ghost\""],
        ),
        (
            "cycle",
            format!(
                r#"{{"version": 1, "tasks": {{{touch}, "p": {{"op": "identity", "args": [{{"$ref": "q"}}]}}, "q": {{"op": "identity", "args": [{{"$ref": "r"}}]}}, "r": {{"op": "noop", "after": ["p"]}}}}}}"#
            ),
            vec!["dependency cycle: \"p\" -> \"q\" -> \"r\" -> \"p\""],
        ),
        (
            "arity",
            format!(r#"{{"version": 1, "tasks": {{{touch}, "x": {{"op": "sub", "args": [1]}}}}}}"#),
            vec!["task \"x\": op `sub` takes 2 arguments, got 1"],
        ),
        (
            "literal type",
            format!(r#"{{"version": 1, "tasks": {{{touch}, "x": {{"op": "range", "args": ["ten"]}}}}}}"#),
            vec!["task \"x\": op `range`: argument 1 must be a non-negative integer, got string"],
        ),
        (
            "unknown output",
            format!(r#"{{"version": 1, "tasks": {{{touch}}}, "outputs": ["m", "nope"]}}"#),
            vec!["unknown output key \"nope\""],
        ),
        ("version", format!(r#"{{"version": 2, "tasks": {{{touch}}}}}"#), vec!["unsupported workflow version 2"]),
        ("not an object", "[1, 2]".to_owned(), vec!["line 1, column"]),
    ];
    for (name, text, needles) in cases {
        let f = dir.file("w.json", &text);
        let o = rask(&["run", f.to_str().expect("utf-8"), "--json"], None);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{name}: {err}");
        assert!(stdout(&o).is_empty(), "{name}: stdout must stay empty");
        for n in needles {
            assert!(err.contains(n), "{name}: expected {n:?} in {err:?}");
        }
        assert!(!marker.exists(), "{name}: a task ran although the file is invalid");
    }
}

#[test]
fn missing_file_and_bad_flags_exit_2() {
    let o = rask(&["run", "/nonexistent/flow.json"], None);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("cannot read /nonexistent/flow.json"), "{}", stderr(&o));
    let o = rask(&["run", "x.json", "--workers", "0"], None);
    assert_eq!(o.status.code(), Some(2));
    let o = rask(&["run", "x.json", "--memory-limit", "lots"], None);
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn unsatisfiable_resources_exit_2_before_running() {
    let o = rask(&["run", examples().join("hello.json").to_str().expect("utf-8"), "--resources", "CPU=4"], None);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("task \"t\" cannot run on the embedded cluster: it needs GPU=1"), "{}", stderr(&o));
}

#[test]
fn shell_timeout_kills_the_child_process_group() {
    let dir = Scratch::new("timeout");
    let pidfile = dir.0.join("pid");
    let text = format!(
        r#"{{"version": 1, "tasks": {{
            "slow": {{"op": "shell", "args": [["sh", "-c", "sleep 30 & echo $! > {}; wait"]], "timeout_s": 0.5}},
            "fast": {{"op": "identity", "args": ["still here"]}}
        }}}}"#,
        pidfile.display()
    );
    let f = dir.file("w.json", &text);
    let t0 = Instant::now();
    let o = rask(&["run", f.to_str().expect("utf-8"), "--json"], None);
    assert!(t0.elapsed() < Duration::from_secs(10), "took {:?}", t0.elapsed());
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        stdout(&o),
        "{\"slow\":{\"$error\":{\"key\":\"slow\",\"message\":\"timed out after 0.5 s\"}},\"fast\":\"still here\"}\n"
    );
    // The grandchild (`sleep 30`) must be gone too, not just the shell.
    let pid = std::fs::read_to_string(&pidfile).expect("pid written").trim().to_owned();
    let gone = (0..200).any(|_| {
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let dead = state.is_empty() || state.split_whitespace().nth(2) == Some("Z");
        if !dead {
            std::thread::sleep(Duration::from_millis(10));
        }
        dead
    });
    assert!(gone, "sleep {pid} survived the timeout");
}

#[test]
fn human_summary_lists_outputs_and_failures() {
    let o = rask(&["run", examples().join("failures.json").to_str().expect("utf-8")], None);
    assert_eq!(o.status.code(), Some(1));
    let out = stdout(&o);
    assert!(out.contains("total       = 10"), "{out}");
    assert!(out.contains("overflow    FAILED: op `mul`: integer overflow"), "{out}");
    assert!(out.contains("after_slow  FAILED: upstream task \"slow\" failed: timed out after 0.5 s"), "{out}");
}

#[test]
fn graph_subcommand_prints_dot() {
    let o = rask(&["graph", examples().join("hello.json").to_str().expect("utf-8")], None);
    assert_eq!(o.status.code(), Some(0));
    let dot = stdout(&o);
    assert!(dot.starts_with("digraph rask {"), "{dot}");
    assert!(dot.contains("[style=dashed]"), "the `after` edge of s is dashed: {dot}");
}
