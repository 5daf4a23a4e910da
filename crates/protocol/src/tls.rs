//! Transport: TCP, or TLS over TCP when the cluster has certificates.
//!
//! Every connection a rask process makes or accepts goes through [`connect`] and [`accept`], so
//! one switch ([`set_process_tls`], the `--tls-*` flags or the `RASK_TLS_*` environment
//! variables) secures the scheduler port, the workers' data ports and every client.
//!
//! **Trust model** (as in Dask): mutual TLS against one cluster CA. Every process presents a
//! certificate signed by the CA and accepts only peers whose certificate the CA signed; host
//! names are not checked, because workers dial each other by whatever address they advertise
//! and the CA, not DNS, is what says who belongs to the cluster. TLS 1.3 only, on *ring*.
//!
//! **Mixed setups fail loudly on both ends.** A TLS ClientHello starts with byte `0x16`, which a
//! plaintext rask handshake never does (its first byte is the high byte of a small length), so
//! an accepting side peeks at the first byte: a plaintext peer at a TLS port reads a refusal in
//! the plaintext handshake saying TLS is required, and a TLS peer at a plaintext port is told by
//! its TLS handshake failing, which [`connect`] turns into a message saying the peer does not
//! speak TLS.

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

use crate::ProtocolError;
use crate::handshake::HANDSHAKE_TIMEOUT;

/// Environment variable naming this process's certificate (PEM) when no `--tls-cert` is given.
pub const CERT_ENV: &str = "RASK_TLS_CERT";
/// Environment variable naming this process's private key (PEM) when no `--tls-key` is given.
pub const KEY_ENV: &str = "RASK_TLS_KEY";
/// Environment variable naming the cluster CA certificate (PEM) when no `--tls-ca` is given.
pub const CA_ENV: &str = "RASK_TLS_CA";

/// Where a process finds its TLS material: all three files, or TLS is off.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// This process's certificate chain (PEM), signed by the cluster CA.
    pub cert: PathBuf,
    /// Its private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// The cluster CA certificate(s) (PEM) that every peer's certificate must chain to.
    pub ca: PathBuf,
}

impl TlsFiles {
    /// The files from the `RASK_TLS_*` environment variables: `None` when none is set.
    ///
    /// # Errors
    /// When only some of the three are set (a half-configured process would otherwise quietly
    /// run in plaintext).
    pub fn from_env() -> Result<Option<TlsFiles>, ProtocolError> {
        let var = |name| std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from);
        Self::from_parts(var(CERT_ENV), var(KEY_ENV), var(CA_ENV), &[CERT_ENV, KEY_ENV, CA_ENV])
    }

    /// The files from three optional settings (flags or variables named by `names`, in the order
    /// cert, key, CA): all three or none.
    ///
    /// # Errors
    /// When only some are given, naming the missing ones.
    pub fn from_parts(
        cert: Option<PathBuf>,
        key: Option<PathBuf>,
        ca: Option<PathBuf>,
        names: &[&str; 3],
    ) -> Result<Option<TlsFiles>, ProtocolError> {
        match (cert, key, ca) {
            (None, None, None) => Ok(None),
            (Some(cert), Some(key), Some(ca)) => Ok(Some(TlsFiles { cert, key, ca })),
            (cert, key, ca) => {
                let missing: Vec<&str> = [cert.is_none(), key.is_none(), ca.is_none()]
                    .iter()
                    .zip(names)
                    .filter_map(|(m, n)| m.then_some(*n))
                    .collect();
                Err(ProtocolError::Tls(format!(
                    "TLS needs a certificate, a key and a CA together; missing {}",
                    missing.join(" and ")
                )))
            }
        }
    }

    /// The environment that gives a child process the same TLS files.
    #[must_use]
    pub fn env(&self) -> [(&'static str, &Path); 3] {
        [(CERT_ENV, &self.cert), (KEY_ENV, &self.key), (CA_ENV, &self.ca)]
    }
}

/// Loaded TLS configuration for both directions (cheap to clone).
#[derive(Clone)]
pub struct Tls {
    files: TlsFiles,
    client: Arc<rustls::ClientConfig>,
    server: Arc<rustls::ServerConfig>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").field("files", &self.files).finish_non_exhaustive()
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_pem_certs(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>, ProtocolError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(Iterator::collect::<Result<Vec<_>, _>>)
        .map_err(|e| ProtocolError::Tls(format!("cannot read the {what} {}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(ProtocolError::Tls(format!("the {what} {} holds no PEM certificate", path.display())));
    }
    Ok(certs)
}

impl Tls {
    /// Reads and checks the three files.
    ///
    /// # Errors
    /// When a file is missing or unreadable, holds no certificate or key, or the key does not
    /// match the certificate — each naming the file.
    pub fn load(files: TlsFiles) -> Result<Tls, ProtocolError> {
        let chain = read_pem_certs(&files.cert, "certificate")?;
        let ca = read_pem_certs(&files.ca, "CA certificate")?;
        let key = PrivateKeyDer::from_pem_file(&files.key)
            .map_err(|e| ProtocolError::Tls(format!("cannot read the private key {}: {e}", files.key.display())))?;
        let mut roots = rustls::RootCertStore::empty();
        for c in ca {
            roots
                .add(c)
                .map_err(|e| ProtocolError::Tls(format!("bad CA certificate in {}: {e}", files.ca.display())))?;
        }
        let roots = Arc::new(roots);
        let bad_pair = |e: rustls::Error| {
            ProtocolError::Tls(format!(
                "the key {} does not fit the certificate {}: {e}",
                files.key.display(),
                files.cert.display()
            ))
        };
        let tls13 = &[&rustls::version::TLS13];
        let client_verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
            .build()
            .map_err(|e| ProtocolError::Tls(format!("CA {}: {e}", files.ca.display())))?;
        let server = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(tls13)
            .map_err(|e| ProtocolError::Tls(e.to_string()))?
            .with_client_cert_verifier(client_verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(bad_pair)?;
        let server_verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider())
            .build()
            .map_err(|e| ProtocolError::Tls(format!("CA {}: {e}", files.ca.display())))?;
        let client = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(tls13)
            .map_err(|e| ProtocolError::Tls(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(ClusterCa(server_verifier)))
            .with_client_auth_cert(chain, key)
            .map_err(bad_pair)?;
        Ok(Tls { files, client: Arc::new(client), server: Arc::new(server) })
    }

    /// The files this configuration was loaded from (to hand to child processes).
    #[must_use]
    pub fn files(&self) -> &TlsFiles {
        &self.files
    }
}

/// Checks a server's certificate chain against the cluster CA but not its host name (see the
/// module documentation for why).
#[derive(Debug)]
struct ClusterCa(Arc<rustls::client::WebPkiServerVerifier>);

impl ServerCertVerifier for ClusterCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // The name is checked last, after the chain: a name error means the chain is good.
        match self.0.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// The configuration in effect: `Some(Some(_))` set, `Some(None)` explicitly off, `None` not
/// yet decided (the environment decides on first use).
static PROCESS_TLS: std::sync::RwLock<Option<Option<Tls>>> = std::sync::RwLock::new(None);

/// Sets the TLS configuration of every connection this process makes or accepts from now on
/// (the `--tls-*` flags call this; without it, the `RASK_TLS_*` variables are read).
pub fn set_process_tls(tls: Option<Tls>) {
    *PROCESS_TLS.write().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(tls);
}

/// The TLS configuration in effect: the one set with [`set_process_tls`], else the one the
/// `RASK_TLS_*` variables name (loaded once), else none.
///
/// # Errors
/// When the variables are incomplete or name unusable files.
pub fn process_tls() -> Result<Option<Tls>, ProtocolError> {
    if let Some(t) = &*PROCESS_TLS.read().unwrap_or_else(std::sync::PoisonError::into_inner) {
        return Ok(t.clone());
    }
    let tls = TlsFiles::from_env()?.map(Tls::load).transpose()?;
    set_process_tls(tls.clone());
    Ok(tls)
}

/// The scheme of this process's addresses: `tls` when TLS is on, else `tcp`.
///
/// # Errors
/// See [`process_tls`].
pub fn scheme() -> Result<&'static str, ProtocolError> {
    Ok(if process_tls()?.is_some() { "tls" } else { "tcp" })
}

/// A connection: plain TCP or TLS over TCP.
pub enum Stream {
    /// Plaintext.
    Plain(TcpStream),
    /// TLS (boxed: the session state is large).
    Tls(Box<tokio_rustls::TlsStream<TcpStream>>),
}

/// The reading half of a [`Stream`], for a reader task.
pub enum ReadHalf {
    /// Plaintext: the socket's own half, no locking.
    Plain(OwnedReadHalf),
    /// TLS: one session shared with the writing half.
    Tls(tokio::io::ReadHalf<tokio_rustls::TlsStream<TcpStream>>),
}

/// The writing half of a [`Stream`], for a writer task.
pub enum WriteHalf {
    /// Plaintext: the socket's own half, no locking.
    Plain(OwnedWriteHalf),
    /// TLS: one session shared with the reading half.
    Tls(tokio::io::WriteHalf<tokio_rustls::TlsStream<TcpStream>>),
}

impl Stream {
    /// Splits into halves that a reader and a writer task own separately.
    #[must_use]
    pub fn into_split(self) -> (ReadHalf, WriteHalf) {
        match self {
            Stream::Plain(s) => {
                let (r, w) = s.into_split();
                (ReadHalf::Plain(r), WriteHalf::Plain(w))
            }
            Stream::Tls(s) => {
                let (r, w) = tokio::io::split(*s);
                (ReadHalf::Tls(r), WriteHalf::Tls(w))
            }
        }
    }
}

/// Forwards the I/O traits of an enum to whichever variant it holds (all are `Unpin`).
macro_rules! forward_io {
    ($ty:ty, $($variant:ident),+) => {
        impl AsyncRead for $ty {
            fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
                match self.get_mut() {
                    $(Self::$variant(s) => Pin::new(s).poll_read(cx, buf),)+
                }
            }
        }
        forward_io!(@write $ty, $($variant),+);
    };
    (@write $ty:ty, $($variant:ident),+) => {
        impl AsyncWrite for $ty {
            fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
                match self.get_mut() {
                    $(Self::$variant(s) => Pin::new(s).poll_write(cx, buf),)+
                }
            }
            fn poll_write_vectored(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                bufs: &[std::io::IoSlice<'_>],
            ) -> Poll<std::io::Result<usize>> {
                match self.get_mut() {
                    $(Self::$variant(s) => Pin::new(s).poll_write_vectored(cx, bufs),)+
                }
            }
            fn is_write_vectored(&self) -> bool {
                match self {
                    $(Self::$variant(s) => s.is_write_vectored(),)+
                }
            }
            fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
                match self.get_mut() {
                    $(Self::$variant(s) => Pin::new(s).poll_flush(cx),)+
                }
            }
            fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
                match self.get_mut() {
                    $(Self::$variant(s) => Pin::new(s).poll_shutdown(cx),)+
                }
            }
        }
    };
}

forward_io!(Stream, Plain, Tls);

impl AsyncRead for ReadHalf {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Self::Tls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

forward_io!(@write WriteHalf, Plain, Tls);

/// The host part of `HOST:PORT` (brackets of an IPv6 literal removed).
fn host_of(host_port: &str) -> &str {
    let host = host_port.rsplit_once(':').map_or(host_port, |(h, _)| h);
    host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host)
}

/// Dials `address` (`tcp://` or `tls://HOST:PORT`) and, when this process has TLS, secures the
/// connection. The rask handshake follows on the returned stream.
///
/// # Errors
/// When the address is invalid, the peer unreachable, a `tls://` address is dialled without TLS
/// configured, or the TLS handshake fails — with a message saying which side lacks what.
pub async fn connect(address: &str) -> Result<Stream, ProtocolError> {
    connect_with(address, process_tls()?).await
}

/// [`connect`] with an explicit configuration (`None`: plaintext).
///
/// # Errors
/// See [`connect`].
pub async fn connect_with(address: &str, tls: Option<Tls>) -> Result<Stream, ProtocolError> {
    let host_port = crate::parse_address(address)?;
    if tls.is_none() && address.starts_with("tls://") {
        return Err(ProtocolError::Tls(format!(
            "{address} is a TLS address but this process has no TLS configured (give --tls-cert, --tls-key and --tls-ca, or set {CERT_ENV}, {KEY_ENV} and {CA_ENV})"
        )));
    }
    let tcp = TcpStream::connect(host_port).await?;
    tcp.set_nodelay(true)?;
    let Some(tls) = tls else { return Ok(Stream::Plain(tcp)) };
    let name = ServerName::try_from(host_of(host_port).to_owned())
        .map_err(|e| ProtocolError::BadAddress(format!("{address}: {e}")))?;
    let handshake = tokio_rustls::TlsConnector::from(tls.client).connect(name, tcp);
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
        Ok(Ok(s)) => Ok(Stream::Tls(Box::new(s.into()))),
        Ok(Err(e)) => Err(ProtocolError::Tls(client_failure(address, &e))),
        Err(_) => Err(ProtocolError::Tls(format!("{address} did not complete a TLS handshake within 10 s"))),
    }
}

/// Explains an error of the first exchange after [`connect`]: in TLS 1.3 the server checks the
/// client's certificate after the client considers the handshake done, so a rejection shows up
/// as an alert on the first read.
#[must_use]
pub fn explain_failure(address: &str, e: ProtocolError) -> ProtocolError {
    match e {
        ProtocolError::Io(io) if io.get_ref().is_some_and(|i| i.is::<rustls::Error>()) => {
            ProtocolError::Tls(client_failure(address, &io))
        }
        other => other,
    }
}

/// Explains a failed client-side TLS handshake.
fn client_failure(address: &str, e: &std::io::Error) -> String {
    let tls_error = e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>());
    match tls_error {
        // Plaintext bytes (a rask refusal) where a TLS record should be, or a hang-up: the peer
        // does not speak TLS.
        Some(rustls::Error::InvalidMessage(_)) => {
            format!("TLS handshake with {address} failed: the peer answered in plaintext; it is not running with TLS")
        }
        Some(rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer | CertificateError::BadSignature)) => {
            format!(
                "TLS handshake with {address} failed: its certificate is not signed by this process's CA (--tls-ca); is it part of another cluster?"
            )
        }
        Some(rustls::Error::AlertReceived(alert)) => format!(
            "TLS handshake with {address} failed: it rejected this process's certificate ({alert:?}); is --tls-cert signed by the cluster's CA?"
        ),
        Some(other) => format!("TLS handshake with {address} failed: {other}"),
        None => format!(
            "TLS handshake with {address} failed: {e} (the peer closed the connection: is it running without TLS?)"
        ),
    }
}

/// Explains a failed server-side TLS handshake.
fn server_failure(e: &std::io::Error) -> String {
    match e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()) {
        Some(rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer | CertificateError::BadSignature)) => {
            "TLS handshake failed: the peer's certificate is not signed by this cluster's CA".to_owned()
        }
        Some(rustls::Error::NoCertificatesPresented) => {
            "TLS handshake failed: the peer presented no certificate (every process needs --tls-cert and --tls-key)"
                .to_owned()
        }
        Some(rustls::Error::AlertReceived(alert)) => format!(
            "TLS handshake failed: the peer rejected this process's certificate ({alert:?}): it trusts another CA"
        ),
        _ => format!("TLS handshake failed: {e}"),
    }
}

/// Accepting side: tells TLS from plaintext by the first byte, and completes the TLS handshake
/// when this process has TLS. A mismatch is refused — a plaintext peer reads why in its
/// handshake — and returned as an error naming it for the caller's log line. `who` names this
/// side ("the scheduler", "worker w1").
///
/// # Errors
/// On a mismatch, a failed TLS handshake, or a peer silent for [`HANDSHAKE_TIMEOUT`].
pub async fn accept(tcp: TcpStream, who: &str) -> Result<Stream, ProtocolError> {
    accept_with(tcp, who, process_tls()?).await
}

/// [`accept`] with an explicit configuration (`None`: plaintext only).
///
/// # Errors
/// See [`accept`].
pub async fn accept_with(tcp: TcpStream, who: &str, tls: Option<Tls>) -> Result<Stream, ProtocolError> {
    tcp.set_nodelay(true)?;
    let mut first = [0u8; 1];
    let n = tokio::time::timeout(HANDSHAKE_TIMEOUT, tcp.peek(&mut first))
        .await
        .map_err(|_| ProtocolError::Refused("peer sent nothing within 10 s".into()))??;
    if n == 0 {
        return Err(ProtocolError::Refused("peer closed the connection before its handshake".into()));
    }
    // 0x16 is the TLS handshake record type; a rask handshake starts with a small length.
    let speaks_tls = first[0] == 0x16;
    match (tls, speaks_tls) {
        (None, false) => Ok(Stream::Plain(tcp)),
        (None, true) => {
            // Answered in plaintext, which the peer's TLS layer reports as such. Its hello (one
            // TLS record: a 5-byte header with the length, then the body) is read first, within
            // the handshake deadline, so that closing does not reset the connection before the
            // peer reads the answer.
            let mut tcp = tcp;
            let drain = async {
                use tokio::io::AsyncReadExt;
                let mut header = [0u8; 5];
                tcp.read_exact(&mut header).await?;
                let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
                let mut body = vec![0u8; len];
                tcp.read_exact(&mut body).await.map(|_| ())
            };
            let _ = tokio::time::timeout(HANDSHAKE_TIMEOUT, drain).await;
            let reason = format!("refused by {who}: it has no TLS configured");
            crate::handshake::send_refusal(&mut tcp, &reason).await;
            Err(ProtocolError::Tls(format!(
                "the peer speaks TLS but {who} has no TLS configured (start it with --tls-cert, --tls-key and --tls-ca)"
            )))
        }
        (Some(_), false) => {
            let mut tcp = tcp;
            let reason = format!(
                "refused by {who}: this cluster requires TLS; give --tls-cert, --tls-key and --tls-ca (or set {CERT_ENV}, {KEY_ENV} and {CA_ENV})"
            );
            crate::handshake::refuse_plaintext(&mut tcp, &reason).await;
            Err(ProtocolError::Tls(format!("plaintext connection refused: {who} requires TLS")))
        }
        (Some(tls), true) => {
            let handshake = tokio_rustls::TlsAcceptor::from(tls.server).accept(tcp);
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
                Ok(Ok(s)) => Ok(Stream::Tls(Box::new(s.into()))),
                Ok(Err(e)) => Err(ProtocolError::Tls(server_failure(&e))),
                Err(_) => Err(ProtocolError::Tls("the peer did not complete a TLS handshake within 10 s".into())),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handshake::{self, Role, Welcome};

    /// A CA and a node certificate it signs, written to a fresh directory, which is removed
    /// when the returned set is dropped (the test ended, failed or not).
    fn cert_set(name: &str) -> CertSet {
        use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair};
        let dir = std::env::temp_dir().join(format!("rask-tls-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let ca_key = KeyPair::generate().expect("key");
        let mut ca = CertificateParams::new(Vec::<String>::new()).expect("params");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name.push(DnType::CommonName, format!("test CA {name}"));
        let ca_cert = ca.self_signed(&ca_key).expect("CA");
        let key = KeyPair::generate().expect("key");
        let mut node = CertificateParams::new(vec!["localhost".to_owned()]).expect("params");
        node.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        let cert = node.signed_by(&key, &ca_cert, &ca_key).expect("cert");
        let files = TlsFiles { cert: dir.join("node.pem"), key: dir.join("key.pem"), ca: dir.join("ca.pem") };
        std::fs::write(&files.cert, cert.pem()).expect("write");
        std::fs::write(&files.key, key.serialize_pem()).expect("write");
        std::fs::write(&files.ca, ca_cert.pem()).expect("write");
        CertSet { files, dir }
    }

    /// See [`cert_set`].
    struct CertSet {
        files: TlsFiles,
        dir: std::path::PathBuf,
    }

    impl std::ops::Deref for CertSet {
        type Target = TlsFiles;
        fn deref(&self) -> &TlsFiles {
            &self.files
        }
    }

    impl Drop for CertSet {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    #[test]
    fn partial_settings_name_what_is_missing() {
        let names = ["--tls-cert", "--tls-key", "--tls-ca"];
        assert!(TlsFiles::from_parts(None, None, None, &names).expect("none is fine").is_none());
        let e = TlsFiles::from_parts(Some("c".into()), None, Some("a".into()), &names).expect_err("partial");
        assert_eq!(e.to_string(), "TLS needs a certificate, a key and a CA together; missing --tls-key");
    }

    #[test]
    fn loading_names_the_file_at_fault() {
        let good = cert_set("load");
        let other = cert_set("load-other");
        let missing = TlsFiles { ca: good.ca.with_file_name("nope.pem"), ..good.clone() };
        let e = Tls::load(missing).expect_err("missing CA").to_string();
        assert!(e.contains("CA certificate") && e.contains("nope.pem"), "{e}");
        let mismatched = TlsFiles { key: other.key.clone(), ..good.clone() };
        let e = Tls::load(mismatched).expect_err("foreign key").to_string();
        assert!(e.contains("does not fit the certificate"), "{e}");
        let not_pem = TlsFiles { cert: good.key.clone(), ..good.clone() };
        let e = Tls::load(not_pem).expect_err("key as certificate").to_string();
        assert!(e.contains("holds no PEM certificate"), "{e}");
        Tls::load(good.clone()).expect("a good set loads");
    }

    #[test]
    fn host_names_come_out_of_addresses() {
        assert_eq!(host_of("127.0.0.1:80"), "127.0.0.1");
        assert_eq!(host_of("[::1]:80"), "::1");
        assert_eq!(host_of("node-3.cluster:8786"), "node-3.cluster");
    }

    /// Runs one connection through the transport and the rask handshake with the given
    /// configurations on each side; returns both sides' outcomes.
    async fn exchange(client: Option<Tls>, server: Option<Tls>) -> (Result<(), String>, Result<(), String>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = format!("tcp://{}", listener.local_addr().expect("addr"));
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.expect("accept");
            let mut s = accept_with(tcp, "the test server", server).await.map_err(|e| e.to_string())?;
            handshake::accept_with(&mut s, "the test server", None).await.map_err(|e| e.to_string())?;
            handshake::welcome(&mut s, &Welcome { id: 7 }).await.map_err(|e| e.to_string())
        });
        let client = async {
            let mut s = connect_with(&address, client).await.map_err(|e| e.to_string())?;
            let w = handshake::connect_with(&mut s, &Role::Peer, None)
                .await
                .map_err(|e| explain_failure(&address, e).to_string())?;
            assert_eq!(w.id, 7);
            Ok(())
        }
        .await;
        (client, server.await.expect("server task"))
    }

    #[tokio::test]
    async fn tls_carries_the_handshake_and_every_mismatch_is_refused_on_both_ends() {
        let (set_files, foreign_files) = (cert_set("both"), cert_set("foreign"));
        let set = Tls::load(set_files.clone()).expect("load");
        let foreign = Tls::load(foreign_files.clone()).expect("load");
        // Trusts the cluster but holds a certificate of another CA.
        let impostor = Tls::load(TlsFiles { ca: set_files.ca.clone(), ..foreign_files.clone() }).expect("load");
        assert_eq!(exchange(Some(set.clone()), Some(set.clone())).await, (Ok(()), Ok(())));
        assert_eq!(exchange(None, None).await, (Ok(()), Ok(())));

        let (c, s) = exchange(None, Some(set.clone())).await;
        assert!(c.expect_err("plaintext client").contains("this cluster requires TLS"));
        assert!(s.expect_err("server").contains("plaintext connection refused"));

        let (c, s) = exchange(Some(set.clone()), None).await;
        assert!(c.expect_err("TLS client").contains("not running with TLS"));
        assert!(s.expect_err("server").contains("the peer speaks TLS"));

        let (c, s) = exchange(Some(impostor), Some(set.clone())).await;
        let s = s.expect_err("server");
        assert!(s.contains("not signed by this cluster's CA"), "{s}");
        let c = c.expect_err("impostor");
        assert!(c.contains("rejected this process's certificate (UnknownCA)"), "{c}");

        let (c, s) = exchange(Some(foreign), Some(set)).await;
        let c = c.expect_err("foreign client");
        assert!(c.contains("not signed by this process's CA"), "{c}");
        let s = s.expect_err("server");
        assert!(s.contains("rejected this process's certificate"), "{s}");
    }
}
