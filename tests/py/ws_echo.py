#!/usr/bin/python3
"""WebSocket echo client for the end-to-end tests (run with /usr/bin/python3).

    /usr/bin/python3 tests/py/ws_echo.py --url ws://HOST:PORT/ws --messages N [--timeout S]

Connects with the `websockets` library (asyncio API, Debian's 10.4), sends N text
messages of sizes spread from 1 byte to 64 KiB and one binary message, checks that each
echo comes back unchanged and in order, then closes cleanly (close code 1000 both ways).

Prints one JSON object on stdout: {"ok": N, "failed": F} (the binary message is checked
but not counted in "ok"; a failure of it counts in "failed"). Exit 0 only if everything
passed and the close was clean; otherwise exit 1 with the reasons on stderr.
"""

import argparse
import asyncio
import json
import sys

import websockets

MAX_SIZE = 64 * 1024


def sizes(n):
    """n sizes from 1 B to 64 KiB, geometric so small and large frames (all three
    WebSocket length encodings: <126, 16-bit, 64-bit) are covered."""
    if n <= 0:
        return []
    if n == 1:
        return [MAX_SIZE]
    ratio = MAX_SIZE ** (1.0 / (n - 1))
    return [max(1, min(MAX_SIZE, round(ratio**i))) for i in range(n)]


def text_message(i, size):
    """A printable, position-dependent text of exactly `size` bytes."""
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
    start = i % len(alphabet)
    rotated = alphabet[start:] + alphabet[:start]
    return (rotated * (size // len(rotated) + 1))[:size]


class Tally:
    """What was checked so far; survives a connection that fails half-way."""

    def __init__(self):
        self.ok = 0
        self.failed = 0
        self.errors = []

    def fail(self, reason):
        self.failed += 1
        self.errors.append(reason)


async def run(url, messages, timeout, tally):
    # No compression: the server does not negotiate extensions, and the test is about
    # the bytes on the wire passing through the proxy unchanged.
    async with websockets.connect(
        url, compression=None, max_size=2 * MAX_SIZE, open_timeout=timeout,
        close_timeout=timeout,
    ) as ws:
        for i, size in enumerate(sizes(messages)):
            msg = text_message(i, size)
            await ws.send(msg)
            echo = await asyncio.wait_for(ws.recv(), timeout)
            if echo == msg:
                tally.ok += 1
            else:
                tally.fail(f"text message {i} ({size} B): echo differs "
                           f"(got {type(echo).__name__} of {len(echo)})")
        binary = bytes(i % 251 for i in range(3000))
        await ws.send(binary)
        echo = await asyncio.wait_for(ws.recv(), timeout)
        if echo != binary:
            tally.fail(f"binary message: echo differs "
                       f"(got {type(echo).__name__} of {len(echo)})")
        await ws.close(code=1000, reason="done")
        if ws.close_code != 1000:
            tally.errors.append(f"close: server answered code {ws.close_code}, "
                                f"expected 1000")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True, help="ws://HOST:PORT/ws")
    parser.add_argument("--messages", type=int, default=20,
                        help="text messages to send (default 20)")
    parser.add_argument("--timeout", type=float, default=10.0,
                        help="seconds allowed for the handshake and for each echo")
    args = parser.parse_args()
    tally = Tally()
    try:
        asyncio.run(run(args.url, args.messages, args.timeout, tally))
    except (OSError, asyncio.TimeoutError, websockets.exceptions.WebSocketException) as e:
        # Every message not confirmed (the text ones and the binary one) failed.
        tally.failed = args.messages + 1 - tally.ok
        tally.errors.append(f"{args.url}: {type(e).__name__}: {e}")
    print(json.dumps({"ok": tally.ok, "failed": tally.failed}), flush=True)
    for error in tally.errors:
        print(f"ws_echo: {error}", file=sys.stderr)
    sys.exit(1 if tally.errors else 0)

if __name__ == "__main__":
    main()
