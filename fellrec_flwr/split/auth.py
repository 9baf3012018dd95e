"""Per-client credentials for the split service.

The server side holds one secret. A client's token is HMAC-SHA256(secret, client key)
in hex: the service recomputes it for every request and compares in constant time, so
it stores no per-client table and can issue a token for a new client offline
(`python -m fellrec_flwr.split.auth issue --secret-file F --client-key node-7`).

The key and token travel as gRPC call metadata (`x-client-key`, `x-client-token`) on every
call. Tokens are bearer credentials: run the service with TLS (or on loopback only) so they
cannot be sniffed. Hand a client its token out of band (node_config, a file), never in
the Flower run config, which every node sees.
"""

from __future__ import annotations

import argparse
import hmac
import re
import secrets
from hashlib import sha256
from pathlib import Path

KEY_METADATA = "x-client-key"  # gRPC metadata keys are lower case
TOKEN_METADATA = "x-client-token"
# The operator's client key: its token sees service-wide statistics in Info. Never issue it to a client.
OPERATOR_KEY = "operator"
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


def auth_metadata(client_key: str, token: str) -> tuple[tuple[str, str], ...]:
    """The call metadata that authenticates `client_key` (pass as `metadata=` to a gRPC call)."""
    return ((KEY_METADATA, client_key), (TOKEN_METADATA, token))


def new_secret() -> bytes:
    return secrets.token_hex(32).encode()


def load_secret(path: str | Path) -> bytes:
    """The secret in `path`, which only its owner may read or write (as `write_secret` creates it)."""
    mode = Path(path).stat().st_mode
    if mode & 0o077:
        raise AuthError(f"secret file {path} has mode {mode & 0o777:o}: group or others may read or change it; "
                        f"make it owner-only (chmod 600 {path}) and, if others could read it, issue a new secret "
                        "(`python -m fellrec_flwr.split.auth new-secret FILE`) and new tokens.")
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


def server_credentials(cert_file: str | Path, key_file: str | Path) -> "grpc.ServerCredentials":
    """TLS for the gRPC server from a PEM certificate (chain) and its key, checked first with the
    standard library's TLS (gRPC only fails later, when binding the port, without saying why)."""
    import grpc
    import ssl

    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert_file, key_file)
    except ssl.SSLError as err:
        why = ("the key does not match the certificate" if "KEY_VALUES_MISMATCH" in str(err)
               else f"not a PEM certificate and its private key ({err.reason or err})")
        raise AuthError(f"TLS: {cert_file} / {key_file}: {why}; pass the certificate and the key it was "
                        "issued for (deploy/make_certs.sh writes both).") from None
    return grpc.ssl_server_credentials([(Path(key_file).read_bytes(), Path(cert_file).read_bytes())])


def channel_credentials(ca_file: str | Path | None = None) -> "grpc.ChannelCredentials":
    """TLS for a gRPC channel that verifies the service certificate against `ca_file` (or the
    system store when None)."""
    import grpc

    return grpc.ssl_channel_credentials(root_certificates=Path(ca_file).read_bytes() if ca_file else None)


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
