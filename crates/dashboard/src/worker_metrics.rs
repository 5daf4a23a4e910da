//! A worker's own `/metrics` and `/health`: its memory, CPU, spill and transfer figures and its
//! task counts, from the [`WorkerStats`] the worker keeps up to date with each heartbeat.

use std::fmt::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

use axum::Router;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use rask_runtime::WorkerStats;

use crate::DashboardError;

/// The Prometheus text of one worker's figures.
#[must_use]
pub fn render(s: &WorkerStats) -> String {
    let label = crate::model::escape_label(&s.name);
    let m = &s.memory;
    let rows: [(&str, &str, &str, String); 13] = [
        ("rask_worker_memory_managed_bytes", "gauge", "Bytes of results in memory.", m.managed.to_string()),
        ("rask_worker_memory_spilled_bytes", "gauge", "Bytes of results on disk.", m.spilled.to_string()),
        ("rask_worker_memory_rss_bytes", "gauge", "Resident memory of the worker process.", m.rss.to_string()),
        (
            "rask_worker_cpu_seconds_total",
            "counter",
            "CPU time of the worker process.",
            format!("{:.3}", m.cpu_us as f64 / 1e6),
        ),
        ("rask_worker_spill_written_bytes_total", "counter", "Bytes written to spill files.", m.written.to_string()),
        ("rask_worker_spill_read_bytes_total", "counter", "Bytes read back from spill files.", m.read.to_string()),
        (
            "rask_worker_transfer_bytes_total",
            "counter",
            "Bytes of inputs fetched from other workers.",
            m.fetched.to_string(),
        ),
        ("rask_worker_tasks_finished_total", "counter", "Tasks finished.", s.tasks_finished.to_string()),
        ("rask_worker_tasks_failed_total", "counter", "Tasks that failed.", s.tasks_failed.to_string()),
        (
            "rask_worker_tasks_inline_total",
            "counter",
            "Tasks run on the worker's event loop (quick functions, small inputs, idle task threads).",
            s.tasks_inline.to_string(),
        ),
        ("rask_worker_tasks_assigned", "gauge", "Tasks assigned and not finished.", s.tasks_assigned.to_string()),
        ("rask_worker_paused", "gauge", "1 while paused for memory.", u8::from(s.paused).to_string()),
        (
            "rask_worker_spill_seconds_total",
            "counter",
            "Time spent writing and reading spill files.",
            format!("{:.3}", (m.write_us + m.read_us) as f64 / 1e6),
        ),
    ];
    let mut out = String::new();
    for (name, kind, help, value) in rows {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name}{{worker=\"{label}\"}} {value}");
    }
    out
}

/// Serves a worker's `/metrics` and `/health` on `listen` from a thread of its own; returns the
/// address it serves on.
///
/// # Errors
/// When the port cannot be bound or the thread not started.
pub fn serve(listen: SocketAddr, stats: Arc<Mutex<WorkerStats>>) -> Result<SocketAddr, DashboardError> {
    let l = std::net::TcpListener::bind(listen).map_err(|e| DashboardError::Bind(listen.to_string(), e))?;
    l.set_nonblocking(true).map_err(|e| DashboardError::Bind(listen.to_string(), e))?;
    let address = l.local_addr().map_err(|e| DashboardError::Bind(listen.to_string(), e))?;
    std::thread::Builder::new()
        .name("rask-worker-metrics".into())
        .spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
            rt.block_on(async move {
                let Ok(l) = tokio::net::TcpListener::from_std(l) else { return };
                let app = Router::new().route("/health", get(|| async { "ok\n" })).route(
                    "/metrics",
                    get(move || {
                        let text = render(&stats.lock().unwrap_or_else(PoisonError::into_inner));
                        async move {
                            ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response()
                        }
                    }),
                );
                if let Err(e) = axum::serve(l, app).await {
                    eprintln!("rask worker: the metrics server stopped: {e}");
                }
            });
        })
        .map_err(DashboardError::Thread)?;
    Ok(address)
}
