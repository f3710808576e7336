//! Header handling of the HTTP stack on untrusted headers: `grpc-timeout` parsing and
//! hop-by-hop stripping (which reads the names listed in `Connection`). Neither may panic,
//! and after stripping no hop-by-hop header may remain.
#![no_main]

use libfuzzer_sys::fuzz_target;
use proxy::http::{parse_grpc_timeout, strip_hop_by_hop};
use hyper::{HeaderMap, header::{HeaderName, HeaderValue}};

fuzz_target!(|data: &[u8]| {
    let mut headers = HeaderMap::new();
    for line in data.split(|b| *b == b'\n') {
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            if let Ok(v) = HeaderValue::from_bytes(line) {
                let _ = parse_grpc_timeout(&v);
            }
            continue;
        };
        let (name, value) = line.split_at(colon);
        let value = value.get(1..).unwrap_or_default();
        if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(name), HeaderValue::from_bytes(value)) {
            let _ = parse_grpc_timeout(&v);
            headers.append(n, v);
        }
    }
    let keep_upgrade = data.first().is_some_and(|b| b & 1 == 1);
    strip_hop_by_hop(&mut headers, keep_upgrade);
    for gone in ["keep-alive", "proxy-connection", "transfer-encoding", "trailer"] {
        assert!(!headers.contains_key(gone));
    }
    if !keep_upgrade {
        assert!(!headers.contains_key("connection") && !headers.contains_key("upgrade"));
    }
    if let Some(te) = headers.get("te") {
        assert_eq!(te, "trailers");
    }
});
