#!/usr/bin/env python3
"""Cold-key stampede client for bench/compare.sh.

Opens N connections to HOST:PORT first, then sends `GET PATH` on all of them at once (one request
per connection, `Connection: close`) and reads every answer. Prints one line:

    ok=<2xx answers> errors=<failed or non-2xx> elapsed_ms=<first send to last answer> \
    p50_ms=<median answer time> max_ms=<slowest answer>

Usage: stampede.py HOST PORT PATH [N=1000] [TIMEOUT_S=30]
"""

import asyncio
import sys
import time


async def connect(host, port, timeout):
    return await asyncio.wait_for(asyncio.open_connection(host, port), timeout)


async def exchange(conn, request, start, timeout):
    reader, writer = conn
    try:
        writer.write(request)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(-1), timeout)
        took = time.monotonic() - start
        status_line = data.split(b"\r\n", 1)[0].split()
        ok = len(status_line) >= 2 and status_line[1].startswith(b"2")
        return ok, took
    except (OSError, asyncio.TimeoutError):
        return False, time.monotonic() - start
    finally:
        writer.close()


async def main():
    host, port, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    count = int(sys.argv[4]) if len(sys.argv) > 4 else 1000
    timeout = float(sys.argv[5]) if len(sys.argv) > 5 else 30.0
    request = (
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n"
    ).encode()

    # Connect in waves so the listen backlog is never the bottleneck; nothing is sent yet.
    conns, errors = [], 0
    for i in range(0, count, 200):
        wave = await asyncio.gather(
            *(connect(host, port, timeout) for _ in range(min(200, count - i))),
            return_exceptions=True,
        )
        for c in wave:
            if isinstance(c, BaseException):
                errors += 1
            else:
                conns.append(c)

    start = time.monotonic()
    results = await asyncio.gather(*(exchange(c, request, start, timeout) for c in conns))
    elapsed = time.monotonic() - start
    ok = sum(1 for good, _ in results if good)
    errors += len(results) - ok
    times = sorted(t for _, t in results) or [0.0]
    p50 = times[len(times) // 2]
    print(
        f"ok={ok} errors={errors} elapsed_ms={elapsed * 1000:.0f} "
        f"p50_ms={p50 * 1000:.0f} max_ms={times[-1] * 1000:.0f}"
    )


if __name__ == "__main__":
    asyncio.run(main())
