"""An asyncio streams echo server, or client, as an app would write it.

    asyncio_echo.py server HOST PORT N   serve N connections, then exit 0.
                                         Prints "listening HOST PORT" (getsockname, as
                                         the app sees it) once the listener is up.
    asyncio_echo.py client HOST PORT MSG connect, send MSG, print the echo, exit 0.

Everything goes through asyncio's own calls (start_server, open_connection,
the event loop's non-blocking connect and accept), with no socket code here.
"""

import asyncio
import sys


async def server(host: str, port: int, n: int) -> None:
    served = 0
    done = asyncio.Event()

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal served
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()
            await writer.wait_closed()
            served += 1
            if served >= n:
                done.set()

    srv = await asyncio.start_server(echo, host, port)
    async with srv:
        name = srv.sockets[0].getsockname()
        print("listening", name[0], name[1], flush=True)
        await done.wait()


async def client(host: str, port: int, msg: str) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(msg.encode())
    await writer.drain()
    writer.write_eof()
    data = await reader.read()
    writer.close()
    await writer.wait_closed()
    print(data.decode(), flush=True)


def main() -> None:
    mode, host, port, arg = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    if mode == "server":
        coro = server(host, port, int(arg))
    elif mode == "client":
        coro = client(host, port, arg)
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    asyncio.run(asyncio.wait_for(coro, timeout=30))


if __name__ == "__main__":
    main()
