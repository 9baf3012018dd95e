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
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import ssl
import sys
from typing import AsyncIterator

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

FLEET_PREFIX = "/v1/fleet/"
MAX_BODY_BYTES = 512 << 20
# Hop-by-hop headers (RFC 9110 7.6.1) and those the two connections set for themselves.
_DROP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
         "transfer-encoding", "upgrade", "host", "content-length", "content-encoding"}

log = logging.getLogger("fellrec.fleet_gateway")


def is_fleet_call(method: str, path: str) -> bool:
    """Only a SuperNode's calls pass: POST /v1/fleet/<name>, nothing nested, nothing relative."""
    if method != "POST" or not path.startswith(FLEET_PREFIX):
        return False
    rest = path[len(FLEET_PREFIX):]
    return bool(rest) and all(c.isalnum() or c == "-" for c in rest)


def make_app(upstream: str, ca_file: str | None) -> Starlette:
    verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=ca_file) if ca_file else True
    if upstream.startswith("http://"):
        verify = False
    client = httpx.AsyncClient(base_url=upstream, verify=verify, timeout=httpx.Timeout(300.0, connect=10.0),
                               follow_redirects=False, trust_env=False)

    async def forward(request: Request) -> Response:
        path = request.url.path
        if not is_fleet_call(request.method, path):
            return JSONResponse({"detail": "this port serves the Flower Fleet API only; the Control API listens "
                                           "on the server's loopback interface"}, status_code=404)
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > MAX_BODY_BYTES):
            return JSONResponse({"detail": "request body too large"}, status_code=413)
        body = await request.body()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _DROP}
        try:
            reply = await client.post(path, content=body, headers=headers)
        except httpx.HTTPError as err:
            log.warning("SuperLink unreachable at %s: %s", upstream, err)
            return JSONResponse({"detail": "the SuperLink is not reachable"}, status_code=503)
        out = {k: v for k, v in reply.headers.items() if k.lower() not in _DROP}
        return Response(reply.content, status_code=reply.status_code, headers=out)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await client.aclose()

    methods = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
    return Starlette(routes=[Route("/{path:path}", forward, methods=methods)], lifespan=lifespan)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="fleet_gateway.py", description=__doc__.split("\n")[0])
    p.add_argument("--listen", required=True, help="HOST:PORT other machines connect to")
    p.add_argument("--upstream", required=True, help="the SuperLink on loopback, e.g. https://127.0.0.1:9095")
    p.add_argument("--certfile", help="server certificate (the SuperLink's)")
    p.add_argument("--keyfile", help="its private key")
    p.add_argument("--ca-file", help="CA that signed the SuperLink's certificate (to verify the upstream)")
    args = p.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    if not host or not port.isdigit():
        p.error(f"--listen {args.listen!r} must be HOST:PORT")
    if bool(args.certfile) != bool(args.keyfile):
        p.error("TLS needs both --certfile and --keyfile")
    if not args.certfile and host not in ("127.0.0.1", "localhost", "::1"):
        p.error("refusing to serve the Fleet API without TLS on a non-loopback address")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    print(f"fleet gateway: {args.listen} -> {args.upstream} (Fleet API only)", file=sys.stderr, flush=True)
    uvicorn.run(make_app(args.upstream, args.ca_file), host=host.strip("[]"), port=int(port),
                ssl_certfile=args.certfile, ssl_keyfile=args.keyfile, log_level="info", access_log=False)


if __name__ == "__main__":
    main()
