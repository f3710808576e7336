//! Bidirectional copy between the workload's connection and the upstream one.
//!
//! Each direction has one fixed buffer (`copy_buffer_bytes`): the proxy reads only when it
//! has written what it read before, so a slow reader on one side pushes back on the sender
//! through TCP flow control instead of growing memory. End of stream on one side is passed
//! on as a half-close (shutdown of the write side), so request/response protocols that
//! signal the end of a request with FIN keep working. An error on either side ends both
//! directions; the caller resets the sockets.
//!
//! Bytes are counted as they move (not only at the end), so the admin API can show live
//! connections with their byte counts.

use std::{
    io,
    sync::atomic::{AtomicU64, Ordering},
};

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpStream,
};

/// Bytes moved in each direction.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Transferred {
    /// Client (workload) to upstream.
    pub to_upstream: u64,
    /// Upstream to client.
    pub to_client: u64,
}

/// Live byte counters of one connection, shared with the connection table.
#[derive(Debug, Default)]
pub struct Progress {
    pub to_upstream: AtomicU64,
    pub to_client: AtomicU64,
}

impl Progress {
    pub fn snapshot(&self) -> Transferred {
        Transferred {
            to_upstream: self.to_upstream.load(Ordering::Relaxed),
            to_client: self.to_client.load(Ordering::Relaxed),
        }
    }
}

pub async fn bidirectional(
    client: &mut TcpStream,
    upstream: &mut TcpStream,
    buffer: usize,
    progress: &Progress,
) -> io::Result<Transferred> {
    let (mut cr, mut cw) = client.split();
    let (mut ur, mut uw) = upstream.split();
    tokio::try_join!(
        one_way(&mut cr, &mut uw, buffer, &progress.to_upstream),
        one_way(&mut ur, &mut cw, buffer, &progress.to_client),
    )?;
    Ok(progress.snapshot())
}

/// [`bidirectional`] between a client socket and any upstream stream (a tunnel stream to
/// another node's proxy), with the same buffers, half-close and counting.
pub async fn bidirectional_io<U>(
    client: &mut TcpStream,
    upstream: U,
    buffer: usize,
    progress: &Progress,
) -> io::Result<Transferred>
where
    U: AsyncRead + AsyncWrite + Unpin,
{
    let (mut cr, mut cw) = client.split();
    let (mut ur, mut uw) = tokio::io::split(upstream);
    tokio::try_join!(
        one_way(&mut cr, &mut uw, buffer, &progress.to_upstream),
        one_way(&mut ur, &mut cw, buffer, &progress.to_client),
    )?;
    Ok(progress.snapshot())
}

/// Copies until end of stream, then half-closes the writer.
async fn one_way<R, W>(r: &mut R, w: &mut W, buffer: usize, count: &AtomicU64) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; buffer];
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            return w.shutdown().await;
        }
        w.write_all(&buf[..n]).await?;
        // A no-op on a TcpStream; a tunnel stream (HTTP/2 DATA frames) may hold bytes until
        // flushed, and a request/response peer would wait for them forever.
        w.flush().await?;
        count.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// Closes with RST instead of FIN, so the peer sees the failure rather than a clean end.
pub fn reset(stream: TcpStream) {
    // SO_LINGER with a zero timeout makes close() send RST.
    let _ = stream.set_zero_linger();
    drop(stream);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::test_support::tcp_pair;

    #[tokio::test]
    async fn half_close_passes_through_and_counts_bytes() -> io::Result<()> {
        let (mut client, mut proxy_in) = tcp_pair().await?;
        let (mut proxy_out, mut server) = tcp_pair().await?;
        let copier = tokio::spawn(async move {
            let p = Progress::default();
            bidirectional(&mut proxy_in, &mut proxy_out, 1024, &p).await
        });
        let request = vec![7u8; 100_000];
        client.write_all(&request).await?;
        client.shutdown().await?;
        let mut got = Vec::new();
        server.read_to_end(&mut got).await?;
        assert_eq!(got, request);
        server.write_all(b"response").await?;
        server.shutdown().await?;
        let mut back = Vec::new();
        client.read_to_end(&mut back).await?;
        assert_eq!(back, b"response");
        let t = copier.await.map_err(io::Error::other)??;
        assert_eq!(
            t,
            Transferred {
                to_upstream: 100_000,
                to_client: 8
            }
        );
        Ok(())
    }

    #[tokio::test]
    async fn an_error_on_one_side_ends_both() -> io::Result<()> {
        let (client, mut proxy_in) = tcp_pair().await?;
        let (mut proxy_out, _server) = tcp_pair().await?;
        // The client resets: the copy must end with an error even though the server side
        // stays open and silent.
        client.set_zero_linger()?;
        drop(client);
        let p = Progress::default();
        let r = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            bidirectional(&mut proxy_in, &mut proxy_out, 1024, &p),
        )
        .await;
        assert!(matches!(r, Ok(Err(_))), "expected a reset error, got {r:?}");
        Ok(())
    }
}
