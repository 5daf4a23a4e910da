//! Connection plumbing shared by the scheduler, workers and clients: dialing and accepting with
//! the handshake, a batching writer task fed by a channel, and a reader loop.

use std::sync::Arc;

use bytes::Bytes;
use rask_protocol::ProtocolError;
use rask_protocol::frame::{Frame, read_frame, write_frame};
use rask_protocol::handshake::{self, Role, Welcome};
use rask_protocol::tls::{ReadHalf, Stream, WriteHalf};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::BufWriter;
use tokio::sync::mpsc;

/// What the writer task receives: a message with its blobs, or a request to report once
/// everything queued before it has been written.
enum Item<M> {
    Msg(M, Vec<Bytes>),
    Many(Vec<M>),
    /// A large message that gets a frame of its own, so the peer can decode and handle it
    /// while the next one is still being encoded here.
    Alone(M),
    Flushed(tokio::sync::oneshot::Sender<()>),
}

/// Messages queued for one connection, written in batches by its writer task.
pub(crate) struct Outbox<M> {
    tx: mpsc::UnboundedSender<Item<M>>,
}

impl<M> Clone for Outbox<M> {
    fn clone(&self) -> Self {
        Outbox { tx: self.tx.clone() }
    }
}

impl<M: Serialize + Send + Sync + 'static> Outbox<M> {
    /// Starts the writer task for `w`. It ends when every `Outbox` is dropped or a write fails.
    pub(crate) fn spawn(w: WriteHalf) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(write_loop(BufWriter::with_capacity(64 * 1024, w), rx));
        Outbox { tx }
    }

    /// Queues a message (with the blobs its values refer to). Returns false if the connection
    /// is gone.
    pub(crate) fn send(&self, msg: M, blobs: Vec<Bytes>) -> bool {
        self.tx.send(Item::Msg(msg, blobs)).is_ok()
    }

    /// Queues several messages without payloads at once (one channel operation). Returns false
    /// if the connection is gone.
    pub(crate) fn send_many(&self, msgs: Vec<M>) -> bool {
        msgs.is_empty() || self.tx.send(Item::Many(msgs)).is_ok()
    }

    /// Queues a large message to travel in its own frame (see [`Item::Alone`]). Returns false
    /// if the connection is gone.
    pub(crate) fn send_alone(&self, msg: M) -> bool {
        self.tx.send(Item::Alone(msg)).is_ok()
    }

    /// Resolves once everything queued so far has been written to the socket (or the
    /// connection is gone). Used before closing, so nothing queued is lost.
    pub(crate) async fn flushed(&self) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        if self.tx.send(Item::Flushed(tx)).is_ok() {
            let _ = rx.await;
        }
    }
}

/// Paces an event loop that shares its thread with connection writers (the scheduler's and
/// workers' shells run on single-threaded runtimes). Under load messages keep arriving, and
/// such a loop would not yield for a long time: `recv().await` only after tokio's budget of
/// 128 receives, and [`recv_spinning`] not at all while a message is waiting. What it produced
/// meanwhile — tasks for workers, results for the scheduler — would wait in the writers'
/// queues, and the other side run dry. [`Turns::pause`] yields once the loop has run
/// [`Turns::EVERY`] without doing so.
pub(crate) struct Turns {
    since: std::time::Instant,
}

impl Default for Turns {
    fn default() -> Self {
        Turns { since: std::time::Instant::now() }
    }
}

impl Turns {
    /// The longest a loop keeps its thread from the writers (a turn longer than this is not
    /// cut short; the pause comes after it).
    pub(crate) const EVERY: std::time::Duration = std::time::Duration::from_micros(100);

    /// Call after each turn: yields to the other tasks on this thread if it is time.
    pub(crate) async fn pause(&mut self) {
        if self.since.elapsed() >= Self::EVERY {
            tokio::task::yield_now().await;
            self.since = std::time::Instant::now();
        }
    }
}

/// How long an idle loop (the scheduler's, a worker's, an executor thread) polls for its next
/// message or job before sleeping: about a few round-trips between processes.
pub(crate) const SPIN_BEFORE_SLEEP: std::time::Duration = std::time::Duration::from_micros(200);

/// Receives the next message, polling for up to `spin` (letting other threads on this CPU and
/// the other tasks on this thread run in between) before sleeping until one comes. For loops
/// whose next message usually follows within a round-trip: waking a sleeping thread costs
/// tens of microseconds on a busy or virtual machine. `None` when every sender is gone. It
/// does not yield while messages are waiting: a loop using it paces itself with [`Turns`].
pub(crate) async fn recv_spinning<T>(rx: &mut mpsc::UnboundedReceiver<T>, spin: std::time::Duration) -> Option<T> {
    let mut until = None;
    loop {
        match rx.try_recv() {
            Ok(m) => return Some(m),
            Err(mpsc::error::TryRecvError::Disconnected) => return None,
            Err(mpsc::error::TryRecvError::Empty) => {
                let now = std::time::Instant::now();
                if now >= *until.get_or_insert(now + spin) {
                    return rx.recv().await;
                }
                // Another thread that wants this CPU gets it; then this thread's sockets are
                // polled (tokio wakes a yielded task after polling its I/O driver).
                std::thread::yield_now();
                tokio::task::yield_now().await;
            }
        }
    }
}

/// Most messages per frame; larger batches are split.
const MAX_BATCH: usize = 4096;

async fn write_loop<M: Serialize>(mut w: BufWriter<WriteHalf>, mut rx: mpsc::UnboundedReceiver<Item<M>>) {
    use tokio::io::AsyncWriteExt;
    let mut batch: Vec<M> = Vec::new();
    let mut waiting: Vec<tokio::sync::oneshot::Sender<()>> = Vec::new();
    while let Some(first) = rx.recv().await {
        // Everything already queued goes out together. A message with blobs travels alone in
        // its frame, because its blob indices count from zero.
        let mut next = Some(first);
        while let Some(item) = next.take() {
            let ok = match item {
                Item::Msg(m, blobs) if blobs.is_empty() => {
                    batch.push(m);
                    batch.len() < MAX_BATCH || flush_batch(&mut w, &mut batch).await
                }
                Item::Msg(m, blobs) => {
                    flush_batch(&mut w, &mut batch).await && write_frame(&mut w, &[m], &blobs).await.is_ok()
                }
                Item::Many(ms) => {
                    let mut ok = true;
                    for m in ms {
                        batch.push(m);
                        if batch.len() >= MAX_BATCH {
                            ok = ok && flush_batch(&mut w, &mut batch).await;
                        }
                    }
                    ok
                }
                Item::Alone(m) => {
                    flush_batch(&mut w, &mut batch).await
                        && write_frame(&mut w, &[m], &[]).await.is_ok()
                        && w.flush().await.is_ok()
                }
                Item::Flushed(done) => {
                    waiting.push(done);
                    true
                }
            };
            if !ok {
                return;
            }
            next = rx.try_recv().ok();
        }
        if !flush_batch(&mut w, &mut batch).await || w.flush().await.is_err() {
            return;
        }
        for done in waiting.drain(..) {
            let _ = done.send(());
        }
    }
    let _ = w.shutdown().await;
}

async fn flush_batch<M: Serialize>(w: &mut BufWriter<WriteHalf>, batch: &mut Vec<M>) -> bool {
    if batch.is_empty() {
        return true;
    }
    let ok = write_frame(w, batch, &[]).await.is_ok();
    batch.clear();
    ok
}

/// Reads frames until the connection closes or sends garbage.
pub(crate) async fn read_loop<M: DeserializeOwned>(
    mut r: ReadHalf,
    mut on_frame: impl FnMut(Frame<M>) -> bool,
) -> Result<(), ProtocolError> {
    while let Some(frame) = read_frame::<_, M>(&mut r).await? {
        if !on_frame(frame) {
            break;
        }
    }
    Ok(())
}

/// Dials `address` (over TLS when this process has it) and performs the handshake as `role`.
pub(crate) async fn dial(address: &str, role: &Role) -> Result<(Stream, Welcome), ProtocolError> {
    let mut stream = rask_protocol::tls::connect(address).await?;
    let welcome =
        handshake::connect(&mut stream, role).await.map_err(|e| rask_protocol::tls::explain_failure(address, e))?;
    Ok((stream, welcome))
}

/// A pool of connections to workers' data ports, one per address, each used by one request at
/// a time.
#[derive(Default, Clone)]
pub(crate) struct PeerPool {
    conns: Arc<tokio::sync::Mutex<std::collections::HashMap<String, PeerSlot>>>,
}

/// What a worker answered for one key: the value, `None` if it does not hold it, or why it
/// cannot send it.
pub(crate) type Fetched = Result<Option<rask_graph::Value>, String>;

/// One cached connection to a peer (`None` until first used or after a failure).
type PeerSlot = Arc<tokio::sync::Mutex<Option<Stream>>>;

impl PeerPool {
    /// One request/response exchange with the worker at `address` over its pooled connection.
    ///
    /// The stream is taken out of the pool while in use and put back only after a complete
    /// exchange, so a request dropped halfway (cancelled future) never leaves a desynchronised
    /// connection behind; the next request simply dials again.
    async fn exchange(
        &self,
        address: &str,
        request: rask_protocol::msg::PeerMsg,
        blobs: &[Bytes],
    ) -> Result<Vec<Frame<rask_protocol::msg::PeerMsg>>, ProtocolError> {
        let slot = {
            let mut conns = self.conns.lock().await;
            Arc::clone(conns.entry(address.to_owned()).or_default())
        };
        let mut guard = slot.lock().await;
        let mut stream = match guard.take() {
            Some(s) => s,
            None => dial(address, &Role::Peer).await?.0,
        };
        write_frame(&mut stream, &[request], blobs).await?;
        // TLS keeps the end of a write in its session buffer until flushed.
        tokio::io::AsyncWriteExt::flush(&mut stream).await?;
        let mut frames = Vec::new();
        // An answer may span several frames, but not without bound.
        let mut frames_left = 64usize;
        loop {
            frames_left = frames_left.checked_sub(1).ok_or_else(|| {
                ProtocolError::Malformed(format!("worker {address} answered with more than 64 frames"))
            })?;
            let frame = read_frame(&mut stream)
                .await?
                .ok_or_else(|| ProtocolError::Refused(format!("worker {address} closed the connection")))?;
            let more = frame.messages.iter().any(|m| matches!(m, rask_protocol::msg::PeerMsg::Data { more: true, .. }));
            frames.push(frame);
            if !more {
                break;
            }
        }
        *guard = Some(stream);
        Ok(frames)
    }

    /// Stores values on the worker at `address` (scatter); returns once they are stored.
    pub(crate) async fn put_data(
        &self,
        address: &str,
        values: Vec<(rask_graph::Key, rask_graph::Value)>,
    ) -> Result<(), ProtocolError> {
        use rask_protocol::msg::PeerMsg;
        let mut blobs = Vec::new();
        let values =
            values.iter().map(|(k, v)| (k.clone(), rask_protocol::wire::value_to_wire(v, &mut blobs))).collect();
        let frames = self.exchange(address, PeerMsg::PutData { values }, &blobs).await?;
        if frames.iter().flat_map(|f| &f.messages).any(|m| matches!(m, PeerMsg::Stored { .. })) {
            Ok(())
        } else {
            Err(ProtocolError::Malformed(format!("worker {address} did not confirm storing the data")))
        }
    }

    /// Fetches values from the worker at `address`: `Ok(None)` for keys it does not hold,
    /// `Err(why)` for values it holds but cannot send (too large for any frame).
    pub(crate) async fn get_data(
        &self,
        address: &str,
        keys: Vec<rask_graph::Key>,
    ) -> Result<Vec<(rask_graph::Key, Fetched)>, ProtocolError> {
        use rask_protocol::msg::PeerMsg;
        let frames = self.exchange(address, PeerMsg::GetData { keys }, &[]).await?;
        let mut out = Vec::new();
        for frame in frames {
            for m in frame.messages {
                if let PeerMsg::Data { values, unsendable, .. } = m {
                    for (k, v) in values {
                        let v = v.map(|v| rask_protocol::wire::value_from_wire(v, &frame.blobs)).transpose()?;
                        out.push((k, Ok(v)));
                    }
                    out.extend(unsendable.into_iter().map(|(k, why)| (k, Err(why))));
                }
            }
        }
        Ok(out)
    }
}
