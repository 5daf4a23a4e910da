//! Frames: `len (u32 BE) | header_len (u32 BE) | header | blob0 | blob1 | ...`.
//!
//! The header is postcard: `(Vec<M>, Vec<u64>)` — a batch of messages and the blob lengths.
//! Reading allocates one buffer per frame and hands out blobs as zero-copy slices of it; writing
//! sends blobs straight from their `Bytes` without copying them into a frame buffer.

use bytes::{Bytes, BytesMut};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::{ProtocolError, max_frame};

/// A decoded frame: its messages and blobs.
#[derive(Debug)]
pub struct Frame<M> {
    /// The batch of messages.
    pub messages: Vec<M>,
    /// Out-of-band binary data the messages refer to by index.
    pub blobs: Vec<Bytes>,
}

/// Writes one frame.
///
/// # Errors
/// On I/O failure, or if the frame would exceed [`max_frame`].
///
/// # Cancel safety
/// Not cancel safe: a cancelled write leaves a partial frame; close the connection.
pub async fn write_frame<W: AsyncWrite + Unpin, M: Serialize>(
    w: &mut W,
    messages: &[M],
    blobs: &[Bytes],
) -> Result<(), ProtocolError> {
    let lens: Vec<u64> = blobs.iter().map(|b| b.len() as u64).collect();
    // Serialize straight after room for the two length prefixes (no copy of the header).
    let mut head = Vec::with_capacity(8 + 64 + 48 * messages.len());
    head.extend_from_slice(&[0u8; 8]);
    let mut head = postcard::to_extend(&(messages, &lens), head)
        .map_err(|e| ProtocolError::Malformed(format!("cannot encode: {e}")))?;
    let header_len = head.len() - 8;
    let total = 4 + header_len + blobs.iter().map(Bytes::len).sum::<usize>();
    if total > max_frame() {
        return Err(ProtocolError::FrameTooLarge { size: total, limit: max_frame() });
    }
    head[..4].copy_from_slice(&(total as u32).to_be_bytes());
    head[4..8].copy_from_slice(&(header_len as u32).to_be_bytes());
    w.write_all(&head).await?;
    for b in blobs {
        w.write_all(b).await?;
    }
    Ok(())
}

/// Reads one frame; `Ok(None)` on a clean end of stream between frames.
///
/// # Errors
/// On I/O failure, an oversized frame, or bytes that do not decode as `M`.
///
/// # Cancel safety
/// Not cancel safe; keep the read loop in one task.
pub async fn read_frame<R: AsyncRead + Unpin, M: DeserializeOwned>(
    r: &mut R,
) -> Result<Option<Frame<M>>, ProtocolError> {
    let Some(raw) = read_raw(r, max_frame()).await? else { return Ok(None) };
    decode(raw).map(Some)
}

/// Reads one length-prefixed frame without decoding it.
pub(crate) async fn read_raw<R: AsyncRead + Unpin>(r: &mut R, limit: usize) -> Result<Option<Bytes>, ProtocolError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let size = u32::from_be_bytes(len) as usize;
    if size > limit {
        return Err(ProtocolError::FrameTooLarge { size, limit });
    }
    // Read into uninitialised capacity (no memset of large frames).
    let mut buf = BytesMut::with_capacity(size);
    if size >= HUGE_FRAME {
        advise_huge_pages(&mut buf);
    }
    while buf.len() < size {
        if r.read_buf(&mut buf).await? == 0 {
            return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
        }
    }
    Ok(Some(buf.freeze()))
}

/// Frames at least this large (data transfers) ask for transparent huge pages.
const HUGE_FRAME: usize = 8 << 20;

/// Asks the kernel to back a large receive buffer with huge pages: a 64 MiB buffer then takes
/// 32 page faults instead of 16 384, which otherwise cost about as much as receiving the data.
#[allow(unsafe_code)]
fn advise_huge_pages(buf: &mut BytesMut) {
    const HUGE: usize = 2 << 20;
    let spare = buf.spare_capacity_mut();
    let start = spare.as_mut_ptr() as usize;
    let end = start + spare.len();
    let aligned = (start + HUGE - 1) & !(HUGE - 1);
    if aligned + HUGE > end {
        return;
    }
    // SAFETY: the range lies inside memory this buffer owns; MADV_HUGEPAGE only changes how the
    // kernel backs the pages, never their contents or validity.
    unsafe {
        libc::madvise(aligned as *mut libc::c_void, (end - aligned) & !(HUGE - 1), libc::MADV_HUGEPAGE);
    }
}

/// Decodes a frame body (everything after the length prefix).
///
/// # Errors
/// When the body is truncated, inconsistent or not postcard for `M`.
pub fn decode<M: DeserializeOwned>(mut body: Bytes) -> Result<Frame<M>, ProtocolError> {
    let bad = |what: &str| ProtocolError::Malformed(what.to_owned());
    if body.len() < 4 {
        return Err(bad("frame shorter than its header length"));
    }
    let hlen = u32::from_be_bytes([body[0], body[1], body[2], body[3]]) as usize;
    if body.len() < 4 + hlen {
        return Err(bad("frame shorter than its header"));
    }
    let _ = body.split_to(4);
    let header = body.split_to(hlen);
    let (messages, lens): (Vec<M>, Vec<u64>) =
        postcard::from_bytes(&header).map_err(|e| ProtocolError::Malformed(format!("undecodable header: {e}")))?;
    let blobs = split_blobs(&mut body, &lens).map_err(bad)?;
    if !body.is_empty() {
        return Err(bad("trailing bytes after the last blob"));
    }
    Ok(Frame { messages, blobs })
}

/// Cuts the out-of-band parts announced by `lens` off the front of `body` (shared, not copied).
///
/// # Errors
/// When a length does not fit in memory or runs past the end of `body`.
pub(crate) fn split_blobs(body: &mut Bytes, lens: &[u64]) -> Result<Vec<Bytes>, &'static str> {
    let mut blobs = Vec::with_capacity(lens.len());
    for &l in lens {
        let l = usize::try_from(l).map_err(|_| "blob length overflows")?;
        if l > body.len() {
            return Err("blob extends past the end of the data");
        }
        blobs.push(body.split_to(l));
    }
    Ok(blobs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[tokio::test(flavor = "current_thread")]
    async fn frame_round_trips_messages_and_blobs() {
        let (mut a, mut b) = tokio::io::duplex(1 << 20);
        let blob = Bytes::from(vec![7u8; 100_000]);
        write_frame(&mut a, &["hello".to_owned(), "world".to_owned()], std::slice::from_ref(&blob))
            .await
            .expect("write");
        drop(a);
        let f: Frame<String> = read_frame(&mut b).await.expect("read").expect("one frame");
        assert_eq!(f.messages, ["hello", "world"]);
        assert_eq!(f.blobs, [blob]);
        assert!(read_frame::<_, String>(&mut b).await.expect("clean end").is_none());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn oversized_length_is_refused_before_allocating() {
        let (mut a, mut b) = tokio::io::duplex(64);
        a.write_all(&u32::MAX.to_be_bytes()).await.expect("write");
        let err = read_frame::<_, String>(&mut b).await.expect_err("too large");
        assert!(matches!(err, ProtocolError::FrameTooLarge { .. }), "{err}");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn truncated_frame_is_an_error_not_a_hang() {
        let (mut a, mut b) = tokio::io::duplex(64);
        a.write_all(&100u32.to_be_bytes()).await.expect("write");
        a.write_all(b"short").await.expect("write");
        drop(a);
        assert!(read_frame::<_, String>(&mut b).await.is_err());
    }

    /// A realistic frame of each direction (tasks with nested arguments, a compute with inputs,
    /// data with an out-of-band blob), encoded as `write_frame` sends it (without the length).
    fn sample_bodies() -> Vec<(u8, Vec<u8>)> {
        use crate::msg::{FromScheduler, PeerMsg, ToScheduler};
        use crate::wire::{WireArg, WireBody, WireCall, WireDep, WireTask, WireTicket, WireValue};
        use rask_graph::Key;
        let call = WireCall {
            op: "add".into(),
            args: vec![
                WireArg::Ref(Key::new("a")),
                WireArg::List(vec![WireArg::Lit(WireValue::Int(7)), WireArg::Lit(WireValue::Str("x".into()))]),
            ],
        };
        let task = WireTask {
            key: Key::new("b"),
            deps: vec![WireDep::Key(Key::new("a")), WireDep::Position(0)],
            body: WireBody::Call(call.clone()).into(),
            annotations: None,
            order: 3,
            wanted: true,
        };
        let rt = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
        let encode = |f: &dyn Fn(&mut Vec<u8>)| -> Vec<u8> {
            let mut buf = Vec::new();
            f(&mut buf);
            buf.split_off(4)
        };
        let to = encode(&|buf| {
            let m = vec![ToScheduler::SubmitGraph { tasks: vec![task.clone()], wanted: vec![Key::new("b")] }];
            rt.block_on(write_frame(buf, &m, &[])).expect("encodes");
        });
        let from = encode(&|buf| {
            let m = vec![FromScheduler::Compute {
                key: Key::new("b"),
                body: WireBody::Call(call.clone()).into(),
                inputs: vec![(Key::new("a"), vec![std::sync::Arc::from("tcp://127.0.0.1:1")])],
                retries: 1,
                timeout_us: Some(5),
                priority: (0, 1, 2),
                ticket: WireTicket { slot: 7, serial: 300 },
            }];
            rt.block_on(write_frame(buf, &m, &[])).expect("encodes");
        });
        let peer = encode(&|buf| {
            let m = vec![PeerMsg::Data {
                values: vec![(Key::new("a"), Some(WireValue::Blob(0)))],
                unsendable: vec![(Key::new("big"), "too large".into())],
                more: false,
            }];
            rt.block_on(write_frame(buf, &m, &[Bytes::from(vec![1u8; 300])])).expect("encodes");
        });
        vec![(0, to), (1, from), (2, peer)]
    }

    /// Whether `body` decodes as a frame of that kind, the task bodies inside included (they
    /// travel encoded, and the worker that runs one decodes it: the fuzzing reaches that
    /// decoder too).
    fn decode_as(kind: u8, body: Vec<u8>) -> bool {
        use crate::msg::{FromScheduler, ToScheduler};
        match kind {
            0 => decode::<ToScheduler>(Bytes::from(body)).is_ok_and(|f| {
                f.messages.iter().all(|m| match m {
                    ToScheduler::SubmitGraph { tasks, .. } | ToScheduler::SubmitPart { tasks } => {
                        tasks.iter().all(|t| t.body.decode().is_ok())
                    }
                    _ => true,
                })
            }),
            1 => decode::<FromScheduler>(Bytes::from(body)).is_ok_and(|f| {
                f.messages.iter().all(|m| match m {
                    FromScheduler::Compute { body, .. } => body.decode().is_ok(),
                    _ => true,
                })
            }),
            _ => decode::<crate::msg::PeerMsg>(Bytes::from(body)).is_ok(),
        }
    }

    #[test]
    fn sample_frames_decode_before_mutation() {
        for (kind, body) in sample_bodies() {
            assert!(decode_as(kind, body), "kind {kind}");
        }
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic_the_decoder(body in prop::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode::<crate::msg::ToScheduler>(Bytes::from(body.clone()));
            let _ = decode::<crate::msg::FromScheduler>(Bytes::from(body.clone()));
            let _ = decode::<crate::msg::PeerMsg>(Bytes::from(body));
        }

        /// Fuzzing by mutation: valid frames with bytes flipped, inserted or cut off decode
        /// to a message or an error, never a panic or a runaway allocation.
        #[test]
        fn mutated_frames_never_panic_the_decoder(
            which in 0usize..3,
            flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
            cut in any::<prop::sample::Index>(),
            truncate in any::<bool>(),
        ) {
            let (kind, mut body) = sample_bodies().swap_remove(which);
            for (at, byte) in flips {
                let i = at.index(body.len());
                body[i] ^= byte | 1;
            }
            if truncate {
                body.truncate(cut.index(body.len()));
            }
            let _ = decode_as(kind, body);
        }
    }
}
