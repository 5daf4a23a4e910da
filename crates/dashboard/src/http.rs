//! The HTTP side: pages, JSON endpoints, server-sent events, `/health` and `/metrics`. Every
//! handler reads the model under its lock and answers; none waits while holding it.

use std::convert::Infallible;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::Router;
use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use futures_util::Stream;
use serde::Deserialize;
use serde_json::json;

use crate::model::Model;

/// The model as the handlers share it.
pub(crate) type Shared = Arc<Mutex<Model>>;

fn lock(m: &Shared) -> std::sync::MutexGuard<'_, Model> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The page: one file, scripts and styles inline, no network access needed.
const INDEX: &str = include_str!("assets/index.html");

/// How often server-sent events check for news.
const SSE_PERIOD: Duration = Duration::from_millis(300);

/// Task runs sent per stream request or event at most.
const STREAM_BATCH: usize = 5_000;

pub(crate) fn router(model: Shared) -> Router {
    Router::new()
        .route("/", get(|| async { Html(INDEX) }))
        .route("/health", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics))
        .route("/api/status", get(status))
        .route("/api/stream", get(stream))
        .route("/api/task", get(task))
        .route("/api/worker", get(worker))
        .route("/api/graph", get(graph))
        .route("/api/events", get(events))
        .route("/report", get(report))
        .with_state(model)
}

async fn metrics(State(m): State<Shared>) -> Response {
    let text = lock(&m).metrics();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response()
}

async fn status(State(m): State<Shared>) -> Response {
    axum::Json(lock(&m).status()).into_response()
}

#[derive(Deserialize)]
struct After {
    #[serde(default)]
    after: u64,
}

async fn stream(State(m): State<Shared>, Query(q): Query<After>) -> Response {
    let model = lock(&m);
    let items = model.stream_after(q.after, STREAM_BATCH);
    axum::Json(json!({ "items": items })).into_response()
}

#[derive(Deserialize)]
struct KeyQuery {
    key: String,
}

async fn task(State(m): State<Shared>, Query(q): Query<KeyQuery>) -> Response {
    let model = lock(&m);
    let (phase, story) = model.story(&q.key);
    if phase.is_none() && story.is_empty() {
        return (StatusCode::NOT_FOUND, axum::Json(json!({ "error": format!("no task {:?} seen", q.key) })))
            .into_response();
    }
    axum::Json(json!({ "key": q.key, "phase": phase, "story": story })).into_response()
}

#[derive(Deserialize)]
struct NameQuery {
    name: String,
}

async fn worker(State(m): State<Shared>, Query(q): Query<NameQuery>) -> Response {
    match lock(&m).worker(&q.name) {
        Some((w, memory, runs)) => axum::Json(json!({ "worker": w, "memory": memory, "runs": runs })).into_response(),
        None => (StatusCode::NOT_FOUND, axum::Json(json!({ "error": format!("no worker {:?} seen", q.name) })))
            .into_response(),
    }
}

async fn graph(State(m): State<Shared>) -> Response {
    let model = lock(&m);
    let (nodes, truncated) = model.graph();
    let nodes: Vec<_> =
        nodes.iter().map(|(k, deps, phase)| json!({ "key": k, "deps": deps, "phase": phase })).collect();
    axum::Json(json!({ "nodes": nodes, "truncated": truncated })).into_response()
}

/// Live updates: a `status` event whenever anything changed, and `stream` events with the task
/// runs since the last one.
async fn events(State(m): State<Shared>) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let state = (m, u64::MAX, 0u64, true);
    let stream = futures_util::stream::unfold(state, |(m, mut version, mut seq, mut first)| async move {
        loop {
            if !first {
                tokio::time::sleep(SSE_PERIOD).await;
            }
            first = false;
            let mut model = lock(&m);
            if model.version() == version {
                continue;
            }
            version = model.version();
            let status = model.status();
            let runs = model.stream_after(seq, STREAM_BATCH);
            drop(model);
            if let Some(last) = runs.last() {
                seq = last.seq;
            }
            let data = json!({ "status": status, "runs": runs }).to_string();
            return Some((Ok(Event::default().event("update").data(data)), (m, version, seq, first)));
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

/// A standalone page with the data built in: opens offline, after the run.
async fn report(State(m): State<Shared>) -> Response {
    let html = report_html(&mut lock(&m));
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], html).into_response()
}

/// The dashboard page with a snapshot of the model built in (the page then draws from it
/// instead of asking the server).
pub(crate) fn report_html(model: &mut Model) -> String {
    let data = json!({
        "status": model.status(),
        "runs": model.stream_after(0, usize::MAX),
        "memory": model.memory_history(),
    });
    // `</` cannot end the script element early once escaped.
    let data = data.to_string().replace("</", "<\\/");
    INDEX.replace("/*REPORT_DATA*/null", &data)
}
