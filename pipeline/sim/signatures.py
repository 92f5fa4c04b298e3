"""Who sent a WS API request: API keys, Ed25519 signatures and timestamps (binance-protocol.md
sections 3.2 and 4).

Why apart from the request routing: authentication is its own rule set (key format, signature
over the verbatim parameter texts, the timestamp/recvWindow window), with errors Binance words
exactly; :class:`ApiKeyring` checks it all, given the parameters as the client sent them.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from typing import Any

from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey

from pipeline.binance.signing import ws_payload
from pipeline.sim.venue import VenueError, missing

MSG_BAD_KEY = "Invalid API-key, IP, or permissions for action."
MSG_BAD_KEY_FMT = "API-key format invalid."
MSG_BAD_SIG = "Signature for this request is not valid."
MSG_TS_AHEAD = "Timestamp for this request was 1000ms ahead of the server's time."
MSG_TS_OUTSIDE = "Timestamp for this request is outside of the recvWindow."
_API_KEY_RE = re.compile(r"^[A-Za-z0-9_\-]{1,128}$")
_MIN_TIMESTAMP = 1483228800000  # 2017-01-01 (section 4, timestamp sanity)


class NumberText(str):
    """Text of a JSON number, kept verbatim so it can be signed as sent (section 2.2)."""


def param_text(value: Any) -> str:
    """A param value as the text that is signed and validated (section 3.2)."""
    if isinstance(value, str):
        return value
    if value is True:
        return "true"
    if value is False:
        return "false"
    if value is None:
        return ""
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)  # only reached if the raw text was not recovered
    raise TypeError(type(value).__name__)


# The payload rule of section 3.2 (every param but ``signature``, sorted by name, ``k=v`` joined by
# ``&``, no encoding) is the client's own :func:`~pipeline.binance.signing.ws_payload`: one
# implementation, pinned to the reference's vectors by tests/test_signing.py. Over the verbatim
# texts kept here (all ``str``) it renders each value as is. What the simulator checks on its own
# is everything else: the key, the Ed25519 signature against the registered public key, the
# timestamp and recvWindow (:meth:`ApiKeyring.verify`).
signature_payload = ws_payload


_SPKI_ED25519_PREFIX = bytes.fromhex("302a300506032b6570032100")


def parse_public_key(data: bytes | str) -> bytes:
    """An Ed25519 public key as registered with Binance -> the raw 32 bytes ``api_keys`` wants.

    Accepts a PEM ``-----BEGIN PUBLIC KEY-----`` (SubjectPublicKeyInfo, what Binance's key
    generator writes), its base64 body, 64 hex characters, or the raw 32 bytes. Raises
    ValueError with the reason otherwise (for CLI/config errors).
    """
    if isinstance(data, bytes) and len(data) == 32:
        return data
    text = data.decode("ascii", "replace") if isinstance(data, bytes) else data
    text = text.strip()
    if "PRIVATE KEY" in text:
        raise ValueError("this is a private key; register the PUBLIC key")
    if text.startswith("-----BEGIN"):
        text = "".join(line for line in text.splitlines() if not line.startswith("-----"))
    if re.fullmatch(r"[0-9a-fA-F]{64}", text):
        return bytes.fromhex(text)
    try:
        der = base64.b64decode(text, validate=True)
    except binascii.Error:
        raise ValueError("not PEM, base64 or hex") from None
    if len(der) == 32:
        return der
    if len(der) == 44 and der.startswith(_SPKI_ED25519_PREFIX):
        return der[12:]
    raise ValueError("not an Ed25519 public key (expected 32 raw bytes or SubjectPublicKeyInfo)")


class ApiKeyring:
    """The registered API keys (name -> Ed25519 public key) and the checks of a signed request."""

    def __init__(self) -> None:
        self._keys: dict[str, VerifyKey] = {}

    def add(self, name: str, public_key: bytes) -> None:
        """Register an API key (raw 32-byte Ed25519 public key)."""
        if len(public_key) != 32:
            raise ValueError(f"Ed25519 public key for {name[:8]}... must be 32 bytes")
        self._keys[name] = VerifyKey(bytes(public_key))

    @staticmethod
    def check_timestamp(params: Mapping[str, str], now: int) -> None:
        """``timestamp`` (ms, or us from 10**14) within ``recvWindow`` (default 5000) of now."""
        text = params.get("timestamp")
        if not text:
            raise missing("timestamp")
        if not text.isdigit():
            raise VenueError(-1100, "Illegal characters found in parameter 'timestamp'.")
        ts = int(text)
        if ts >= 10**14:  # microseconds (section 4)
            ts //= 1000
        rw_text = params.get("recvWindow")
        recv_window = Decimal(5000)
        if rw_text:
            try:
                recv_window = Decimal(rw_text)
            except InvalidOperation:
                raise VenueError(
                    -1100, "Illegal characters found in parameter 'recvWindow'."
                ) from None
            if recv_window > 60000 or recv_window < 0:
                raise VenueError(-1131, "recvWindow must be less than 60000")
        if ts >= now + 1000:
            raise VenueError(-1021, MSG_TS_AHEAD)
        if now - ts > recv_window or ts < _MIN_TIMESTAMP:
            raise VenueError(-1021, MSG_TS_OUTSIDE)

    def verify(self, params: Mapping[str, str], now: int) -> str:
        """Explicit ``apiKey`` + ``signature`` on the request: returns the account (API key)."""
        key = params.get("apiKey")
        if not key:
            raise missing("apiKey")
        if not _API_KEY_RE.match(key):
            raise VenueError(-2014, MSG_BAD_KEY_FMT)
        verify_key = self._keys.get(key)
        if verify_key is None:
            raise VenueError(-2015, MSG_BAD_KEY)
        sig_text = params.get("signature")
        if not sig_text:
            raise missing("signature")
        self.check_timestamp(params, now)
        try:
            sig = base64.b64decode(sig_text, validate=True)
            if len(sig) != 64:
                raise ValueError("length")
            verify_key.verify(signature_payload(params).encode(), sig)
        except (binascii.Error, ValueError, BadSignatureError):
            raise VenueError(-1022, MSG_BAD_SIG) from None
        return key
