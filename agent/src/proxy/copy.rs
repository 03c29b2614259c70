//! Bidirectional copy with half-close and adaptive buffers.
//!
//! Each direction starts with a small buffer (most connections are small request/response exchanges, and
//! thousands of idle connections must stay cheap) and grows when reads keep filling it (bulk transfer).
//! When one side finishes sending, the other side's write half is shut down and the opposite direction
//! keeps flowing until it finishes too. When a direction fails (a reset, a tunnel closed by the peer), both
//! stop at once, so the caller closes both sides: a client waiting for an answer learns the connection is
//! gone instead of waiting forever. Byte counts are kept even when a direction fails.
use std::io;

use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Buffer sizes a direction steps through.
const SIZES: [usize; 3] = [1024, 16 * 1024, 256 * 1024];
/// Consecutive full reads before stepping up.
const FULL_READS_TO_GROW: u32 = 4;

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Transferred {
    /// Bytes from `a` to `b`.
    pub a_to_b: u64,
    /// Bytes from `b` to `a`.
    pub b_to_a: u64,
}

/// Counters a copy adds to as bytes flow (metrics that show a long-lived connection while it is open).
#[derive(Default)]
pub struct Meters {
    pub a_to_b: Vec<Counter>,
    pub b_to_a: Vec<Counter>,
}

/// Copies both ways until both directions have finished, or until one fails: then the other is abandoned
/// and the error returned with the counts so far.
pub async fn copy_bidirectional<A, B>(a: A, b: B) -> (Transferred, Option<io::Error>)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    copy_metered(a, b, &Meters::default()).await
}

/// [`copy_bidirectional`], adding each chunk to `meters` as it is written.
pub async fn copy_metered<A, B>(a: A, b: B, meters: &Meters) -> (Transferred, Option<io::Error>)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let (mut a_read, mut a_write) = tokio::io::split(a);
    let (mut b_read, mut b_write) = tokio::io::split(b);
    let mut a_to_b = 0u64;
    let mut b_to_a = 0u64;
    let error = {
        let forward = copy_one_way(&mut a_read, &mut b_write, &mut a_to_b, &meters.a_to_b);
        let back = copy_one_way(&mut b_read, &mut a_write, &mut b_to_a, &meters.b_to_a);
        tokio::pin!(forward, back);
        tokio::select! {
            done = &mut forward => match done {
                Ok(()) => back.await.err(),
                Err(e) => Some(e),
            },
            done = &mut back => match done {
                Ok(()) => forward.await.err(),
                Err(e) => Some(e),
            },
        }
    };
    (Transferred { a_to_b, b_to_a }, error)
}

async fn copy_one_way<R, W>(from: &mut R, to: &mut W, copied: &mut u64, meters: &[Counter]) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut step = 0;
    let mut buf = vec![0u8; SIZES[0]];
    let mut full_reads = 0;
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            // Half-close: tell the other side we are done sending; keep the other direction open.
            return to.shutdown().await;
        }
        to.write_all(&buf[..n]).await?;
        *copied += n as u64;
        for meter in meters {
            meter.inc_by(n as u64);
        }
        if n == buf.len() {
            full_reads += 1;
            if full_reads >= FULL_READS_TO_GROW && step + 1 < SIZES.len() {
                step += 1;
                buf.resize(SIZES[step], 0);
                full_reads = 0;
            }
        } else {
            full_reads = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        pin::Pin,
        task::{Context, Poll},
        time::Duration,
    };

    use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadBuf, duplex};

    use super::*;

    /// A peer whose reads end as `ending` says: a reset (error) or a clean end of stream.
    struct Peer {
        reset: bool,
    }

    impl AsyncRead for Peer {
        fn poll_read(self: Pin<&mut Self>, _: &mut Context<'_>, _: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(if self.reset { Err(io::ErrorKind::ConnectionReset.into()) } else { Ok(()) })
        }
    }

    impl AsyncWrite for Peer {
        fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn a_reset_ends_both_directions_while_the_client_waits() {
        // The client sends nothing and waits for an answer; the peer's side is reset.
        let (_client, proxy_a) = duplex(1024);
        let copy = copy_bidirectional(proxy_a, Peer { reset: true });
        let (_, error) = tokio::time::timeout(Duration::from_secs(1), copy).await.expect("the copy ends at the reset");
        assert_eq!(error.map(|e| e.kind()), Some(io::ErrorKind::ConnectionReset));
        // Control: a clean end of stream from the peer is a half-close — the client's direction stays open.
        let (_client, proxy_a) = duplex(1024);
        let copy = copy_bidirectional(proxy_a, Peer { reset: false });
        assert!(tokio::time::timeout(Duration::from_millis(200), copy).await.is_err(), "half-close keeps the copy going");
    }

    #[tokio::test]
    async fn copies_both_ways_byte_exact_with_half_close() {
        let (client, proxy_a) = duplex(64 * 1024);
        let (proxy_b, server) = duplex(64 * 1024);
        let proxy = tokio::spawn(copy_bidirectional(proxy_a, proxy_b));

        let request: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let (mut client_read, mut client_write) = tokio::io::split(client);
        let (mut server_read, mut server_write) = tokio::io::split(server);
        let expected = request.clone();
        let server_task = tokio::spawn(async move {
            // Read everything until the client's half-close arrives, then answer.
            let mut got = vec![];
            server_read.read_to_end(&mut got).await.unwrap();
            assert_eq!(got, expected);
            server_write.write_all(b"done").await.unwrap();
            server_write.shutdown().await.unwrap();
        });
        client_write.write_all(&request).await.unwrap();
        client_write.shutdown().await.unwrap();
        let mut reply = vec![];
        client_read.read_to_end(&mut reply).await.unwrap();
        assert_eq!(reply, b"done");
        server_task.await.unwrap();
        let (transferred, error) = proxy.await.unwrap();
        assert!(error.is_none(), "{error:?}");
        assert_eq!(transferred, Transferred { a_to_b: 3_000_000, b_to_a: 4 });
    }
}
