//! Bidirectional copy between the workload's connection and the upstream one.
//!
//! Each direction has one fixed buffer (`copy_buffer_bytes`): the proxy reads only when it
//! can write, so a slow reader on one side pushes back on the sender through TCP flow
//! control instead of growing memory. End of stream on one side is passed on as a
//! half-close (shutdown of the write side), so request/response protocols that signal the
//! end of a request with FIN keep working. An error on either side resets both.

use std::io;

use tokio::{io::copy_bidirectional_with_sizes, net::TcpStream};

/// Bytes moved in each direction.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Transferred {
    /// Client (workload) to upstream.
    pub to_upstream: u64,
    /// Upstream to client.
    pub to_client: u64,
}

pub async fn bidirectional(
    client: &mut TcpStream,
    upstream: &mut TcpStream,
    buffer: usize,
) -> io::Result<Transferred> {
    let (to_upstream, to_client) =
        copy_bidirectional_with_sizes(client, upstream, buffer, buffer).await?;
    Ok(Transferred {
        to_upstream,
        to_client,
    })
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
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpListener,
    };

    async fn pair() -> io::Result<(TcpStream, TcpStream)> {
        let l = TcpListener::bind("127.0.0.1:0").await?;
        let a = TcpStream::connect(l.local_addr()?).await?;
        let (b, _) = l.accept().await?;
        Ok((a, b))
    }

    #[tokio::test]
    async fn half_close_passes_through_and_counts_bytes() -> io::Result<()> {
        let (mut client, mut proxy_in) = pair().await?;
        let (mut proxy_out, mut server) = pair().await?;
        let copier =
            tokio::spawn(async move { bidirectional(&mut proxy_in, &mut proxy_out, 1024).await });
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
}
