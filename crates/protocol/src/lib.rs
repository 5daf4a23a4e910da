//! rask's wire protocol — the only crate that knows what bytes travel between processes.
//!
//! - **Frames** ([`frame`]): a 4-byte big-endian length, then a header (postcard: a batch of
//!   messages plus the lengths of out-of-band blobs), then the blobs themselves. Many small
//!   messages share one frame; large binary values travel as blobs, written from and read into
//!   [`bytes::Bytes`] without copying. Frames larger than [`MAX_FRAME`] are refused.
//! - **Handshake** ([`handshake`]): the first frame each way carries a magic number, the
//!   protocol version and the build id *before* anything version-dependent, so a mismatched peer
//!   is refused with a message naming both versions instead of a decoding error.
//! - **Transport** ([`tls`]): plain TCP, or mutual TLS against the cluster CA, chosen per
//!   process; mixed setups are refused with a message on both ends.
//! - **Messages** ([`msg`]): plain serde enums (no `untagged`, no `flatten`), one per direction.
//! - **Values** ([`wire`]): [`rask_graph::Value`] and task specs converted at this boundary;
//!   core crates never see wire types.

pub mod frame;
pub mod handshake;
pub mod msg;
pub mod tls;
pub mod wire;

/// Version of the message formats below; bumped on any incompatible change.
pub const PROTOCOL_VERSION: u32 = 5;

/// Identifies the build: processes of different builds may register different functions under
/// the same names, so they refuse each other.
pub const BUILD_ID: &str = concat!("rask-", env!("CARGO_PKG_VERSION"));

/// Largest frame accepted (1 GiB). A peer announcing more is disconnected.
pub const MAX_FRAME: usize = 1 << 30;

/// The frame limit in effect: [`MAX_FRAME`], or less when the `RASK_MAX_FRAME_BYTES`
/// environment variable says so (at least 64 KiB) — for tests of values too large to send,
/// without allocating a gigabyte.
#[must_use]
pub fn max_frame() -> usize {
    static LIMIT: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *LIMIT.get_or_init(|| {
        std::env::var("RASK_MAX_FRAME_BYTES")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .map_or(MAX_FRAME, |v| v.clamp(64 << 10, MAX_FRAME))
    })
}

/// Errors of the protocol layer. Each says what was wrong with the bytes or the peer.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// The connection failed or closed.
    #[error("connection error: {0}")]
    Io(#[from] std::io::Error),
    /// A frame announced a size above the limit.
    #[error("frame of {size} bytes exceeds the limit of {limit} bytes")]
    FrameTooLarge {
        /// Announced size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// The bytes do not decode as the expected message.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// A task's body (see [`wire::TaskBody`]) is not an encoded function call: its message was
    /// fine, and only that task is affected.
    #[error("its body is not an encoded function call ({0})")]
    BadBody(String),
    /// The peer is not a rask process of a compatible version, or refused us.
    #[error("{0}")]
    Refused(String),
    /// An address is not of the form `tcp://HOST:PORT` or `tls://HOST:PORT`.
    #[error("invalid address {0:?}: expected tcp://HOST:PORT or tls://HOST:PORT")]
    BadAddress(String),
    /// TLS is misconfigured, or the TLS handshake with a peer failed.
    #[error("{0}")]
    Tls(String),
}

/// Parses `tcp://HOST:PORT`, `tls://HOST:PORT` or a bare `HOST:PORT` into the `HOST:PORT` part.
/// (Whether a connection uses TLS is this process's setting, see [`tls`]; the `tls` scheme only
/// tells users, and is refused when this process has no TLS.)
///
/// # Errors
/// For other schemes or a missing port.
pub fn parse_address(addr: &str) -> Result<&str, ProtocolError> {
    let rest = match addr.split_once("://") {
        Some(("tcp" | "tls", rest)) => rest,
        Some(_) => return Err(ProtocolError::BadAddress(addr.to_owned())),
        None => addr,
    };
    match rest.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => Ok(rest),
        _ => Err(ProtocolError::BadAddress(addr.to_owned())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_with_and_without_scheme() {
        assert_eq!(parse_address("tcp://127.0.0.1:8786").expect("valid"), "127.0.0.1:8786");
        assert_eq!(parse_address("localhost:1").expect("valid"), "localhost:1");
        assert_eq!(parse_address("tls://a:1").expect("valid"), "a:1");
        assert!(parse_address("udp://a:1").is_err());
        assert!(parse_address("tcp://a").is_err());
        assert!(parse_address("tcp://:80").is_err());
    }
}
