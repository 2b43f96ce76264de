"""A trivial server that streams canned tokens: the load generator's own ceiling, with no model behind it.

It answers POST /v1/chat/completions (stream on) with max_tokens SSE chunks shaped like an OpenAI server's,
one token each, then a usage chunk and ``data: [DONE]``; GET /health, /readyz and /v1/models answer 200.
Each chunk is its own write, with the event loop given up in between (``--step-ms`` waits that long instead),
so a client sees one event per token as from a real server. Several worker processes share the port
(SO_REUSEPORT), so the server is not what limits bench.load's clients.

    python -m bench.canned_server --port 8088 --workers 4
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import signal
import socket
import sys
import time

WORDS = ("The", " quick", " brown", " fox", " jumps", " over", " the", " lazy", " dog", ".")


def chunk(index: int, created: int, delta: dict, finish: str | None = None, usage: dict | None = None) -> bytes:
    body = {"id": "chatcmpl-canned", "object": "chat.completion.chunk", "created": created, "model": "canned",
            "choices": [] if usage else [{"index": 0, "delta": delta, "finish_reason": finish}]}
    if usage:
        body["usage"] = usage
    return b"data: " + json.dumps(body).encode() + b"\n\n"


def chunked(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, step: float) -> None:
    try:
        while True:  # keep-alive: one request after the other
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, path, _ = lines[0].split(" ", 2)
            headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
            body = await reader.readexactly(int(headers.get("content-length", 0))) if "content-length" in headers else b""
            if method == "GET":
                payload = b'{"status": "ok", "data": [{"id": "canned"}]}'
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                             % (len(payload), payload))
                await writer.drain()
                continue
            request = json.loads(body or b"{}")
            tokens = int(request.get("max_tokens") or 16)
            created = int(time.time())
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
            writer.write(chunked(chunk(0, created, {"role": "assistant", "content": ""})))
            for i in range(tokens):
                writer.write(chunked(chunk(i, created, {"content": WORDS[i % len(WORDS)]},
                                           "length" if i == tokens - 1 else None)))
                await writer.drain()
                await asyncio.sleep(step)
            usage = {"prompt_tokens": 16, "completion_tokens": tokens, "total_tokens": 16 + tokens}
            writer.write(chunked(chunk(0, created, {}, usage=usage)) + chunked(b"data: [DONE]\n\n") + b"0\r\n\r\n")
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, ValueError):
        pass
    finally:
        writer.close()


def serve(sock: socket.socket, step: float) -> None:
    async def main() -> None:
        server = await asyncio.start_server(lambda r, w: handle(r, w, step), sock=sock, limit=1 << 20)
        async with server:
            await server.serve_forever()

    asyncio.run(main())


def listening_socket(port: int) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(1024)
    sock.setblocking(False)
    return sock


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="processes (default 4)")
    parser.add_argument("--step-ms", type=float, default=0.0, help="wait between tokens (default 0: as fast as it can)")
    args = parser.parse_args(argv)
    workers = [multiprocessing.Process(target=serve, args=(listening_socket(args.port), args.step_ms / 1000), daemon=True)
               for _ in range(args.workers)]
    for w in workers:
        w.start()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # bench.load stops it so: the workers go too
    try:
        for w in workers:
            w.join()
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        for w in workers:
            w.terminate()


if __name__ == "__main__":
    main()
