#!/usr/bin/python3
"""Close and reset propagation through the proxy, for tests/tests/kernel_path.rs.

Standard library only. Run with /usr/bin/python3. Every socket operation has a timeout, and
each run prints exactly one result line (on stdout) that the test checks.

Every connection starts with the server's greeting (GREETING), which the client reads
before anything else: a turn, after which the proxy opens the kernel-only path (with the
stream rule on, the default, a connection whose bytes only ever went one way never takes it).

Server (one connection, then exits):
    close_reset.py serve PORT MODE
  MODE read   reads to the end; prints "eof N" (clean end of stream after N bytes) or
              "reset N" (the connection was reset after N bytes); on "eof" it then sends
              REPLY bytes and closes normally.
  MODE abort  reads ABORT_AFTER bytes, then resets the connection (SO_LINGER 0 and close);
              prints "aborted".
  MODE echo   echoes every byte until the end or a reset; prints "eof N" or "reset N".

Client:
    close_reset.py connect HOST PORT MODE
  MODE close  sends SEND bytes in pieces with pauses (so later pieces can take the
              kernel-only path), half-closes, reads to the end; prints "eof N" with the
              reply length, or "reset N".
  MODE reset  sends SEND bytes the same way, waits, then resets (SO_LINGER 0); prints "sent".
  MODE wait   sends ABORT_AFTER bytes, then reads until the end; prints "eof N" or "reset N"
              (the server resets it).
  MODE ticks  sends 100 bytes every 100 ms and reads the echo, for at most SECONDS; prints
              "done N" if it ran out the time, "eof N" or "reset N" if the connection ended
              first (N round trips done).
"""

import socket
import struct
import sys
import time

SEND = 64 * 1024
PIECE = 8 * 1024
REPLY = 1000
ABORT_AFTER = 1000
TIMEOUT = 20.0
GREETING = b"hello\n"
SECONDS = 15.0


def abort(sock):
    # l_onoff=1, l_linger=0: close() sends RST instead of FIN.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def read_to_end(sock, echo=False):
    """Returns ("eof" | "reset", bytes read)."""
    n = 0
    while True:
        try:
            data = sock.recv(65536)
        except ConnectionResetError:
            return "reset", n
        if not data:
            return "eof", n
        n += len(data)
        if echo:
            sock.sendall(data)


def send_pieces(sock, total):
    sent = 0
    while sent < total:
        piece = bytes((sent + i) % 251 for i in range(min(PIECE, total - sent)))
        sock.sendall(piece)
        sent += len(piece)
        time.sleep(0.02)


def serve(port, mode):
    listener = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("::", port))
    # Before listen(): a blocking listener's connections stay off the short-circuit.
    listener.settimeout(TIMEOUT)
    listener.listen(8)
    print("listening", flush=True)
    conn, _ = listener.accept()
    conn.settimeout(TIMEOUT)
    conn.sendall(GREETING)
    if mode == "read":
        how, n = read_to_end(conn)
        print(f"{how} {n}", flush=True)
        if how == "eof":
            conn.sendall(b"r" * REPLY)
            conn.close()
    elif mode == "abort":
        got = 0
        while got < ABORT_AFTER:
            data = conn.recv(ABORT_AFTER - got)
            if not data:
                break
            got += len(data)
        time.sleep(0.2)
        abort(conn)
        print("aborted", flush=True)
    elif mode == "echo":
        how, n = read_to_end(conn, echo=True)
        print(f"{how} {n}", flush=True)
    else:
        sys.exit(f"unknown serve mode {mode}")


def connect(host, port, mode):
    # A reset can also come before the first round trip (a denied connection): then the
    # result is "reset 0".
    try:
        run_client(host, port, mode)
    except (ConnectionResetError, BrokenPipeError):
        print("reset 0", flush=True)


def run_client(host, port, mode):
    sock = socket.create_connection((host, port), timeout=TIMEOUT)
    got = b""
    while len(got) < len(GREETING):
        data = sock.recv(len(GREETING) - len(got))
        if not data:
            print("eof 0", flush=True)
            return
        got += data
    if got != GREETING:
        sys.exit(f"greeting: got {got!r}, expected {GREETING!r}")
    if mode == "close":
        send_pieces(sock, SEND)
        sock.shutdown(socket.SHUT_WR)
        how, n = read_to_end(sock)
        print(f"{how} {n}", flush=True)
    elif mode == "reset":
        send_pieces(sock, SEND)
        time.sleep(0.3)
        abort(sock)
        print("sent", flush=True)
    elif mode == "wait":
        sock.sendall(b"w" * ABORT_AFTER)
        how, n = read_to_end(sock)
        print(f"{how} {n}", flush=True)
    elif mode == "ticks":
        end = time.monotonic() + SECONDS
        done = 0
        while time.monotonic() < end:
            try:
                sock.sendall(b"t" * 100)
                got = 0
                while got < 100:
                    data = sock.recv(100 - got)
                    if not data:
                        print(f"eof {done}", flush=True)
                        return
                    got += len(data)
            except (ConnectionResetError, BrokenPipeError):
                print(f"reset {done}", flush=True)
                return
            done += 1
            time.sleep(0.1)
        print(f"done {done}", flush=True)
    else:
        sys.exit(f"unknown connect mode {mode}")


def main():
    if len(sys.argv) == 4 and sys.argv[1] == "serve":
        serve(int(sys.argv[2]), sys.argv[3])
    elif len(sys.argv) == 5 and sys.argv[1] == "connect":
        connect(sys.argv[2], int(sys.argv[3]), sys.argv[4])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
