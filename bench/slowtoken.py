"""A token service that answers every introspection after a fixed delay.

Scenario 4 of bench/run.py needs a token service that is slow (nginx cannot
delay an answer easily) and that counts the introspections it saw, to show
that 200 concurrent requests with one new token cost one introspection.

    python bench/slowtoken.py --jwt-file F [--delay 0.1] [--port 0]

prints ``PORT <n>`` on stdout once listening.  ``POST /introspect`` answers
the JWT from F (application/jwt, Cache-Control: max-age=300) after the delay;
``GET /stats`` answers ``{"calls": n}`` at once.  HTTP/1.1 keep-alive,
Content-Length bodies only: enough for phantomd's introspection client.
"""

import argparse
import asyncio
import json
import sys


class TokenService:
    def __init__(self, jwt: bytes, delay: float) -> None:
        self.jwt = jwt
        self.delay = delay
        self.calls = 0

    async def handle(self, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                lines = head.split(b"\r\n")
                method, _, rest = lines[0].partition(b" ")
                path = rest.partition(b" ")[0]
                length = 0
                close = False
                for line in lines[1:]:
                    name, _, value = line.partition(b":")
                    name = name.strip().lower()
                    if name == b"content-length":
                        length = int(value)
                    elif name == b"connection" and b"close" in value.lower():
                        close = True
                if length:
                    await reader.readexactly(length)
                if method == b"POST" and path.startswith(b"/introspect"):
                    self.calls += 1
                    await asyncio.sleep(self.delay)
                    body, ctype = self.jwt, b"application/jwt"
                    extra = b"Cache-Control: max-age=300\r\n"
                    status = b"200 OK"
                elif path == b"/stats":
                    body = json.dumps({"calls": self.calls}).encode()
                    ctype, extra, status = b"application/json", b"", b"200 OK"
                else:
                    body, ctype, extra = b"not found\n", b"text/plain", b""
                    status = b"404 Not Found"
                writer.write(b"HTTP/1.1 %s\r\nContent-Type: %s\r\n"
                             b"Content-Length: %d\r\n%s%s\r\n%s" % (
                                 status, ctype, len(body), extra,
                                 b"Connection: close\r\n" if close else b"",
                                 body))
                await writer.drain()
                if close:
                    return
        finally:
            writer.close()


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jwt-file", required=True)
    p.add_argument("--delay", type=float, default=0.1)
    p.add_argument("--port", type=int, default=0)
    args = p.parse_args()
    with open(args.jwt_file, "rb") as f:
        service = TokenService(f.read().strip(), args.delay)
    server = await asyncio.start_server(service.handle, "127.0.0.1",
                                        args.port, backlog=1024)
    port = server.sockets[0].getsockname()[1]
    sys.stdout.write("PORT %d\n" % port)
    sys.stdout.flush()
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
