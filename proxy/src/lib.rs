//! The node proxy as a library: the binary (`main.rs`) parses the CLI and calls into these
//! modules; fuzz targets and tests reach the parsers through here.
#![forbid(unsafe_code)]

pub mod admin;
pub mod authz;
pub mod balance;
pub mod cgroup;
pub mod check;
pub mod config;
pub mod detect;
pub mod discovery;
pub mod ebpf;
pub mod http;
pub mod identity;
pub mod iptables;
pub mod metrics;
pub mod outbound;
pub mod transport;
pub mod tunnel;
