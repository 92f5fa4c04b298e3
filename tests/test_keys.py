"""Ed25519 key loading: every accepted format, and clear refusals that never echo key bytes."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from pipeline.binance.keys import (
    KeyLoadError,
    generate_keypair,
    load_private_key,
    load_public_key,
    parse_private_key,
    public_key_pem,
)

SEED_HEX = "8244616b4606b8400a66fd0efcbea9af1611fd2540e975b3808b20007d9bcf6e"
PUBLIC_HEX = "19420abfd752a565c15625e9da6eaf0086fc40c14960183214442c14996a800d"
SEED = bytes.fromhex(SEED_HEX)
DER = bytes.fromhex("302e020100300506032b657004220420") + SEED
PEM = (
    b"-----BEGIN PRIVATE KEY-----\n"
    b"MC4CAQAwBQYDK2VwBCIEIIJEYWtGBrhACmb9Dvy+qa8WEf0lQOl1s4CLIAB9m89u\n"
    b"-----END PRIVATE KEY-----\n"
)
SECRETS = [SEED_HEX, base64.b64encode(SEED).decode(), "MC4CAQAwBQYDK2VwBCIEIIJEYWtGBrhACmb9"]


def _assert_no_material(message: str) -> None:
    for secret in SECRETS:
        assert secret not in message
        assert secret[:12] not in message


def write_key(tmp_path: Path, name: str, data: bytes, mode: int = 0o600) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    os.chmod(path, mode)
    return path


@pytest.mark.parametrize(
    "data",
    [
        SEED_HEX.encode(),
        SEED_HEX.upper().encode() + b"\n",
        base64.b64encode(SEED),
        (SEED_HEX + PUBLIC_HEX).encode(),
        base64.b64encode(SEED + bytes.fromhex(PUBLIC_HEX)),
        DER,
        base64.b64encode(DER),
        PEM,
        b"\n  " + PEM,
    ],
    ids=["hex", "hex-upper", "b64", "hex64", "b64-64", "der", "der-b64", "pem", "pem-ws"],
)
def test_accepted_formats(data: bytes) -> None:
    signer = parse_private_key(data)
    assert signer.public_key.hex() == PUBLIC_HEX


def test_pem_from_openssl_style_generation_and_files(tmp_path: Path) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    path = write_key(tmp_path, "k.pem", pem)
    signer = load_private_key(path)
    raw_pub = key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    assert signer.public_key == raw_pub
    der = key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    assert load_private_key(write_key(tmp_path, "k.der", der)).public_key == raw_pub


def test_encrypted_pem(tmp_path: Path) -> None:
    key = ed25519.Ed25519PrivateKey.from_private_bytes(SEED)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"correct horse"),
    )
    path = write_key(tmp_path, "enc.pem", pem)
    assert load_private_key(path, "correct horse").public_key.hex() == PUBLIC_HEX
    with pytest.raises(KeyLoadError, match="passphrase is required"):
        load_private_key(path)
    with pytest.raises(KeyLoadError, match="wrong passphrase") as exc:
        load_private_key(path, b"wrong")
    assert "wrong" not in str(exc.value).replace("wrong passphrase", "")


def test_passphrase_for_plain_key_is_an_error() -> None:
    with pytest.raises(KeyLoadError, match="not encrypted"):
        parse_private_key(PEM, b"pw")


def test_rsa_key_refused_clearly() -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    with pytest.raises(KeyLoadError, match="RSA private key, not Ed25519") as exc:
        parse_private_key(pem)
    assert pem.decode()[40:80] not in str(exc.value)


def test_ec_key_refused_clearly() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    with pytest.raises(KeyLoadError, match="not Ed25519"):
        parse_private_key(pem)


def test_hmac_secret_refused_clearly() -> None:
    secret = "NhqPtmdSJYdKjVHjA7PZj4Mge3R5YNiP1e3UZjInClVN65XAbvqqM6A7H5fATj0j"
    with pytest.raises(KeyLoadError, match="HMAC secret") as exc:
        parse_private_key(secret)
    assert secret[:10] not in str(exc.value)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"   \n",
        b"hello world, not a key!",
        b"-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2Vw\n-----END PRIVATE KEY-----\n",
        b"-----BEGIN PUBLIC KEY-----\n"
        b"MCowBQYDK2VwAyEAGUIKv9dSpWXBViXp2m6vAIb8QMFJYBgyFEQsFJlqgA0=\n"
        b"-----END PUBLIC KEY-----\n",
        base64.b64encode(SEED[:20]),
        (SEED_HEX + "00" * 32).encode(),  # 64 bytes whose second half is not the public key
        b"0\x82\x01\x00garbage-der",
        b"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI",
    ],
)
def test_garbage_refused_without_echo(data: bytes) -> None:
    with pytest.raises(KeyLoadError) as exc:
        parse_private_key(data)
    message = str(exc.value)
    _assert_no_material(message)
    if len(data) > 8:
        assert data.decode("latin-1")[4:24] not in message or not data.strip()


def test_group_readable_key_file_refused(tmp_path: Path) -> None:
    path = write_key(tmp_path, "k.pem", PEM, mode=0o640)
    with pytest.raises(KeyLoadError, match=r"group/other .*0640.*chmod 600"):
        load_private_key(path)
    os.chmod(path, 0o600)
    assert load_private_key(path).public_key.hex() == PUBLIC_HEX


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(KeyLoadError, match="does not exist"):
        load_private_key(tmp_path / "nope.pem")


def test_generate_keypair(tmp_path: Path) -> None:
    priv, pub = generate_keypair(tmp_path / "keys")
    assert priv.stat().st_mode & 0o777 == 0o600
    signer = load_private_key(priv)
    assert load_public_key(pub) == signer.public_key
    assert public_key_pem(signer) == pub.read_bytes()
    assert pub.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEA")
    with pytest.raises(FileExistsError):
        generate_keypair(tmp_path / "keys")


def test_generate_encrypted_keypair(tmp_path: Path) -> None:
    priv, pub = generate_keypair(tmp_path, passphrase=b"pw")
    assert load_private_key(priv, b"pw").public_key == load_public_key(pub)


def test_load_public_key_refuses_private(tmp_path: Path) -> None:
    with pytest.raises(KeyLoadError):
        load_public_key(write_key(tmp_path, "k.pem", PEM))
