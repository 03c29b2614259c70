//! Bidirectional copy with half-close and adaptive buffers.
//!
//! Each direction starts with a small buffer (most connections are small request/response exchanges, and
//! thousands of idle connections must stay cheap) and grows when reads keep filling it (bulk transfer).
//! When one side finishes sending, the other side's write half is shut down and the opposite direction
//! keeps flowing until it finishes too. Byte counts are kept even when a direction fails.
use std::io;

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

/// Copies both ways until both directions have finished; the first error (if any) is returned with the
/// counts so far.
pub async fn copy_bidirectional<A, B>(a: A, b: B) -> (Transferred, Option<io::Error>)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let (mut a_read, mut a_write) = tokio::io::split(a);
    let (mut b_read, mut b_write) = tokio::io::split(b);
    let mut a_to_b = 0u64;
    let mut b_to_a = 0u64;
    let (first, second) =
        tokio::join!(copy_one_way(&mut a_read, &mut b_write, &mut a_to_b), copy_one_way(&mut b_read, &mut a_write, &mut b_to_a));
    (Transferred { a_to_b, b_to_a }, first.err().or(second.err()))
}

async fn copy_one_way<R, W>(from: &mut R, to: &mut W, copied: &mut u64) -> io::Result<()>
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
    use tokio::io::{AsyncReadExt, AsyncWriteExt, duplex};

    use super::*;

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
