"""Load Ed25519 private keys from every format people actually have (binance-protocol.md §3.4).

Accepted: a raw 32-byte seed (hex or base64), a 64-byte libsodium secret (seed||public, hex
or base64, the public half is checked), PKCS#8 DER (binary or base64 text), PEM
(``-----BEGIN PRIVATE KEY-----`` as written by Binance's key generator and
``openssl genpkey -algorithm ed25519``) and encrypted PKCS#8 PEM with a passphrase.
`cryptography` parses the containers; pynacl signs
(:class:`pipeline.binance.signing.Ed25519Signer`).

Everything else (RSA/EC keys, HMAC secrets, public keys, garbage) raises :class:`KeyLoadError`
whose message says what was found and never includes any byte of the input.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import stat
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from pipeline.binance.signing import Ed25519Signer

_PKCS8_ED25519_PREFIX = bytes.fromhex("302e020100300506032b657004220420")
_HEX = re.compile(rb"^[0-9a-fA-F]+$")
_B64 = re.compile(rb"^[A-Za-z0-9+/=_-]+$")
_ALNUM64 = re.compile(rb"^[A-Za-z0-9]{64}$")

PRIVATE_KEY_FILE = "ed25519_private.pem"
PUBLIC_KEY_FILE = "ed25519_public.pem"


class KeyLoadError(ValueError):
    """A private key could not be used. The message never contains key material."""


def check_private_key_permissions(path: str | os.PathLike[str]) -> None:
    """Refuse a key file that group or other may access (like ssh does for its keys)."""
    st = os.stat(path)
    if st.st_mode & 0o077:
        raise KeyLoadError(
            f"private key file {os.fspath(path)!r} is accessible by group/other "
            f"(mode {stat.S_IMODE(st.st_mode):04o}); a private key must be private: "
            f"chmod 600 {os.fspath(path)}"
        )


def load_private_key(
    path: str | os.PathLike[str],
    passphrase: bytes | str | None = None,
    *,
    check_permissions: bool = True,
) -> Ed25519Signer:
    """Read a key file (any accepted format) and return a signer.

    Permissions are checked first so an exposed key is refused before it is even read.
    """
    if check_permissions:
        try:
            check_private_key_permissions(path)
        except FileNotFoundError:
            raise KeyLoadError(f"private key file {os.fspath(path)!r} does not exist") from None
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise KeyLoadError(
            f"cannot read private key file {os.fspath(path)!r}: {exc.strerror}"
        ) from None
    return parse_private_key(data, passphrase)


def parse_private_key(data: bytes | str, passphrase: bytes | str | None = None) -> Ed25519Signer:
    """Turn key bytes/text in any accepted format into an :class:`Ed25519Signer`."""
    if isinstance(data, str):
        data = data.encode("utf-8", "replace")
    if isinstance(passphrase, str):
        passphrase = passphrase.encode("utf-8")
    stripped = data.strip()
    if not stripped:
        raise KeyLoadError("the private key is empty")
    if stripped.startswith(b"-----BEGIN"):
        return _from_pem(stripped, passphrase)
    if data.startswith(b"\x30") and not _B64.match(b"".join(stripped.split())):
        return _from_der(data, passphrase)  # ASN.1 SEQUENCE: binary DER
    if stripped.startswith(b"ssh-") or b"OPENSSH" in stripped:
        raise KeyLoadError("this is an OpenSSH key; export the Ed25519 key as PKCS#8 PEM")
    return _from_text(stripped, passphrase)


def _signer_from_crypto(key: object) -> Ed25519Signer:
    if isinstance(key, ed25519.Ed25519PrivateKey):
        seed = key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        return Ed25519Signer(seed)
    name = type(key).__name__.replace("_", "")
    kind = "RSA" if "RSA" in name.upper() else ("EC" if "EllipticCurve" in name else name)
    raise KeyLoadError(
        f"this is a {kind} private key, not Ed25519; the WS API session logon "
        "(session.logon) only accepts Ed25519 keys"
    )


def _from_pem(data: bytes, passphrase: bytes | None) -> Ed25519Signer:
    header = data.split(b"\n", 1)[0]
    if b"PUBLIC KEY" in header:
        raise KeyLoadError(
            "this is a public key; pass the PRIVATE key (the public one is registered with Binance)"
        )
    if b"OPENSSH" in header:
        raise KeyLoadError("this is an OpenSSH key; export the Ed25519 key as PKCS#8 PEM")
    encrypted = b"ENCRYPTED" in header or b"Proc-Type: 4,ENCRYPTED" in data
    if encrypted and not passphrase:
        raise KeyLoadError("the private key is encrypted; a passphrase is required")
    if passphrase and not encrypted:
        raise KeyLoadError("a passphrase was given but the private key is not encrypted")
    try:
        key = serialization.load_pem_private_key(data, password=passphrase if encrypted else None)
    except TypeError:
        raise KeyLoadError(
            "a passphrase was given but the private key is not encrypted"
            if passphrase and not encrypted
            else "the private key is encrypted; a passphrase is required"
        ) from None
    except ValueError:
        if encrypted:
            raise KeyLoadError("cannot decrypt the private key: wrong passphrase?") from None
        raise KeyLoadError("the PEM private key is malformed or of an unsupported type") from None
    except Exception:
        raise KeyLoadError("the PEM private key is malformed or of an unsupported type") from None
    return _signer_from_crypto(key)


def _from_der(data: bytes, passphrase: bytes | None) -> Ed25519Signer:
    if len(data) == 48 and data.startswith(_PKCS8_ED25519_PREFIX):
        return Ed25519Signer(data[16:])
    try:
        key = serialization.load_der_private_key(data, password=passphrase)
    except TypeError:
        raise KeyLoadError("the DER private key is encrypted; a passphrase is required") from None
    except Exception:
        raise KeyLoadError("the DER private key is malformed or of an unsupported type") from None
    return _signer_from_crypto(key)


def _from_raw(raw: bytes, what: str) -> Ed25519Signer:
    if len(raw) == 32:
        return Ed25519Signer(raw)
    if len(raw) == 64:
        signer = Ed25519Signer(raw[:32])
        if signer.public_key != raw[32:]:
            raise KeyLoadError(
                f"{what} is 64 bytes but its second half is not the public key of its first half "
                "(expected an Ed25519 seed||public secret)"
            )
        return signer
    raise KeyLoadError(f"{what} decodes to {len(raw)} bytes; an Ed25519 seed is 32 (or 64) bytes")


def _from_text(text: bytes, passphrase: bytes | None) -> Ed25519Signer:
    compact = b"".join(text.split())
    if _HEX.match(compact) and len(compact) in (64, 128):
        return _from_raw(binascii.unhexlify(compact), "the hex key")
    if _ALNUM64.match(compact):
        # 64 alphanumerics that are not hex: the shape of a Binance HMAC secret key.
        raise KeyLoadError(
            "this looks like an HMAC secret key (64 letters and digits), not an Ed25519 "
            "private key; session.logon needs an Ed25519 key"
        )
    if _B64.match(compact):
        try:
            if b"-" in compact or b"_" in compact:
                raw = base64.urlsafe_b64decode(compact + b"=" * (-len(compact) % 4))
            else:
                raw = base64.b64decode(compact + b"=" * (-len(compact) % 4), validate=True)
        except (binascii.Error, ValueError):
            raise KeyLoadError("the private key is neither PEM, DER, hex nor base64") from None
        if raw.startswith(b"\x30") and len(raw) not in (32, 64):
            return _from_der(raw, passphrase)
        return _from_raw(raw, "the base64 key")
    raise KeyLoadError("the private key is neither PEM, DER, hex nor base64")


def public_key_pem(signer: Ed25519Signer) -> bytes:
    """The SubjectPublicKeyInfo PEM of a signer's public key (what Binance registers)."""
    pub = ed25519.Ed25519PublicKey.from_public_bytes(signer.public_key)
    return pub.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def load_public_key(path: str | os.PathLike[str]) -> bytes:
    """Raw 32-byte Ed25519 public key from a PEM/DER public key file (for the simulator)."""
    data = Path(path).read_bytes()
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            key = serialization.load_pem_public_key(data)
        else:
            key = serialization.load_der_public_key(data)
    except Exception:
        raise KeyLoadError(f"{os.fspath(path)!r} is not a readable public key") from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise KeyLoadError(f"{os.fspath(path)!r} is not an Ed25519 public key")
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def generate_keypair(
    out_dir: str | os.PathLike[str], passphrase: bytes | None = None
) -> tuple[Path, Path]:
    """Write a new Ed25519 key pair as PKCS#8 PEM (private, mode 0600) + public PEM.

    Refuses to overwrite existing files: silently replacing a registered key locks you out.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    priv_path, pub_path = out / PRIVATE_KEY_FILE, out / PUBLIC_KEY_FILE
    for p in (priv_path, pub_path):
        if p.exists():
            raise FileExistsError(f"{p} already exists; refusing to overwrite a key")
    key = ed25519.Ed25519PrivateKey.generate()
    enc: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase)
        if passphrase
        else serialization.NoEncryption()
    )
    priv_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc)
    pub_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    fd = os.open(priv_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(priv_pem)
    os.chmod(priv_path, 0o600)  # in case the umask widened nothing but a filesystem did
    fd = os.open(pub_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(pub_pem)
    return priv_path, pub_path
