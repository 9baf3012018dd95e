"""Per-client credentials for the split service.

The server side holds one secret. A client's token is HMAC-SHA256(secret, client key)
in hex: the service recomputes it for every request and compares in constant time, so
it stores no per-client table and can issue a token for a new client offline
(`python -m fellrec_flwr.split.auth issue --secret-file F --client-key node-7`).

Tokens are bearer credentials: run the service with TLS (or on loopback only) so they
cannot be sniffed. Hand a client its token out of band (node_config, a file), never in
the Flower run config, which every node sees.
"""

from __future__ import annotations

import argparse
import hmac
import re
import secrets
import ssl
from hashlib import sha256
from pathlib import Path

KEY_HEADER = "X-Client-Key"
TOKEN_HEADER = "X-Client-Token"
_KEY_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
MIN_SECRET_BYTES = 16


class AuthError(ValueError):
    """Missing or malformed credentials or secret."""


def check_client_key(client_key: str) -> str:
    if not isinstance(client_key, str) or not _KEY_RE.match(client_key):
        raise AuthError(f"client key {client_key!r} must be 1-64 characters of A-Z a-z 0-9 _ . : -")
    return client_key


def issue_token(secret: bytes, client_key: str) -> str:
    """The token of `client_key` under `secret` (hex HMAC-SHA256)."""
    return hmac.new(secret, check_client_key(client_key).encode(), sha256).hexdigest()


def verify_token(secret: bytes, client_key: str, token: str) -> bool:
    try:
        expected = issue_token(secret, client_key)
    except AuthError:
        return False
    return hmac.compare_digest(expected.encode(), str(token).encode())


def auth_headers(client_key: str, token: str) -> dict[str, str]:
    return {KEY_HEADER: client_key, TOKEN_HEADER: token}


def new_secret() -> bytes:
    return secrets.token_hex(32).encode()


def load_secret(path: str | Path) -> bytes:
    data = Path(path).read_bytes().strip()
    if len(data) < MIN_SECRET_BYTES:
        raise AuthError(f"secret in {path} is {len(data)} bytes; use at least {MIN_SECRET_BYTES} "
                        "(create one with `python -m fellrec_flwr.split.auth new-secret FILE`).")
    return data


def write_secret(path: str | Path, secret: bytes | None = None) -> bytes:
    """Write a (new) secret readable by the owner only, atomically: the temporary is created 0600
    and renamed into place, so no reader ever sees the secret with a wider mode."""
    from fellrec_flwr.atomic import atomic_write_bytes

    secret = secret or new_secret()
    atomic_write_bytes(Path(path), secret + b"\n", mode=0o600)
    return secret


def server_ssl_context(cert_file: str | Path, key_file: str | Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(cert_file), str(key_file))
    return ctx


def client_ssl_context(ca_file: str | Path | None = None) -> ssl.SSLContext:
    """Verifies the service certificate against `ca_file` (or the system store)."""
    ctx = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Split-service credentials")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_new = sub.add_parser("new-secret", help="write a new server secret file (mode 600)")
    p_new.add_argument("file")
    p_issue = sub.add_parser("issue", help="print the token of a client key")
    p_issue.add_argument("--secret-file", required=True)
    p_issue.add_argument("--client-key", required=True)
    args = parser.parse_args(argv)
    if args.cmd == "new-secret":
        write_secret(args.file)
        print(f"wrote {args.file}")
    else:
        print(issue_token(load_secret(args.secret_file), args.client_key))


if __name__ == "__main__":
    main()
