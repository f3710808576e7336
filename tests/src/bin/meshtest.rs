//! meshtest: the integrity client and server the end-to-end tests run inside pods.
//!
//! Protocol of one connection:
//! 1. server: optionally writes `--greet` bytes first (a server that speaks first);
//! 2. client: (after reading the greeting, if it expects one) writes a 32-byte header
//!    `MTv1`, 4 zero bytes, upload length, reply length, seed (little-endian u64s), then the
//!    upload: a deterministic byte stream from the seed, in writes of random sizes; then
//!    half-closes (shutdown of its write side);
//! 3. server: reads to end of stream, checking every byte and the length, writes one status
//!    byte (`Y` all correct, `N` not), then the reply stream in random-size writes, closes;
//! 4. client: checks status, every reply byte and the length.
//!
//! Any mismatch, short read or timeout is a failure; the client exits non-zero.
//!
//! `--io blocking` (default) uses plain blocking sockets, as simple C or Python clients do;
//! `--io poll` uses non-blocking sockets and poll(2), as event-driven runtimes (Go, Java
//! NIO, tokio, curl) do. Both must work through the proxy; see ARCHITECTURE.md for the
//! kernel behaviour that makes the difference matter with the short-circuit on.

use std::{
    io::{self, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    os::fd::AsFd,
    sync::{Arc, Mutex},
    thread,
    time::Duration,
};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

use anyhow::{Context, Result, bail};

const MAGIC: &[u8; 4] = b"MTv1";
const IO_TIMEOUT: Duration = Duration::from_secs(30);
const GREET_SEED: u64 = 0x6767_6767;

/// xorshift64* stream: cheap, deterministic, and any reordering or loss shows.
struct Pattern(u64);

impl Pattern {
    fn new(seed: u64) -> Pattern {
        Pattern(seed ^ 0x9e37_79b9_7f4a_7c15 | 1)
    }

    fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// Generates the stream in 8-byte units so that any split of reads sees the same bytes.
struct Stream {
    p: Pattern,
    pending: Vec<u8>,
}

impl Stream {
    fn new(seed: u64) -> Stream {
        Stream {
            p: Pattern::new(seed),
            pending: Vec::new(),
        }
    }

    fn take(&mut self, n: usize, out: &mut Vec<u8>) {
        out.clear();
        while self.pending.len() < n {
            let mut b = [0u8; 8];
            self.p.fill(&mut b);
            self.pending.extend_from_slice(&b);
        }
        out.extend(self.pending.drain(..n));
    }
}

/// A connection in blocking or poll mode.
struct Conn {
    s: TcpStream,
    poll: bool,
}

impl Conn {
    fn new(s: TcpStream, poll: bool) -> Result<Conn> {
        if poll {
            s.set_nonblocking(true)?;
        } else {
            s.set_read_timeout(Some(IO_TIMEOUT))?;
            s.set_write_timeout(Some(IO_TIMEOUT))?;
        }
        Ok(Conn { s, poll })
    }

    fn wait(&self, flags: PollFlags) -> io::Result<()> {
        let mut fds = [PollFd::new(self.s.as_fd(), flags)];
        let ms = u16::try_from(IO_TIMEOUT.as_millis()).unwrap_or(u16::MAX);
        match poll(&mut fds, PollTimeout::from(ms)) {
            Ok(0) => Err(io::Error::new(io::ErrorKind::TimedOut, "poll timed out")),
            Ok(_) => Ok(()),
            Err(e) => Err(io::Error::from(e)),
        }
    }

    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.s.read(buf) {
                Err(e) if self.poll && e.kind() == io::ErrorKind::WouldBlock => {
                    self.wait(PollFlags::POLLIN)?
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                r => return r,
            }
        }
    }

    fn read_exact(&mut self, buf: &mut [u8]) -> io::Result<()> {
        let mut at = 0;
        while at < buf.len() {
            match self.read(&mut buf[at..])? {
                0 => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "end of stream",
                    ));
                }
                n => at += n,
            }
        }
        Ok(())
    }

    fn write_all(&mut self, mut buf: &[u8]) -> io::Result<()> {
        while !buf.is_empty() {
            match self.s.write(buf) {
                Ok(0) => return Err(io::Error::new(io::ErrorKind::WriteZero, "write returned 0")),
                Ok(n) => buf = &buf[n..],
                Err(e) if self.poll && e.kind() == io::ErrorKind::WouldBlock => {
                    self.wait(PollFlags::POLLOUT)?
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn shutdown_write(&self) -> io::Result<()> {
        self.s.shutdown(Shutdown::Write)
    }
}

fn write_stream(s: &mut Conn, len: u64, seed: u64, max_write: usize, rng_seed: u64) -> Result<()> {
    let mut data = Stream::new(seed);
    let mut sizes = Pattern::new(rng_seed);
    let mut left = len;
    let mut buf = Vec::new();
    while left > 0 {
        // Mostly random sizes up to max_write, with frequent tiny writes.
        let r = sizes.next_u64();
        let size = if r.is_multiple_of(4) {
            1 + (r >> 8) % 16
        } else {
            1 + (r >> 8) % max_write as u64
        };
        let n = size.min(left) as usize;
        data.take(n, &mut buf);
        s.write_all(&buf).context("write")?;
        left -= n as u64;
    }
    Ok(())
}

/// Reads to end of stream; returns (bytes read, all bytes matched).
fn read_stream(s: &mut Conn, seed: u64, limit: Option<u64>) -> Result<(u64, bool)> {
    let mut expect = Stream::new(seed);
    let mut buf = vec![0u8; 64 * 1024];
    let mut want = Vec::new();
    let mut total = 0u64;
    let mut ok = true;
    loop {
        let cap = match limit {
            Some(l) if l - total < buf.len() as u64 => (l - total) as usize,
            _ => buf.len(),
        };
        if cap == 0 {
            return Ok((total, ok));
        }
        let n = s.read(&mut buf[..cap]).context("read")?;
        if n == 0 {
            return Ok((total, ok));
        }
        expect.take(n, &mut want);
        if buf[..n] != want[..] {
            ok = false;
        }
        total += n as u64;
    }
}

// === server ===

fn serve(listen: SocketAddr, greet: u64, poll: bool) -> Result<()> {
    let l = TcpListener::bind(listen).with_context(|| format!("bind {listen}"))?;
    println!("listening {}", l.local_addr()?);
    std::io::stdout().flush()?;
    let out = Arc::new(Mutex::new(()));
    for conn in l.incoming() {
        let Ok(s) = conn else { continue };
        let out = Arc::clone(&out);
        thread::spawn(move || {
            // A dual-stack listener sees IPv4 clients as ::ffff:a.b.c.d; print them as IPv4.
            let peer = s
                .peer_addr()
                .map(|a| SocketAddr::new(a.ip().to_canonical(), a.port()).to_string())
                .unwrap_or_default();
            let line = match Conn::new(s, poll).and_then(|mut c| serve_one(&mut c, greet)) {
                Ok((got, ok, sent)) => {
                    format!("conn peer={peer} received={got} verified={ok} sent={sent}")
                }
                Err(e) => format!("conn peer={peer} error={e:#}"),
            };
            let _g = out.lock();
            println!("{line}");
            let _ = std::io::stdout().flush();
        });
    }
    Ok(())
}

fn serve_one(s: &mut Conn, greet: u64) -> Result<(u64, bool, u64)> {
    if greet > 0 {
        write_stream(s, greet, GREET_SEED, 4096, 1)?;
    }
    let mut h = [0u8; 32];
    s.read_exact(&mut h).context("header")?;
    if &h[..4] != MAGIC {
        bail!("bad header magic");
    }
    let field = |i: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&h[i..i + 8]);
        u64::from_le_bytes(b)
    };
    let (upload, reply, seed) = (field(8), field(16), field(24));
    let (got, matched) = read_stream(s, seed, None)?;
    let ok = matched && got == upload;
    s.write_all(if ok { b"Y" } else { b"N" })?;
    write_stream(s, reply, seed ^ 0xabc, 64 * 1024, seed ^ 0x77)?;
    s.shutdown_write()?;
    Ok((got, ok, reply))
}

// === client ===

struct ClientArgs {
    connect: SocketAddr,
    send: u64,
    reply: u64,
    seed: u64,
    connections: u64,
    max_write: usize,
    expect_greet: u64,
    poll: bool,
}

fn client_one(a: &ClientArgs, seed: u64) -> Result<(u64, u64)> {
    let s = TcpStream::connect_timeout(&a.connect, IO_TIMEOUT)
        .with_context(|| format!("connect {}", a.connect))?;
    let mut s = Conn::new(s, a.poll)?;
    if a.expect_greet > 0 {
        let (got, ok) = read_stream(&mut s, GREET_SEED, Some(a.expect_greet))?;
        if got != a.expect_greet || !ok {
            bail!(
                "greeting: got {got} of {} bytes, intact={ok}",
                a.expect_greet
            );
        }
    }
    let mut h = [0u8; 32];
    h[..4].copy_from_slice(MAGIC);
    h[8..16].copy_from_slice(&a.send.to_le_bytes());
    h[16..24].copy_from_slice(&a.reply.to_le_bytes());
    h[24..32].copy_from_slice(&seed.to_le_bytes());
    s.write_all(&h)?;
    write_stream(&mut s, a.send, seed, a.max_write, seed ^ 0x1234)?;
    s.shutdown_write()?;
    let mut status = [0u8; 1];
    s.read_exact(&mut status)
        .context("status byte (the server closed early?)")?;
    if &status != b"Y" {
        bail!("server saw a corrupted or short upload of {} bytes", a.send);
    }
    let (got, ok) = read_stream(&mut s, seed ^ 0xabc, None)?;
    if !ok || got != a.reply {
        bail!("reply: got {got} of {} bytes, intact={ok}", a.reply);
    }
    Ok((a.send, got))
}

fn client(a: ClientArgs) -> Result<bool> {
    let a = Arc::new(a);
    let mut handles = Vec::new();
    for i in 0..a.connections {
        let a = Arc::clone(&a);
        handles.push(thread::spawn(move || {
            client_one(&a, a.seed.wrapping_add(i))
        }));
    }
    let (mut sent, mut received, mut failures) = (0u64, 0u64, Vec::new());
    for h in handles {
        match h.join() {
            Ok(Ok((s, r))) => {
                sent += s;
                received += r;
            }
            Ok(Err(e)) => failures.push(format!("{e:#}")),
            Err(_) => failures.push("client thread panicked".into()),
        }
    }
    let ok = failures.is_empty();
    let failures: Vec<String> = failures.iter().map(|f| format!("{f:?}")).collect();
    println!(
        "{{\"ok\":{ok},\"connections\":{},\"sent\":{sent},\"received\":{received},\"failures\":[{}]}}",
        a.connections,
        failures.join(",")
    );
    Ok(ok)
}

// === CLI ===

fn usage() -> ! {
    eprintln!(
        "usage:\n  meshtest serve --listen ADDR [--greet BYTES] [--io blocking|poll]\n  meshtest client --connect ADDR [--send BYTES] [--reply BYTES] [--seed N] [--connections N] [--max-write BYTES] [--expect-greet BYTES] [--io blocking|poll]"
    );
    std::process::exit(2)
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(cmd) = args.first() else { usage() };
    let get = |name: &str| -> Option<String> {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1).cloned())
    };
    let num = |name: &str, default: u64| -> Result<u64> {
        get(name).map_or(Ok(default), |v| {
            v.parse().with_context(|| format!("{name} {v}"))
        })
    };
    let poll = match get("--io").as_deref() {
        None | Some("blocking") => false,
        Some("poll") => true,
        Some(_) => usage(),
    };
    match cmd.as_str() {
        "serve" => {
            let listen: SocketAddr = get("--listen").unwrap_or_else(|| usage()).parse()?;
            serve(listen, num("--greet", 0)?, poll)
        }
        "client" => {
            let a = ClientArgs {
                connect: get("--connect").unwrap_or_else(|| usage()).parse()?,
                send: num("--send", 1024)?,
                reply: num("--reply", 1024)?,
                seed: num("--seed", 1)?,
                connections: num("--connections", 1)?,
                max_write: usize::try_from(num("--max-write", 65536)?.max(1))?,
                expect_greet: num("--expect-greet", 0)?,
                poll,
            };
            if client(a)? {
                Ok(())
            } else {
                std::process::exit(1)
            }
        }
        _ => usage(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_is_split_independent() {
        let mut a = Stream::new(5);
        let mut whole = Vec::new();
        a.take(100, &mut whole);
        let mut b = Stream::new(5);
        let mut parts = Vec::new();
        let mut tmp = Vec::new();
        for n in [1, 7, 8, 13, 71] {
            b.take(n, &mut tmp);
            parts.extend_from_slice(&tmp);
        }
        assert_eq!(whole, parts);
        let mut c = Stream::new(6);
        c.take(100, &mut tmp);
        assert_ne!(whole, tmp);
    }

    #[test]
    fn loopback_round_trip() -> Result<()> {
        let l = TcpListener::bind("127.0.0.1:0")?;
        let addr = l.local_addr()?;
        let server = thread::spawn(move || -> Result<(u64, bool, u64)> {
            let (s, _) = l.accept()?;
            serve_one(&mut Conn::new(s, false)?, 10)
        });
        let a = ClientArgs {
            poll: true,
            connect: addr,
            send: 100_000,
            reply: 5_000,
            seed: 3,
            connections: 1,
            max_write: 1000,
            expect_greet: 10,
        };
        assert_eq!(client_one(&a, 3)?, (100_000, 5_000));
        let r = server
            .join()
            .map_err(|_| anyhow::anyhow!("server panicked"))??;
        assert_eq!(r, (100_000, true, 5_000));
        Ok(())
    }
}
