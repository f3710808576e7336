#!/usr/bin/python3
"""A stream into a reader slower than the proxy, then request/response on the same
connection, for tests/tests/short_circuit.rs (the proxy's paced writes).

Standard library only. Run with /usr/bin/python3. Every socket operation has a timeout, and
each side prints exactly one result line (on stdout) besides the server's "streamed".

Server (one connection, then exits):
    slow_reader.py serve PORT GO_FILE
  Reads STREAM bytes, checking every byte, pausing PAUSE seconds after each PAUSE_EVERY
  bytes (slower than the proxy writes, faster than the pace it keeps when held back); prints
  "streamed N"; waits for GO_FILE to exist (the test reads counters meanwhile); sends one
  byte; then echoes ROUNDS messages of ROUND bytes; reads to the end. Prints "ok ROUNDS",
  "mismatch at K" or "short N".

Client:
    slow_reader.py connect HOST PORT
  Sends STREAM bytes in WRITE-byte pieces, waits for the server's byte, then sends ROUNDS
  messages of ROUND bytes, each checked against its echo; closes. Prints "ok ROUNDS" or what
  went wrong.
"""

import os
import socket
import sys
import time

STREAM = 64 << 20
WRITE = 64 << 10
PAUSE_EVERY = 1 << 20
PAUSE = 0.001
ROUNDS = 200
ROUND = 100
TIMEOUT = 30.0


def pattern(offset, n):
    """Bytes offset..offset+n of the stream: byte i is i mod 251 (a prime, so pieces of any
    power-of-two size differ)."""
    return bytes((offset + i) % 251 for i in range(n))


def recv_exact(sock, n):
    out = bytearray()
    while len(out) < n:
        data = sock.recv(n - len(out))
        if not data:
            return bytes(out)
        out += data
    return bytes(out)


def serve(port, go_file):
    listener = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("::", port))
    # A timeout makes the socket non-blocking (Python waits in poll), and before listen()
    # so the proxy counts the server as event-driven: blocking listeners' connections stay
    # off the short-circuit.
    listener.settimeout(TIMEOUT)
    listener.listen(1)
    print("listening", flush=True)
    conn, _ = listener.accept()
    conn.settimeout(TIMEOUT)
    # The expected bytes repeat every 251: compare against a window of the pattern.
    window = pattern(0, 251 + (1 << 16))
    got = 0
    since_pause = 0
    while got < STREAM:
        data = conn.recv(min(1 << 16, STREAM - got))
        if not data:
            print(f"short {got}", flush=True)
            return
        start = got % 251
        if data != window[start:start + len(data)]:
            for i, b in enumerate(data):
                if b != (got + i) % 251:
                    print(f"mismatch at {got + i}", flush=True)
                    return
        got += len(data)
        since_pause += len(data)
        if since_pause >= PAUSE_EVERY:
            since_pause = 0
            time.sleep(PAUSE)
    print(f"streamed {got}", flush=True)
    deadline = time.monotonic() + TIMEOUT
    while not os.path.exists(go_file):
        if time.monotonic() > deadline:
            print("no go file", flush=True)
            return
        time.sleep(0.05)
    conn.sendall(b"g")
    for i in range(ROUNDS):
        msg = recv_exact(conn, ROUND)
        if len(msg) != ROUND:
            print(f"short round {i}", flush=True)
            return
        conn.sendall(msg)
    rest = conn.recv(1)
    print(f"ok {ROUNDS}" if not rest else "unexpected bytes", flush=True)
    conn.close()


def connect(host, port):
    sock = socket.create_connection((host, port), timeout=TIMEOUT)
    window = pattern(0, 251 + WRITE)
    sent = 0
    while sent < STREAM:
        n = min(WRITE, STREAM - sent)
        start = sent % 251
        sock.sendall(window[start:start + n])
        sent += n
    if recv_exact(sock, 1) != b"g":
        print("no go byte", flush=True)
        return
    for i in range(ROUNDS):
        msg = bytes((i + j) % 256 for j in range(ROUND))
        sock.sendall(msg)
        if recv_exact(sock, ROUND) != msg:
            print(f"round {i} came back wrong", flush=True)
            return
    sock.close()
    print(f"ok {ROUNDS}", flush=True)


def main():
    if len(sys.argv) == 4 and sys.argv[1] == "serve":
        serve(int(sys.argv[2]), sys.argv[3])
    elif len(sys.argv) == 4 and sys.argv[1] == "connect":
        connect(sys.argv[2], int(sys.argv[3]))
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
