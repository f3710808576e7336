//! Sockets: listeners, the original destination of an accepted connection, and the
//! bidirectional copy.

pub mod copy;
pub mod counted;
pub mod orig_dst;
pub mod rechecked;
pub mod splice;

use std::{io, net::SocketAddr};

use nix::{
    getsockopt_impl, sockopt_impl,
    sys::socket::{getsockopt, setsockopt, sockopt},
};
use tokio::net::{TcpListener, TcpSocket};

/// How many connections may wait in the accept queue. Redirected connects from every
/// workload on the node land here, so it is larger than a typical server's.
const LISTEN_BACKLOG: u32 = 4096;

// SO_NETNS_COOKIE (Linux 5.14+): the cookie BPF programs get from bpf_get_netns_cookie().
sockopt_impl!(
    /// The network namespace cookie of a socket.
    NetnsCookie,
    GetOnly,
    libc::SOL_SOCKET,
    libc::SO_NETNS_COOKIE,
    u64
);

/// Binds a listener. IPv6 listeners are IPv6-only: IPv4 has its own listener, and a dual
/// stack socket would see IPv4 clients as v4-mapped addresses.
pub fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => {
            let s = TcpSocket::new_v6()?;
            setsockopt(&s, sockopt::Ipv6V6Only, &true).map_err(io::Error::from)?;
            s
        }
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// The network namespace cookie of a socket.
pub fn netns_cookie(listener: &TcpListener) -> io::Result<u64> {
    getsockopt(listener, NetnsCookie).map_err(io::Error::from)
}

/// Helpers for tests that need real sockets.
#[cfg(test)]
pub(crate) mod test_support {
    use std::io;

    use tokio::net::{TcpListener, TcpStream};

    /// A connected loopback TCP pair: (the connecting end, the accepted end).
    pub(crate) async fn tcp_pair() -> io::Result<(TcpStream, TcpStream)> {
        let l = TcpListener::bind("127.0.0.1:0").await?;
        let a = TcpStream::connect(l.local_addr()?).await?;
        let (b, _) = l.accept().await?;
        Ok((a, b))
    }
}
