"""WS API request signatures (binance-protocol.md §3.2, vectors in §3.5).

The WS API signs ``k=v&k=v`` over *every* param except ``signature``, sorted by name, values
rendered exactly as sent, no percent-encoding, UTF-8 bytes. REST is different (sent order,
percent-encoded) and is deliberately not implemented here so the two cannot be mixed up.

Signers hold key material; their ``repr`` never shows it, and they refuse to be pickled so a
key cannot leak into a multiprocessing queue or a crash dump by accident.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Mapping
from decimal import Decimal
from typing import Any, Protocol

ParamValue = str | int | float | bool | Decimal


def render_value(value: Any) -> str:
    """The text of one param value, as it is both sent and signed.

    Booleans are ``true``/``false`` (``str(True)`` would be wrong), Decimals are written
    without exponent, floats through their shortest round-trip repr. Strings are used as is.
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Decimal):
        return format(value, "f")
    if isinstance(value, float):
        return format(Decimal(repr(value)), "f")
    if isinstance(value, int | str):
        return str(value)
    raise TypeError(f"unsupported WS API param type {type(value).__name__}")


def ws_payload(params: Mapping[str, Any]) -> str:
    """The WS API signature payload: all params but ``signature``, sorted, ``k=v&...``."""
    return "&".join(f"{k}={render_value(params[k])}" for k in sorted(params) if k != "signature")


class Signer(Protocol):
    """Signs a payload; ``kind`` tells the session whether ``session.logon`` can use it."""

    kind: str

    def sign(self, payload: bytes) -> str: ...


class Ed25519Signer:
    """Ed25519 (RFC 8032, pure) signer; base64 output (88 chars)."""

    kind = "ed25519"
    __slots__ = ("_key",)

    def __init__(self, seed: bytes) -> None:
        if len(seed) != 32:
            raise ValueError("an Ed25519 seed is exactly 32 bytes")
        # imported here, not at the top: the config types import the request rules of this
        # package, and a process that never signs (ingest, consumers) should not load libsodium
        import nacl.signing

        self._key = nacl.signing.SigningKey(bytes(seed))

    def sign(self, payload: bytes) -> str:
        return base64.b64encode(self._key.sign(payload).signature).decode("ascii")

    @property
    def public_key(self) -> bytes:
        """Raw 32-byte public key (not secret)."""
        return bytes(self._key.verify_key)

    def verify(self, payload: bytes, signature_b64: str) -> bool:
        """Check a signature against our own public key (used by tests and the simulator)."""
        try:
            self._key.verify_key.verify(payload, base64.b64decode(signature_b64))
        except Exception:
            return False
        return True

    def __repr__(self) -> str:
        return f"<Ed25519Signer public={self.public_key.hex()[:16]}… private=<hidden>>"

    def __reduce__(self) -> Any:
        raise TypeError("signers hold key material and cannot be pickled")


class HmacSigner:
    """HMAC-SHA256 signer (deprecated key type; lowercase hex). Not usable for session.logon."""

    kind = "hmac"
    __slots__ = ("_secret",)

    def __init__(self, secret: str | bytes) -> None:
        self._secret = secret.encode() if isinstance(secret, str) else bytes(secret)

    def sign(self, payload: bytes) -> str:
        return hmac.new(self._secret, payload, hashlib.sha256).hexdigest()

    def __repr__(self) -> str:
        return "<HmacSigner secret=<hidden>>"

    def __reduce__(self) -> Any:
        raise TypeError("signers hold key material and cannot be pickled")


def sign_params(params: Mapping[str, Any], signer: Signer) -> dict[str, Any]:
    """A copy of ``params`` with ``signature`` set over :func:`ws_payload`.

    The caller includes ``apiKey`` and ``timestamp`` (and ``recvWindow`` if used) itself:
    they are signed like any other param.
    """
    out = dict(params)
    out.pop("signature", None)
    out["signature"] = signer.sign(ws_payload(out).encode("utf-8"))
    return out
