//! The node's HTTPS client for the issuer: one short TLS 1.3 connection per request
//! (requests are rare: one per identity per renewal), the issuer authenticated by its SPIFFE
//! ID against the current trust anchors.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Method, Request, StatusCode, header};
use hyper_util::rt::TokioIo;
use rustls::{ClientConfig, crypto::CryptoProvider, pki_types::ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::{
    SpiffeId,
    verify::{AnchorSet, SpiffeServerVerifier},
};

/// The whole exchange (connect, handshake, request, response) must finish within this.
pub(crate) const ISSUER_TIMEOUT: Duration = Duration::from_secs(10);

/// Issuer answers are a certificate chain or a short error; anything larger is wrong.
const MAX_RESPONSE: usize = 1024 * 1024;

pub(crate) struct IssuerClient {
    addr: SocketAddr,
    tls: TlsConnector,
}

impl IssuerClient {
    pub(crate) fn new(
        addr: SocketAddr,
        anchors: Arc<AnchorSet>,
        issuer_id: SpiffeId,
        provider: &Arc<CryptoProvider>,
    ) -> Result<Self, rustls::Error> {
        let verifier = SpiffeServerVerifier::new(
            anchors,
            Some(issuer_id),
            provider.signature_verification_algorithms,
        );
        let mut config = ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Self {
            addr,
            tls: TlsConnector::from(Arc::new(config)),
        })
    }

    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Sends one request; the error says which step failed.
    pub(crate) async fn request(
        &self,
        method: Method,
        path: &str,
        bearer: Option<&str>,
        body: Vec<u8>,
    ) -> Result<(StatusCode, Bytes), String> {
        match tokio::time::timeout(ISSUER_TIMEOUT, self.exchange(method, path, bearer, body)).await
        {
            Ok(result) => result,
            Err(_) => Err(format!("no answer within {} s", ISSUER_TIMEOUT.as_secs())),
        }
    }

    async fn exchange(
        &self,
        method: Method,
        path: &str,
        bearer: Option<&str>,
        body: Vec<u8>,
    ) -> Result<(StatusCode, Bytes), String> {
        let tcp = TcpStream::connect(self.addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let tls = self
            .tls
            .connect(ServerName::from(self.addr.ip()), tcp)
            .await
            .map_err(|e| {
                format!("TLS handshake: {e} (does the anchors bundle hold the issuer's CA?)")
            })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| format!("HTTP/1.1: {e}"))?;
        let conn = tokio::spawn(conn);
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, self.addr.to_string())
            .header(header::CONTENT_TYPE, "application/json");
        if let Some(token) = bearer {
            request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        // The error of a failed build never contains header values (the token).
        let request = request
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| format!("building the request: {e}"))?;
        let result = async {
            let response = sender
                .send_request(request)
                .await
                .map_err(|e| format!("request: {e}"))?;
            let status = response.status();
            let body = Limited::new(response.into_body(), MAX_RESPONSE)
                .collect()
                .await
                .map_err(|e| format!("response body: {e}"))?
                .to_bytes();
            Ok((status, body))
        }
        .await;
        conn.abort();
        result
    }
}
