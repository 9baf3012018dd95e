"""Fleet-only gateway: the one SuperLink port that other machines can reach.

Flower 1.42 serves the Fleet API (SuperNodes), the Control API (`flwr run/stop/list`,
`flwr supernode register`) and the Runtime API on ONE host:port, and in the open-source
release the Control API has no account authentication (the `--control-api-address` flag is
deprecated and ignored). Listening on a public interface therefore lets anyone who can open a
TLS connection -- every client holds `ca.crt` -- register nodes and run an arbitrary ServerApp.

So the SuperLink listens on 127.0.0.1 only (`start_superlink.sh`), and this gateway listens on
the public address with the same server certificate and forwards exactly the Fleet API
(`POST /v1/fleet/...`, what a SuperNode speaks) to it. Everything else gets 404 and never
reaches the SuperLink. Operators use the Control API on the server itself (or through an SSH
tunnel to its loopback port).

    python deploy/fleet_gateway.py --listen 0.0.0.0:9093 --upstream https://127.0.0.1:9095 \\
        --certfile server.pem --keyfile server.key --ca-file ca.crt

What one sender can hold here is bounded: a request body is streamed to the SuperLink as it
arrives (never buffered whole) and cut with 413 once it passes `--max-body-mb`, whatever its
framing (Content-Length or chunked); a request must be done within `--request-timeout` (else 408);
at most `--max-connections` connections are served at once (uvicorn's `limit_concurrency`: a
request beyond it gets 503). The HTTP parsing is uvicorn's (h11), as before.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import ssl
import sys
from typing import AsyncIterator, Sequence

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

FLEET_PREFIX = "/v1/fleet/"
MAX_BODY_BYTES = 512 << 20
REQUEST_TIMEOUT_S = 300.0
MAX_CONNECTIONS = 256
# Hop-by-hop headers (RFC 9110 7.6.1) and those each connection sets for itself. Bodies are passed
# through as raw bytes, so Content-Length and Content-Encoding stay true and are kept.
_DROP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
         "transfer-encoding", "upgrade", "host"}

log = logging.getLogger("fellrec.fleet_gateway")


def is_fleet_call(method: str, path: str) -> bool:
    """Only a SuperNode's calls pass: POST /v1/fleet/<name>, nothing nested, nothing relative."""
    if method != "POST" or not path.startswith(FLEET_PREFIX):
        return False
    rest = path[len(FLEET_PREFIX):]
    return bool(rest) and all(c.isalnum() or c == "-" for c in rest)


class _BodyTooLarge(Exception):
    pass


async def _capped(chunks: AsyncIterator[bytes], limit: int) -> AsyncIterator[bytes]:
    """The body as it arrives, cut once it passes `limit` bytes, however it is framed."""
    seen = 0
    async for chunk in chunks:
        seen += len(chunk)
        if seen > limit:
            raise _BodyTooLarge
        yield chunk


async def _relay(reply: httpx.Response) -> AsyncIterator[bytes]:
    """The SuperLink's reply as it arrives; its connection is released even if our client leaves."""
    try:
        async for chunk in reply.aiter_raw():
            yield chunk
    finally:
        await reply.aclose()


def make_app(upstream: str, ca_file: str | None, max_body_bytes: int = MAX_BODY_BYTES,
             request_timeout_s: float = REQUEST_TIMEOUT_S) -> Starlette:
    verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=ca_file) if ca_file else True
    if upstream.startswith("http://"):
        verify = False
    client = httpx.AsyncClient(base_url=upstream, verify=verify,
                               timeout=httpx.Timeout(request_timeout_s, connect=10.0),
                               follow_redirects=False, trust_env=False)
    too_large = {"detail": f"request body over {max_body_bytes} bytes"}

    async def forward(request: Request) -> Response:
        path = request.url.path
        if not is_fleet_call(request.method, path):
            return JSONResponse({"detail": "this port serves the Flower Fleet API only; the Control API listens "
                                           "on the server's loopback interface"}, status_code=404)
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > max_body_bytes):
            return JSONResponse(too_large, status_code=413)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _DROP}
        try:
            async with asyncio.timeout(request_timeout_s):  # the whole exchange, slow senders included
                upstream_request = client.build_request("POST", path, headers=headers,
                                                        content=_capped(request.stream(), max_body_bytes))
                reply = await client.send(upstream_request, stream=True)
        except _BodyTooLarge:
            return JSONResponse(too_large, status_code=413)
        except ClientDisconnect:  # the sender left mid-upload: the SuperLink's request is dropped too
            return Response(status_code=400)
        except TimeoutError:
            return JSONResponse({"detail": f"request not done within {request_timeout_s:g} s"}, status_code=408)
        except httpx.HTTPError as err:
            log.warning("SuperLink unreachable at %s: %s", upstream, err)
            return JSONResponse({"detail": "the SuperLink is not reachable"}, status_code=503)
        out = {k: v for k, v in reply.headers.items() if k.lower() not in _DROP}
        return StreamingResponse(_relay(reply), status_code=reply.status_code, headers=out)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await client.aclose()

    methods = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
    return Starlette(routes=[Route("/{path:path}", forward, methods=methods)], lifespan=lifespan)


def server_config(argv: Sequence[str] | None = None) -> uvicorn.Config:
    """The gateway's uvicorn server from its command line (what `main` runs)."""
    p = argparse.ArgumentParser(prog="fleet_gateway.py", description=__doc__.split("\n")[0])
    p.add_argument("--listen", required=True, help="HOST:PORT other machines connect to")
    p.add_argument("--upstream", required=True, help="the SuperLink on loopback, e.g. https://127.0.0.1:9095")
    p.add_argument("--certfile", help="server certificate (the SuperLink's)")
    p.add_argument("--keyfile", help="its private key")
    p.add_argument("--ca-file", help="CA that signed the SuperLink's certificate (to verify the upstream)")
    p.add_argument("--max-body-mb", type=int, default=MAX_BODY_BYTES >> 20,
                   help="largest request body, however framed (more: 413)")
    p.add_argument("--request-timeout", type=float, default=REQUEST_TIMEOUT_S,
                   help="seconds a request may take, its upload included (more: 408)")
    p.add_argument("--max-connections", type=int, default=MAX_CONNECTIONS,
                   help="connections served at once; a request on one more gets 503")
    args = p.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    if not host or not port.isdigit():
        p.error(f"--listen {args.listen!r} must be HOST:PORT")
    if bool(args.certfile) != bool(args.keyfile):
        p.error("TLS needs both --certfile and --keyfile")
    if not args.certfile and host not in ("127.0.0.1", "localhost", "::1", "[::1]"):
        p.error("refusing to serve the Fleet API without TLS on a non-loopback address")
    if args.max_body_mb < 1 or args.max_connections < 1 or args.request_timeout <= 0:
        p.error("--max-body-mb, --max-connections and --request-timeout must be positive")
    app = make_app(args.upstream, args.ca_file, args.max_body_mb << 20, args.request_timeout)
    # uvicorn counts the connection of the request it is deciding on, hence + 1
    return uvicorn.Config(app, host=host.strip("[]"), port=int(port), ssl_certfile=args.certfile,
                          ssl_keyfile=args.keyfile, log_level="info", access_log=False,
                          limit_concurrency=args.max_connections + 1)


def main(argv: list[str] | None = None) -> None:
    config = server_config(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    print(f"fleet gateway: {config.host}:{config.port} (Fleet API only)", file=sys.stderr, flush=True)
    uvicorn.Server(config).run()


if __name__ == "__main__":
    main()
