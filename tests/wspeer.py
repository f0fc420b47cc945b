"""A real WebSocket peer (the ``websockets`` package) in a process of its own,
for tests/test_tunnel_e2e.py: asyncio must not run inside trial's reactor.

``wspeer.py serve``: an echo server on 127.0.0.1, port 0; prints
``{"port": N}``, then ``{"open": headers}`` per connection (the handshake
headers it received) and ``{"closed": true}`` when one ends.

``wspeer.py client URL MODE [AUTHORIZATION]``: connects and sends ``hello``
and prints ``{"echo": text}``, or ``{"status": N}`` when the handshake is
refused.  MODE ``wait``: then waits for a line on stdin, sends ``bye``, prints
its echo and closes.  MODE ``quiet``: sends nothing more and prints
``{"closed": seconds}`` once the connection is closed under it.  MODE
``chatty``: sends ``tick`` every 0.2 s until the connection is closed, then
prints ``{"closed": seconds}``.
"""

import asyncio
import json
import sys
import time


def say(**doc):
    print(json.dumps(doc), flush=True)


async def serve():
    from websockets.asyncio.server import serve as ws_serve

    async def echo(ws):
        say(open=[[k, v] for k, v in ws.request.headers.raw_items()])
        try:
            async for message in ws:
                await ws.send(message)
        finally:
            say(closed=True)

    async with ws_serve(echo, "127.0.0.1", 0, ping_interval=None) as server:
        say(port=server.sockets[0].getsockname()[1])
        await asyncio.Future()


async def client(url, mode, authorization=None):
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed, InvalidStatus

    headers = {"Authorization": authorization} if authorization else {}
    try:
        ws = await connect(url, additional_headers=headers,
                           ping_interval=None, open_timeout=10)
    except InvalidStatus as e:
        say(status=e.response.status_code)
        return
    await ws.send("hello")
    say(echo=await ws.recv())
    start = time.monotonic()
    try:
        if mode == "wait":
            await asyncio.get_running_loop().run_in_executor(
                None, sys.stdin.readline)
            await ws.send("bye")
            say(echo=await ws.recv())
            await ws.close()
            return
        while True:
            if mode == "chatty":
                await ws.send("tick")
            await asyncio.wait_for(ws.recv(), 0.2 if mode == "chatty"
                                   else 60)
            if mode == "chatty":
                await asyncio.sleep(0.2)
    except (ConnectionClosed, OSError):
        say(closed=time.monotonic() - start)


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        asyncio.run(serve())
    else:
        asyncio.run(client(*sys.argv[2:]))
