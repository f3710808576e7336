//! Protocol detection over a bounded peek: HTTP/1.x, HTTP/2 with prior knowledge, TLS (with
//! the SNI of its ClientHello) or opaque bytes.
//!
//! [`classify`] is a pure, synchronous parser of the bytes seen so far; it allocates only the
//! SNI string it returns. [`detect`] peeks at a socket (never consuming a byte) until
//! [`classify`] decides, the peek buffer is full, the peer closes, or a timeout fires.
//!
//! Like linkerd's `linkerd/http/detect`, detection *biases towards availability*: whatever it
//! cannot recognise is [`Protocol::Opaque`] and is forwarded as plain TCP, which always works;
//! detection itself never fails on the bytes (only the socket can fail).
//!
//! A decision is final: once [`classify`] returns [`Verdict::Done`] for some bytes, it returns
//! the same `Done` for those bytes followed by anything. Every decision depends only on bytes
//! already seen, so peeking more can only turn `NeedMore` into `Done`.

use std::{fmt, io, time::Duration};

use tokio::{io::Interest, net::TcpStream};

/// The most bytes detection peeks at (and so the most a client must have sent before the
/// proxy decides).
///
/// The trade-off: a larger window recognises more (a ClientHello whose SNI extension comes
/// late in a big record, a long HTTP/1 request line) but costs per-connection memory during
/// detection and makes the proxy wait longer before it gives up on bytes it cannot place. The
/// proxy biases towards availability: when the window is full and nothing is decided, the
/// connection is [`Protocol::Opaque`] (see [`classify_final`]), never an error. 16 KiB holds
/// any request line up to [`MAX_REQUEST_LINE`] and ClientHellos far larger than browsers send
/// today (about 1.8 KiB with post-quantum key shares); the SNI is usually found well before
/// the record ends, since [`classify`] decides as soon as the server_name extension is in.
pub const MAX_PEEK: usize = 16 * 1024;

/// The longest HTTP/1 request line (without its CRLF) recognised as HTTP; a longer one is
/// [`Protocol::Opaque`]. 8 KiB is the default limit of nginx (`large_client_header_buffers`)
/// and Apache (`LimitRequestLine`), so real clients stay below it.
pub const MAX_REQUEST_LINE: usize = 8 * 1024;
// A full request line and its CRLF fit in the peek window, so a valid one is always decided.
const _: () = assert!(MAX_REQUEST_LINE + 2 <= MAX_PEEK);

/// The HTTP/2 client connection preface (RFC 9113, section 3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The two versions accepted at the end of an HTTP/1 request line, with its CRLF.
const HTTP10_END: &[u8] = b"HTTP/1.0\r\n";
const HTTP11_END: &[u8] = b"HTTP/1.1\r\n";
/// `SP HTTP/1.x` after the request-target: what a request line needs after the target.
const LINE_AFTER_TARGET: usize = 1 + b"HTTP/1.1".len();

/// TLS record content type `handshake` (RFC 8446, section 5.1).
const TLS_HANDSHAKE: u8 = 0x16;
/// legacy_record_version: major byte, and the minor bytes of TLS 1.0..1.2 (a TLS 1.3
/// ClientHello still says 1.0 or 1.2 here). SSL 3.0 (minor 0) is not recognised.
const TLS_MAJOR: u8 = 0x03;
const TLS_MINORS: std::ops::RangeInclusive<u8> = 0x01..=0x03;
/// Record header: type (1), legacy_record_version (2), length (2).
const TLS_RECORD_HEADER: usize = 5;
/// The largest plaintext record fragment (RFC 8446, section 5.1: 2^14 bytes).
const TLS_MAX_RECORD: usize = 1 << 14;
/// Handshake type `client_hello`.
const TLS_CLIENT_HELLO: u8 = 1;
/// ClientHello.random is 32 bytes, legacy_session_id at most 32.
const TLS_RANDOM: usize = 32;
const TLS_MAX_SESSION_ID: usize = 32;
/// Extension type `server_name` (RFC 6066, section 3) and its NameType `host_name`.
const EXT_SERVER_NAME: u16 = 0;
const NAME_TYPE_HOST: u8 = 0;
/// The longest DNS name in text form, without a trailing dot (RFC 1035, section 2.3.4).
const MAX_HOST_NAME: usize = 253;

/// The wait between two peeks that found no new bytes (doubling up to the maximum). See
/// [`detect`] for why detection polls instead of waiting for readiness.
const PEEK_BACKOFF_MIN: Duration = Duration::from_millis(1);
const PEEK_BACKOFF_MAX: Duration = Duration::from_millis(16);

/// The standard HTTP/1 request methods (RFC 9110, section 9, and PATCH from RFC 5789). An
/// extension method is not recognised: the connection is opaque.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Method {
    Get,
    Head,
    Post,
    Put,
    Delete,
    Connect,
    Options,
    Trace,
    Patch,
}

/// What a connection speaks, as far as its first bytes tell.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// An HTTP/1.0 or HTTP/1.1 request line.
    Http1 { method: Method },
    /// The HTTP/2 prior-knowledge preface.
    Http2,
    /// A TLS handshake record. `sni` is the ClientHello's `host_name` (lowercased, since DNS
    /// names are case-insensitive), or `None` when it has none or the handshake is malformed
    /// or split over several records (not reassembled).
    Tls { sni: Option<String> },
    /// Anything else: forwarded as plain TCP.
    Opaque,
}

/// The decision on the bytes seen so far.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Verdict {
    /// Final: more bytes cannot change it.
    Done(Protocol),
    /// The bytes are a prefix of something recognisable; peek more.
    NeedMore,
}

/// Why [`detect`] stopped peeking.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// [`classify`] decided.
    Detected,
    /// The timeout fired first; the protocol is [`Protocol::Opaque`].
    Timeout,
    /// [`MAX_PEEK`] bytes were not enough; the protocol is [`Protocol::Opaque`].
    PeekLimit,
    /// The peer closed its side before anything decisive; the protocol is
    /// [`Protocol::Opaque`].
    Closed,
}

/// Classifies the first bytes of a connection. Never panics, whatever the bytes.
pub fn classify(buf: &[u8]) -> Verdict {
    match buf.first() {
        None => Verdict::NeedMore,
        Some(&TLS_HANDSHAKE) => classify_tls(buf),
        Some(_) if buf.starts_with(H2_PREFACE) => Verdict::Done(Protocol::Http2),
        // "PRI" is no HTTP/1 method: nothing else can start like the preface.
        Some(_) if H2_PREFACE.starts_with(buf) => Verdict::NeedMore,
        Some(_) => classify_http1(buf),
    }
}

/// The decision when no more bytes will come (timeout, full peek buffer, end of stream):
/// still undecided means [`Protocol::Opaque`].
pub fn classify_final(buf: &[u8]) -> Protocol {
    match classify(buf) {
        Verdict::Done(protocol) => protocol,
        Verdict::NeedMore => Protocol::Opaque,
    }
}

/// Peeks at `stream` until its protocol is known, and says why it stopped.
///
/// Never consumes a byte: the caller reads the connection from its first byte afterwards.
/// Returns an error only when the socket fails (e.g. a reset); every other ending maps to a
/// protocol, [`Protocol::Opaque`] when undecided.
///
/// Keep `timeout` short (on the order of a second at most) and let operators mark ports as
/// opaque so that they skip detection: in server-speaks-first protocols (SMTP, MySQL, FTP,
/// and others) the client sends nothing until the server greets it, so detection can only
/// end by timeout, and every connection to such a port waits the full timeout before the
/// proxy even connects upstream. Users of other meshes lost 10 s per connection to exactly
/// this; count [`Outcome::Timeout`] in metrics so that such ports show up.
pub async fn detect(stream: &TcpStream, timeout: Duration) -> io::Result<(Protocol, Outcome)> {
    // On the heap: 16 KiB inside the future would bloat every connection task.
    let mut buf = vec![0u8; MAX_PEEK];
    let mut seen = 0;
    match tokio::time::timeout(timeout, peek_until_decided(stream, &mut buf, &mut seen)).await {
        Ok(result) => result,
        Err(_elapsed) => {
            let peeked = buf.get(..seen).unwrap_or_default();
            Ok((classify_final(peeked), Outcome::Timeout))
        }
    }
}

/// The peek loop of [`detect`]; `seen` is how many bytes the last peek returned, so that the
/// caller can classify them when the timeout cancels this future.
///
/// When a peek finds no new bytes, this sleeps (1 ms, doubling to 16 ms) instead of waiting
/// for readiness: tokio's readiness is edge-triggered and only cleared when an operation
/// returns `WouldBlock`, and a peek at bytes already queued succeeds. Clearing readiness by
/// hand would leave those queued bytes unannounced, and the caller's first read after a
/// timeout would hang until the client sent more. The sleeps only happen when a client sent a
/// partial prefix (a ClientHello split over TCP segments), which the next peek usually
/// completes.
async fn peek_until_decided(
    stream: &TcpStream,
    buf: &mut [u8],
    seen: &mut usize,
) -> io::Result<(Protocol, Outcome)> {
    let mut backoff = PEEK_BACKOFF_MIN;
    loop {
        // `ready` (not only `peek`) to learn whether the peer has closed: a FIN after a partial
        // prefix leaves peek returning the same bytes forever. Read before the peek, so that
        // the peek sees every byte sent before the FIN.
        let ready = stream.ready(Interest::READABLE).await?;
        let n = stream.peek(buf).await?;
        let peeked = buf.get(..n).unwrap_or_default();
        if n != *seen {
            *seen = n;
            backoff = PEEK_BACKOFF_MIN;
            if let Verdict::Done(protocol) = classify(peeked) {
                return Ok((protocol, Outcome::Detected));
            }
            if n >= buf.len() {
                return Ok((Protocol::Opaque, Outcome::PeekLimit));
            }
        }
        // A peek of 0 bytes into a non-empty buffer is end of stream.
        if n == 0 || ready.is_read_closed() {
            return Ok((classify_final(peeked), Outcome::Closed));
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(PEEK_BACKOFF_MAX);
    }
}

// === impl Method ===

impl Method {
    const ALL: [Method; 9] = [
        Method::Get,
        Method::Head,
        Method::Post,
        Method::Put,
        Method::Delete,
        Method::Connect,
        Method::Options,
        Method::Trace,
        Method::Patch,
    ];

    /// The method as it appears on the wire.
    pub const fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Head => "HEAD",
            Method::Post => "POST",
            Method::Put => "PUT",
            Method::Delete => "DELETE",
            Method::Connect => "CONNECT",
            Method::Options => "OPTIONS",
            Method::Trace => "TRACE",
            Method::Patch => "PATCH",
        }
    }

    fn from_token(token: &[u8]) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|m| m.as_str().as_bytes() == token)
    }

    /// Whether some method starts with `token` (methods are case-sensitive: RFC 9110, 9.1).
    fn could_start(token: &[u8]) -> bool {
        Self::ALL
            .iter()
            .any(|m| m.as_str().as_bytes().starts_with(token))
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

// === HTTP/1 ===

/// `method SP request-target SP HTTP/1.x CRLF` (RFC 9112, section 3), decided at the first
/// byte that cannot belong to such a line.
fn classify_http1(buf: &[u8]) -> Verdict {
    const OPAQUE: Verdict = Verdict::Done(Protocol::Opaque);

    let token_len = buf
        .iter()
        .position(|b| !b.is_ascii_uppercase())
        .unwrap_or(buf.len());
    let token = buf.get(..token_len).unwrap_or_default();
    if !Method::could_start(token) {
        return OPAQUE;
    }
    match buf.get(token_len) {
        None => return Verdict::NeedMore,
        Some(b' ') => {}
        Some(_) => return OPAQUE,
    }
    let Some(method) = Method::from_token(token) else {
        return OPAQUE;
    };

    // request-target: one or more visible ASCII bytes, up to the next SP. Index `at` in `buf`
    // is also the length of the line before that byte.
    let target_start = token_len + 1;
    let target = buf.get(target_start..).unwrap_or_default();
    for (i, &b) in target.iter().enumerate() {
        let at = target_start + i;
        if b == b' ' {
            if i == 0 || at + LINE_AFTER_TARGET > MAX_REQUEST_LINE {
                return OPAQUE;
            }
            return classify_http1_version(buf.get(at + 1..).unwrap_or_default(), method);
        }
        // Control bytes (CR, LF: an HTTP/0.9 line without a version), DEL and non-ASCII
        // cannot be in a request-target; and even the shortest ending would be too long.
        if !b.is_ascii_graphic() || at + 1 + LINE_AFTER_TARGET > MAX_REQUEST_LINE {
            return OPAQUE;
        }
    }
    Verdict::NeedMore
}

fn classify_http1_version(rest: &[u8], method: Method) -> Verdict {
    if rest.starts_with(HTTP11_END) || rest.starts_with(HTTP10_END) {
        Verdict::Done(Protocol::Http1 { method })
    } else if HTTP11_END.starts_with(rest) || HTTP10_END.starts_with(rest) {
        Verdict::NeedMore
    } else {
        Verdict::Done(Protocol::Opaque)
    }
}

// === TLS ===

/// Why the ClientHello parser stopped before the end.
enum Stop {
    /// The structure continues past the bytes seen so far.
    NeedMore,
    /// A length or value contradicts the structure around it.
    Malformed,
}

/// A cursor over `buf` whose reads are bounded twice: by the end of the enclosing structure
/// (past it: [`Stop::Malformed`]) and by the bytes seen (past them: [`Stop::NeedMore`]).
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    /// Takes `n` bytes of a structure that ends at `end` (an index into `buf`).
    fn take(&mut self, n: usize, end: usize) -> Result<&'a [u8], Stop> {
        let next = self.pos.checked_add(n).ok_or(Stop::Malformed)?;
        if next > end {
            return Err(Stop::Malformed);
        }
        let bytes = self.buf.get(self.pos..next).ok_or(Stop::NeedMore)?;
        self.pos = next;
        Ok(bytes)
    }

    fn u8(&mut self, end: usize) -> Result<usize, Stop> {
        match self.take(1, end)? {
            &[b] => Ok(usize::from(b)),
            _ => Err(Stop::Malformed),
        }
    }

    fn u16(&mut self, end: usize) -> Result<usize, Stop> {
        match self.take(2, end)? {
            &[a, b] => Ok(usize::from(u16::from_be_bytes([a, b]))),
            _ => Err(Stop::Malformed),
        }
    }

    fn u24(&mut self, end: usize) -> Result<usize, Stop> {
        match self.take(3, end)? {
            &[a, b, c] => Ok(usize::from(a) << 16 | usize::from(b) << 8 | usize::from(c)),
            _ => Err(Stop::Malformed),
        }
    }

    /// The end of a structure of `len` bytes starting here, inside one ending at `end`.
    fn sub_end(&self, len: usize, end: usize) -> Result<usize, Stop> {
        match self.pos.checked_add(len) {
            Some(sub) if sub <= end => Ok(sub),
            _ => Err(Stop::Malformed),
        }
    }
}

/// A TLS record that starts with a ClientHello. Called when `buf[0]` is the handshake content
/// type; once the version bytes also match, the answer is TLS, with or without an SNI.
fn classify_tls(buf: &[u8]) -> Verdict {
    match buf.get(1) {
        None => return Verdict::NeedMore,
        Some(&TLS_MAJOR) => {}
        Some(_) => return Verdict::Done(Protocol::Opaque),
    }
    match buf.get(2) {
        None => return Verdict::NeedMore,
        Some(minor) if TLS_MINORS.contains(minor) => {}
        Some(_) => return Verdict::Done(Protocol::Opaque),
    }
    match client_hello_sni(buf) {
        Ok(sni) => Verdict::Done(Protocol::Tls { sni }),
        Err(Stop::NeedMore) => Verdict::NeedMore,
        Err(Stop::Malformed) => Verdict::Done(Protocol::Tls { sni: None }),
    }
}

/// Walks a ClientHello (RFC 8446, section 4.1.2) up to its server_name extension. Stops at
/// the first server_name: a second one would be malformed, and stopping keeps the decision
/// final however many bytes follow.
fn client_hello_sni(buf: &[u8]) -> Result<Option<String>, Stop> {
    let mut r = Reader { buf, pos: 0 };
    r.take(3, TLS_RECORD_HEADER)?; // type and version, checked by the caller
    let record_len = r.u16(TLS_RECORD_HEADER)?;
    if record_len == 0 || record_len > TLS_MAX_RECORD {
        return Err(Stop::Malformed);
    }
    let record_end = TLS_RECORD_HEADER + record_len;

    if r.u8(record_end)? != usize::from(TLS_CLIENT_HELLO) {
        return Err(Stop::Malformed);
    }
    // A ClientHello longer than its record continues in the next record. Reassembly is not
    // worth it for detection: the answer is TLS without an SNI.
    let hello_len = r.u24(record_end)?;
    let end = r.sub_end(hello_len, record_end)?;

    r.take(2, end)?; // legacy_version
    r.take(TLS_RANDOM, end)?;
    let session_id_len = r.u8(end)?;
    if session_id_len > TLS_MAX_SESSION_ID {
        return Err(Stop::Malformed);
    }
    r.take(session_id_len, end)?;
    let cipher_suites_len = r.u16(end)?;
    if cipher_suites_len == 0 || cipher_suites_len % 2 != 0 {
        return Err(Stop::Malformed);
    }
    r.take(cipher_suites_len, end)?;
    let compression_len = r.u8(end)?;
    if compression_len == 0 {
        return Err(Stop::Malformed);
    }
    r.take(compression_len, end)?;
    if r.pos == end {
        return Ok(None); // a ClientHello without extensions (TLS 1.2 allows it)
    }

    let extensions_len = r.u16(end)?;
    let extensions_end = r.sub_end(extensions_len, end)?;
    while r.pos < extensions_end {
        let ext_type = r.u16(extensions_end)?;
        let ext_len = r.u16(extensions_end)?;
        let data = r.take(ext_len, extensions_end)?;
        if ext_type == usize::from(EXT_SERVER_NAME) {
            return Ok(server_name(data));
        }
    }
    Ok(None)
}

/// The `host_name` of a complete server_name extension body (RFC 6066, section 3), if it
/// is well-formed.
fn server_name(data: &[u8]) -> Option<String> {
    let end = data.len();
    let mut r = Reader { buf: data, pos: 0 };
    let list_len = r.u16(end).ok()?;
    if r.pos + list_len != end {
        return None;
    }
    while r.pos < end {
        let name_type = r.u8(end).ok()?;
        let name_len = r.u16(end).ok()?;
        let name = r.take(name_len, end).ok()?;
        if name_type == usize::from(NAME_TYPE_HOST) {
            return host_name(name);
        }
    }
    None
}

/// A DNS name in ASCII (internationalised names travel as punycode), lowercased. Anything
/// else, including non-UTF-8 bytes, is no usable name.
fn host_name(name: &[u8]) -> Option<String> {
    let valid = !name.is_empty()
        && name.len() <= MAX_HOST_NAME
        && name
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'));
    if !valid {
        return None;
    }
    std::str::from_utf8(name).ok().map(str::to_ascii_lowercase)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::test_support::tcp_pair;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const REQUEST: &[u8] = b"GET /index.html?q=1 HTTP/1.1\r\nHost: example.com\r\n\r\n";

    // --- ClientHello builder ---

    fn be16(n: usize) -> [u8; 2] {
        u16::try_from(n)
            .unwrap_or_else(|_| unreachable!())
            .to_be_bytes()
    }

    fn ext(ext_type: u16, data: &[u8]) -> Vec<u8> {
        let mut v = ext_type.to_be_bytes().to_vec();
        v.extend(be16(data.len()));
        v.extend(data);
        v
    }

    /// server_name with one host_name entry; `list_delta` skews the list length.
    fn sni_ext_with(host: &[u8], list_delta: isize) -> Vec<u8> {
        let mut entry = vec![NAME_TYPE_HOST];
        entry.extend(be16(host.len()));
        entry.extend(host);
        let list_len = entry.len().checked_add_signed(list_delta).unwrap_or(0);
        let mut list = be16(list_len).to_vec();
        list.extend(entry);
        ext(EXT_SERVER_NAME, &list)
    }

    fn sni_ext(host: &str) -> Vec<u8> {
        sni_ext_with(host.as_bytes(), 0)
    }

    /// Offsets into a record built by `record(&hello_body(..))`.
    const SESSION_ID_LEN_AT: usize = 9 + 2 + 32;
    const CIPHER_SUITES_LEN_AT: usize = SESSION_ID_LEN_AT + 1 + 32;
    const EXTENSIONS_LEN_AT: usize = CIPHER_SUITES_LEN_AT + 2 + 4 + 2;

    fn hello_body(extensions: &[Vec<u8>]) -> Vec<u8> {
        let mut b = vec![0x03, 0x03];
        b.extend([0x11; 32]); // random
        b.push(32);
        b.extend([0x22; 32]); // session id
        b.extend(be16(4));
        b.extend([0x13, 0x01, 0x13, 0x02]); // cipher suites
        b.extend([1, 0]); // compression: null
        let all = extensions.concat();
        b.extend(be16(all.len()));
        b.extend(all);
        b
    }

    fn record(body: &[u8]) -> Vec<u8> {
        let mut hs = vec![TLS_CLIENT_HELLO];
        let len = u32::try_from(body.len()).unwrap_or_else(|_| unreachable!());
        hs.extend(&len.to_be_bytes()[1..]);
        hs.extend(body);
        let mut r = vec![TLS_HANDSHAKE, 0x03, 0x01];
        r.extend(be16(hs.len()));
        r.extend(hs);
        r
    }

    /// A ClientHello shaped like a browser's: extensions before and after server_name,
    /// including a zero-length one.
    fn client_hello(host: &str) -> Vec<u8> {
        record(&hello_body(&[
            ext(0x000a, &[0x00, 0x04, 0x00, 0x1d, 0x00, 0x17]), // supported_groups
            ext(0x0017, &[]),                                   // extended_master_secret
            sni_ext(host),
            ext(0x002b, &[0x04, 0x03, 0x04, 0x03, 0x03]), // supported_versions
            ext(0x0033, &[0x55; 38]),                     // key_share-ish
        ]))
    }

    fn tls(sni: Option<&str>) -> Verdict {
        Verdict::Done(Protocol::Tls {
            sni: sni.map(str::to_owned),
        })
    }

    fn http1(method: Method) -> Verdict {
        Verdict::Done(Protocol::Http1 { method })
    }

    const OPAQUE: Verdict = Verdict::Done(Protocol::Opaque);

    /// Every prefix is NeedMore or `want`; once decided, every longer prefix is too; the
    /// whole input is `want`.
    fn assert_prefixes(input: &[u8], want: &Verdict) {
        let mut decided = false;
        for k in 0..=input.len() {
            let got = classify(&input[..k]);
            if got == Verdict::NeedMore {
                assert!(!decided, "prefix {k} undecided after a decision");
            } else {
                assert_eq!(&got, want, "prefix {k} of {input:?}");
                decided = true;
            }
        }
        assert_eq!(&classify(input), want);
    }

    // --- positive cases ---

    #[test]
    fn every_method_is_http1() {
        for method in Method::ALL {
            for version in ["1.0", "1.1"] {
                let line = format!("{method} / HTTP/{version}\r\n");
                assert_eq!(classify(line.as_bytes()), http1(method), "{line}");
            }
        }
        assert_eq!(
            classify(b"CONNECT example.com:443 HTTP/1.1\r\n"),
            http1(Method::Connect)
        );
        assert_eq!(classify(b"OPTIONS * HTTP/1.1\r\n"), http1(Method::Options));
    }

    #[test]
    fn http1_request_prefixes() {
        assert_prefixes(REQUEST, &http1(Method::Get));
        // Decided at the CRLF of the request line, headers or not.
        let line_end = REQUEST.windows(2).position(|w| w == b"\r\n").unwrap_or(0) + 2;
        assert_eq!(classify(&REQUEST[..line_end - 1]), Verdict::NeedMore);
        assert_eq!(classify(&REQUEST[..line_end]), http1(Method::Get));
    }

    #[test]
    fn http2_preface_and_prefixes() {
        assert_prefixes(H2_PREFACE, &Verdict::Done(Protocol::Http2));
        // Preface followed by an empty SETTINGS frame.
        let mut with_settings = H2_PREFACE.to_vec();
        with_settings.extend([0, 0, 0, 4, 0, 0, 0, 0, 0]);
        assert_eq!(classify(&with_settings), Verdict::Done(Protocol::Http2));
        // Diverging from the preface after "PRI": not HTTP/1 either.
        assert_eq!(classify(b"PRI * HTTP/1.1\r\n"), OPAQUE);
        assert_eq!(classify(b"PRI * HTTP/2.0\r\n\r\nXX"), OPAQUE);
    }

    #[test]
    fn client_hello_sni_and_prefixes() {
        let hello = client_hello("api.example.com");
        assert_eq!(classify(&hello), tls(Some("api.example.com")));
        assert_prefixes(&hello, &tls(Some("api.example.com")));
        // Decided once server_name is in, before the record is complete.
        let sni = sni_ext("api.example.com");
        let sni_end = hello
            .windows(sni.len())
            .position(|w| w == sni.as_slice())
            .unwrap_or(0)
            + sni.len();
        assert_eq!(classify(&hello[..sni_end - 1]), Verdict::NeedMore);
        assert_eq!(classify(&hello[..sni_end]), tls(Some("api.example.com")));
        // Names are case-insensitive: lowercased.
        assert_eq!(
            classify(&client_hello("API.Example.COM")),
            tls(Some("api.example.com"))
        );
        // Record version 1.2 is also a ClientHello record.
        let mut v12 = hello.clone();
        v12[2] = 0x03;
        assert_eq!(classify(&v12), tls(Some("api.example.com")));
    }

    #[test]
    fn client_hello_without_sni_is_tls() {
        let hello = record(&hello_body(&[ext(0x000a, &[0x00, 0x02, 0x00, 0x1d])]));
        assert_prefixes(&hello, &tls(None));
        // No extensions block at all.
        let mut body = hello_body(&[]);
        body.truncate(body.len() - 2);
        assert_prefixes(&record(&body), &tls(None));
    }

    #[test]
    fn classify_final_maps_need_more_to_opaque() {
        assert_eq!(classify_final(b""), Protocol::Opaque);
        assert_eq!(classify_final(b"GET / HT"), Protocol::Opaque);
        assert_eq!(classify_final(&H2_PREFACE[..10]), Protocol::Opaque);
        let hello = client_hello("a.example");
        assert_eq!(classify_final(&hello[..20]), Protocol::Opaque);
        assert_eq!(
            classify_final(&hello),
            Protocol::Tls {
                sni: Some("a.example".into())
            }
        );
        assert_eq!(classify_final(H2_PREFACE), Protocol::Http2);
    }

    // --- malformed HTTP/1 ---

    #[test]
    fn malformed_request_lines_are_opaque() {
        for bad in [
            &b"G@T / HTTP/1.1\r\n"[..],
            b"get / HTTP/1.1\r\n",
            b"Get / HTTP/1.1\r\n",
            b"FOO / HTTP/1.1\r\n",
            b"GETS / HTTP/1.1\r\n",
            b"GE / HTTP/1.1\r\n",
            b" GET / HTTP/1.1\r\n",
            b"GET  / HTTP/1.1\r\n",    // empty target
            b"GET /\r\n",              // HTTP/0.9: no version
            b"GET / \r\n",             // empty version
            b"GET / HTTP/2.0\r\n",     // not HTTP/1.x
            b"GET / HTTP/1.1\n",       // LF without CR
            b"GET / HTTP/1.1 \r\n",    // trailing space
            b"GET /a\tb HTTP/1.1\r\n", // control byte in the target
            b"GET /\xff HTTP/1.1\r\n",
            b"\x00\x00\x00\x08",
            b"SSH-2.0-OpenSSH_9.6\r\n",
        ] {
            assert_eq!(classify(bad), OPAQUE, "{:?}", String::from_utf8_lossy(bad));
        }
        // Decided at the first impossible byte, not at the end of the line.
        assert_eq!(classify(b"g"), OPAQUE);
        assert_eq!(classify(b"GX"), OPAQUE);
        assert_eq!(classify(b"GET /\r"), OPAQUE);
        assert_eq!(classify(b"GET / HTTP/1.2"), OPAQUE);
        assert_eq!(classify(b"GET / HTTP/1."), Verdict::NeedMore);
    }

    #[test]
    fn request_line_length_is_bounded() {
        // "GET " + target + " HTTP/1.1" is exactly MAX_REQUEST_LINE bytes: still HTTP.
        let target_len = MAX_REQUEST_LINE - 4 - LINE_AFTER_TARGET;
        let line = |target_len: usize| {
            let mut v = b"GET /".to_vec();
            v.resize(4 + target_len, b'a');
            v.extend(b" HTTP/1.1\r\n");
            v
        };
        assert_eq!(line(target_len).len(), MAX_REQUEST_LINE + 2);
        assert_eq!(classify(&line(target_len)), http1(Method::Get));
        assert_eq!(classify(&line(target_len + 1)), OPAQUE);
        // Decided as soon as no ending could fit, without waiting for a CRLF.
        let long = line(target_len + 1);
        assert_eq!(classify(&long[..4 + target_len]), Verdict::NeedMore);
        assert_eq!(classify(&long[..4 + target_len + 1]), OPAQUE);
    }

    // --- malformed TLS ---

    #[test]
    fn non_client_hello_records_are_opaque() {
        let hello = client_hello("a.example");
        for (at, byte) in [(1, 0x02), (2, 0x00), (2, 0x04)] {
            let mut bad = hello.clone();
            bad[at] = byte;
            assert_eq!(classify(&bad), OPAQUE, "byte {at} = {byte:#x}");
        }
        // Application data, alerts: other content types.
        assert_eq!(classify(&[0x17, 0x03, 0x03, 0x00, 0x10]), OPAQUE);
        assert_eq!(classify(&[0x15, 0x03, 0x03, 0x00, 0x02]), OPAQUE);
        assert_eq!(classify(&[TLS_HANDSHAKE]), Verdict::NeedMore);
        assert_eq!(classify(&[TLS_HANDSHAKE, 0x03]), Verdict::NeedMore);
    }

    #[test]
    fn malformed_client_hellos_are_tls_without_sni() {
        let hello = client_hello("a.example");
        let set = |at: usize, bytes: &[u8]| {
            let mut v = hello.clone();
            v[at..at + bytes.len()].copy_from_slice(bytes);
            v
        };
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("zero record length", set(3, &[0, 0])),
            ("record longer than 2^14", set(3, &[0x40, 0x01])),
            ("handshake type ServerHello", set(5, &[2])),
            (
                "handshake longer than its record",
                set(6, &[0x00, 0xff, 0xff]),
            ),
            ("session id over 32 bytes", set(SESSION_ID_LEN_AT, &[33])),
            ("session id past the end", set(SESSION_ID_LEN_AT, &[0xff])),
            (
                "odd cipher suites length",
                set(CIPHER_SUITES_LEN_AT, &[0, 3]),
            ),
            ("empty cipher suites", set(CIPHER_SUITES_LEN_AT, &[0, 0])),
            (
                "cipher suites past the end",
                set(CIPHER_SUITES_LEN_AT, &[0xff, 0xfe]),
            ),
            (
                "extensions past the end",
                set(EXTENSIONS_LEN_AT, &[0xff, 0xff]),
            ),
            // The first extension (supported_groups, 6 bytes) claims 0xffff bytes.
            (
                "extension past the end",
                set(EXTENSIONS_LEN_AT + 4, &[0xff, 0xff]),
            ),
        ];
        for (what, bad) in cases {
            assert_eq!(classify(&bad), tls(None), "{what}");
            // Malformed is decided from the bytes seen, whatever follows.
            assert_eq!(classify_final(&bad), Protocol::Tls { sni: None }, "{what}");
        }
    }

    #[test]
    fn record_longer_than_the_bytes_needs_more() {
        let hello = record(&hello_body(&[ext(0x0017, &[])]));
        // The record (and the handshake and extensions in it) promise more bytes than were
        // sent: undecided, then opaque at the end.
        let extra = 100;
        let mut short = hello.clone();
        short[3..5].copy_from_slice(&be16(hello.len() - 5 + extra));
        let hs_len = u32::try_from(hello.len() - 9 + extra).unwrap_or_else(|_| unreachable!());
        short[6..9].copy_from_slice(&hs_len.to_be_bytes()[1..]);
        let extensions_len = hello.len() - EXTENSIONS_LEN_AT - 2 + extra;
        short[EXTENSIONS_LEN_AT..EXTENSIONS_LEN_AT + 2].copy_from_slice(&be16(extensions_len));
        assert_eq!(classify(&short), Verdict::NeedMore);
        assert_eq!(classify_final(&short), Protocol::Opaque);
    }

    #[test]
    fn zero_length_extensions() {
        // An empty extensions block.
        assert_eq!(classify(&record(&hello_body(&[]))), tls(None));
        // Zero-length extensions before server_name do not hide it.
        let hello = record(&hello_body(&[
            ext(0x0017, &[]),
            ext(0xff01, &[]),
            sni_ext("b.example"),
        ]));
        assert_eq!(classify(&hello), tls(Some("b.example")));
        // An empty server_name extension (what servers echo back) carries no name.
        let hello = record(&hello_body(&[ext(EXT_SERVER_NAME, &[])]));
        assert_eq!(classify(&hello), tls(None));
    }

    #[test]
    fn bad_server_name_extensions_have_no_sni() {
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("list length too short", sni_ext_with(b"a.example", -1)),
            ("list length too long", sni_ext_with(b"a.example", 1)),
            ("empty name", sni_ext_with(b"", 0)),
            ("non-UTF-8 name", sni_ext_with(b"\xff\xfe.example", 0)),
            (
                "UTF-8 but not a DNS name",
                sni_ext_with("é.example".as_bytes(), 0),
            ),
            ("space in name", sni_ext_with(b"a example", 0)),
            ("name too long", sni_ext_with(&[b'a'; MAX_HOST_NAME + 1], 0)),
            // Entry claims a 0xffff-byte name inside a consistent list.
            ("name length past the list", {
                let mut list = be16(3 + 2).to_vec();
                list.extend([NAME_TYPE_HOST, 0xff, 0xff, b'a', b'b']);
                ext(EXT_SERVER_NAME, &list)
            }),
            // Only an unknown name type.
            ("no host_name entry", {
                let mut list = be16(3 + 1).to_vec();
                list.extend([7, 0, 1, b'a']);
                ext(EXT_SERVER_NAME, &list)
            }),
        ];
        for (what, sni) in cases {
            let hello = record(&hello_body(&[ext(0x0017, &[]), sni]));
            assert_eq!(classify(&hello), tls(None), "{what}");
            assert_prefixes(&hello, &tls(None));
        }
        // A longest valid name is kept.
        let long = "a".repeat(MAX_HOST_NAME);
        let hello = record(&hello_body(&[sni_ext(&long)]));
        assert_eq!(classify(&hello), tls(Some(&long)));
    }

    // --- byte soup ---

    struct XorShift(u64);

    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    /// A Done verdict must survive appending bytes; checked on one random split.
    fn assert_final_on_split(rng: &mut XorShift, buf: &[u8]) {
        let k = rng.below(buf.len() + 1);
        if let Verdict::Done(p) = classify(&buf[..k]) {
            assert_eq!(classify(buf), Verdict::Done(p), "split {k} of {buf:?}");
        }
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
        let starts: [&[u8]; 5] = [
            b"",
            b"GET /",
            b"PRI * HTTP/2.0\r\n",
            &[0x16, 0x03, 0x01],
            b"POST",
        ];
        for _ in 0..10_000 {
            let len = rng.below(2048);
            let mut buf = starts[rng.below(starts.len())].to_vec();
            buf.extend((0..len).map(|_| rng.next() as u8));
            let _ = classify(&buf);
            let _ = classify_final(&buf);
            assert_final_on_split(&mut rng, &buf);
        }
    }

    #[test]
    fn mutated_client_hellos_never_panic() {
        let mut rng = XorShift(42);
        let hello = client_hello("mutate.example.com");
        for _ in 0..10_000 {
            let mut buf = hello.clone();
            for _ in 0..=rng.below(4) {
                let at = rng.below(buf.len());
                buf[at] = rng.next() as u8;
            }
            buf.truncate(rng.below(buf.len() + 1));
            match classify(&buf) {
                Verdict::NeedMore | Verdict::Done(Protocol::Tls { .. } | Protocol::Opaque) => {}
                other => {
                    // Only a mutated first byte can turn the record into something else.
                    assert_ne!(buf.first(), Some(&TLS_HANDSHAKE), "{other:?}");
                }
            }
            assert_final_on_split(&mut rng, &buf);
        }
    }

    // --- detect over loopback TCP ---

    #[tokio::test]
    async fn client_hello_in_two_writes_is_tls_and_stays_readable() -> io::Result<()> {
        let (mut client, mut server) = tcp_pair().await?;
        client.set_nodelay(true)?;
        let hello = client_hello("split.example.com");
        // The first part ends inside the cipher suites, before server_name.
        let (first, second) = hello.split_at(CIPHER_SUITES_LEN_AT + 3);
        let (first, second) = (first.to_vec(), second.to_vec());
        let writer = tokio::spawn(async move {
            client.write_all(&first).await?;
            tokio::time::sleep(Duration::from_millis(30)).await;
            client.write_all(&second).await?;
            client.shutdown().await?;
            Ok::<_, io::Error>(client)
        });
        let got = detect(&server, Duration::from_secs(10)).await?;
        assert_eq!(
            got,
            (
                Protocol::Tls {
                    sni: Some("split.example.com".into())
                },
                Outcome::Detected
            )
        );
        // Peek consumed nothing: a plain read sees the whole ClientHello.
        let mut all = Vec::new();
        server.read_to_end(&mut all).await?;
        assert_eq!(all, hello);
        let _client = writer.await.map_err(io::Error::other)??;
        Ok(())
    }

    #[tokio::test]
    async fn http1_is_detected_and_stays_readable() -> io::Result<()> {
        let (mut client, mut server) = tcp_pair().await?;
        client.write_all(REQUEST).await?;
        let got = detect(&server, Duration::from_secs(10)).await?;
        assert_eq!(
            got,
            (
                Protocol::Http1 {
                    method: Method::Get
                },
                Outcome::Detected
            )
        );
        let mut all = vec![0; REQUEST.len()];
        server.read_exact(&mut all).await?;
        assert_eq!(all, REQUEST);
        Ok(())
    }

    #[tokio::test(start_paused = true)]
    async fn silent_client_times_out_as_opaque() -> io::Result<()> {
        let (_client, server) = tcp_pair().await?;
        let got = detect(&server, Duration::from_millis(50)).await?;
        assert_eq!(got, (Protocol::Opaque, Outcome::Timeout));
        Ok(())
    }

    #[tokio::test]
    async fn partial_prefix_times_out_and_stays_readable() -> io::Result<()> {
        let (mut client, mut server) = tcp_pair().await?;
        client.write_all(b"GET /pa").await?;
        let got = detect(&server, Duration::from_millis(50)).await?;
        assert_eq!(got, (Protocol::Opaque, Outcome::Timeout));
        // The bytes peeked during the timeout are still announced to a normal read (a read
        // that waited for new data here would hang: the client sends nothing more).
        let mut all = [0; 7];
        tokio::time::timeout(Duration::from_secs(10), server.read_exact(&mut all))
            .await
            .map_err(io::Error::other)??;
        assert_eq!(&all, b"GET /pa");
        Ok(())
    }

    #[tokio::test]
    async fn client_closing_at_once_is_closed() -> io::Result<()> {
        let (client, server) = tcp_pair().await?;
        drop(client);
        let got = detect(&server, Duration::from_secs(10)).await?;
        assert_eq!(got, (Protocol::Opaque, Outcome::Closed));
        Ok(())
    }

    #[tokio::test]
    async fn client_closing_after_a_prefix_is_closed() -> io::Result<()> {
        let (mut client, server) = tcp_pair().await?;
        client.write_all(&H2_PREFACE[..5]).await?;
        client.shutdown().await?;
        let got = detect(&server, Duration::from_secs(10)).await?;
        assert_eq!(got, (Protocol::Opaque, Outcome::Closed));
        Ok(())
    }

    #[tokio::test]
    async fn a_full_peek_buffer_is_opaque() -> io::Result<()> {
        let (mut client, server) = tcp_pair().await?;
        // A request line that never ends would be Opaque by MAX_REQUEST_LINE; a TLS record
        // that promises 2^14 bytes stays undecided up to the peek limit.
        let mut big = vec![TLS_HANDSHAKE, 0x03, 0x01];
        big.extend(be16(TLS_MAX_RECORD));
        big.push(TLS_CLIENT_HELLO);
        let hs_len = u32::try_from(TLS_MAX_RECORD - 4).unwrap_or_else(|_| unreachable!());
        big.extend(&hs_len.to_be_bytes()[1..]);
        big.extend([0x03, 0x03]);
        big.extend([0; TLS_RANDOM]);
        big.extend([1, 0xaa]); // a 1-byte session id, so that the suites' length is even
        // Cipher suites that fill the record past the peek limit.
        let suites_len = TLS_RECORD_HEADER + TLS_MAX_RECORD - big.len() - 2 - 2;
        assert!(big.len() + 2 + suites_len > MAX_PEEK);
        big.extend(be16(suites_len));
        big.resize(TLS_RECORD_HEADER + TLS_MAX_RECORD - 2, 0x13);
        big.extend([1, 0]);
        assert_eq!(classify(&big[..MAX_PEEK]), Verdict::NeedMore);
        assert_eq!(classify(&big), tls(None));
        let writer = tokio::spawn(async move {
            client.write_all(&big).await?;
            Ok::<_, io::Error>(client)
        });
        let got = detect(&server, Duration::from_secs(10)).await?;
        assert_eq!(got, (Protocol::Opaque, Outcome::PeekLimit));
        let _client = writer.await.map_err(io::Error::other)??;
        Ok(())
    }
}
