//! The first frame each way: who is talking, and whether we can understand each other.
//!
//! Layout (inside a normal length prefix): `"RASK" | protocol u32 BE | build_len u16 BE | build |
//! kind u8 | payload`. Everything up to `kind` is fixed forever, so any two rask versions can
//! tell each other precisely why they refuse. `kind` 0 is a hello (payload: postcard [`Role`]),
//! 1 a welcome (payload: postcard [`Welcome`]), 2 a refusal (payload: UTF-8 reason).

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::frame::read_raw;
use crate::{BUILD_ID, PROTOCOL_VERSION, ProtocolError};

const MAGIC: &[u8; 4] = b"RASK";
/// A peer has this long to complete its handshake before the connection is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What a connecting process is.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Role {
    /// A client submitting graphs.
    Client {
        /// A name for logs.
        name: String,
    },
    /// A worker joining the cluster.
    Worker(WorkerInfo),
    /// A client or worker fetching data from a worker's data port.
    Peer,
}

/// What a worker tells the scheduler about itself.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WorkerInfo {
    /// Its name (restrictions may name it).
    pub name: String,
    /// Threads running tasks.
    pub nthreads: u32,
    /// Resources it advertises.
    pub resources: Vec<(String, f64)>,
    /// Memory limit in bytes, if any.
    pub memory_limit: Option<u64>,
    /// Where peers and clients fetch its data (`tcp://HOST:PORT`).
    pub data_address: String,
    /// How its previous process ended, when its supervisor restarted it (so the scheduler can
    /// record why the earlier worker of that name was lost).
    pub restarted_after: Option<String>,
}

/// The accepting side's answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Welcome {
    /// The id the scheduler gave this connection (0 for peers).
    pub id: u64,
}

async fn send<W: AsyncWrite + Unpin>(w: &mut W, kind: u8, payload: &[u8]) -> Result<(), ProtocolError> {
    let build = BUILD_ID.as_bytes();
    let mut buf = Vec::with_capacity(16 + build.len() + payload.len());
    let body_len = 4 + 4 + 2 + build.len() + 1 + payload.len();
    buf.extend_from_slice(&(body_len as u32).to_be_bytes());
    buf.extend_from_slice(MAGIC);
    buf.extend_from_slice(&PROTOCOL_VERSION.to_be_bytes());
    buf.extend_from_slice(&(build.len() as u16).to_be_bytes());
    buf.extend_from_slice(build);
    buf.push(kind);
    buf.extend_from_slice(payload);
    w.write_all(&buf).await?;
    w.flush().await?;
    Ok(())
}

/// A parsed handshake frame.
struct Parsed {
    version: u32,
    build: String,
    kind: u8,
    payload: bytes::Bytes,
}

/// Largest handshake frame accepted: a stranger may not make us reserve more before we know
/// it speaks rask.
const MAX_HANDSHAKE: usize = 64 * 1024;

async fn recv<R: AsyncRead + Unpin>(r: &mut R) -> Result<Parsed, ProtocolError> {
    let body =
        read_raw(r, MAX_HANDSHAKE).await?.ok_or_else(|| ProtocolError::Refused("peer closed the connection".into()))?;
    let bad = || ProtocolError::Refused("peer is not speaking the rask protocol (bad handshake)".into());
    if body.len() < 11 || &body[..4] != MAGIC {
        return Err(bad());
    }
    let version = u32::from_be_bytes([body[4], body[5], body[6], body[7]]);
    let blen = u16::from_be_bytes([body[8], body[9]]) as usize;
    if body.len() < 10 + blen + 1 {
        return Err(bad());
    }
    let build = String::from_utf8_lossy(&body[10..10 + blen]).into_owned();
    let kind = body[10 + blen];
    Ok(Parsed { version, build, kind, payload: body.slice(10 + blen + 1..) })
}

fn mismatch(p: &Parsed, us: &str, them: &str) -> Option<String> {
    (p.version != PROTOCOL_VERSION || p.build != BUILD_ID).then(|| {
        format!(
            "version mismatch: {them} speaks rask protocol {} (build {}), {us} speaks protocol {PROTOCOL_VERSION} (build {BUILD_ID})",
            p.version, p.build
        )
    })
}

/// Connecting side: says who we are and waits for the answer.
///
/// # Errors
/// [`ProtocolError::Refused`] with the peer's reason, or when the peer is not compatible.
pub async fn connect<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, role: &Role) -> Result<Welcome, ProtocolError> {
    let payload = postcard::to_stdvec(role).map_err(|e| ProtocolError::Malformed(e.to_string()))?;
    send(s, 0, &payload).await?;
    let p = tokio::time::timeout(HANDSHAKE_TIMEOUT, recv(s))
        .await
        .map_err(|_| ProtocolError::Refused("no handshake answer within 10 s".into()))??;
    if p.kind == 2 {
        return Err(ProtocolError::Refused(String::from_utf8_lossy(&p.payload).into_owned()));
    }
    if let Some(m) = mismatch(&p, "this process", "the peer") {
        return Err(ProtocolError::Refused(m));
    }
    if p.kind != 1 {
        return Err(ProtocolError::Refused("unexpected handshake answer".into()));
    }
    postcard::from_bytes(&p.payload).map_err(|e| ProtocolError::Malformed(format!("bad welcome: {e}")))
}

/// Accepting side: reads the peer's hello. On a mismatch or garbage, answers with a refusal
/// naming both versions (when it can) and returns the error; the caller closes the connection.
///
/// # Errors
/// When the peer is incompatible, silent for [`HANDSHAKE_TIMEOUT`], or not speaking rask.
pub async fn accept<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, who: &str) -> Result<Role, ProtocolError> {
    let p = match tokio::time::timeout(HANDSHAKE_TIMEOUT, recv(s)).await {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => return Err(e),
        Err(_) => return Err(ProtocolError::Refused("peer sent no handshake within 10 s".into())),
    };
    if let Some(m) = mismatch(&p, who, "the peer") {
        let reason = format!("refused by {who}: {m}");
        let _ = send(s, 2, reason.as_bytes()).await;
        return Err(ProtocolError::Refused(m));
    }
    if p.kind != 0 {
        return Err(ProtocolError::Refused("expected a hello".into()));
    }
    postcard::from_bytes(&p.payload).map_err(|e| ProtocolError::Malformed(format!("bad hello: {e}")))
}

/// Accepting side: completes a handshake accepted with [`accept`].
///
/// # Errors
/// On I/O failure.
pub async fn welcome<W: AsyncWrite + Unpin>(w: &mut W, welcome: &Welcome) -> Result<(), ProtocolError> {
    let payload = postcard::to_stdvec(welcome).map_err(|e| ProtocolError::Malformed(e.to_string()))?;
    send(w, 1, &payload).await
}

/// Accepting side: refuses a peer whose hello was fine but which may not join (e.g. a duplicate
/// worker name).
///
/// # Errors
/// On I/O failure.
pub async fn refuse<W: AsyncWrite + Unpin>(w: &mut W, reason: &str) -> Result<(), ProtocolError> {
    send(w, 2, reason.as_bytes()).await
}

/// A hello frame claiming another protocol version, for tests of version refusal.
#[doc(hidden)]
#[must_use]
pub fn foreign_hello(version: u32, build: &str) -> Vec<u8> {
    let payload = postcard::to_stdvec(&Role::Client { name: "foreign".into() }).unwrap_or_default();
    let mut body = Vec::new();
    body.extend_from_slice(MAGIC);
    body.extend_from_slice(&version.to_be_bytes());
    body.extend_from_slice(&(build.len() as u16).to_be_bytes());
    body.extend_from_slice(build.as_bytes());
    body.push(0);
    body.extend_from_slice(&payload);
    let mut out = (body.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(&body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[tokio::test(flavor = "current_thread")]
    async fn matching_peers_shake_hands() {
        let (mut a, mut b) = tokio::io::duplex(4096);
        let server = async {
            let role = accept(&mut b, "the scheduler").await.expect("accepted");
            welcome(&mut b, &Welcome { id: 7 }).await.expect("welcomed");
            role
        };
        let me = Role::Client { name: "c".into() };
        let (w, role) = tokio::join!(connect(&mut a, &me), server);
        assert_eq!(w.expect("welcome").id, 7);
        assert_eq!(role, Role::Client { name: "c".into() });
    }

    #[tokio::test(flavor = "current_thread")]
    async fn other_version_is_refused_naming_both_versions() {
        let (mut a, mut b) = tokio::io::duplex(4096);
        a.write_all(&foreign_hello(99, "rask-9.9.9")).await.expect("write");
        let err = accept(&mut b, "the scheduler").await.expect_err("refused");
        assert!(err.to_string().contains("protocol 99 (build rask-9.9.9)"), "{err}");
        // The refusal reached the peer too, readable whatever its version.
        let mut len = [0u8; 4];
        a.read_exact(&mut len).await.expect("refusal frame");
        let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
        a.read_exact(&mut body).await.expect("refusal body");
        let text = String::from_utf8_lossy(&body);
        assert!(text.contains(&format!("protocol {PROTOCOL_VERSION} (build {BUILD_ID})")), "{text}");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn garbage_is_refused() {
        let (mut a, mut b) = tokio::io::duplex(4096);
        a.write_all(b"\x00\x00\x00\x05GET /").await.expect("write");
        assert!(accept(&mut b, "x").await.is_err());
    }
}
