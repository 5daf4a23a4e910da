//! The first frame each way: who is talking, and whether we can understand each other.
//!
//! Layout (inside a normal length prefix): `"RASK" | protocol u32 BE | build_len u16 BE | build |
//! kind u8 | payload`. Everything up to `kind` is fixed forever, so any two rask versions can
//! tell each other precisely why they refuse. `kind` 0 is a hello (payload: postcard [`Hello`]),
//! 1 a welcome (payload: postcard [`Welcome`]), 2 a refusal (payload: UTF-8 reason), 3 a
//! challenge and 4 a proof (authentication, below).
//!
//! **Authentication** with a shared token (`--token` or `RASK_TOKEN`): an accepting side that
//! has a token answers a hello with a challenge — its own nonce and an HMAC-SHA256 over both
//! nonces proving it knows the token — and the connecting side answers with its own HMAC. Each
//! side checks the other, so neither the token nor anything replayable crosses the wire, and a
//! side without the right token is refused with a message saying so, on both ends. A
//! connecting side with a token also refuses an accepting side that asks for none.

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

/// The first message of a connecting side.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Hello {
    role: Role,
    /// Fresh random bytes, for the accepting side's proof.
    nonce: [u8; 32],
}

/// A shared secret that every process of a cluster must know (see the module documentation).
#[derive(Clone)]
pub struct Token(std::sync::Arc<[u8]>);

impl Token {
    /// A token from its text (any length; an empty one is no token — the flags refuse it, so
    /// that `--token "$UNSET"` cannot silently turn authentication off).
    #[must_use]
    pub fn new(text: &str) -> Option<Token> {
        (!text.is_empty()).then(|| Token(std::sync::Arc::from(text.as_bytes())))
    }

    /// HMAC-SHA256 keyed by the token over a label, the side and both nonces.
    fn hmac(&self, side: &[u8], client_nonce: &[u8; 32], server_nonce: &[u8; 32]) -> hmac::Hmac<sha2::Sha256> {
        use hmac::Mac;
        // HMAC accepts keys of any length, so this cannot fail.
        let mut m = <hmac::Hmac<sha2::Sha256> as Mac>::new_from_slice(&self.0).expect("HMAC takes any key length");
        m.update(b"rask-auth-v1 ");
        m.update(side);
        m.update(client_nonce);
        m.update(server_nonce);
        m
    }

    fn mac(&self, side: &[u8], client_nonce: &[u8; 32], server_nonce: &[u8; 32]) -> [u8; 32] {
        use hmac::Mac;
        self.hmac(side, client_nonce, server_nonce).finalize().into_bytes().into()
    }

    /// Checks a peer's MAC in constant time.
    fn verify(&self, side: &[u8], client_nonce: &[u8; 32], server_nonce: &[u8; 32], mac: &[u8]) -> bool {
        use hmac::Mac;
        self.hmac(side, client_nonce, server_nonce).verify_slice(mac).is_ok()
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

/// The token this process uses for every connection it makes or accepts.
static PROCESS_TOKEN: std::sync::RwLock<Option<Option<Token>>> = std::sync::RwLock::new(None);

/// Environment variable holding the cluster token when no `--token` is given.
pub const TOKEN_ENV: &str = "RASK_TOKEN";

/// Sets the token for every connection this process makes or accepts from now on (the
/// `--token` flags call this; without it, [`TOKEN_ENV`] is read).
pub fn set_process_token(token: Option<Token>) {
    *PROCESS_TOKEN.write().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(token);
}

/// The token in effect: the one set with [`set_process_token`], else `RASK_TOKEN`, else none.
#[must_use]
pub fn process_token() -> Option<Token> {
    if let Some(t) = &*PROCESS_TOKEN.read().unwrap_or_else(std::sync::PoisonError::into_inner) {
        return t.clone();
    }
    std::env::var(TOKEN_ENV).ok().and_then(|t| Token::new(&t))
}

fn nonce() -> Result<[u8; 32], ProtocolError> {
    use std::io::Read;
    let mut n = [0u8; 32];
    std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut n))?;
    Ok(n)
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

/// Connecting side: says who we are and waits for the answer, proving (and checking) the
/// [`process_token`] when the peer asks.
///
/// # Errors
/// [`ProtocolError::Refused`] with the peer's reason, or when the peer is not compatible or
/// fails authentication.
pub async fn connect<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, role: &Role) -> Result<Welcome, ProtocolError> {
    connect_with(s, role, process_token().as_ref()).await
}

/// [`connect`] with an explicit token (`None`: this side has none).
///
/// # Errors
/// See [`connect`].
pub async fn connect_with<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    role: &Role,
    token: Option<&Token>,
) -> Result<Welcome, ProtocolError> {
    let hello = Hello { role: role.clone(), nonce: nonce()? };
    let payload = postcard::to_stdvec(&hello).map_err(|e| ProtocolError::Malformed(e.to_string()))?;
    send(s, 0, &payload).await?;
    let mut p = answer(s).await?;
    if p.kind == 3 {
        // A challenge: the peer's nonce and its proof.
        if p.payload.len() != 64 {
            return Err(ProtocolError::Refused("malformed authentication challenge".into()));
        }
        let mut server_nonce = [0u8; 32];
        server_nonce.copy_from_slice(&p.payload[..32]);
        let Some(token) = token else {
            return Err(ProtocolError::Refused(
                "the peer requires a token: give the cluster's token with --token or RASK_TOKEN".into(),
            ));
        };
        if !token.verify(b"server", &hello.nonce, &server_nonce, &p.payload[32..]) {
            return Err(ProtocolError::Refused(
                "authentication failed: the peer does not know this cluster's token".into(),
            ));
        }
        send(s, 4, &token.mac(b"client", &hello.nonce, &server_nonce)).await?;
        p = answer(s).await?;
    } else if token.is_some() && p.kind == 1 {
        return Err(ProtocolError::Refused(
            "the peer accepted us without asking for the token: refusing an unauthenticated cluster (start it with the same --token)".into(),
        ));
    }
    if p.kind != 1 {
        return Err(ProtocolError::Refused("unexpected handshake answer".into()));
    }
    postcard::from_bytes(&p.payload).map_err(|e| ProtocolError::Malformed(format!("bad welcome: {e}")))
}

/// The accepting side's next frame: a refusal becomes an error naming its reason.
async fn answer<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) -> Result<Parsed, ProtocolError> {
    let p = tokio::time::timeout(HANDSHAKE_TIMEOUT, recv(s))
        .await
        .map_err(|_| ProtocolError::Refused("no handshake answer within 10 s".into()))??;
    if p.kind == 2 {
        return Err(ProtocolError::Refused(String::from_utf8_lossy(&p.payload).into_owned()));
    }
    if let Some(m) = mismatch(&p, "this process", "the peer") {
        return Err(ProtocolError::Refused(m));
    }
    Ok(p)
}

/// Accepting side: reads the peer's hello and, when this process has a token, has the peer
/// prove it. On a mismatch, garbage or failed proof, answers with a refusal naming the reason
/// (both versions, or the token) and returns the error; the caller closes the connection.
///
/// # Errors
/// When the peer is incompatible, silent for [`HANDSHAKE_TIMEOUT`], not speaking rask, or
/// without the token.
pub async fn accept<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, who: &str) -> Result<Role, ProtocolError> {
    accept_with(s, who, process_token().as_ref()).await
}

/// [`accept`] with an explicit token (`None`: anyone compatible may connect).
///
/// # Errors
/// See [`accept`].
pub async fn accept_with<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    who: &str,
    token: Option<&Token>,
) -> Result<Role, ProtocolError> {
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
    let hello: Hello =
        postcard::from_bytes(&p.payload).map_err(|e| ProtocolError::Malformed(format!("bad hello: {e}")))?;
    if let Some(token) = token {
        let server_nonce = nonce()?;
        let mut challenge = server_nonce.to_vec();
        challenge.extend_from_slice(&token.mac(b"server", &hello.nonce, &server_nonce));
        send(s, 3, &challenge).await?;
        let proof = match tokio::time::timeout(HANDSHAKE_TIMEOUT, recv(s)).await {
            Ok(Ok(p)) if p.kind == 4 => p,
            // The peer hung up: it has no token (it says so on its side).
            Ok(Ok(_)) | Ok(Err(_)) => {
                return Err(ProtocolError::Refused("the peer did not authenticate (it has no token?)".into()));
            }
            Err(_) => return Err(ProtocolError::Refused("the peer sent no proof within 10 s".into())),
        };
        if !token.verify(b"client", &hello.nonce, &server_nonce, &proof.payload) {
            let reason = format!("refused by {who}: authentication failed: wrong token");
            let _ = send(s, 2, reason.as_bytes()).await;
            return Err(ProtocolError::Refused("authentication failed: the peer's token is wrong".into()));
        }
    }
    Ok(hello.role)
}

/// Answers a plaintext peer with a refusal (TLS is required here). Its hello is read first, so
/// closing does not reset the connection before the peer has read the reason.
pub(crate) async fn refuse_plaintext<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, reason: &str) {
    let _ = tokio::time::timeout(HANDSHAKE_TIMEOUT, recv(s)).await;
    send_refusal(s, reason).await;
}

/// Sends a refusal and closes the writing side (best effort: the connection is being dropped).
pub(crate) async fn send_refusal<W: AsyncWrite + Unpin>(w: &mut W, reason: &str) {
    let _ = send(w, 2, reason.as_bytes()).await;
    let _ = w.shutdown().await;
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
    let hello = Hello { role: Role::Client { name: "foreign".into() }, nonce: [0; 32] };
    let payload = postcard::to_stdvec(&hello).unwrap_or_default();
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

    /// Runs both sides with the given tokens: (connector's result, acceptor's result).
    async fn shake(
        client: Option<&str>,
        server: Option<&str>,
    ) -> (Result<Welcome, ProtocolError>, Result<Role, ProtocolError>) {
        let (mut a, mut b) = tokio::io::duplex(4096);
        let (ct, st) = (client.and_then(Token::new), server.and_then(Token::new));
        let role = Role::Client { name: "c".into() };
        let server = async {
            let r = accept_with(&mut b, "the scheduler", st.as_ref()).await;
            if r.is_ok() {
                welcome(&mut b, &Welcome { id: 7 }).await.expect("welcome");
            }
            drop(b);
            r
        };
        let client = async {
            let r = connect_with(&mut a, &role, ct.as_ref()).await;
            drop(a);
            r
        };
        tokio::join!(client, server)
    }

    #[tokio::test(flavor = "current_thread")]
    async fn same_token_on_both_sides_authenticates() {
        let (c, s) = shake(Some("s3cret"), Some("s3cret")).await;
        assert_eq!(c.expect("client in").id, 7);
        assert_eq!(s.expect("server accepts"), Role::Client { name: "c".into() });
    }

    #[tokio::test(flavor = "current_thread")]
    async fn wrong_missing_or_unasked_token_is_refused_with_a_reason_on_both_ends() {
        let (c, s) = shake(Some("wrong"), Some("s3cret")).await;
        let (c, s) = (c.expect_err("refused").to_string(), s.expect_err("refused").to_string());
        assert!(c.contains("does not know this cluster's token"), "{c}");
        assert!(s.contains("authenticate") || s.contains("token"), "{s}");
        let (c, s) = shake(None, Some("s3cret")).await;
        let c = c.expect_err("refused").to_string();
        assert!(c.contains("requires a token") && c.contains("RASK_TOKEN"), "{c}");
        assert!(s.expect_err("refused").to_string().contains("did not authenticate"));
        let (c, _) = shake(Some("s3cret"), None).await;
        assert!(c.expect_err("refused").to_string().contains("unauthenticated cluster"));
    }

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

    proptest::proptest! {
        /// Whatever a stranger sends first, the accepting side answers with an error (or a
        /// refusal), never a panic, and never waits for more than it was promised.
        #[test]
        fn random_handshake_bytes_are_refused_not_a_panic(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256),
            with_token in proptest::prelude::any::<bool>(),
        ) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().expect("runtime");
            let token = Token::new("s3cret");
            let result = rt.block_on(async {
                let (mut a, mut b) = tokio::io::duplex(4096);
                a.write_all(&bytes).await.expect("write");
                drop(a);
                accept_with(&mut b, "the scheduler", if with_token { token.as_ref() } else { None }).await
            });
            proptest::prop_assert!(result.is_err());
        }
    }
}
