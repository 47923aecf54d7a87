"""TLS material and device enrollment for the backend.

Why here: phones are the one party the operator does not control. By default the device
API stays as FedKit's backend had it (anonymous, so existing apps work unchanged);
``device_auth="token"`` makes every phone route and every gRPC ``Join`` present a
per-device token the operator issued. TLS covers both transports with one certificate:
uvicorn serves HTTPS and Flower's legacy gRPC server takes ``certificates=``.

Tokens are stored as SHA-256 digests in their own table of the registry (the token itself
is shown once, when issued; the registry runs the SQL), so the session processes, which
share the database, check gRPC joins against the same list the HTTP API uses. A token may expire
(``ttl``) and may be valid for one session only (``session``); a session process also
watches the table to cut the live streams of revoked or expired tokens
(``xflwb.server.device_streams``).
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
import os
import secrets
import ssl
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from xflwb.errors import BackendError, InputError
from xflwb.sessions.registry import MAX_DEVICE_NAME, Registry

#: ``device_auth`` values: None (open, FedKit's behaviour) or "token"
DEVICE_AUTH_MODES = (None, "token")
#: where phones may put their token: ``Authorization: Bearer <token>`` or this header
#: (on gRPC: the same names as metadata keys, lower case)
TOKEN_HEADER = "x-device-token"
#: the longest a token may live (``ttl`` in seconds): ten years
MAX_TTL = 10 * 365 * 24 * 3600.0


# -- TLS ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TLSConfig:
    """A server certificate (PEM chain), its key, and the CA that signed it (clients trust
    the CA; Flower's gRPC server wants it too). Without a CA the certificate stands for
    itself (a self-signed server certificate)."""

    cert: Path
    key: Path
    ca: Path | None = None

    @property
    def ca_file(self) -> Path:
        """What clients pass as their trusted roots."""
        return self.ca or self.cert

    def certificates(self) -> tuple[bytes, bytes, bytes]:
        """``(ca, cert, key)`` bytes, the order of Flower's ``start_grpc_server``."""
        return self.ca_file.read_bytes(), self.cert.read_bytes(), self.key.read_bytes()

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the CA certificate (or of the server's, without a CA): what an
        operator reads out to check what a phone trusts."""
        return fingerprint(self.ca_file)

    def as_list(self) -> list[str]:
        """For a session's JSON config."""
        return [str(self.cert), str(self.key), str(self.ca or "")]


def tls_config(tls: Any) -> TLSConfig | None:
    """``Workbench(tls=...)`` as a checked ``TLSConfig``: None, a ``TLSConfig`` (as
    ``make_dev_ca`` returns) or ``(cert, key)`` / ``(cert, key, ca)`` paths. The files must
    exist and the key must match the certificate; errors name the file and the fix."""
    if tls is None:
        return None
    if isinstance(tls, TLSConfig):
        cfg = tls
    elif isinstance(tls, list | tuple) and len(tls) in (2, 3) and all(
            isinstance(p, str | os.PathLike) for p in tls):
        ca = Path(tls[2]) if len(tls) == 3 and str(tls[2]) else None
        cfg = TLSConfig(Path(tls[0]), Path(tls[1]), ca)
    else:
        raise InputError(f"tls must be (cert_path, key_path), (cert_path, key_path, ca_path) "
                         f"or xflwb.server.security.make_dev_ca(dir), got {tls!r}")
    for what, path in (("certificate", cfg.cert), ("key", cfg.key), ("CA", cfg.ca)):
        if path is not None and not Path(path).is_file():
            raise InputError(f"TLS {what} file {str(path)!r} does not exist; for development "
                             "make one with xflwb.server.security.make_dev_ca(dir)")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_cert_chain(cfg.cert, cfg.key)
    except (ssl.SSLError, OSError) as exc:
        raise InputError(f"TLS certificate {str(cfg.cert)!r} and key {str(cfg.key)!r} do not "
                         f"load together ({exc}): pass the PEM certificate chain and its own "
                         "unencrypted private key") from None
    if cfg.ca is not None:
        try:
            ssl.create_default_context(cafile=str(cfg.ca))
        except (ssl.SSLError, OSError) as exc:
            raise InputError(f"TLS CA file {str(cfg.ca)!r} is not a PEM certificate "
                             f"({exc})") from None
    return cfg


def fingerprint(pem_path: str | os.PathLike[str]) -> str:
    """``AB:CD:…``: SHA-256 of the first certificate's DER bytes in a PEM file."""
    text = Path(pem_path).read_text()
    start = text.find("-----BEGIN CERTIFICATE-----")
    end = text.find("-----END CERTIFICATE-----", start)
    if start < 0 or end < 0:
        raise InputError(f"{pem_path} holds no PEM certificate")
    der = ssl.PEM_cert_to_DER_cert(text[start:end + len("-----END CERTIFICATE-----")])
    digest = hashlib.sha256(der).hexdigest().upper()
    return ":".join(digest[i:i + 2] for i in range(0, len(digest), 2))


def make_dev_ca(directory: str | os.PathLike[str],
                hosts: Iterable[str] = ("127.0.0.1", "localhost", "::1"),
                days: int = 825) -> TLSConfig:
    """A self-signed CA and a server certificate it signs, for development only.

    Writes ``ca.pem`` (install or pin this on phones), ``ca.key``, ``server.pem`` and
    ``server.key`` (keys readable by the owner only) into ``directory`` and returns the
    ``TLSConfig`` to pass as ``Workbench(tls=...)``. ``hosts`` go into the certificate's
    subject alternative names (IP addresses and DNS names; add the address phones dial).
    Files already there are reused: the CA always while it is valid (phones that trust it
    keep trusting it across kernel restarts), the server certificate while it covers
    ``hosts`` (else a new one is signed by the same CA). Needs ``cryptography``."""
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    except ImportError:  # pragma: no cover - cryptography ships with flwr
        raise ImportError("make_dev_ca needs the 'cryptography' package (pip install "
                          "cryptography), or bring your own certificate and key") from None
    import datetime as dt

    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    hosts = list(dict.fromkeys(str(h) for h in hosts))
    if not hosts:
        raise InputError("make_dev_ca needs at least one host name or IP address")
    out = TLSConfig(folder / "server.pem", folder / "server.key", folder / "ca.pem")
    ca_key_path = folder / "ca.key"
    soon = dt.datetime.now(dt.UTC) + dt.timedelta(days=1)

    def load(path: Path) -> Any:
        return x509.load_pem_x509_certificate(path.read_bytes())

    def pem_key(k: ec.EllipticCurvePrivateKey) -> bytes:
        return k.private_bytes(serialization.Encoding.PEM,
                               serialization.PrivateFormat.PKCS8,
                               serialization.NoEncryption())

    ca_ok = out.ca_file.is_file() and ca_key_path.is_file() and load(
        out.ca_file).not_valid_after_utc > soon
    if ca_ok and out.cert.is_file() and out.key.is_file():
        existing = load(out.cert)
        try:
            san = existing.extensions.get_extension_for_class(x509.SubjectAlternativeName)
            names = {str(v) for v in san.value.get_values_for_type(x509.DNSName)}
            names |= {str(v) for v in san.value.get_values_for_type(x509.IPAddress)}
        except x509.ExtensionNotFound:
            names = set()
        if existing.not_valid_after_utc > soon and {_canonical_host(h) for h in hosts} <= names:
            return out

    now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    until = now + dt.timedelta(days=int(days))
    if ca_ok:
        ca = load(out.ca_file)
        ca_key = cast(ec.EllipticCurvePrivateKey,  # the EC key this function wrote before
                      serialization.load_pem_private_key(ca_key_path.read_bytes(),
                                                         password=None))
        ca_name = ca.subject
    else:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "xflwb development CA"),
                             x509.NameAttribute(NameOID.ORGANIZATION_NAME,
                                                "xflwb (dev only)")])
        ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
              .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
              .not_valid_before(now).not_valid_after(until)
              .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
              .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                           crl_sign=True, content_commitment=False,
                                           key_encipherment=False, data_encipherment=False,
                                           key_agreement=False, encipher_only=False,
                                           decipher_only=False), critical=True)
              .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                             critical=False)
              .sign(ca_key, hashes.SHA256()))
        _write(ca_key_path, pem_key(ca_key), private=True)
        _write(out.ca_file, ca.public_bytes(serialization.Encoding.PEM))
    key = ec.generate_private_key(ec.SECP256R1())
    alt: list[x509.GeneralName] = []
    for h in hosts:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            alt.append(x509.DNSName(h))
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(until)
            .add_extension(x509.SubjectAlternativeName(alt), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    _write(out.key, pem_key(key), private=True)
    _write(out.cert, cert.public_bytes(serialization.Encoding.PEM))
    return out


def _canonical_host(h: str) -> str:
    try:
        return str(ipaddress.ip_address(h))
    except ValueError:
        return h


def _write(path: Path, data: bytes, private: bool = False) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


# -- device tokens ------------------------------------------------------------------------------
def check_device_auth(mode: Any) -> str | None:
    """``device_auth`` normalised: None / "none" / "open" → None, "token" → "token"."""
    if mode is None or (isinstance(mode, str) and mode.lower() in ("none", "open", "")):
        return None
    if isinstance(mode, str) and mode.lower() == "token":
        return "token"
    raise InputError(f"device_auth must be None (open, as FedKit's backend) or 'token' "
                     f"(phones present a token issued with wb.issue_device_token), got "
                     f"{mode!r}")


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


class TokenRefused(BackendError):
    """A device token that may not be used here, with the reason a phone can act on.
    ``scope``: the token is valid, only not for this session (HTTP 403 / gRPC
    PERMISSION_DENIED rather than 401 / UNAUTHENTICATED)."""

    def __init__(self, reason: str, scope: bool = False) -> None:
        super().__init__(reason)
        self.scope = scope


UNKNOWN_TOKEN = ("unknown device: present the token the operator issued (wb.issue_device_"
                 "token, %xfl_server token, xflwb token issue) as 'Authorization: Bearer "
                 f"<token>' or '{TOKEN_HEADER}'")


def check_ttl(ttl: Any) -> float | None:
    """``ttl`` (seconds a token lives) as a float in (0, MAX_TTL], or None; ValueError."""
    if ttl is None:
        return None
    if isinstance(ttl, bool) or not isinstance(ttl, int | float) \
            or not math.isfinite(ttl) or not 0 < ttl <= MAX_TTL:
        raise InputError(f"ttl must be a number of seconds in (0, {MAX_TTL:.0f}] (ten years) "
                         f"or None (the token never expires), got {ttl!r}")
    return float(ttl)


def check_session_scope(session: Any) -> int | None:
    """``session`` (the one session id a token is valid for) as an int ≥ 1, or None. A
    session handle (anything with an ``id``) stands for its id."""
    if session is None:
        return None
    value = getattr(session, "id", session)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value < 2**63:
        raise InputError(f"session must be a session id (a positive integer, e.g. s.id) or "
                         f"None (valid for every session), got {session!r}")
    return int(value)


def token_state(row: Mapping[str, Any], now: float) -> str | None:
    """Why a stored token row (``Registry.device_token``) is no longer valid ("revoked …" /
    "expired …"), else None."""
    if row["revoked"] is not None:
        return (f"device token {row['id']} of {row['device']!r} was revoked at "
                f"{_when(row['revoked'])}")
    if row["expires"] is not None and row["expires"] <= now:
        return (f"device token {row['id']} of {row['device']!r} expired at "
                f"{_when(row['expires'])}")
    return None


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def _row(row: Mapping[str, Any]) -> dict[str, Any]:
    return {"id": int(row["id"]), "device": row["device"], "created": row["created"],
            "expires": row["expires"], "session": row["session_id"]}


class TokenStore:
    """Per-device tokens in the registry (digests only): issuing, checking, revoking."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def issue(self, device: str, ttl: float | None = None,
              session: int | None = None) -> dict[str, Any]:
        """A new token for ``device`` (a label, e.g. "pixel-7 of Ana"); the returned
        ``token`` is shown only now. A device may hold several tokens (rotation).
        ``ttl``: seconds until it expires (None: never); ``session``: the one session id
        it is valid for (None: every session)."""
        if not isinstance(device, str) or not device.strip() or len(device) > MAX_DEVICE_NAME \
                or not device.isprintable():
            raise InputError(f"device must be a printable name of 1 to {MAX_DEVICE_NAME} "
                             f"characters, got {device!r}")
        ttl, session = check_ttl(ttl), check_session_scope(session)
        token = secrets.token_urlsafe(32)
        expires = None if ttl is None else time.time() + ttl
        row = self.registry.add_device_token(device.strip(), _digest(token), expires, session)
        return {**row, "token": token}

    def check(self, token: str | None, session: int | None = None) -> dict[str, Any]:
        """The token's row (id, device, created, expires, session) when it is known, not
        revoked, not expired and valid for ``session`` (None: no session asked, e.g. the
        model download); else ``TokenRefused`` with the reason."""
        if not token or len(token) > 512:
            raise TokenRefused(UNKNOWN_TOKEN)
        row = self.registry.device_token(_digest(token))
        if row is None:
            raise TokenRefused(UNKNOWN_TOKEN)
        why = token_state(row, time.time())
        if why is not None:
            raise TokenRefused(f"{why}: ask the operator for a new one")
        scope = row["session_id"]
        if session is not None and scope is not None and scope != session:
            raise TokenRefused(f"device token {row['id']} of {row['device']!r} is valid only "
                               f"for session {scope}, not session {session}", scope=True)
        return _row(row)

    def verify(self, token: str | None, session: int | None = None) -> dict[str, Any] | None:
        """The token's row when it is valid (``check``), else None."""
        try:
            return self.check(token, session)
        except TokenRefused:
            return None

    def revocation_mark(self) -> tuple[int, float]:
        """(revoked tokens, newest revocation time): changes whenever a token is revoked,
        so a session process polls this one cheap row instead of every live token."""
        return self.registry.device_token_revocations()

    def invalid(self, ids: Iterable[int]) -> dict[int, str]:
        """Of the token ids ``ids``, those revoked or expired now, each with the reason."""
        wanted = sorted({int(i) for i in ids})
        if not wanted:
            return {}
        now, out = time.time(), {}
        for row in self.registry.device_tokens_by_id(wanted):
            why = token_state(row, now)
            if why is not None:
                out[int(row["id"])] = why
        return out

    def revoke(self, device_or_id: str | int) -> int:
        """Revoke one token (by id) or every token of a device (by name); how many. Live
        gRPC streams of a revoked token are cut within about a second (every session
        process polls ``revocation_mark``)."""
        if isinstance(device_or_id, int) and not isinstance(device_or_id, bool):
            return self.registry.revoke_device_tokens(token_id=device_or_id)
        return self.registry.revoke_device_tokens(device=str(device_or_id))

    def list(self) -> list[dict[str, Any]]:
        """Every token ever issued (id, device, created, expires, session, revoked); never
        the token."""
        return self.registry.list_device_tokens()


def token_from_headers(headers: Mapping[str, str]) -> str | None:
    """A phone's token from ``Authorization: Bearer <token>`` or ``X-Device-Token``
    (header names compared case-insensitively; gRPC metadata keys are lower case)."""
    lower = {str(k).lower(): v for k, v in headers.items()}
    auth = lower.get("authorization")
    if isinstance(auth, str) and auth[:7].lower() == "bearer ":
        return auth[7:].strip() or None
    value = lower.get(TOKEN_HEADER)
    return value.strip() if isinstance(value, str) and value.strip() else None


def grpc_interceptor(store: TokenStore, session: int | None = None) -> Any:
    """A gRPC server interceptor refusing calls without a valid device token in their
    metadata (before the stream registers a client): UNAUTHENTICATED for an unknown,
    revoked or expired token, PERMISSION_DENIED for a token scoped to another session than
    ``session``, each with the reason."""
    import grpc

    def denied(code: Any, reason: str) -> Any:
        def deny(_requests: Any, context: Any) -> Any:
            context.abort(code, reason)
            yield  # pragma: no cover - abort raises

        return grpc.stream_stream_rpc_method_handler(deny)

    class DeviceTokenInterceptor(grpc.ServerInterceptor):  # type: ignore[misc]  # grpc: no stubs
        def intercept_service(self, continuation: Any, details: Any) -> Any:
            metadata = {k: v for k, v in (details.invocation_metadata or ())
                        if isinstance(v, str)}
            try:
                store.check(token_from_headers(metadata), session)
            except TokenRefused as exc:
                return denied(grpc.StatusCode.PERMISSION_DENIED if exc.scope
                              else grpc.StatusCode.UNAUTHENTICATED, str(exc))
            return continuation(details)

    return DeviceTokenInterceptor()


# -- what the operator should know ----------------------------------------------------------------
def is_loopback(host: str) -> bool:
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def warnings_for(host: str, tls: TLSConfig | None, device_auth: str | None) -> list[str]:
    """What is open to the network: a non-loopback bind without TLS or device auth."""
    if is_loopback(host):
        return []
    out = []
    if tls is None:
        out.append(f"listening on {host} without TLS: model files, updates and tokens "
                   "travel in clear text on the network (pass tls=(cert, key), or "
                   "xflwb.server.security.make_dev_ca(dir) for development)")
    if device_auth is None:
        out.append(f"listening on {host} without device authentication: any device that "
                   "reaches this address can download the model and send updates (pass "
                   "device_auth='token' and issue tokens with wb.issue_device_token)")
    return out


__all__ = [
    "DEVICE_AUTH_MODES",
    "MAX_TTL",
    "TOKEN_HEADER",
    "TLSConfig",
    "TokenRefused",
    "TokenStore",
    "check_device_auth",
    "check_session_scope",
    "check_ttl",
    "fingerprint",
    "grpc_interceptor",
    "is_loopback",
    "make_dev_ca",
    "tls_config",
    "token_from_headers",
    "token_state",
    "warnings_for",
]
