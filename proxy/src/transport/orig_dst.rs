//! Recovering where an intercepted connection was going.
//!
//! eBPF mode: connect4/connect6 recorded it and sock_ops moved it to a map keyed by the
//! connection as the proxy sees it (client address and port, proxy address and port).
//! iptables mode: conntrack knows it, and SO_ORIGINAL_DST / IP6T_SO_ORIGINAL_DST return it.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
    sync::Arc,
};

use nix::sys::socket::{getsockopt, sockopt};
use tokio::net::TcpStream;

use crate::ebpf::Maps;

#[derive(Clone)]
pub enum OrigDstSource {
    Ebpf(Arc<Maps>),
    Conntrack,
}

#[derive(Debug, thiserror::Error)]
pub enum OrigDstError {
    #[error(
        "no original destination recorded for {client} -> {local}: the connection did not come through connect4/connect6 (a direct connect to the proxy port?) or its entry was evicted"
    )]
    NotRecorded {
        client: SocketAddr,
        local: SocketAddr,
    },
    #[error(
        "SO_ORIGINAL_DST failed for {client} -> {local}: {source}; the connection was not redirected by the proxy's iptables rules"
    )]
    Conntrack {
        client: SocketAddr,
        local: SocketAddr,
        source: nix::Error,
    },
}

/// Where an intercepted connection was going, and who made it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Origin {
    pub dst: SocketAddr,
    /// cgroup v2 id of the connecting task (eBPF mode; iptables mode cannot know it).
    pub cgroup_id: Option<u64>,
}

impl OrigDstSource {
    pub fn lookup(
        &self,
        stream: &TcpStream,
        client: SocketAddr,
        local: SocketAddr,
    ) -> Result<Origin, OrigDstError> {
        match self {
            OrigDstSource::Ebpf(maps) => maps
                .take_orig_dst(client, local)
                .map(|(dst, cg)| Origin {
                    dst,
                    cgroup_id: (cg != 0).then_some(cg),
                })
                .ok_or(OrigDstError::NotRecorded { client, local }),
            OrigDstSource::Conntrack => conntrack(stream, local)
                .map(|dst| Origin {
                    dst,
                    cgroup_id: None,
                })
                .map_err(|source| OrigDstError::Conntrack {
                    client,
                    local,
                    source,
                }),
        }
    }
}

fn conntrack(stream: &TcpStream, local: SocketAddr) -> nix::Result<SocketAddr> {
    if local.is_ipv4() {
        let sin = getsockopt(stream, sockopt::OriginalDst)?;
        let ip = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
        Ok(SocketAddr::V4(SocketAddrV4::new(
            ip,
            u16::from_be(sin.sin_port),
        )))
    } else {
        let sin6 = getsockopt(stream, sockopt::Ip6tOriginalDst)?;
        let ip = IpAddr::from(sin6.sin6_addr.s6_addr);
        match ip {
            IpAddr::V6(ip) => Ok(SocketAddr::V6(SocketAddrV6::new(
                ip,
                u16::from_be(sin6.sin6_port),
                0,
                0,
            ))),
            IpAddr::V4(_) => Err(nix::Error::EAFNOSUPPORT),
        }
    }
}
