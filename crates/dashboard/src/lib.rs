//! rask's dashboard: what the scheduler is doing, live, and after the run.
//!
//! It reads only what the scheduler publishes ([`rask_runtime::feed`]): the events are folded
//! into a [`model::Model`] on a thread of its own, so the scheduler's only cost is publishing.
//! The same thread writes the events to a journal file when asked, one JSON object per line,
//! and a journal replayed into a fresh model ([`replay`]) gives the same pages as the live run.
//!
//! HTTP (axum, on the same thread): `/` the page (task stream, progress per task prefix,
//! memory and CPU per worker, counts by state, workers table, graph view, task and worker
//! pages; scripts and styles inline, no network access needed), `/api/*` the JSON behind it,
//! `/api/events` server-sent events for live updates, `/report` a standalone copy with the data
//! built in, `/health`, and `/metrics` in the Prometheus text format. Workers serve their own
//! `/metrics` and `/health` too ([`worker_metrics`]).

mod http;
pub mod model;
pub mod worker_metrics;

use std::io::{BufRead, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rask_runtime::feed::{FeedEvent, Published};
use tokio::sync::mpsc::UnboundedReceiver;

pub use model::Model;

/// Errors starting the dashboard or reading a journal.
#[derive(Debug, thiserror::Error)]
pub enum DashboardError {
    /// The HTTP port could not be bound.
    #[error("cannot serve the dashboard on {0}: {1}")]
    Bind(String, std::io::Error),
    /// The journal file could not be created, written or read.
    #[error("journal {0}: {1}")]
    Journal(PathBuf, std::io::Error),
    /// A journal line is not a published event.
    #[error("journal {path}, line {line}: {error}")]
    BadJournal {
        /// The file.
        path: PathBuf,
        /// The line number (from 1).
        line: usize,
        /// What is wrong with it.
        error: String,
    },
    /// The dashboard thread could not start.
    #[error("cannot start the dashboard thread: {0}")]
    Thread(std::io::Error),
}

/// What to run.
#[derive(Clone, Debug, Default)]
pub struct DashboardConfig {
    /// Where to serve HTTP (`None`: no server, e.g. only a journal).
    pub listen: Option<SocketAddr>,
    /// Where to write the journal, if anywhere.
    pub journal: Option<PathBuf>,
}

/// A running dashboard.
pub struct Dashboard {
    /// Where it serves, if it does.
    pub address: Option<SocketAddr>,
    model: Arc<Mutex<Model>>,
    finished: std::sync::mpsc::Receiver<Result<(), String>>,
}

impl Dashboard {
    /// The model (for tests and reports).
    #[must_use]
    pub fn model(&self) -> Arc<Mutex<Model>> {
        Arc::clone(&self.model)
    }

    /// Waits (at most `patience`) until the feed has closed and the journal is flushed; call it
    /// after stopping the scheduler, so the journal is complete.
    ///
    /// # Errors
    /// When writing the journal failed (the message names the file).
    pub fn finish(&self, patience: Duration) -> Result<(), String> {
        match self.finished.recv_timeout(patience) {
            Ok(r) => r,
            Err(_) => Err("the dashboard did not finish its journal in time".into()),
        }
    }
}

/// Starts the dashboard on a thread of its own, fed by `feed`.
///
/// # Errors
/// When the port cannot be bound, the journal cannot be created, or the thread not started.
pub fn start(cfg: &DashboardConfig, feed: UnboundedReceiver<Published>) -> Result<Dashboard, DashboardError> {
    let journal = match &cfg.journal {
        Some(p) => Some((
            p.clone(),
            std::io::BufWriter::new(std::fs::File::create(p).map_err(|e| DashboardError::Journal(p.clone(), e))?),
        )),
        None => None,
    };
    run(cfg.listen, Model::new(), Some(feed), journal)
}

/// Serves a journal written by [`start`]: the same pages, for a finished run.
///
/// # Errors
/// When the file cannot be read or holds something else than published events (naming the
/// line), or the port cannot be bound.
pub fn replay(path: &Path, listen: SocketAddr) -> Result<Dashboard, DashboardError> {
    run(Some(listen), load_journal(path)?, None, None)
}

/// Reads a journal into a model.
///
/// # Errors
/// See [`replay`].
pub fn load_journal(path: &Path) -> Result<Model, DashboardError> {
    let file = std::fs::File::open(path).map_err(|e| DashboardError::Journal(path.to_owned(), e))?;
    let mut model = Model::new();
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|e| DashboardError::Journal(path.to_owned(), e))?;
        if line.trim().is_empty() {
            continue;
        }
        let event: FeedEvent = serde_json::from_str(&line).map_err(|e| DashboardError::BadJournal {
            path: path.to_owned(),
            line: i + 1,
            error: e.to_string(),
        })?;
        model.apply(event);
    }
    Ok(model)
}

/// A standalone HTML performance report of `model` (task stream, per-prefix timings, worker
/// memory over time) that opens offline.
pub fn report(model: &mut Model) -> String {
    http::report_html(model)
}

type Journal = (PathBuf, std::io::BufWriter<std::fs::File>);

fn run(
    listen: Option<SocketAddr>,
    model: Model,
    feed: Option<UnboundedReceiver<Published>>,
    journal: Option<Journal>,
) -> Result<Dashboard, DashboardError> {
    let listener = match listen {
        Some(addr) => {
            let l = std::net::TcpListener::bind(addr).map_err(|e| DashboardError::Bind(addr.to_string(), e))?;
            l.set_nonblocking(true).map_err(|e| DashboardError::Bind(addr.to_string(), e))?;
            Some(l)
        }
        None => None,
    };
    let address = listener.as_ref().and_then(|l| l.local_addr().ok());
    let model = Arc::new(Mutex::new(model));
    let shared = Arc::clone(&model);
    let (done_tx, finished) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("rask-dashboard".into())
        .spawn(move || {
            yield_to_the_computation();
            let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = done_tx.send(Err(format!("cannot start the dashboard's runtime: {e}")));
                    return;
                }
            };
            rt.block_on(async move {
                if let Some(l) = listener {
                    match tokio::net::TcpListener::from_std(l) {
                        Ok(l) => {
                            let app = http::router(Arc::clone(&shared));
                            tokio::spawn(async move {
                                if let Err(e) = axum::serve(l, app).await {
                                    eprintln!("rask dashboard: the server stopped: {e}");
                                }
                            });
                        }
                        Err(e) => eprintln!("rask dashboard: cannot serve: {e}"),
                    }
                }
                let result = match feed {
                    Some(feed) => consume(feed, &shared, journal).await,
                    None => Ok(()),
                };
                let _ = done_tx.send(result);
                // Keep serving until the process ends.
                std::future::pending::<()>().await;
            });
        })
        .map_err(DashboardError::Thread)?;
    Ok(Dashboard { address, model, finished })
}

/// Lowers the calling thread's priority (nice 10, on Linux): the dashboard then runs on CPU
/// time the scheduler and workers leave idle, and on a saturated machine it falls behind (its
/// feed queues up, and it catches up when the machine has room) rather than slowing the
/// computation it observes. Best effort: where the priority cannot be changed, it stays as it
/// was.
#[allow(unsafe_code)]
fn yield_to_the_computation() {
    #[cfg(target_os = "linux")]
    // SAFETY: takes and returns plain integers and touches no memory. On Linux a nice value
    // belongs to a thread, and `PRIO_PROCESS` with 0 sets the calling thread's alone.
    unsafe {
        libc::setpriority(libc::PRIO_PROCESS, 0, DASHBOARD_NICE);
    }
}

/// The dashboard thread's nice value: the kernel gives it about a tenth of the share of a
/// normal thread on a busy core, so it keeps up with a loaded scheduler, and all of an idle
/// core.
#[cfg(target_os = "linux")]
const DASHBOARD_NICE: libc::c_int = 10;

/// Folds the feed into the model and appends it to the journal (flushed every 250 ms, so a
/// scheduler killed outright still leaves a usable journal) until the feed closes.
async fn consume(
    mut feed: UnboundedReceiver<Published>,
    model: &Arc<Mutex<Model>>,
    mut journal: Option<Journal>,
) -> Result<(), String> {
    let mut flush = tokio::time::interval(Duration::from_millis(250));
    let mut batch = Vec::new();
    let mut events = Vec::new();
    let mut failed: Option<String> = None;
    loop {
        tokio::select! {
            n = feed.recv_many(&mut batch, 1024) => {
                if n == 0 {
                    break;
                }
                // The scheduler's raw records become events on this thread (see `Published`);
                // without a journal, changes go straight into the model, with no list between.
                let Some((path, w)) = &mut journal else {
                    let mut m = model.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                    for p in batch.drain(..) {
                        if let Some(e) = p.visit_batch(|b| m.apply_batch(b)) {
                            m.apply(e);
                        }
                    }
                    continue;
                };
                events.clear();
                for p in batch.drain(..) {
                    p.into_events(&mut events);
                }
                for e in &events {
                    let written = serde_json::to_writer(&mut *w, e)
                        .map_err(std::io::Error::other)
                        .and_then(|()| w.write_all(b"\n"));
                    if let Err(e) = written {
                        failed.get_or_insert(format!("cannot write the journal {}: {e}", path.display()));
                    }
                }
                let mut m = model.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                for e in events.drain(..) {
                    m.apply(e);
                }
            }
            _ = flush.tick() => {
                if let Some((path, w)) = &mut journal {
                    if let Err(e) = w.flush() {
                        failed.get_or_insert(format!("cannot write the journal {}: {e}", path.display()));
                    }
                }
            }
        }
    }
    if let Some((path, w)) = &mut journal {
        if let Err(e) = w.flush() {
            failed.get_or_insert(format!("cannot write the journal {}: {e}", path.display()));
        }
    }
    match failed {
        Some(e) => Err(e),
        None => Ok(()),
    }
}
