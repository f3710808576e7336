//! Identities from untrusted input: SPIFFE IDs (config files, CSR requests to the issuer,
//! certificates' URI SANs) and the SPIFFE ID of a peer certificate given as arbitrary DER
//! (what a tunnel client presents). Parsing must never panic; a parsed ID must round-trip
//! and give a valid server name.
#![no_main]

use libfuzzer_sys::fuzz_target;
use proxy::identity::{SpiffeId, peer_identity, sni_for};
use rustls::pki_types::CertificateDer;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(id) = SpiffeId::parse(text)
    {
        let again = SpiffeId::parse(id.as_str());
        assert!(again.as_ref().is_ok_and(|a| *a == id));
        let sni = sni_for(&id);
        assert!(rustls::pki_types::ServerName::try_from(sni).is_ok());
    }
    let cert = CertificateDer::from(data.to_vec());
    let _ = peer_identity(std::slice::from_ref(&cert));
});
