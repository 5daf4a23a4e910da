//! The scheduler process: a thin shell around [`rask_scheduler_core::Core`].
//!
//! One task accepts connections; each connection gets a reader task (frames → events) and a
//! writer task (batched commands). One task owns the core and is the only place where state
//! changes: it turns inbound messages into events, and the core's commands into outbound
//! messages. No scheduling decision is made here.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};

use rask_graph::{Key, TaskError};
use rask_protocol::handshake::{self, Role, Welcome};
use rask_protocol::msg::{FromScheduler, MemoryReport, ToScheduler};
use rask_protocol::wire::{TaskBody, WireDep, WireError, WireTask, WireTicket};
use rask_scheduler_core::{
    ClientId, Command, Config, Core, Dep, Event, LossCause, NewTask, Restrictions, Ticket, WorkerId, WorkerSpec,
};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};

use crate::RuntimeError;
use crate::conn::{Outbox, SPIN_BEFORE_SLEEP, Turns, read_loop, recv_spinning};
use crate::feed::{Cause, FeedEvent, FeedSender, GRAPH_FEED_LIMIT, Publisher};

/// Connected peers by connection id (integer keys: the cheap hash).
type Peers = rask_graph::FxHashMap<u32, Peer>;

/// What a worker runs for a task; opaque to the core.
#[derive(Debug)]
pub(crate) struct Payload {
    /// As the client encoded it: forwarded, never decoded here.
    body: TaskBody,
    retries: u32,
    timeout_us: Option<u64>,
}

/// How to start a scheduler.
#[derive(Clone, Debug)]
pub struct SchedulerConfig {
    /// Interface to listen on.
    pub host: String,
    /// Port (0: any free port).
    pub port: u16,
    /// Scheduling policy tunables.
    pub core: Config,
    /// Where to publish what happens (task state changes, runs, workers) for observers such as
    /// the dashboard; `None` publishes nothing and records nothing.
    pub feed: Option<FeedSender>,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig { host: "127.0.0.1".into(), port: 8786, core: Config::default(), feed: None }
    }
}

/// A running scheduler.
pub struct SchedulerHandle {
    /// Its address, `tcp://HOST:PORT`.
    pub address: String,
    workers: Arc<AtomicUsize>,
    stop: Option<oneshot::Sender<String>>,
    done: Option<oneshot::Receiver<()>>,
}

impl SchedulerHandle {
    /// Number of workers connected now.
    #[must_use]
    pub fn workers(&self) -> usize {
        self.workers.load(Ordering::Relaxed)
    }

    /// Tells every client and worker that the scheduler is going away, then stops it.
    pub async fn shutdown(mut self, reason: &str) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(reason.to_owned());
        }
        if let Some(d) = self.done.take() {
            let _ = d.await;
        }
    }
}

enum Inbound {
    Joined {
        id: u32,
        role: Role,
        outbox: Outbox<FromScheduler>,
    },
    Frame {
        id: u32,
        messages: Vec<ToScheduler>,
    },
    Left {
        id: u32,
    },
    /// The core loop's timer fired (turned into `TickAt` with the time).
    Tick,
    TickAt(u64),
}

enum Peer {
    Client {
        outbox: Outbox<FromScheduler>,
    },
    Worker {
        address: Arc<str>,
        name: String,
        nthreads: u32,
        outbox: Outbox<FromScheduler>,
        /// Its latest memory report.
        memory: MemoryReport,
        /// Its memory limit, if any.
        memory_limit: Option<u64>,
    },
}

/// Binds and starts a scheduler on the current tokio runtime.
///
/// # Errors
/// When the address cannot be bound.
pub async fn start_scheduler(cfg: SchedulerConfig) -> Result<SchedulerHandle, RuntimeError> {
    let listener = TcpListener::bind((cfg.host.as_str(), cfg.port))
        .await
        .map_err(|e| RuntimeError::Bind(format!("{}:{}", cfg.host, cfg.port), e.to_string()))?;
    let local = listener.local_addr().map_err(|e| RuntimeError::Bind(cfg.host.clone(), e.to_string()))?;
    let address = format!("{}://{local}", rask_protocol::tls::scheme()?);
    let (in_tx, in_rx) = mpsc::unbounded_channel();
    let (stop_tx, stop_rx) = oneshot::channel();
    let (done_tx, done_rx) = oneshot::channel();
    let next_id = Arc::new(AtomicU32::new(1));
    let accept = tokio::spawn(accept_loop(listener, in_tx, next_id));
    let workers = Arc::new(AtomicUsize::new(0));
    let count = Arc::clone(&workers);
    let mut core_cfg = cfg.core;
    if let Some(feed) = &cfg.feed {
        core_cfg.record_transitions = true;
        let unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis().min(u128::from(u64::MAX)) as u64);
        let _ = feed.send(FeedEvent::Started { unix_ms, address: address.clone() }.into());
    }
    let feed = cfg.feed;
    tokio::spawn(async move {
        core_loop(core_cfg, in_rx, stop_rx, &count, feed).await;
        accept.abort();
        let _ = done_tx.send(());
    });
    Ok(SchedulerHandle { address, workers, stop: Some(stop_tx), done: Some(done_rx) })
}

async fn accept_loop(listener: TcpListener, tx: mpsc::UnboundedSender<Inbound>, next_id: Arc<AtomicU32>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                eprintln!("rask scheduler: accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let tx = tx.clone();
        let next_id = Arc::clone(&next_id);
        tokio::spawn(async move {
            if let Err(e) = serve(stream, &tx, &next_id).await {
                eprintln!("rask scheduler: connection from {peer} closed: {e}");
            }
        });
    }
}

async fn serve(
    stream: TcpStream,
    tx: &mpsc::UnboundedSender<Inbound>,
    next_id: &AtomicU32,
) -> Result<(), RuntimeError> {
    let mut stream = rask_protocol::tls::accept(stream, "the scheduler").await?;
    let role = handshake::accept(&mut stream, "the scheduler").await?;
    if role == Role::Peer {
        handshake::refuse(&mut stream, "this is a scheduler, not a worker's data port").await?;
        return Err(RuntimeError::Protocol(rask_protocol::ProtocolError::Refused(
            "peer connected to the scheduler".into(),
        )));
    }
    let id = next_id.fetch_add(1, Ordering::Relaxed);
    handshake::welcome(&mut stream, &Welcome { id: u64::from(id) }).await?;
    let (r, w) = stream.into_split();
    let outbox = Outbox::spawn(w);
    if tx.send(Inbound::Joined { id, role, outbox }).is_err() {
        return Ok(());
    }
    let result =
        read_loop::<ToScheduler>(r, |frame| tx.send(Inbound::Frame { id, messages: frame.messages }).is_ok()).await;
    let _ = tx.send(Inbound::Left { id });
    result.map_err(RuntimeError::from)
}

async fn core_loop(
    cfg: Config,
    mut rx: mpsc::UnboundedReceiver<Inbound>,
    mut stop: oneshot::Receiver<String>,
    worker_count: &AtomicUsize,
    feed: Option<FeedSender>,
) {
    let mut core: Core<Arc<Payload>> = Core::new(cfg);
    let mut peers: Peers = Peers::default();
    // Reused across events: the loop runs once per task event.
    let mut commands: Vec<Command<Arc<Payload>>> = Vec::new();
    let mut frees: Vec<(WorkerId, Vec<Key>)> = Vec::new();
    // What is published, when a feed is attached.
    let mut publisher = feed.map(Publisher::new);
    // Events other than task changes that a turn publishes.
    let mut extra: Vec<FeedEvent> = Vec::new();
    // The core's clock: microseconds since the scheduler started.
    let started = std::time::Instant::now();
    let now_us = move || started.elapsed().as_micros().min(u128::from(u64::MAX)) as u64;
    let mut ticker = tokio::time::interval(std::time::Duration::from_millis(250));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut turns = Turns::default();
    loop {
        let inbound = tokio::select! {
            // The next report usually follows within a round-trip (see `recv_spinning`).
            m = recv_spinning(&mut rx, SPIN_BEFORE_SLEEP) => match m { Some(m) => m, None => break },
            _ = ticker.tick() => Inbound::Tick,
            reason = &mut stop => {
                let reason = reason.unwrap_or_else(|_| "scheduler stopped".into());
                for p in peers.values() {
                    let (Peer::Client { outbox } | Peer::Worker { outbox, .. }) = p;
                    outbox.send(FromScheduler::Shutdown { reason: reason.clone() }, Vec::new());
                }
                // Give writers a moment to flush the goodbyes.
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                break;
            }
        };
        let heard = match &inbound {
            Inbound::Frame { id, .. } if matches!(peers.get(id), Some(Peer::Worker { .. })) => Some(*id),
            _ => None,
        };
        let ticked = matches!(inbound, Inbound::Tick);
        let inbound = match inbound {
            Inbound::Tick => Inbound::TickAt(now_us()),
            other => other,
        };
        // Acknowledge submissions once the core has taken them in (clients can measure intake).
        let accepted: Vec<(u32, u64)> = match &inbound {
            Inbound::Frame { id, messages } => messages
                .iter()
                .filter_map(|m| match m {
                    ToScheduler::SubmitGraph { tasks, .. } => Some((*id, tasks.len() as u64)),
                    _ => None,
                })
                .collect(),
            _ => Vec::new(),
        };
        let publishing = publisher.is_some();
        // One clock reading per turn, for what it publishes and for when a worker was heard.
        let turn_us = if publishing || heard.is_some() { now_us() } else { 0 };
        let mut events = translate(inbound, &mut peers, &core, publishing.then_some((&mut extra, turn_us)));
        if let Some(p) = &mut publisher {
            for e in extra.drain(..) {
                p.event(&mut core, e);
            }
        }
        if let Some(id) = heard {
            events.push(Event::WorkerHeard { worker: WorkerId(id), at_us: turn_us });
        }
        if events.is_empty() {
            // Memory reports may have been published.
            send_feed(&mut publisher, &mut core, ticked, turn_us);
            continue;
        }
        if debug_events() {
            for e in &events {
                eprintln!("event: {}", format!("{e:?}").chars().take(200).collect::<String>());
            }
        }
        worker_count.store(peers.values().filter(|p| matches!(p, Peer::Worker { .. })).count(), Ordering::Relaxed);
        for ev in events {
            let cause = publisher.as_mut().map(|p| {
                let (cause, event) = published_by(&ev, &peers, turn_us);
                if let Some(e) = event {
                    p.event(&mut core, e);
                }
                cause
            });
            let before = core.transitions_pending();
            core.handle_into(ev, &mut commands);
            if let (Some(p), Some(cause)) = (&mut publisher, cause) {
                p.caused(&mut core, before, cause, turn_us);
            }
            for cmd in commands.drain(..) {
                // A worker gets its pending frees before anything else is sent to it: a value
                // freed, recomputed and stored again must not meet its old `Free` afterwards.
                let to = match &cmd {
                    Command::Compute { worker, .. }
                    | Command::Acquire { worker, .. }
                    | Command::Steal { worker, .. } => Some(*worker),
                    _ => None,
                };
                if let Some(i) = to.and_then(|w| frees.iter().position(|(fw, _)| *fw == w)) {
                    let (worker, keys) = frees.swap_remove(i);
                    send_frees(&peers, worker, keys);
                }
                match cmd {
                    // One Free per worker per frame, not one per key.
                    Command::Free { worker, key } => match frees.iter_mut().find(|(w, _)| *w == worker) {
                        Some((_, keys)) => keys.push(key),
                        None => frees.push((worker, vec![key])),
                    },
                    // Dropping its outbox closes our side of the connection: a worker that was
                    // only frozen sees it when it wakes, and joins again as a new worker (its
                    // data was counted as lost).
                    Command::DropWorker { worker, cause } => {
                        if let Some(Peer::Worker { name, .. }) = peers.remove(&worker.0) {
                            eprintln!("rask scheduler: removed worker {name}: {cause}");
                        }
                        if let Some(p) = &mut publisher {
                            let at_us = turn_us;
                            p.event(
                                &mut core,
                                FeedEvent::WorkerLeft { at_us, worker: worker.0, cause: cause.to_string() },
                            );
                        }
                    }
                    Command::Retired { worker } => {
                        if let Some(p) = &mut publisher {
                            let (at_us, cause) = (turn_us, "retired gracefully (SIGTERM)".to_owned());
                            p.event(&mut core, FeedEvent::WorkerLeft { at_us, worker: worker.0, cause });
                        }
                        if let Some(Peer::Worker { outbox, name, .. }) = peers.remove(&worker.0) {
                            eprintln!("rask scheduler: worker {name} retired; its results live on elsewhere");
                            let reason = "retired: its results were moved to other workers".to_owned();
                            outbox.send(FromScheduler::Shutdown { reason }, Vec::new());
                        }
                    }
                    cmd => dispatch(cmd, &peers),
                }
            }
        }
        // The rest of the frame's frees (a worker's go out before anything else sent to it).
        for (worker, keys) in frees.drain(..) {
            send_frees(&peers, worker, keys);
        }
        for (id, tasks) in accepted {
            if let Some(Peer::Client { outbox }) = peers.get(&id) {
                outbox.send(FromScheduler::GraphAccepted { tasks }, Vec::new());
            }
        }
        send_feed(&mut publisher, &mut core, ticked, turn_us);
        // Under load, let the writers send what these turns produced (see `Turns`).
        turns.pause().await;
    }
    send_feed(&mut publisher, &mut core, true, now_us());
}

/// Sends what the publisher has gathered when it is time by `at_us` (`now`: at once). When
/// the observer is gone (its thread ended), stops publishing and recording for it.
fn send_feed(publisher: &mut Option<Publisher>, core: &mut Core<Arc<Payload>>, now: bool, at_us: u64) {
    if publisher.as_mut().is_some_and(|p| !p.send(core, now, at_us)) {
        eprintln!("rask scheduler: the dashboard's feed closed; no longer publishing");
        *publisher = None;
        core.stop_recording();
    }
}

/// The cause the state changes an event brings about are filed under, and what else it
/// publishes (a graph, a worker joining or leaving), if anything.
fn published_by(ev: &Event<Arc<Payload>>, peers: &Peers, now_us: u64) -> (Cause, Option<FeedEvent>) {
    let extra = match ev {
        Event::GraphPart { tasks, .. } | Event::GraphSubmitted { tasks, .. } if tasks.len() <= GRAPH_FEED_LIMIT => {
            // Copies, not clones: the observer's thread must not share these keys' reference
            // counts with the scheduler's.
            let copy = |k: &Key| Key::new(k.as_str());
            let key_of = |d: &Dep| match d {
                Dep::Key(k) => Some(copy(k)),
                Dep::Position(i) => tasks.get(*i as usize).map(|t| copy(&t.key)),
            };
            let tasks = tasks.iter().map(|t| (copy(&t.key), t.deps.iter().filter_map(key_of).collect())).collect();
            Some(FeedEvent::Graph { tasks })
        }
        Event::WorkerConnected { worker, spec } => {
            let memory_limit = match peers.get(&worker.0) {
                Some(Peer::Worker { memory_limit, .. }) => *memory_limit,
                _ => None,
            };
            Some(FeedEvent::WorkerJoined {
                at_us: now_us,
                worker: worker.0,
                name: spec.name.to_string(),
                address: spec.address.to_string(),
                nthreads: spec.nthreads,
                memory_limit,
            })
        }
        Event::WorkerDisconnected { worker, cause } => {
            Some(FeedEvent::WorkerLeft { at_us: now_us, worker: worker.0, cause: cause.to_string() })
        }
        _ => None,
    };
    (cause_of(ev), extra)
}

/// The cause an event's state changes are filed under.
fn cause_of(ev: &Event<Arc<Payload>>) -> Cause {
    match ev {
        Event::GraphPart { client, .. } | Event::GraphSubmitted { client, .. } => Cause::Submitted { client: client.0 },
        Event::TaskFinished { worker, .. } => Cause::Finished { worker: worker.0 },
        Event::TaskFailed { worker, .. } => Cause::Failed { worker: worker.0 },
        Event::InputsMissing { worker, .. } | Event::TaskDropped { worker, .. } => {
            Cause::InputsMissing { worker: worker.0 }
        }
        Event::WorkerConnected { worker, .. } => Cause::WorkerJoined { worker: worker.0 },
        Event::WorkerDisconnected { worker, .. } => Cause::WorkerLeft { worker: worker.0 },
        Event::WorkerHeard { worker, .. }
        | Event::WorkerRetiring { worker }
        | Event::WorkerPaused { worker, .. }
        | Event::DataAcquired { worker, .. } => Cause::Worker { worker: worker.0 },
        Event::ClientConnected { client }
        | Event::ClientDisconnected { client }
        | Event::KeysReleased { client, .. }
        | Event::KeysCancelled { client, .. }
        | Event::DataScattered { client, .. } => Cause::Client { client: client.0 },
        Event::KeysFireAndForget { .. } => Cause::FireAndForget,
        Event::AcquireFailed { .. } | Event::Tick { .. } => Cause::Tick,
    }
}

/// Whether to print every event to standard error (`RASK_DEBUG_EVENTS=1`), for debugging.
fn debug_events() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("RASK_DEBUG_EVENTS").is_some())
}

/// Turns an inbound message into core events; memory reports are published to `feed` (the
/// turn's list and the time) when there is one.
fn translate(
    inbound: Inbound,
    peers: &mut Peers,
    core: &Core<Arc<Payload>>,
    mut feed: Option<(&mut Vec<FeedEvent>, u64)>,
) -> Vec<Event<Arc<Payload>>> {
    match inbound {
        Inbound::Tick => Vec::new(),
        Inbound::TickAt(now_us) => vec![Event::Tick { now_us }],
        Inbound::Joined { id, role, outbox } => match role {
            Role::Client { .. } => {
                peers.insert(id, Peer::Client { outbox });
                vec![Event::ClientConnected { client: ClientId(id) }]
            }
            Role::Worker(info) => {
                let address: Arc<str> = Arc::from(info.data_address.as_str());
                peers.insert(
                    id,
                    Peer::Worker {
                        address: Arc::clone(&address),
                        name: info.name.clone(),
                        nthreads: info.nthreads,
                        outbox,
                        memory: MemoryReport::default(),
                        memory_limit: info.memory_limit,
                    },
                );
                let spec = WorkerSpec {
                    name: Arc::from(info.name.as_str()),
                    address,
                    nthreads: info.nthreads,
                    resources: info.resources.iter().map(|(n, a)| (Arc::from(n.as_str()), *a)).collect(),
                    restarted_after: info.restarted_after.clone(),
                };
                if let Some(why) = &info.restarted_after {
                    eprintln!("rask scheduler: worker {} is back; its previous process {why}", info.name);
                }
                vec![Event::WorkerConnected { worker: WorkerId(id), spec }]
            }
            Role::Peer => Vec::new(),
        },
        Inbound::Left { id } => match peers.remove(&id) {
            Some(Peer::Client { .. }) => vec![Event::ClientDisconnected { client: ClientId(id) }],
            Some(Peer::Worker { name, .. }) => {
                eprintln!("rask scheduler: worker {name} left: {}", LossCause::ConnectionClosed);
                vec![Event::WorkerDisconnected { worker: WorkerId(id), cause: LossCause::ConnectionClosed }]
            }
            None => Vec::new(),
        },
        Inbound::Frame { id, messages } => {
            let is_worker = matches!(peers.get(&id), Some(Peer::Worker { .. }));
            let mut events = Vec::new();
            for m in messages {
                match m {
                    // Answered by the shell: it is about connections, not scheduling.
                    ToScheduler::WhoIsThere => {
                        let workers = peers
                            .values()
                            .filter_map(|p| match p {
                                Peer::Worker { address, name, nthreads, .. } => {
                                    Some((name.clone(), address.to_string(), *nthreads))
                                }
                                Peer::Client { .. } => None,
                            })
                            .collect();
                        let memory = peers
                            .values()
                            .filter_map(|p| match p {
                                Peer::Worker { name, memory, .. } => Some((name.clone(), *memory)),
                                Peer::Client { .. } => None,
                            })
                            .collect();
                        let departed = core
                            .departures()
                            .map(|d| (d.name.to_string(), d.address.to_string(), d.cause.to_string()))
                            .collect();
                        if let Some(Peer::Client { outbox }) = peers.get(&id) {
                            outbox.send(FromScheduler::Workers { workers, departed, memory }, Vec::new());
                        }
                    }
                    ToScheduler::Memory { report } if is_worker => {
                        if let Some((out, at_us)) = &mut feed {
                            out.push(FeedEvent::WorkerMemory {
                                at_us: *at_us,
                                worker: id,
                                managed: report.managed,
                                spilled: report.spilled,
                                rss: report.rss,
                                cpu_us: report.cpu_us,
                                spill_written: report.written,
                                spill_read: report.read,
                                fetched: report.fetched,
                            });
                        }
                        if let Some(Peer::Worker { memory, .. }) = peers.get_mut(&id) {
                            *memory = report;
                        }
                    }
                    // A worker leaving on purpose: its departure carries its reason.
                    ToScheduler::Goodbye { reason } if is_worker => {
                        if let Some(Peer::Worker { name, .. }) = peers.remove(&id) {
                            eprintln!("rask scheduler: worker {name} left: {reason}");
                        }
                        events.push(Event::WorkerDisconnected { worker: WorkerId(id), cause: LossCause::Said(reason) });
                        break;
                    }
                    ToScheduler::Scattered { items } if !is_worker => {
                        let by_address: HashMap<&str, WorkerId> = peers
                            .iter()
                            .filter_map(|(wid, p)| match p {
                                Peer::Worker { address, .. } => Some((&**address, WorkerId(*wid))),
                                Peer::Client { .. } => None,
                            })
                            .collect();
                        let items = items
                            .into_iter()
                            .map(|(k, nbytes, addrs)| {
                                let holders =
                                    addrs.iter().filter_map(|a| by_address.get(a.as_str()).copied()).collect();
                                (k, nbytes, holders)
                            })
                            .collect();
                        events.push(Event::DataScattered { client: ClientId(id), items });
                    }
                    m => events.extend(message_event(id, peers, is_worker, m)),
                }
            }
            events
        }
    }
}

/// The worker whose data address is `addr`.
fn worker_at(peers: &Peers, addr: &str) -> Option<WorkerId> {
    peers.iter().find_map(|(id, p)| match p {
        Peer::Worker { address, .. } if &**address == addr => Some(WorkerId(*id)),
        _ => None,
    })
}

fn message_event(id: u32, peers: &Peers, is_worker: bool, m: ToScheduler) -> Option<Event<Arc<Payload>>> {
    let (client, worker) = (ClientId(id), WorkerId(id));
    Some(match (is_worker, m) {
        (false, ToScheduler::SubmitPart { tasks }) => {
            Event::GraphPart { client, tasks: tasks.into_iter().map(new_task).collect() }
        }
        (false, ToScheduler::SubmitGraph { tasks, wanted }) => {
            Event::GraphSubmitted { client, tasks: tasks.into_iter().map(new_task).collect(), wanted }
        }
        (false, ToScheduler::Release { keys }) => Event::KeysReleased { client, keys },
        (false, ToScheduler::Cancel { keys }) => Event::KeysCancelled { client, keys },
        (false, ToScheduler::FireAndForget { keys }) => Event::KeysFireAndForget { keys },
        (true, ToScheduler::TaskFinished { key, ticket, nbytes, duration_us }) => {
            Event::TaskFinished { worker, key, ticket: Some(ticket_of(ticket)), nbytes, duration_us }
        }
        (true, ToScheduler::TaskFailed { key, ticket, error }) => {
            Event::TaskFailed { worker, key, ticket: Some(ticket_of(ticket)), error: Arc::new(TaskError::from(error)) }
        }
        (true, ToScheduler::MissingInputs { key, ticket, missing }) => {
            let ticket = Some(ticket_of(ticket));
            let missing = missing.into_iter().filter_map(|(k, addr)| worker_at(peers, &addr).map(|w| (k, w))).collect();
            Event::InputsMissing { worker, key, ticket, missing }
        }
        (true, ToScheduler::TaskDropped { key, ticket }) => {
            Event::TaskDropped { worker, key, ticket: Some(ticket_of(ticket)) }
        }
        (true, ToScheduler::Retire) => {
            if let Some(Peer::Worker { name, .. }) = peers.get(&id) {
                eprintln!("rask scheduler: worker {name} is retiring; moving its results");
            }
            Event::WorkerRetiring { worker }
        }
        (true, ToScheduler::Acquired { key, nbytes }) => Event::DataAcquired { worker, key, nbytes },
        (true, ToScheduler::AcquireFailed { key }) => Event::AcquireFailed { key },
        (true, ToScheduler::Paused { paused }) => {
            if let Some(Peer::Worker { name, .. }) = peers.get(&id) {
                let what = if paused { "paused: its memory is over 80% of its limit" } else { "resumed" };
                eprintln!("rask scheduler: worker {name} {what}");
            }
            Event::WorkerPaused { worker, paused }
        }
        (_, ToScheduler::Heartbeat) => return None,
        (_, other) => {
            eprintln!("rask scheduler: ignoring a message not meant for this kind of peer: {other:?}");
            return None;
        }
    })
}

fn new_task(t: WireTask) -> NewTask<Arc<Payload>> {
    let ann = t.annotations.map(|a| *a).unwrap_or_default();
    let restrictions = (!ann.resources.is_empty() || !ann.workers.is_empty()).then(|| {
        Box::new(Restrictions {
            resources: ann.resources.iter().map(|(n, a)| (Arc::from(n.as_str()), *a)).collect(),
            workers: ann.workers.iter().map(|w| Arc::from(w.as_str())).collect(),
            allow_other_workers: ann.allow_other_workers,
        })
    });
    NewTask {
        key: t.key,
        deps: t
            .deps
            .into_iter()
            .map(|d| match d {
                WireDep::Key(k) => Dep::Key(k),
                WireDep::Position(i) => Dep::Position(i),
            })
            .collect(),
        payload: Arc::new(Payload { body: t.body, retries: ann.retries, timeout_us: ann.timeout_us }),
        priority: ann.priority,
        order: t.order,
        restrictions,
        wanted: t.wanted,
    }
}

fn ticket_of(t: WireTicket) -> Ticket {
    Ticket { slot: t.slot, serial: t.serial }
}

fn send_frees(peers: &Peers, worker: WorkerId, keys: Vec<Key>) {
    if let Some(Peer::Worker { outbox, .. }) = peers.get(&worker.0) {
        outbox.send(FromScheduler::Free { keys }, Vec::new());
    }
}

fn address_of(peers: &Peers, w: WorkerId) -> Option<Arc<str>> {
    match peers.get(&w.0) {
        Some(Peer::Worker { address, .. }) => Some(Arc::clone(address)),
        _ => None,
    }
}

fn dispatch(cmd: Command<Arc<Payload>>, peers: &Peers) {
    let send = |id: u32, m: FromScheduler| {
        if let Some(Peer::Client { outbox } | Peer::Worker { outbox, .. }) = peers.get(&id) {
            outbox.send(m, Vec::new());
        }
    };
    match cmd {
        // Handled by the core loop, which owns the peer table (and batches frees per worker).
        Command::DropWorker { .. } | Command::Retired { .. } | Command::Free { .. } => {}
        Command::Acquire { worker, key, from } => {
            if let Some(address) = address_of(peers, from) {
                send(worker.0, FromScheduler::Acquire { keys: vec![(key, address)] });
            }
        }
        Command::Compute { worker, key, payload, inputs, prio, ticket } => {
            // Only the other holders are named: the worker finds its own copies itself (and
            // asks itself, to say it lacks one, if none is named); a local input then costs no
            // address to encode and decode.
            let inputs = inputs
                .into_iter()
                .map(|(k, holders)| {
                    let others = holders.iter().filter(|h| **h != worker);
                    (k, others.filter_map(|h| address_of(peers, *h)).collect())
                })
                .collect();
            let msg = FromScheduler::Compute {
                key,
                body: payload.body.clone(),
                inputs,
                retries: payload.retries,
                timeout_us: payload.timeout_us,
                priority: prio,
                ticket: WireTicket { slot: ticket.slot, serial: ticket.serial },
            };
            send(worker.0, msg);
        }
        Command::Steal { worker, key } => send(worker.0, FromScheduler::Steal { keys: vec![key] }),
        Command::KeyInMemory { client, key, workers, nbytes } => {
            let workers = workers.iter().filter_map(|w| address_of(peers, *w).map(|a| a.to_string())).collect();
            send(client.0, FromScheduler::KeyInMemory { key, workers, nbytes });
        }
        Command::KeyErred { client, key, error } => {
            send(client.0, FromScheduler::KeyErred { key, error: WireError::from(&*error) });
        }
        Command::KeyCancelled { client, key } => send(client.0, FromScheduler::KeyCancelled { key }),
        Command::KeyLost { client, key } => send(client.0, FromScheduler::KeyLost { key }),
        Command::Progress { client, done, total } => send(client.0, FromScheduler::Progress { done, total }),
    }
}
