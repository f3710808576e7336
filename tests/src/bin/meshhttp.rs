//! meshhttp: the backends the end-to-end tests run inside pods.
//!
//! - `meshhttp serve`: an HTTP/1.1 and h2c (HTTP/2 prior knowledge) server on the same
//!   port, with routes that let a test see which backend answered, make it slow, fail,
//!   stream, cut a response short, show the headers it received, count requests, and
//!   upgrade to a WebSocket echo. Every response carries `x-backend: NAME`.
//! - `meshhttp banner`: a server-speaks-first TCP server (like SMTP): it writes its banner
//!   as soon as it accepts, before the client says anything, then echoes. A proxy that
//!   waits for the client's first bytes to detect the protocol stalls on it.
//!
//! Both print `ready` on stdout once every listener is bound (the tests wait for that
//! line) and exit with status 0 on SIGTERM or SIGINT. See `meshhttp --help`.

use std::{
    convert::Infallible,
    io::Write as _,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context as TaskContext, Poll},
    time::Duration,
};

use anyhow::{Context, Result};
use base64::Engine as _;
use bytes::{Buf, Bytes, BytesMut};
use clap::{Parser, Subcommand};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::{
    Request, Response, StatusCode,
    body::{Body, Frame, Incoming, SizeHint},
    header::{self, HeaderMap, HeaderValue},
    service::service_fn,
};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use sha1::{Digest, Sha1};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

/// Runtime threads: two workers are plenty for test traffic and keep a node with many
/// pods (each running a backend) from oversubscribing the 2-core test machine.
const WORKER_THREADS: usize = 2;
/// `/bytes/<n>` is sent in chunks of this size, so large bodies are streamed, not built.
const CHUNK: usize = 16 * 1024;
/// `/close-mid` announces this Content-Length ...
const CLOSE_MID_LENGTH: u64 = 1_000_000;
/// ... and sends only this many bytes before failing the body, which aborts the
/// connection (HTTP/1) or resets the stream (HTTP/2).
const CLOSE_MID_SENT: usize = 1000;
/// `/close-mid` waits this long between its data and its error. hyper drops what is still
/// in its write buffer when a body fails, so failing at once would send nothing at all;
/// pausing lets the head and the first bytes reach the client first.
const CLOSE_MID_PAUSE: Duration = Duration::from_millis(50);
/// Pause after a failed accept (EMFILE and friends) so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(10);

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type RespBody = BoxBody<Bytes, BoxError>;

// === CLI ===

#[derive(Parser, Debug)]
#[command(
    name = "meshhttp",
    about = "Test backends for the end-to-end tests: an HTTP/1.1 + h2c server with \
             diagnostic routes and a WebSocket echo, and a server-speaks-first TCP server. \
             Each prints `ready` on stdout once listening and exits 0 on SIGTERM/SIGINT."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// HTTP/1.1 and HTTP/2 prior-knowledge (h2c) server on the same port(s)
    ///
    /// Every response has `x-backend: NAME`. Routes (any method):
    ///   /                 200, body "NAME\n" (also every unknown path)
    ///   /status/<code>    that status, body "NAME <code>\n"
    ///   /delay/<ms>       sleeps <ms>, then 200
    ///   /echo             streams the request body back as it arrives; echoes header x-echo
    ///   /bytes/<n>        n bytes, byte i = i % 251, in 16 KiB chunks, with Content-Length
    ///   /close-mid        Content-Length 1000000, sends 1000 bytes, then aborts
    ///   /headers          the request headers as sorted "name: value" lines
    ///                     (HTTP/2's :authority shows as ":authority: ...")
    ///   /stats            {"name": NAME, "requests": N}, N = requests served except /stats
    ///   /ws               WebSocket (RFC 6455) upgrade, then echoes every message
    #[command(verbatim_doc_comment)]
    Serve {
        /// Address to listen on, e.g. 0.0.0.0:8080 or [::]:8080; repeat for several.
        #[arg(long, required = true)]
        listen: Vec<SocketAddr>,
        /// Name reported in `x-backend` and in bodies.
        #[arg(long)]
        name: String,
        /// Extra delay before every response head, in milliseconds (a slow endpoint).
        #[arg(long, default_value_t = 0)]
        delay_ms: u64,
    },
    /// Server-speaks-first TCP server: on accept writes "TEXT\r\n" at once, then echoes
    /// every byte it reads until the client closes.
    Banner {
        /// Address to listen on.
        #[arg(long)]
        listen: SocketAddr,
        /// Banner line, sent without waiting for the client.
        #[arg(long)]
        text: String,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(WORKER_THREADS)
        .enable_all()
        .build()
        .context("building the tokio runtime")?;
    let result = runtime.block_on(async {
        match cli.command {
            Command::Serve {
                listen,
                name,
                delay_ms,
            } => serve(listen, name, Duration::from_millis(delay_ms)).await,
            Command::Banner { listen, text } => banner(listen, text).await,
        }
    });
    // Open connections are not drained: the tests stop backends on purpose, and a
    // connection cut at shutdown is what they expect to see.
    runtime.shutdown_background();
    result
}

/// Installs the SIGTERM and SIGINT handlers at once and returns a future that resolves
/// on either. Called before `ready` is printed: a test may signal as soon as it reads
/// that line, and a signal before the handlers exist would kill the process instead.
fn shutdown_signal() -> Result<impl Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
}

fn print_ready() -> Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "ready").context("writing `ready` to stdout")?;
    out.flush().context("flushing stdout")
}

async fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr).await.with_context(|| {
        format!("binding {addr}: is the port in use or the address not assigned in this namespace?")
    })
}

// === impl serve ===

/// What every request handler shares.
struct State {
    name: String,
    delay: Duration,
    /// Requests seen, except `/stats` itself.
    requests: AtomicU64,
}

async fn serve(listen: Vec<SocketAddr>, name: String, delay: Duration) -> Result<()> {
    let shutdown = shutdown_signal()?;
    let mut listeners = Vec::with_capacity(listen.len());
    for addr in &listen {
        listeners.push(bind(*addr).await?);
    }
    let state = Arc::new(State {
        name,
        delay,
        requests: AtomicU64::new(0),
    });
    for listener in listeners {
        let local = listener.local_addr().context("reading the bound address")?;
        eprintln!("meshhttp serve: {} listening on {local}", state.name);
        tokio::spawn(accept_http(listener, state.clone()));
    }
    print_ready()?;
    shutdown.await;
    Ok(())
}

async fn accept_http(listener: TcpListener, state: Arc<State>) {
    // One builder for the listener: HTTP/1.1 (keep-alive is hyper's default) or h2c,
    // chosen by the connection preface.
    let builder = Arc::new(auto::Builder::new(TokioExecutor::new()));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                eprintln!("meshhttp serve: accept failed: {e}");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        // Small responses leave at once rather than after the peer's delayed ACK.
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        let builder = builder.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| handle(req, state.clone()));
            // Errors here are clients going away and `/close-mid` doing its job.
            let _ = builder
                .serve_connection_with_upgrades(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// The routes, parsed from the path alone.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Route {
    Root,
    Status(StatusCode),
    Delay(Duration),
    Echo,
    Bytes(u64),
    CloseMid,
    Headers,
    Stats,
    WebSocket,
    /// A known route with an argument that does not parse: 400 with this reason.
    Invalid(String),
}

impl Route {
    fn parse(path: &str) -> Self {
        let mut parts = path.trim_start_matches('/').splitn(2, '/');
        let first = parts.next().unwrap_or_default();
        let arg = parts.next();
        match (first, arg) {
            ("status", Some(code)) => match code.parse::<u16>() {
                // A 1xx is not a final response: hyper would not send it as one.
                Ok(code) if (200..=999).contains(&code) => match StatusCode::from_u16(code) {
                    Ok(status) => Route::Status(status),
                    Err(_) => Route::Invalid(format!("bad status code {code}")),
                },
                _ => Route::Invalid(format!("bad status code {code:?}: expected 200..=999")),
            },
            ("delay", Some(ms)) => match ms.parse::<u64>() {
                Ok(ms) => Route::Delay(Duration::from_millis(ms)),
                Err(_) => Route::Invalid(format!("bad delay {ms:?}: expected milliseconds")),
            },
            ("bytes", Some(n)) => match n.parse::<u64>() {
                Ok(n) => Route::Bytes(n),
                Err(_) => Route::Invalid(format!("bad length {n:?}: expected a byte count")),
            },
            ("echo", None) => Route::Echo,
            ("close-mid", None) => Route::CloseMid,
            ("headers", None) => Route::Headers,
            ("stats", None) => Route::Stats,
            ("ws", None) => Route::WebSocket,
            _ => Route::Root,
        }
    }
}

async fn handle(
    req: Request<Incoming>,
    state: Arc<State>,
) -> Result<Response<RespBody>, Infallible> {
    let route = Route::parse(req.uri().path());
    if route != Route::Stats {
        state.requests.fetch_add(1, Ordering::Relaxed);
    }
    if !state.delay.is_zero() {
        tokio::time::sleep(state.delay).await;
    }
    let name = &state.name;
    let mut resp = match route {
        Route::Root => text(StatusCode::OK, format!("{name}\n")),
        Route::Status(status) => {
            // 204 and 304 have no body by definition.
            let body = if status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
                String::new()
            } else {
                format!("{name} {}\n", status.as_u16())
            };
            text(status, body)
        }
        Route::Delay(wait) => {
            tokio::time::sleep(wait).await;
            text(StatusCode::OK, format!("{name}\n"))
        }
        Route::Echo => {
            let echo = req.headers().get("x-echo").cloned();
            // The request body is the response body: each frame goes back as it arrives.
            let mut resp = Response::new(req.into_body().map_err(BoxError::from).boxed());
            if let Some(value) = echo {
                resp.headers_mut().insert("x-echo", value);
            }
            resp
        }
        Route::Bytes(n) => {
            let mut resp = Response::new(PatternBody::new(n).boxed());
            resp.headers_mut()
                .insert(header::CONTENT_LENGTH, HeaderValue::from(n));
            resp
        }
        Route::CloseMid => {
            let mut resp = Response::new(CloseMidBody::new().boxed());
            resp.headers_mut()
                .insert(header::CONTENT_LENGTH, HeaderValue::from(CLOSE_MID_LENGTH));
            resp
        }
        Route::Headers => text(StatusCode::OK, headers_listing(&req)),
        Route::Stats => {
            let stats = serde_json::json!({
                "name": name,
                "requests": state.requests.load(Ordering::Relaxed),
            });
            let mut resp = text(StatusCode::OK, format!("{stats}\n"));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            resp
        }
        Route::WebSocket => websocket_upgrade(req),
        Route::Invalid(reason) => text(StatusCode::BAD_REQUEST, format!("{name} {reason}\n")),
    };
    // A name that is not a valid header value is left out rather than failing the request.
    if let Ok(value) = HeaderValue::from_str(name) {
        resp.headers_mut().insert("x-backend", value);
    }
    Ok(resp)
}

fn text(status: StatusCode, body: String) -> Response<RespBody> {
    let mut resp = Response::new(Full::new(Bytes::from(body)).map_err(BoxError::from).boxed());
    *resp.status_mut() = status;
    resp
}

/// `name: value` lines sorted by name then value. HTTP/2 carries the authority as a
/// pseudo-header, not as `host`; it is listed as `:authority` so a test can check it.
fn headers_listing(req: &Request<Incoming>) -> String {
    let mut lines: Vec<String> = req
        .headers()
        .iter()
        .map(|(name, value)| format!("{name}: {}\n", String::from_utf8_lossy(value.as_bytes())))
        .collect();
    if req.version() == hyper::Version::HTTP_2
        && let Some(authority) = req.uri().authority()
    {
        lines.push(format!(":authority: {authority}\n"));
    }
    // The version the request arrived with, so a test can see a protocol conversion.
    lines.push(format!(":version: {:?}\n", req.version()));
    lines.sort();
    lines.concat()
}

/// The deterministic `/bytes` pattern: byte `i` of the body is `i % 251` (a prime, so the
/// pattern does not line up with power-of-two chunk or buffer sizes).
fn pattern(start: u64, len: usize) -> Bytes {
    (start..start + len as u64)
        .map(|i| (i % 251) as u8)
        .collect::<Vec<u8>>()
        .into()
}

/// `/bytes/<n>`: the pattern, produced one chunk at a time.
struct PatternBody {
    next: u64,
    end: u64,
}

impl PatternBody {
    fn new(len: u64) -> Self {
        Self { next: 0, end: len }
    }
}

impl Body for PatternBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let left = self.end - self.next;
        if left == 0 {
            return Poll::Ready(None);
        }
        let len = usize::try_from(left).map_or(CHUNK, |left| left.min(CHUNK));
        let chunk = pattern(self.next, len);
        self.next += len as u64;
        Poll::Ready(Some(Ok(Frame::data(chunk))))
    }

    fn is_end_stream(&self) -> bool {
        self.next == self.end
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.end - self.next)
    }
}

/// `/close-mid`: the first `CLOSE_MID_SENT` bytes, a pause (see `CLOSE_MID_PAUSE`), then
/// an error, which makes hyper abort the connection (HTTP/1) or reset the stream (HTTP/2)
/// short of the Content-Length.
struct CloseMidBody {
    /// Set once the data is out: the pause before the error.
    pause: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl CloseMidBody {
    fn new() -> Self {
        Self { pause: None }
    }
}

impl Body for CloseMidBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.pause.as_mut() {
            None => {
                self.pause = Some(Box::pin(tokio::time::sleep(CLOSE_MID_PAUSE)));
                Poll::Ready(Some(Ok(Frame::data(pattern(0, CLOSE_MID_SENT)))))
            }
            Some(pause) => pause
                .as_mut()
                .poll(cx)
                .map(|()| Some(Err("meshhttp: /close-mid aborts on purpose".into()))),
        }
    }
}

// === impl WebSocket ===

/// RFC 6455 section 1.3: the GUID appended to the client's key.
const WS_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// `Sec-WebSocket-Accept` for a `Sec-WebSocket-Key`.
fn accept_key(key: &[u8]) -> String {
    let mut sha = Sha1::new();
    sha.update(key);
    sha.update(WS_GUID.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(sha.finalize())
}

/// Whether a comma-separated header (`Connection`, `Upgrade`) holds `token`.
fn header_has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|value| {
        value
            .to_str()
            .map(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
            .unwrap_or(false)
    })
}

fn websocket_upgrade(mut req: Request<Incoming>) -> Response<RespBody> {
    let headers = req.headers();
    let key = headers.get(header::SEC_WEBSOCKET_KEY).cloned();
    let key = match key {
        Some(key)
            if header_has_token(headers, header::UPGRADE, "websocket")
                && header_has_token(headers, header::CONNECTION, "upgrade") =>
        {
            key
        }
        _ => {
            return text(
                StatusCode::BAD_REQUEST,
                "expected a WebSocket upgrade: HTTP/1.1 GET with Connection: Upgrade, \
                 Upgrade: websocket and Sec-WebSocket-Key\n"
                    .to_owned(),
            );
        }
    };
    let upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        match upgrade.await {
            Ok(upgraded) => {
                if let Err(e) = ws_echo(TokioIo::new(upgraded)).await {
                    eprintln!("meshhttp serve: websocket: {e:#}");
                }
            }
            Err(e) => eprintln!("meshhttp serve: websocket upgrade failed: {e}"),
        }
    });
    let mut resp = Response::new(Full::new(Bytes::new()).map_err(BoxError::from).boxed());
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    // The accept key is base64, always a valid header value.
    if let Ok(accept) = HeaderValue::from_str(&accept_key(key.as_bytes())) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    }
    resp
}

/// Frame opcodes (RFC 6455 section 5.2).
mod opcode {
    pub const CONTINUATION: u8 = 0x0;
    pub const TEXT: u8 = 0x1;
    pub const BINARY: u8 = 0x2;
    pub const CLOSE: u8 = 0x8;
    pub const PING: u8 = 0x9;
    pub const PONG: u8 = 0xA;
}

/// Close status 1002: protocol error (RFC 6455 section 7.4.1).
const CLOSE_PROTOCOL_ERROR: u16 = 1002;
/// Largest payload accepted in one frame; a larger length is treated as hostile rather
/// than allocated. Tests send at most 64 KiB per message.
const MAX_PAYLOAD: u64 = 16 * 1024 * 1024;
/// Control frames carry at most 125 bytes (RFC 6455 section 5.5).
const MAX_CONTROL_PAYLOAD: usize = 125;

#[derive(Debug, Clone, PartialEq, Eq)]
struct WsFrame {
    fin: bool,
    opcode: u8,
    /// Whether the frame arrived masked (clients must mask, servers must not).
    masked: bool,
    /// Unmasked payload.
    payload: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum FrameError {
    ReservedBits,
    UnknownOpcode(u8),
    ControlTooLong(usize),
    ControlFragmented,
    LengthMsbSet,
    TooLong(u64),
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FrameError::ReservedBits => write!(f, "reserved bits set but no extension agreed"),
            FrameError::UnknownOpcode(op) => write!(f, "unknown opcode {op:#x}"),
            FrameError::ControlTooLong(len) => {
                write!(
                    f,
                    "control frame of {len} bytes (at most {MAX_CONTROL_PAYLOAD})"
                )
            }
            FrameError::ControlFragmented => write!(f, "fragmented control frame"),
            FrameError::LengthMsbSet => write!(f, "64-bit length with the top bit set"),
            FrameError::TooLong(len) => {
                write!(
                    f,
                    "frame of {len} bytes exceeds the {MAX_PAYLOAD}-byte limit"
                )
            }
        }
    }
}

impl std::error::Error for FrameError {}

/// Decodes one frame from the start of `buf`: `Ok(None)` if more bytes are needed,
/// otherwise the frame and the number of bytes it took.
fn decode_frame(buf: &[u8]) -> Result<Option<(WsFrame, usize)>, FrameError> {
    let [b0, b1, ..] = *buf else {
        return Ok(None);
    };
    let fin = b0 & 0x80 != 0;
    if b0 & 0x70 != 0 {
        return Err(FrameError::ReservedBits);
    }
    let op = b0 & 0x0F;
    let is_control = match op {
        opcode::CONTINUATION | opcode::TEXT | opcode::BINARY => false,
        opcode::CLOSE | opcode::PING | opcode::PONG => true,
        other => return Err(FrameError::UnknownOpcode(other)),
    };
    let masked = b1 & 0x80 != 0;
    let (len, mut at) = match b1 & 0x7F {
        126 => match buf.get(2..4) {
            Some(&[a, b]) => (u64::from(u16::from_be_bytes([a, b])), 4),
            _ => return Ok(None),
        },
        127 => match buf.get(2..10).and_then(|s| <[u8; 8]>::try_from(s).ok()) {
            Some(bytes) => {
                let len = u64::from_be_bytes(bytes);
                if len >> 63 != 0 {
                    return Err(FrameError::LengthMsbSet);
                }
                (len, 10)
            }
            None => return Ok(None),
        },
        short => (u64::from(short), 2),
    };
    if is_control && len > MAX_CONTROL_PAYLOAD as u64 {
        return Err(FrameError::ControlTooLong(
            usize::try_from(len).unwrap_or(usize::MAX),
        ));
    }
    if is_control && !fin {
        return Err(FrameError::ControlFragmented);
    }
    if len > MAX_PAYLOAD {
        return Err(FrameError::TooLong(len));
    }
    let mask = if masked {
        match buf
            .get(at..at + 4)
            .and_then(|s| <[u8; 4]>::try_from(s).ok())
        {
            Some(mask) => {
                at += 4;
                Some(mask)
            }
            None => return Ok(None),
        }
    } else {
        None
    };
    // len <= MAX_PAYLOAD, so it fits a usize.
    let len = len as usize;
    let Some(payload) = buf.get(at..at + len) else {
        return Ok(None);
    };
    let mut payload = payload.to_vec();
    if let Some(mask) = mask {
        apply_mask(&mut payload, mask);
    }
    let frame = WsFrame {
        fin,
        opcode: op,
        masked,
        payload,
    };
    Ok(Some((frame, at + len)))
}

fn apply_mask(payload: &mut [u8], mask: [u8; 4]) {
    for (i, byte) in payload.iter_mut().enumerate() {
        *byte ^= mask[i % 4];
    }
}

/// Encodes a frame, masked with `mask` if given (servers send unmasked frames).
fn encode_frame(fin: bool, op: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 14);
    out.push(if fin { 0x80 } else { 0 } | (op & 0x0F));
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    match payload.len() {
        len @ 0..=125 => out.push(mask_bit | len as u8),
        len @ 126..=0xFFFF => {
            out.push(mask_bit | 126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        }
        len => {
            out.push(mask_bit | 127);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
    }
    match mask {
        Some(mask) => {
            out.extend_from_slice(&mask);
            let start = out.len();
            out.extend_from_slice(payload);
            apply_mask(&mut out[start..], mask);
        }
        None => out.extend_from_slice(payload),
    }
    out
}

/// Echoes WebSocket frames on an upgraded connection until a close frame or EOF. Data
/// frames go back frame for frame with the same FIN bit and opcode (so fragmented
/// messages echo correctly too); pings are answered with pongs; a close is answered with
/// a close carrying the same status code, and the connection ends.
async fn ws_echo<S: AsyncRead + AsyncWrite + Unpin>(mut io: S) -> Result<()> {
    let mut buf = BytesMut::with_capacity(64 * 1024);
    loop {
        let frame = match decode_frame(&buf) {
            Ok(Some((frame, used))) => {
                buf.advance(used);
                frame
            }
            Ok(None) => {
                let n = io.read_buf(&mut buf).await.context("reading a frame")?;
                if n == 0 {
                    // The peer went away without a close frame.
                    return Ok(());
                }
                continue;
            }
            Err(e) => {
                let close = encode_frame(
                    true,
                    opcode::CLOSE,
                    &CLOSE_PROTOCOL_ERROR.to_be_bytes(),
                    None,
                );
                let _ = io.write_all(&close).await;
                return Err(e).context("malformed frame from the client");
            }
        };
        if !frame.masked {
            let close = encode_frame(
                true,
                opcode::CLOSE,
                &CLOSE_PROTOCOL_ERROR.to_be_bytes(),
                None,
            );
            let _ = io.write_all(&close).await;
            anyhow::bail!("unmasked frame from the client (RFC 6455 section 5.1)");
        }
        match frame.opcode {
            opcode::CLOSE => {
                // Echo the status code (not the reason), or send an empty close.
                let code = frame.payload.get(..2).unwrap_or_default();
                let close = encode_frame(true, opcode::CLOSE, code, None);
                io.write_all(&close)
                    .await
                    .context("writing the close frame")?;
                io.shutdown().await.context("closing the connection")?;
                return Ok(());
            }
            opcode::PING => {
                let pong = encode_frame(true, opcode::PONG, &frame.payload, None);
                io.write_all(&pong).await.context("writing a pong")?;
            }
            opcode::PONG => {}
            op => {
                let echo = encode_frame(frame.fin, op, &frame.payload, None);
                io.write_all(&echo).await.context("writing an echo")?;
            }
        }
    }
}

// === impl banner ===

async fn banner(listen: SocketAddr, text: String) -> Result<()> {
    let shutdown = shutdown_signal()?;
    let listener = bind(listen).await?;
    let local = listener.local_addr().context("reading the bound address")?;
    eprintln!("meshhttp banner: listening on {local}");
    let line = Bytes::from(format!("{text}\r\n"));
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    tokio::spawn(banner_conn(stream, line.clone()));
                }
                Err(e) => {
                    eprintln!("meshhttp banner: accept failed: {e}");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            }
        }
    });
    print_ready()?;
    shutdown.await;
    Ok(())
}

async fn banner_conn(mut stream: TcpStream, line: Bytes) {
    let _ = stream.set_nodelay(true);
    if stream.write_all(&line).await.is_err() {
        return;
    }
    let (mut rd, mut wr) = stream.split();
    if tokio::io::copy(&mut rd, &mut wr).await.is_ok() {
        let _ = wr.shutdown().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 6455 section 1.3 (the value there reads `...9kYGzzh...`).
    #[test]
    fn accept_key_matches_rfc_6455_example() {
        assert_eq!(
            accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    fn round_trip(len: usize, mask: Option<[u8; 4]>, header_len: usize) {
        let payload = pattern(7, len).to_vec();
        let wire = encode_frame(true, opcode::BINARY, &payload, mask);
        assert_eq!(wire.len(), header_len + len, "header size for {len} bytes");
        // Every strict prefix is incomplete, never an error.
        for cut in [0, 1, header_len - 1, wire.len() - 1] {
            assert_eq!(
                decode_frame(&wire[..cut]),
                Ok(None),
                "prefix of {cut} bytes"
            );
        }
        let mut extra = wire.clone();
        extra.extend_from_slice(b"next");
        let (frame, used) = match decode_frame(&extra) {
            Ok(Some(decoded)) => decoded,
            other => panic!("{len} bytes: {other:?}"),
        };
        assert_eq!(used, wire.len());
        assert_eq!(
            frame,
            WsFrame {
                fin: true,
                opcode: opcode::BINARY,
                masked: mask.is_some(),
                payload
            }
        );
    }

    #[test]
    fn frames_round_trip_in_all_length_forms() {
        for mask in [None, Some([0x37, 0xfa, 0x21, 0x3d])] {
            let m = if mask.is_some() { 4 } else { 0 };
            round_trip(0, mask, 2 + m);
            round_trip(125, mask, 2 + m);
            round_trip(126, mask, 4 + m);
            round_trip(65535, mask, 4 + m);
            round_trip(65536, mask, 10 + m);
            round_trip(200_000, mask, 10 + m);
        }
    }

    #[test]
    fn decodes_rfc_6455_masked_hello() {
        // RFC 6455 section 5.7: a single-frame masked text message "Hello".
        let wire = [
            0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58,
        ];
        let (frame, used) = match decode_frame(&wire) {
            Ok(Some(decoded)) => decoded,
            other => panic!("{other:?}"),
        };
        assert_eq!(used, wire.len());
        assert_eq!(frame.opcode, opcode::TEXT);
        assert!(frame.fin && frame.masked);
        assert_eq!(frame.payload, b"Hello");
        assert_eq!(
            encode_frame(true, opcode::TEXT, b"Hello", None),
            [0x81, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f]
        );
    }

    #[test]
    fn malformed_frames_are_rejected() {
        let cases: [(&[u8], FrameError); 6] = [
            (&[0xC1, 0x80, 0, 0, 0, 0], FrameError::ReservedBits),
            (&[0x83, 0x80, 0, 0, 0, 0], FrameError::UnknownOpcode(3)),
            (&[0x8B, 0x80, 0, 0, 0, 0], FrameError::UnknownOpcode(0xB)),
            (&[0x89, 0xFE, 0, 126], FrameError::ControlTooLong(126)),
            (&[0x09, 0x80, 0, 0, 0, 0], FrameError::ControlFragmented),
            (
                &[0x82, 0xFF, 0x80, 0, 0, 0, 0, 0, 0, 0],
                FrameError::LengthMsbSet,
            ),
        ];
        for (wire, want) in cases {
            assert_eq!(decode_frame(wire), Err(want), "{wire:02x?}");
        }
        let huge = [0x82, 0xFF, 0, 0, 0, 0x10, 0, 0, 0, 0];
        assert_eq!(decode_frame(&huge), Err(FrameError::TooLong(1 << 36)));
    }

    #[test]
    fn decoder_never_panics_on_arbitrary_bytes() {
        // A cheap stand-in for a fuzz target: every 3-byte input, and longer inputs
        // built from a simple generator.
        for a in 0..=255u8 {
            for b in 0..=255u8 {
                for c in [0u8, 1, 0x7F, 0x80, 0xFF] {
                    let _ = decode_frame(&[a, b, c]);
                }
            }
        }
        let mut x: u32 = 12345;
        for len in 0..200 {
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
                    (x >> 16) as u8
                })
                .collect();
            let _ = decode_frame(&bytes);
        }
    }

    #[test]
    fn routes_parse() {
        assert_eq!(Route::parse("/"), Route::Root);
        assert_eq!(Route::parse("/unknown/x"), Route::Root);
        assert_eq!(
            Route::parse("/status/503"),
            Route::Status(StatusCode::SERVICE_UNAVAILABLE)
        );
        assert!(matches!(Route::parse("/status/101"), Route::Invalid(_)));
        assert!(matches!(Route::parse("/status/abc"), Route::Invalid(_)));
        assert_eq!(
            Route::parse("/delay/250"),
            Route::Delay(Duration::from_millis(250))
        );
        assert_eq!(Route::parse("/bytes/1000"), Route::Bytes(1000));
        assert_eq!(Route::parse("/echo"), Route::Echo);
        assert_eq!(Route::parse("/close-mid"), Route::CloseMid);
        assert_eq!(Route::parse("/headers"), Route::Headers);
        assert_eq!(Route::parse("/stats"), Route::Stats);
        assert_eq!(Route::parse("/ws"), Route::WebSocket);
    }

    #[test]
    fn pattern_is_continuous_across_chunks() {
        let whole = pattern(0, 3 * CHUNK + 17);
        let mut body = PatternBody::new(whole.len() as u64);
        let mut joined = Vec::new();
        let waker = std::task::Waker::noop();
        let mut cx = TaskContext::from_waker(waker);
        while let Poll::Ready(Some(frame)) = Pin::new(&mut body).poll_frame(&mut cx) {
            let frame = match frame {
                Ok(frame) => frame,
                Err(e) => panic!("{e}"),
            };
            if let Ok(data) = frame.into_data() {
                assert!(data.len() <= CHUNK);
                joined.extend_from_slice(&data);
            }
        }
        assert_eq!(joined, whole);
        assert_eq!(whole[251], 0);
        assert_eq!(whole[250], 250);
    }

    #[tokio::test]
    async fn ws_echo_echoes_and_closes() -> Result<()> {
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let task = tokio::spawn(ws_echo(server));
        let mask = Some([1, 2, 3, 4]);
        let big = pattern(0, 70_000).to_vec();
        client
            .write_all(&encode_frame(true, opcode::TEXT, b"hi", mask))
            .await?;
        client
            .write_all(&encode_frame(true, opcode::BINARY, &big, mask))
            .await?;
        client
            .write_all(&encode_frame(true, opcode::PING, b"p", mask))
            .await?;
        client
            .write_all(&encode_frame(
                true,
                opcode::CLOSE,
                &1000u16.to_be_bytes(),
                mask,
            ))
            .await?;
        let mut got = Vec::new();
        client.read_to_end(&mut got).await?;
        task.await??;
        let mut want = encode_frame(true, opcode::TEXT, b"hi", None);
        want.extend(encode_frame(true, opcode::BINARY, &big, None));
        want.extend(encode_frame(true, opcode::PONG, b"p", None));
        want.extend(encode_frame(
            true,
            opcode::CLOSE,
            &1000u16.to_be_bytes(),
            None,
        ));
        assert_eq!(got, want);
        Ok(())
    }

    #[tokio::test]
    async fn ws_echo_rejects_unmasked_frames() -> Result<()> {
        let (mut client, server) = tokio::io::duplex(1024);
        let task = tokio::spawn(ws_echo(server));
        client
            .write_all(&encode_frame(true, opcode::TEXT, b"hi", None))
            .await?;
        let mut got = [0u8; 4];
        client.read_exact(&mut got).await?;
        assert_eq!(got, [0x88, 0x02, 0x03, 0xEA]);
        assert!(task.await?.is_err());
        Ok(())
    }

    /// One raw HTTP/1.1 exchange against a server on an ephemeral loopback port: the
    /// response head as text and the body as bytes (chunked encoding left in place).
    async fn http1(state: Arc<State>, request: &str) -> Result<(String, Vec<u8>)> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let server = tokio::spawn(accept_http(listener, state));
        let mut conn = TcpStream::connect(addr).await?;
        conn.write_all(request.as_bytes()).await?;
        let mut got = Vec::new();
        // The server may abort the connection (close-mid): keep what arrived.
        let _ = conn.read_to_end(&mut got).await;
        server.abort();
        let split = got
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .map_or(got.len(), |at| at + 4);
        let body = got.split_off(split);
        Ok((String::from_utf8_lossy(&got).into_owned(), body))
    }

    fn state() -> Arc<State> {
        Arc::new(State {
            name: "b1".to_owned(),
            delay: Duration::ZERO,
            requests: AtomicU64::new(0),
        })
    }

    #[tokio::test]
    async fn http_routes_over_loopback() -> Result<()> {
        let st = state();
        let close = "host: x\r\nconnection: close\r\n\r\n";
        let (head, body) =
            http1(st.clone(), &format!("GET /status/503 HTTP/1.1\r\n{close}")).await?;
        assert!(head.starts_with("HTTP/1.1 503"), "{head}");
        assert!(head.contains("x-backend: b1\r\n"), "{head}");
        assert_eq!(body, b"b1 503\n");

        let (_, body) = http1(
            st.clone(),
            "GET /headers HTTP/1.1\r\nHost: h.example\r\nx-b: 2\r\nx-a: 1\r\nconnection: close\r\n\r\n",
        )
        .await?;
        assert_eq!(
            body,
            b":version: HTTP/1.1\nconnection: close\nhost: h.example\nx-a: 1\nx-b: 2\n"
        );

        let (head, body) =
            http1(st.clone(), &format!("GET /bytes/40000 HTTP/1.1\r\n{close}")).await?;
        assert!(head.contains("content-length: 40000\r\n"), "{head}");
        assert_eq!(body, pattern(0, 40_000));

        // Keep-alive is left on: the server, not the client, ends this connection.
        let (head, body) = http1(st.clone(), "GET /close-mid HTTP/1.1\r\nhost: x\r\n\r\n").await?;
        assert!(head.contains("content-length: 1000000\r\n"), "{head}");
        assert_eq!(body, pattern(0, CLOSE_MID_SENT));

        let (_, body) = http1(st.clone(), &format!("GET /stats HTTP/1.1\r\n{close}")).await?;
        assert_eq!(body, b"{\"name\":\"b1\",\"requests\":4}\n");
        Ok(())
    }
}
