#!/usr/bin/python3
"""gRPC echo server and client for the end-to-end tests, without protobuf.

Run with /usr/bin/python3 (Debian's python3-grpcio). Messages are raw bytes: every
handler and stub uses identity (None) serializers, so no code generation is needed.

    grpc_echo.py serve  --listen HOST:PORT --name NAME [--workers W]
    grpc_echo.py client --target HOST:PORT [--calls N] [--channels K] [--json]
                        [--timeout S]

Service `mesh.Echo`; every method sends initial metadata `x-backend: NAME`:
  Unary         returns the request; trailing metadata `x-trailer: NAME`
  ServerStream  request is an ASCII integer n; streams b"msg-0" .. b"msg-<n-1>"
  ClientStream  returns b"<count>:<total length>" of the request messages
  BidiStream    answers each message as it arrives with b"echo-" + message
  Fail          aborts with the status named by the request (e.g. b"FAILED_PRECONDITION"),
                details "requested failure", trailing metadata `x-trailer: NAME`
  Slow          sleeps the number of milliseconds in the request, then returns b"done"

`serve` prints `ready` (flushed) once listening and exits 0 on SIGTERM or SIGINT.

`client` runs every kind N times (default 3), call i on channel i % K (default K = 1: all
calls share one HTTP/2 connection), and prints one JSON object on stdout:
  {"unary": {"ok": 3, "failed": 0, "backends": ["a"]}, "server_stream": {...},
   "client_stream": {...}, "bidi_stream": {...}, "fail": {...}, "slow": {...},
   "backends": [every backend seen], "calls": N, "channels": K}
"backends" lists every x-backend seen, on failed calls too (a Fail or a deadline still
names the backend that answered).
Exit 0 only if every call passed; otherwise 1, with the reasons on stderr. `--json` is
accepted for clarity; the output is always JSON.
"""

import argparse
import json
import queue
import signal
import sys
import threading
import time
from concurrent import futures

import grpc

SERVICE = "mesh.Echo"
FAIL_DETAILS = "requested failure"
STREAM_COUNT = 50
CLIENT_STREAM_MESSAGES = 20
BIDI_MESSAGES = 20
SLOW_MS = 2000
SLOW_DEADLINE_S = 0.3
# The slow handler checks this often whether its caller is still there, so a cancelled or
# timed-out call frees its worker thread early instead of after the full sleep.
SLOW_POLL_S = 0.05
KINDS = ("unary", "server_stream", "client_stream", "bidi_stream", "fail", "slow")


# === server ===


class Echo:
    def __init__(self, name):
        self.name = name

    def _hello(self, context):
        context.send_initial_metadata((("x-backend", self.name),))

    def unary(self, request, context):
        self._hello(context)
        context.set_trailing_metadata((("x-trailer", self.name),))
        return request

    def server_stream(self, request, context):
        self._hello(context)
        try:
            n = int(request.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"ServerStream wants an ASCII integer, got {request[:32]!r}")
        for i in range(n):
            yield b"msg-%d" % i

    def client_stream(self, request_iterator, context):
        self._hello(context)
        count = 0
        total = 0
        for msg in request_iterator:
            count += 1
            total += len(msg)
        return b"%d:%d" % (count, total)

    def bidi_stream(self, request_iterator, context):
        self._hello(context)
        for msg in request_iterator:
            yield b"echo-" + msg

    def fail(self, request, context):
        self._hello(context)
        name = request.decode("ascii", errors="replace").strip()
        code = grpc.StatusCode.__members__.get(name)
        if code is None or code == grpc.StatusCode.OK:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"Fail wants a non-OK status code name, got {name!r}")
        context.set_trailing_metadata((("x-trailer", self.name),))
        context.abort(code, FAIL_DETAILS)

    def slow(self, request, context):
        self._hello(context)
        try:
            ms = int(request.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"Slow wants milliseconds as ASCII, got {request[:32]!r}")
        end = time.monotonic() + ms / 1000.0
        while context.is_active():
            left = end - time.monotonic()
            if left <= 0:
                return b"done"
            time.sleep(min(left, SLOW_POLL_S))
        return b"cancelled"


def serve(args):
    echo = Echo(args.name)
    handler = grpc.method_handlers_generic_handler(SERVICE, {
        # None (de)serializers: handlers see and return raw bytes.
        "Unary": grpc.unary_unary_rpc_method_handler(echo.unary),
        "ServerStream": grpc.unary_stream_rpc_method_handler(echo.server_stream),
        "ClientStream": grpc.stream_unary_rpc_method_handler(echo.client_stream),
        "BidiStream": grpc.stream_stream_rpc_method_handler(echo.bidi_stream),
        "Fail": grpc.unary_unary_rpc_method_handler(echo.fail),
        "Slow": grpc.unary_unary_rpc_method_handler(echo.slow),
    })
    # Each open stream holds a worker thread for its whole life: size the pool for the
    # concurrent streams a test opens, not for the CPU count.
    # grpc turns SO_REUSEPORT on by default: a second server (a leftover of an earlier
    # test) could then bind the same port and silently take half the connections.
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=args.workers),
                         options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers((handler,))
    # grpc 1.51 raises on a failed bind; older versions returned port 0.
    try:
        port = server.add_insecure_port(args.listen)
    except RuntimeError:
        port = 0
    if port == 0:
        print(f"grpc_echo: cannot listen on {args.listen}: is the port in use or the "
              f"address not assigned in this namespace?", file=sys.stderr)
        return 1
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    server.start()
    print(f"grpc_echo serve: {args.name} listening on {args.listen}", file=sys.stderr)
    print("ready", flush=True)
    # A timed wait keeps the main thread returning to the interpreter, where the
    # signal handlers run.
    while not stop.wait(0.5):
        pass
    server.stop(grace=0.5).wait()
    return 0


# === client ===


class Kind:
    def __init__(self):
        self.ok = 0
        self.failed = 0
        self.backends = set()

    def json(self):
        return {"ok": self.ok, "failed": self.failed, "backends": sorted(self.backends)}


def metadata_value(metadata, key):
    for k, v in metadata or ():
        if k == key:
            return v
    return None


class Client:
    def __init__(self, channel, timeout):
        def method(name, kind):
            path = f"/{SERVICE}/{name}"
            # No serializers: requests and responses are raw bytes.
            return getattr(channel, kind)(path)

        self.timeout = timeout
        self.unary = method("Unary", "unary_unary")
        self.server_stream = method("ServerStream", "unary_stream")
        self.client_stream = method("ClientStream", "stream_unary")
        self.bidi_stream = method("BidiStream", "stream_stream")
        self.fail = method("Fail", "unary_unary")
        self.slow = method("Slow", "unary_unary")


class CheckFailed(Exception):
    pass


def check(cond, reason):
    if not cond:
        raise CheckFailed(reason)


def seen(kind, call):
    """Records the call's x-backend; returns it."""
    backend = metadata_value(call.initial_metadata(), "x-backend")
    if backend is not None:
        kind.backends.add(backend)
    return backend


def run_unary(c, kind, i):
    payload = b"unary-%d-" % i + bytes(range(256))
    resp, call = c.unary.with_call(payload, timeout=c.timeout)
    backend = seen(kind, call)
    check(resp == payload, f"echo differs: {len(resp)} bytes back for {len(payload)}")
    check(backend is not None, "no x-backend initial metadata")
    trailer = metadata_value(call.trailing_metadata(), "x-trailer")
    check(trailer == backend, f"x-trailer {trailer!r}, expected {backend!r}")


def run_server_stream(c, kind, _i):
    responses = c.server_stream(b"%d" % STREAM_COUNT, timeout=c.timeout)
    got = list(responses)
    seen(kind, responses)
    want = [b"msg-%d" % i for i in range(STREAM_COUNT)]
    check(got == want, f"got {len(got)} messages, first differing at "
          f"{next((j for j, (a, b) in enumerate(zip(got, want)) if a != b), len(got))}")


def run_client_stream(c, kind, i):
    msgs = [b"c%d-%d" % (i, j) * (j + 1) for j in range(CLIENT_STREAM_MESSAGES)]
    resp, call = c.client_stream.with_call(iter(msgs), timeout=c.timeout)
    seen(kind, call)
    want = b"%d:%d" % (len(msgs), sum(len(m) for m in msgs))
    check(resp == want, f"got {resp!r}, expected {want!r}")


def run_bidi_stream(c, kind, i):
    # Lock-step: the next message goes out only after the echo of the previous one came
    # back, so a proxy that buffers a stream instead of forwarding frames fails here.
    outbox = queue.Queue()
    done = object()

    def requests():
        while True:
            msg = outbox.get()
            if msg is done:
                return
            yield msg

    responses = c.bidi_stream(requests(), timeout=c.timeout)
    try:
        for j in range(BIDI_MESSAGES):
            msg = b"b%d-%d" % (i, j)
            outbox.put(msg)
            echo = next(responses)
            check(echo == b"echo-" + msg, f"message {j}: got {echo!r}")
        outbox.put(done)
        rest = list(responses)
        check(not rest, f"{len(rest)} unexpected extra messages")
        seen(kind, responses)
    finally:
        outbox.put(done)
        responses.cancel()


def run_fail(c, kind, _i):
    try:
        c.fail.with_call(b"FAILED_PRECONDITION", timeout=c.timeout)
    except grpc.RpcError as e:
        backend = seen(kind, e)
        check(e.code() == grpc.StatusCode.FAILED_PRECONDITION,
              f"status {e.code()}, expected FAILED_PRECONDITION ({e.details()!r})")
        check(e.details() == FAIL_DETAILS,
              f"details {e.details()!r}, expected {FAIL_DETAILS!r}")
        trailer = metadata_value(e.trailing_metadata(), "x-trailer")
        check(trailer is not None and trailer == backend,
              f"x-trailer {trailer!r}, expected {backend!r}")
        return
    raise CheckFailed("the call succeeded, expected FAILED_PRECONDITION")


def run_slow(c, kind, _i):
    start = time.monotonic()
    try:
        c.slow.with_call(b"%d" % SLOW_MS, timeout=SLOW_DEADLINE_S)
    except grpc.RpcError as e:
        elapsed = time.monotonic() - start
        # The headers may or may not have arrived before the deadline.
        seen(kind, e)
        check(e.code() == grpc.StatusCode.DEADLINE_EXCEEDED,
              f"status {e.code()}, expected DEADLINE_EXCEEDED ({e.details()!r})")
        check(elapsed < SLOW_MS / 1000.0,
              f"deadline of {SLOW_DEADLINE_S}s fired only after {elapsed:.2f}s")
        return
    raise CheckFailed(f"Slow {SLOW_MS} ms returned within a {SLOW_DEADLINE_S}s deadline")


RUNNERS = {
    "unary": run_unary,
    "server_stream": run_server_stream,
    "client_stream": run_client_stream,
    "bidi_stream": run_bidi_stream,
    "fail": run_fail,
    "slow": run_slow,
}


def client(args):
    # A local subchannel pool per channel: otherwise grpc shares one connection between
    # channels to the same target, and --channels would not spread anything.
    options = [("grpc.use_local_subchannel_pool", 1)]
    channels = [grpc.insecure_channel(args.target, options=options)
                for _ in range(args.channels)]
    clients = [Client(ch, args.timeout) for ch in channels]
    kinds = {name: Kind() for name in KINDS}
    errors = []
    try:
        for i in range(args.calls):
            c = clients[i % len(clients)]
            for name in KINDS:
                kind = kinds[name]
                try:
                    RUNNERS[name](c, kind, i)
                    kind.ok += 1
                except CheckFailed as e:
                    kind.failed += 1
                    errors.append(f"{name} #{i}: {e}")
                except grpc.RpcError as e:
                    kind.failed += 1
                    errors.append(f"{name} #{i}: {e.code()}: {e.details()}")
                except Exception as e:  # noqa: BLE001 - any surprise is a failed call
                    kind.failed += 1
                    errors.append(f"{name} #{i}: {type(e).__name__}: {e}")
    finally:
        for ch in channels:
            ch.close()
    result = {name: kind.json() for name, kind in kinds.items()}
    result["backends"] = sorted(set().union(*(k.backends for k in kinds.values())))
    result["calls"] = args.calls
    result["channels"] = args.channels
    print(json.dumps(result), flush=True)
    for error in errors:
        print(f"grpc_echo: {error}", file=sys.stderr)
    return 1 if errors else 0


def main():
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="run the mesh.Echo server")
    s.add_argument("--listen", required=True, help="HOST:PORT, e.g. 0.0.0.0:9090 or [::]:9090")
    s.add_argument("--name", required=True, help="backend name sent as x-backend")
    s.add_argument("--workers", type=int, default=32,
                   help="worker threads = concurrent calls served (default 32)")
    c = sub.add_parser("client", help="exercise every method and report JSON")
    c.add_argument("--target", required=True, help="HOST:PORT of the server (or proxy)")
    c.add_argument("--calls", type=int, default=3, help="calls of each kind (default 3)")
    c.add_argument("--channels", type=int, default=1,
                   help="spread calls over K channels, i.e. K HTTP/2 connections")
    c.add_argument("--json", action="store_true", help="JSON output (always on)")
    c.add_argument("--timeout", type=float, default=10.0,
                   help="deadline of each call except Slow, in seconds (default 10)")
    args = parser.parse_args()
    if args.command == "serve":
        return serve(args)
    if args.calls < 0 or args.channels < 1:
        parser.error("--calls must be >= 0 and --channels >= 1")
    return client(args)


if __name__ == "__main__":
    sys.exit(main())
