#!/usr/bin/python3
"""One-way small writes with gaps between them, so slow that the proxy reads each one before
the next, for tests/tests/short_circuit.rs (the stream rule's "no reply" criterion).

Standard library only. Run with /usr/bin/python3. Sockets are non-blocking (blocking
workload sockets stay off the short-circuit by default); every wait has a deadline, and
each side prints exactly one result line on stdout.

Server (CONNECTIONS connections, one at a time, then exits):
    paced_writes.py serve PORT CONNECTIONS
  Reads each connection to its end, checking every byte, then sends back the count as
  decimal text and closes. Prints "ok CONNECTIONS" or what went wrong.

Client:
    paced_writes.py connect HOST PORT CONNECTIONS
  On each connection in turn: WRITES writes of SIZE bytes, GAP seconds apart, no read in
  between; then half-closes and checks the server's count. Prints "ok CONNECTIONS" or what
  went wrong.
"""

import select
import socket
import sys
import time

WRITES = 100
SIZE = 64
GAP = 0.002
DEADLINE = 30.0


def byte_at(i):
    return (i * 7 + 3) % 251


def wait(sock, write, until):
    left = until - time.monotonic()
    if left <= 0:
        raise TimeoutError("deadline passed")
    r, w, _ = select.select([] if write else [sock], [sock] if write else [], [], left)
    if not (r or w):
        raise TimeoutError("deadline passed")


def send_all(sock, data, until):
    while data:
        wait(sock, True, until)
        try:
            n = sock.send(data)
        except BlockingIOError:
            continue
        data = data[n:]


def recv_some(sock, until):
    while True:
        wait(sock, False, until)
        try:
            return sock.recv(65536)
        except BlockingIOError:
            continue


def serve(port, connections):
    lsock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind(("::", port))
    lsock.listen(16)
    # Non-blocking before accept: an accepted socket takes its listener's mode.
    lsock.setblocking(False)
    print("listening", file=sys.stderr, flush=True)
    until = time.monotonic() + DEADLINE
    for c in range(connections):
        wait(lsock, False, until)
        conn, _ = lsock.accept()
        conn.setblocking(False)
        got = 0
        while True:
            data = recv_some(conn, until)
            if not data:
                break
            for k, b in enumerate(data):
                if b != byte_at(got + k):
                    print(f"mismatch in connection {c} at {got + k}", flush=True)
                    return
            got += len(data)
        send_all(conn, str(got).encode(), until)
        conn.close()
    print(f"ok {connections}", flush=True)


def connect(host, port, connections):
    until = time.monotonic() + DEADLINE
    for c in range(connections):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            sock.connect((host, port))
        except BlockingIOError:
            pass
        wait(sock, True, until)
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            print(f"connect failed: errno {err}", flush=True)
            return
        sent = 0
        for _ in range(WRITES):
            send_all(sock, bytes(byte_at(sent + k) for k in range(SIZE)), until)
            sent += SIZE
            time.sleep(GAP)
        sock.shutdown(socket.SHUT_WR)
        reply = b""
        while True:
            data = recv_some(sock, until)
            if not data:
                break
            reply += data
        sock.close()
        if reply != str(sent).encode():
            print(f"connection {c}: the server counted {reply!r}, {sent} were sent", flush=True)
            return
    print(f"ok {connections}", flush=True)


def main():
    if len(sys.argv) == 4 and sys.argv[1] == "serve":
        serve(int(sys.argv[2]), int(sys.argv[3]))
    elif len(sys.argv) == 5 and sys.argv[1] == "connect":
        connect(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    else:
        print(__doc__, file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
