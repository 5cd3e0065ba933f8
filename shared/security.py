"""Transport security and client authentication, for the server and the clients alike.

* TLS / mutual TLS: :func:`server_credentials` and :func:`channel_credentials` turn PEM files into
  gRPC credentials, after checking with Python's ``ssl`` module that they parse and that certificate
  and key belong together (so a bad file is a clear start-up error, not a failed handshake later).
* Per-client tokens: the server holds only ``sha256:<hex>`` digests (``tokens.json``); a client
  reads its raw token with :func:`read_token_file` and sends it as :func:`bearer_metadata`
  (``authorization: Bearer <token>``) on every RPC; :class:`TokenAuthenticator` compares digests
  in constant time.
* ``python -m genfl_server.security make-tokens --clients K --out DIR`` makes a token per client
  (the command lives here; ``genfl_server.security`` is its documented entry point).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import secrets
import ssl
import stat
import sys
from pathlib import Path
from typing import Iterable, Mapping

import click
import grpc

from genfl_shared.runfiles import atomic_write

TOKEN_PREFIX = "sha256:"
_HASH_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
# What a token may contain: it travels as an HTTP/2 header value (visible ASCII, no spaces).
_TOKEN_RE = re.compile(r"^[\x21-\x7e]+$")
AUTH_METADATA_KEY = "authorization"
MAX_TOKEN_CHARS = 1024
MAKE_TOKENS_PROG = "python -m genfl_server.security"

log = logging.getLogger(__name__)


class SecurityError(ValueError):
    """An unusable security setting (tokens file, certificate, key)."""


class SecurityOptionsError(SecurityError):
    """Security options that do not go together (a usage error of the command line)."""


# -- tokens -------------------------------------------------------------------------------------

def token_digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


def hash_token(token: str) -> str:
    """The tokens-file entry for ``token``: ``sha256:<hex of sha256(token)>``."""
    return TOKEN_PREFIX + token_digest(token).hex()


def check_token(token: str) -> str:
    """``token`` if it can travel as a bearer token (visible ASCII, bounded length); else SecurityError."""
    if not token:
        raise SecurityError("the token is empty")
    if len(token) > MAX_TOKEN_CHARS or not _TOKEN_RE.match(token):
        raise SecurityError(f"a token must be 1-{MAX_TOKEN_CHARS} visible ASCII characters without spaces")
    return token


def load_tokens(path: Path) -> dict[str, bytes]:
    """Read a tokens file (JSON ``{client_id: "sha256:<hex>"}``) into {client_id: digest}.

    Refuses anything that is not a hash, so a file of plaintext tokens never reaches a server.
    """
    try:
        data = json.loads(Path(path).read_text())
    except OSError as error:
        raise SecurityError(f"cannot read tokens file {path}: {error.strerror or error}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise SecurityError(f"tokens file {path} is not JSON: {error}") from None
    if not isinstance(data, dict) or not data:
        raise SecurityError(f"tokens file {path} must be a non-empty JSON object {{client_id: \"sha256:<hex>\"}}")
    digests = {}
    for client_id, entry in data.items():
        if not isinstance(entry, str) or not _HASH_RE.match(entry):
            raise SecurityError(
                f"tokens file {path}: the entry for client {client_id!r} is not a hash "
                f"(\"sha256:\" + 64 lowercase hex digits); the server stores hashed tokens only, never "
                f"plaintext ones; make them with: {MAKE_TOKENS_PROG} make-tokens")
        digests[client_id] = bytes.fromhex(entry[len(TOKEN_PREFIX):])
    return digests


def read_token_file(path: Path) -> str:
    """A client's raw token from its token file (from make-tokens); warns when others may read it."""
    try:
        token = Path(path).read_text().strip()
        mode = Path(path).stat().st_mode
    except (OSError, UnicodeDecodeError) as error:
        raise SecurityError(f"cannot read token file {path}: {error}") from None
    try:
        check_token(token)
    except SecurityError as error:
        raise SecurityError(f"token file {path} must hold one token: {error}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("token file %s is readable by others (mode %o); chmod 600 it", path, stat.S_IMODE(mode))
    return token


def bearer_metadata(token: str) -> tuple[tuple[str, str], ...]:
    """The gRPC metadata that carries ``token`` (what :func:`bearer_token` reads back)."""
    return ((AUTH_METADATA_KEY, f"Bearer {token}"),)


def bearer_token(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The token of the ``authorization: Bearer <token>`` entry of gRPC metadata, or None."""
    for key, value in metadata or ():
        if key.lower() != AUTH_METADATA_KEY:
            continue
        if isinstance(value, bytes):
            value = value.decode("ascii", "replace")
        scheme, _, token = value.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    return None


class TokenAuthenticator:
    """Checks that a request carries the token of the client it names; knows only digests."""

    def __init__(self, digests: Mapping[str, bytes]):
        self._digests = dict(digests)
        # Compared against when the client id is unknown, so that an unknown id costs the same work
        # as a known one with a wrong token.
        self._decoy = secrets.token_bytes(32)

    @classmethod
    def from_file(cls, path: Path) -> "TokenAuthenticator":
        return cls(load_tokens(path))

    @property
    def client_ids(self) -> list[str]:
        return sorted(self._digests)

    def check(self, client_id: str, token: str | None) -> bool:
        expected = self._digests.get(client_id)
        actual = token_digest(token) if token else b""
        same = hmac.compare_digest(expected if expected is not None else self._decoy, actual)
        return same and expected is not None


# -- TLS ----------------------------------------------------------------------------------------

def _no_password() -> bytes:  # an encrypted key must fail, never prompt on a terminal
    return b""


def read_pem(path: Path, what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise SecurityError(f"cannot read {what} {path}: {error.strerror or error}") from None
    if b"-----BEGIN " not in data:
        raise SecurityError(f"{what} {path} is not a PEM file (no '-----BEGIN' line)")
    return data


def check_key_pair(cert: Path, key: Path) -> None:
    """Raise SecurityError unless ``cert`` parses and ``key`` is its (unencrypted) private key."""
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(str(cert), str(key), password=_no_password)
    except (ssl.SSLError, OSError, ValueError) as error:
        raise SecurityError(f"certificate {cert} and key {key} are unusable together (the key must be the "
                            f"certificate's, PEM, unencrypted): {error}") from None


def check_ca(ca: Path) -> None:
    """Raise SecurityError unless ``ca`` is a PEM bundle of at least one CA certificate."""
    try:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.load_verify_locations(cafile=str(ca))
    except (ssl.SSLError, OSError, ValueError) as error:
        raise SecurityError(f"CA file {ca} is unusable: {error}") from None
    if not context.get_ca_certs():
        raise SecurityError(f"CA file {ca} holds no CA certificate")


def server_credentials(cert: Path, key: Path, client_ca: Path | None = None) -> grpc.ServerCredentials:
    """TLS credentials; with ``client_ca``, clients must present a certificate signed by it (mTLS)."""
    cert_pem, key_pem = read_pem(cert, "certificate"), read_pem(key, "key")
    check_key_pair(cert, key)
    ca_pem = None
    if client_ca is not None:
        ca_pem = read_pem(client_ca, "client CA")
        check_ca(client_ca)
    return grpc.ssl_server_credentials([(key_pem, cert_pem)], root_certificates=ca_pem,
                                       require_client_auth=ca_pem is not None)


def channel_credentials(ca: Path | None, cert: Path | None = None, key: Path | None = None,
                        server_name: str | None = None) -> grpc.ChannelCredentials | None:
    """A client's TLS credentials, or None (plaintext) without ``ca`` and ``cert``: verify the server
    against ``ca`` (None: the system's CAs); with ``cert`` and ``key``, also present that client
    certificate (mutual TLS). ``server_name`` (verified instead of the dialled host) needs TLS."""
    if (cert is None) != (key is None):
        raise SecurityOptionsError("--tls-cert and --tls-key go together")
    if ca is None and cert is None:
        if server_name is not None:
            raise SecurityOptionsError("--tls-server-name needs TLS (--ca or --tls-cert)")
        return None
    ca_pem = cert_pem = key_pem = None
    if ca is not None:
        ca_pem = read_pem(ca, "CA file")
        check_ca(ca)
    if cert is not None:
        cert_pem, key_pem = read_pem(cert, "certificate"), read_pem(key, "key")
        check_key_pair(cert, key)
    return grpc.ssl_channel_credentials(root_certificates=ca_pem, private_key=key_pem, certificate_chain=cert_pem)


def server_security(cert: Path | None, key: Path | None, client_ca: Path | None = None,
                    tokens_file: Path | None = None
                    ) -> tuple[grpc.ServerCredentials | None, TokenAuthenticator | None]:
    """The server's (TLS credentials or None: plaintext, TokenAuthenticator or None: no tokens)."""
    if (cert is None) != (key is None):
        raise SecurityOptionsError("--tls-cert and --tls-key go together")
    if client_ca is not None and cert is None:
        raise SecurityOptionsError("--client-ca (mutual TLS) needs TLS: also pass --tls-cert and --tls-key")
    credentials = server_credentials(cert, key, client_ca) if cert is not None else None
    authenticator = TokenAuthenticator.from_file(tokens_file) if tokens_file is not None else None
    if authenticator is not None:
        log.info("client tokens required (%d clients in %s)", len(authenticator.client_ids), tokens_file)
        if credentials is None:
            log.warning("--tokens-file without TLS: tokens cross the network in plaintext; "
                        "add --tls-cert/--tls-key")
    return credentials, authenticator


# -- make-tokens tool ---------------------------------------------------------------------------

def make_tokens(out: Path, client_ids: list[str], *, force: bool = False) -> dict[str, str]:
    """Write ``out/tokens.json`` (hashes, for the server) and ``out/<client_id>.token`` (0600, one
    raw token per client). Returns {client_id: token}."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    tokens_file = out / "tokens.json"
    if tokens_file.exists() and not force:
        raise SecurityError(f"{tokens_file} exists; pass --force to replace it (every client needs its new token)")
    tokens = {cid: secrets.token_urlsafe(32) for cid in client_ids}
    for cid, token in tokens.items():
        # Readable by its owner only (0600), also when the file existed: it is replaced, not reused.
        with atomic_write(out / f"{cid}.token", permissions=0o600) as f:
            f.write(token + "\n")
    with atomic_write(tokens_file) as f:
        f.write(json.dumps({cid: hash_token(t) for cid, t in tokens.items()}, indent=2) + "\n")
    return tokens


@click.group(context_settings={"show_default": True, "max_content_width": 100})
def cli() -> None:
    """GenFL security tools."""


@cli.command("make-tokens")
@click.option("--clients", type=click.IntRange(1), required=True, help="Number of clients.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Folder for tokens.json and the client token files.")
@click.option("--prefix", default="client-", help="Client ids are PREFIX + a 3-digit index (the shards' ids).")
@click.option("--force", is_flag=True, default=False, help="Replace an existing tokens.json.")
def make_tokens_command(clients: int, out: Path, prefix: str, force: bool) -> None:
    """Make one random token per client: OUT/tokens.json holds their SHA-256 hashes (give it to
    genfl-server --tokens-file); OUT/<client-id>.token holds each raw token, readable by its owner
    only (give it to that client's genfl-client --token-file)."""
    ids = [f"{prefix}{i:03d}" for i in range(clients)]
    try:
        make_tokens(out, ids, force=force)
    except SecurityError as error:
        raise click.ClickException(str(error)) from None
    click.echo(f"wrote {out / 'tokens.json'} (hashes, for genfl-server --tokens-file) and "
               f"{len(ids)} token files {out / (ids[0] + '.token')} ... (for genfl-client --token-file)")


@cli.command("hash-token")
@click.argument("token_file", type=click.File("r"), default="-")
def hash_token_command(token_file) -> None:
    """Print the tokens.json entry for the token in TOKEN_FILE (default: stdin), to add a client by
    hand: "client-id": "<printed value>"."""
    try:
        click.echo(hash_token(check_token(token_file.read().strip())))
    except SecurityError as error:
        raise click.ClickException(str(error)) from None


def main() -> None:
    cli(sys.argv[1:], prog_name=MAKE_TOKENS_PROG)


if __name__ == "__main__":
    main()
