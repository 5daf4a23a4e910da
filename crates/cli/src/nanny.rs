//! The worker supervisor (Dask's "nanny"): `rask worker` runs each worker as a child process
//! and starts it again when it crashes, so a task that panics the process, a kill -9 or an
//! out-of-memory kill costs a restart, not a worker. `--no-nanny` runs the workers in the
//! `rask worker` process itself.
//!
//! Policy, kept small and testable ([`verdict`]): a child that exits 0 stopped on purpose
//! (the scheduler shut down, or it was told to stop); one that exits 1–3 could not do its job
//! (scheduler unreachable, bad arguments) and restarting would not help; anything else — killed
//! by a signal, or a panic's 101 — is a crash and is restarted after 0.1 s, or after a pause
//! that doubles (up to 5 s) while it keeps dying within a second of starting, so a worker that
//! cannot start does not spin.

use std::os::unix::process::ExitStatusExt;
use std::process::{Child, Command, ExitCode, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Environment variable through which a restarted worker learns how its previous process
/// ended (and tells the scheduler).
pub(crate) const RESTARTED_AFTER_ENV: &str = "RASK_WORKER_RESTARTED_AFTER";

/// What to do about a worker process that ended.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// It stopped on purpose: done.
    Done,
    /// It could not work (exit status given); restarting would not help.
    GiveUp(i32),
    /// It crashed (how, in words): start it again.
    Restart(String),
}

/// A worker using more than this fraction of its memory limit is restarted (Dask's
/// `terminate`, 95%).
const TERMINATE_FRACTION: f64 = 0.95;

/// Classifies how a worker process ended.
pub(crate) fn verdict(status: ExitStatus) -> Verdict {
    if let Some(sig) = status.signal() {
        return Verdict::Restart(format!("was killed by signal {sig} ({})", signal_name(sig)));
    }
    match status.code() {
        Some(0) => Verdict::Done,
        Some(c @ 1..=3) => Verdict::GiveUp(c),
        Some(101) => Verdict::Restart("panicked (exit status 101)".into()),
        Some(c) => Verdict::Restart(format!("exited with status {c}")),
        None => Verdict::Restart("ended for an unknown reason".into()),
    }
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGKILL => "SIGKILL: killed outright, e.g. by the kernel's out-of-memory killer",
        libc::SIGSEGV => "SIGSEGV: memory fault",
        libc::SIGABRT => "SIGABRT: aborted",
        libc::SIGBUS => "SIGBUS: bus error",
        libc::SIGTERM => "SIGTERM",
        libc::SIGINT => "SIGINT",
        _ => "signal",
    }
}

/// One supervised worker process.
struct Supervised {
    name: String,
    args: Vec<String>,
    /// Settings passed in the environment (the token, TLS files).
    env: Vec<(&'static str, std::ffi::OsString)>,
    /// The worker's memory limit: above 95% of it, the process is restarted.
    memory_limit: Option<u64>,
    /// Set when this supervisor killed the process for memory (its resident bytes).
    killed_for_memory: Option<u64>,
    child: Option<Child>,
    /// When to start it (again), if it is not running.
    restart_at: Option<Instant>,
    last_start: Instant,
    backoff: Duration,
    restarted_after: Option<String>,
    outcome: Option<Verdict>,
}

impl Supervised {
    fn start(&mut self) {
        let exe = match std::env::current_exe() {
            Ok(e) => e,
            Err(e) => {
                eprintln!("rask worker {}: cannot find the rask binary to start it: {e}", self.name);
                self.outcome = Some(Verdict::GiveUp(1));
                return;
            }
        };
        let mut cmd = Command::new(exe);
        cmd.arg("worker").args(&self.args).stdin(Stdio::null());
        // The worker dies with its supervisor, even one killed outright (no orphans).
        // SAFETY: prctl(2) is async-signal-safe and touches no memory of the parent; it runs
        // in the forked child before exec.
        #[allow(unsafe_code)]
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        match &self.restarted_after {
            Some(why) => cmd.env(RESTARTED_AFTER_ENV, why),
            None => cmd.env_remove(RESTARTED_AFTER_ENV),
        };
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        match cmd.spawn() {
            Ok(c) => {
                self.child = Some(c);
                self.last_start = Instant::now();
            }
            Err(e) => {
                eprintln!("rask worker {}: cannot start its process: {e}", self.name);
                self.outcome = Some(Verdict::GiveUp(1));
            }
        }
        self.restart_at = None;
    }

    /// Checks the child; schedules a restart after a crash.
    fn poll(&mut self) {
        let Some(child) = &mut self.child else { return };
        if let Some(limit) = self.memory_limit {
            // Resident bytes (0 once the process is gone).
            let rss = crate::bench::proc_status_kib(&child.id().to_string(), "VmRSS:");
            if self.killed_for_memory.is_none() && rss as f64 > limit as f64 * TERMINATE_FRACTION {
                eprintln!(
                    "rask worker {}: its process uses {rss} bytes, over 95% of its {limit}-byte memory limit; restarting it",
                    self.name
                );
                let _ = child.kill();
                self.killed_for_memory = Some(rss);
            }
        }
        let status = match child.try_wait() {
            Ok(Some(s)) => s,
            Ok(None) => return,
            Err(e) => {
                eprintln!("rask worker {}: cannot watch its process: {e}", self.name);
                return;
            }
        };
        self.child = None;
        let verdict = match (verdict(status), self.killed_for_memory.take()) {
            (Verdict::Restart(_), Some(rss)) => Verdict::Restart(format!(
                "was terminated by its supervisor for memory: {rss} bytes, over 95% of its {}-byte limit",
                self.memory_limit.unwrap_or_default()
            )),
            (v, _) => v,
        };
        match verdict {
            Verdict::Restart(how) => {
                // A process that dies within a second of starting backs off (doubling, up to
                // 5 s), so one that cannot start does not spin; one that ran restarts at once.
                self.backoff = if self.last_start.elapsed() < Duration::from_secs(1) {
                    (self.backoff * 2).clamp(Duration::from_millis(100), Duration::from_secs(5))
                } else {
                    Duration::from_millis(100)
                };
                eprintln!(
                    "rask worker {}: its process {how}; restarting in {:.1} s",
                    self.name,
                    self.backoff.as_secs_f64()
                );
                self.restarted_after = Some(how);
                self.restart_at = Some(Instant::now() + self.backoff);
            }
            other => self.outcome = Some(other),
        }
    }
}

/// Runs and supervises one process per worker (`children`: the name and the arguments of its
/// `rask worker ... --no-nanny` command) until all have stopped; forwards SIGINT/SIGTERM.
pub(crate) fn supervise(
    children: Vec<(String, Vec<String>)>,
    env: Vec<(&'static str, std::ffi::OsString)>,
    memory_limit: Option<u64>,
) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("rask worker: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut workers: Vec<Supervised> = children
        .into_iter()
        .map(|(name, args)| Supervised {
            name,
            args,
            env: env.clone(),
            memory_limit,
            killed_for_memory: None,
            child: None,
            restart_at: None,
            last_start: Instant::now(),
            backoff: Duration::ZERO,
            restarted_after: None,
            outcome: None,
        })
        .collect();
    for w in &mut workers {
        w.start();
    }
    rt.block_on(async {
        let signalled = crate::cluster::signalled();
        tokio::pin!(signalled);
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        loop {
            tokio::select! {
                sig = &mut signalled => {
                    eprintln!("rask worker: received {sig}, stopping its worker processes");
                    stop_all(&mut workers).await;
                    return ExitCode::SUCCESS;
                }
                _ = tick.tick() => {}
            }
            for w in &mut workers {
                w.poll();
                if w.outcome.is_none() && w.child.is_none() && w.restart_at.is_some_and(|t| Instant::now() >= t) {
                    w.start();
                }
            }
            if workers.iter().all(|w| w.outcome.is_some()) {
                let worst = workers
                    .iter()
                    .filter_map(|w| match w.outcome {
                        Some(Verdict::GiveUp(c)) => Some(c),
                        _ => None,
                    })
                    .max();
                return worst.map_or(ExitCode::SUCCESS, |c| ExitCode::from(c as u8));
            }
        }
    })
}

/// SIGTERM to every child, then wait for them while they retire (SIGKILL after 40 s: a
/// retiring worker gives the scheduler 30 s to move its results).
async fn stop_all(workers: &mut [Supervised]) {
    for w in workers.iter() {
        if let Some(c) = &w.child {
            // SAFETY: kill(2) on a child process we started and have not reaped.
            #[allow(unsafe_code)]
            unsafe {
                libc::kill(c.id() as i32, libc::SIGTERM);
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(40);
    for w in workers.iter_mut() {
        let Some(c) = &mut w.child else { continue };
        loop {
            match c.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) if Instant::now() >= deadline => {
                    let _ = c.kill();
                    let _ = c.wait();
                    break;
                }
                Ok(None) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status_of(script: &str) -> ExitStatus {
        Command::new("sh").args(["-c", script]).status().expect("sh runs")
    }

    #[test]
    fn crashes_restart_and_deliberate_exits_do_not() {
        assert_eq!(verdict(status_of("exit 0")), Verdict::Done);
        assert_eq!(verdict(status_of("exit 1")), Verdict::GiveUp(1));
        assert_eq!(verdict(status_of("exit 3")), Verdict::GiveUp(3));
        assert_eq!(verdict(status_of("exit 101")), Verdict::Restart("panicked (exit status 101)".into()));
        match verdict(status_of("kill -9 $$")) {
            Verdict::Restart(how) => assert!(how.contains("signal 9"), "{how}"),
            other => panic!("a SIGKILL is a crash: {other:?}"),
        }
    }
}
