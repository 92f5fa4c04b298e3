"""Every signature test vector of binance-protocol.md §3.5 (HMAC, Ed25519 FIX, derived WS API)."""

from __future__ import annotations

import base64
import pickle
from decimal import Decimal

import pytest

from pipeline.binance.keys import parse_private_key
from pipeline.binance.signing import (
    Ed25519Signer,
    HmacSigner,
    render_value,
    sign_params,
    ws_payload,
)

HMAC_API_KEY = "vmPUZE6mv9SD5VNHk4HlWFsOr6aKE2zvsw0MuIgwCIPy6utIco14y7Ju91duEh8A"
HMAC_SECRET = "NhqPtmdSJYdKjVHjA7PZj4Mge3R5YNiP1e3UZjInClVN65XAbvqqM6A7H5fATj0j"
FIX_PEM = (
    "-----BEGIN PRIVATE KEY-----\n"
    "MC4CAQAwBQYDK2VwBCIEIIJEYWtGBrhACmb9Dvy+qa8WEf0lQOl1s4CLIAB9m89u\n"
    "-----END PRIVATE KEY-----\n"
)
FIX_SEED_HEX = "8244616b4606b8400a66fd0efcbea9af1611fd2540e975b3808b20007d9bcf6e"
FIX_PUBLIC_HEX = "19420abfd752a565c15625e9da6eaf0086fc40c14960183214442c14996a800d"

ORDER_PARAMS = {
    "symbol": "BTCUSDT",
    "side": "SELL",
    "type": "LIMIT",
    "timeInForce": "GTC",
    "quantity": "0.01000000",
    "price": "52000.00",
    "recvWindow": 100,
    "timestamp": 1645423376532,
}

HMAC_PAYLOAD_VECTORS = [
    (
        f"apiKey={HMAC_API_KEY}&price=52000.00&quantity=0.01000000&recvWindow=100&side=SELL"
        "&symbol=BTCUSDT&timeInForce=GTC&timestamp=1645423376532&type=LIMIT",
        "aa1b5712c094bc4e57c05a1a5c1fd8d88dcd628338ea863fec7b88e59fe2db24",
    ),
    (
        f"apiKey={HMAC_API_KEY}&price=0.10000000&quantity=1.00000000&recvWindow=5000&side=BUY"
        "&symbol=１２３４５６&timeInForce=GTC&timestamp=1645423376532&type=LIMIT",
        "b33892ae8e687c939f4468c6268ddd4c40ac1af18ad19a064864c47bae0752cd",
    ),
    (
        f"apiKey={HMAC_API_KEY}&newOrderRespType=ACK&price=52000.00&quantity=0.01000000"
        "&recvWindow=100&side=SELL&symbol=BTCUSDT&timeInForce=GTC&timestamp=1645423376532"
        "&type=LIMIT",
        "cc15477742bd704c29492d96c7ead9414dfd8e0ec4a00f947bb5bb454ddbd08a",
    ),
    # REST vectors: same secret, payload signed as sent (the REST rules are not ours to build,
    # but the HMAC primitive must agree).
    (
        "symbol=LTCBTC&side=BUY&type=LIMIT&timeInForce=GTC&quantity=1&price=0.1"
        "&recvWindow=5000&timestamp=1499827319559",
        "c8db56825ae71d6d79447849e617115f4a920fa2acdcab2b053c4b2838bd6b71",
    ),
    (
        "symbol=%EF%BC%91%EF%BC%92%EF%BC%93%EF%BC%94%EF%BC%95%EF%BC%96&side=BUY&type=LIMIT"
        "&timeInForce=GTC&quantity=1&price=0.1&recvWindow=5000&timestamp=1499827319559",
        "e1353ec6b14d888f1164ae9af8228a3dbd508bc82eb867db8ab6046442f33ef3",
    ),
]


@pytest.mark.parametrize(("payload", "signature"), HMAC_PAYLOAD_VECTORS)
def test_hmac_payload_vectors(payload: str, signature: str) -> None:
    assert HmacSigner(HMAC_SECRET).sign(payload.encode("utf-8")) == signature


# Per-method examples of web-socket-api.md: params (besides apiKey) -> signature.
METHOD_VECTORS = [
    (
        {"timestamp": 1649729878532},
        "1cf54395b336b0a9727ef27d5d98987962bc47aca6e13fe978612d0adee066ed",
    ),
    (
        {
            "symbol": "BTCUSDT",
            "side": "SELL",
            "type": "LIMIT",
            "timeInForce": "GTC",
            "price": "23416.10000000",
            "quantity": "0.00847000",
            "timestamp": 1660801715431,
        },
        "15af09e41c36f3cc61378c2fbe2c33719a03dd5eba8d0f9206fbda44de717c88",
    ),
    (
        {
            "symbol": "BTCUSDT",
            "origClientOrderId": "4d96324ff9d44481926157",
            "timestamp": 1660801715830,
        },
        "33d5b721f278ae17a52f004a82a6f68a70c68e7dd6776ed0be77a455ab855282",
    ),
    (
        {
            "symbol": "BTCUSDT",
            "cancelReplaceMode": "ALLOW_FAILURE",
            "cancelOrigClientOrderId": "4d96324ff9d44481926157",
            "side": "SELL",
            "type": "LIMIT",
            "timeInForce": "GTC",
            "price": "23416.10000000",
            "quantity": "0.00847000",
            "timestamp": 1660813156900,
        },
        "7028fdc187868754d25e42c37ccfa5ba2bab1d180ad55d4c3a7e2de643943dc5",
    ),
    (
        {"symbol": "BTCUSDT", "orderId": 12569099453, "timestamp": 1660801720951},
        "2c3aab5a078ee4ea465ecd95523b77289f61476c2f238ec10c55ea6cb11a6f35",
    ),
    (
        {"symbol": "BTCUSDT", "timestamp": 1660813156812},
        "d632b3fdb8a81dd44f82c7c901833309dd714fe508772a89b0a35b0ee0c48b89",
    ),
    (
        {"symbol": "BTCUSDT", "timestamp": 1660805557200},
        "773f01b6e3c2c9e0c1d217bc043ce383c1ddd6f0e25f8d6070f2b66a6ceaf3a5",
    ),
    (
        {"timestamp": 1660801839480},
        "83303b4a136ac1371795f465808367242685a9e3a42b22edb4d977d0696eb45c",
    ),
]


@pytest.mark.parametrize(("params", "signature"), METHOD_VECTORS)
def test_hmac_method_vectors_through_sign_params(params: dict, signature: str) -> None:
    signed = sign_params({"apiKey": HMAC_API_KEY, **params}, HmacSigner(HMAC_SECRET))
    assert signed["signature"] == signature
    assert "signature" not in params


def test_order_payload_is_sorted_and_signed() -> None:
    params = {"apiKey": HMAC_API_KEY, **ORDER_PARAMS}
    assert ws_payload(params) == HMAC_PAYLOAD_VECTORS[0][0]
    assert sign_params(params, HmacSigner(HMAC_SECRET))["signature"] == HMAC_PAYLOAD_VECTORS[0][1]


def test_non_ascii_symbol_is_not_percent_encoded() -> None:
    params = {
        "apiKey": HMAC_API_KEY,
        "symbol": "１２３４５６",
        "side": "BUY",
        "type": "LIMIT",
        "timeInForce": "GTC",
        "quantity": "1.00000000",
        "price": "0.10000000",
        "recvWindow": 5000,
        "timestamp": 1645423376532,
    }
    assert ws_payload(params) == HMAC_PAYLOAD_VECTORS[1][0]
    assert sign_params(params, HmacSigner(HMAC_SECRET))["signature"] == HMAC_PAYLOAD_VECTORS[1][1]


def test_signature_param_is_excluded_and_replaced() -> None:
    params = {"apiKey": HMAC_API_KEY, **ORDER_PARAMS, "signature": "stale"}
    assert "signature" not in ws_payload(params)
    assert sign_params(params, HmacSigner(HMAC_SECRET))["signature"] == HMAC_PAYLOAD_VECTORS[0][1]


def test_render_values() -> None:
    assert render_value(True) == "true"
    assert render_value(False) == "false"
    assert render_value(Decimal("0.00001000")) == "0.00001000"
    assert render_value(Decimal("1E-7")) == "0.0000001"
    assert render_value(0.1) == "0.1"
    assert render_value(1e-7) == "0.0000001"
    assert render_value(12569099453) == "12569099453"
    with pytest.raises(TypeError):
        render_value(None)
    assert ws_payload({"b": True, "a": 1}) == "a=1&b=true"


def fix_signer() -> Ed25519Signer:
    return parse_private_key(FIX_PEM)


def test_ed25519_fix_vector() -> None:
    signer = fix_signer()
    assert signer.public_key.hex() == FIX_PUBLIC_HEX
    payload = b"\x01".join([b"A", b"EXAMPLE", b"SPOT", b"1", b"20240627-11:17:25.223"])
    assert signer.sign(payload) == (
        "4MHXelVVcpkdwuLbl6n73HQUXUf1dse2PCgT1DYqW9w8AVZ1RACFGM+5UdlGPrQHrgtS3CvsRURC1oj73j8gCA=="
    )


ED25519_WS_VECTORS = [
    (
        {
            "apiKey": "sBRXrJx2DsOraMXOaUovEhgVRcjOvCtQwnWj8VxkOh1xqboS02SPGfKi2h8spZJb",
            "timestamp": 1649729878532,
        },
        "QkxRSX10rV71REvvMibSfvHCKvHoDFDweKdzKXhHhcKIGkHoZPXAPVNsZYgJtf0CuKIm+cVrCqO07JHjZCVpAg==",
    ),
    (
        {
            "apiKey": "sBRXrJx2DsOraMXOaUovEhgVRcjOvCtQwnWj8VxkOh1xqboS02SPGfKi2h8spZJb",
            "timestamp": 1649729878532,
            "recvWindow": 5000,
        },
        "wCEX+NFthTz3SNtwFiAAMUb+dyyUBgPfhVNKR0MBcfO+4SBknQqzpg+uyOYKKUJiPklWT5RfKswfd/hf0CNnDA==",
    ),
    (
        {
            "apiKey": "4yNzx3yWC5bS6YTwEkSRaC0nRmSQIIStAUOh1b6kqaBrTLIhjCpI5lJH8q8R8WNO",
            **ORDER_PARAMS,
        },
        "82wlF5RobwT7JZehRQgOaupNEm5GrAqJj5tqZeCCE6ZxkhlUbWBThOx00q3FVnCKn882P+9p85phztjk4bOMAQ==",
    ),
]


@pytest.mark.parametrize(("params", "signature"), ED25519_WS_VECTORS)
def test_ed25519_derived_ws_vectors(params: dict, signature: str) -> None:
    signer = fix_signer()
    signed = sign_params(params, signer)
    assert signed["signature"] == signature
    assert len(signature) == 88
    assert signer.verify(ws_payload(params).encode(), signature)
    assert not signer.verify(b"tampered", signature)


def test_signer_repr_and_pickle_hide_material() -> None:
    signer = Ed25519Signer(bytes.fromhex(FIX_SEED_HEX))
    text = repr(signer) + str(signer)
    assert FIX_SEED_HEX[:16] not in text
    assert base64.b64encode(bytes.fromhex(FIX_SEED_HEX)).decode()[:12] not in text
    assert "hidden" in text
    with pytest.raises(TypeError):
        pickle.dumps(signer)
    hmac_signer = HmacSigner(HMAC_SECRET)
    assert HMAC_SECRET not in repr(hmac_signer)
    with pytest.raises(TypeError):
        pickle.dumps(hmac_signer)


def test_seed_length_checked() -> None:
    with pytest.raises(ValueError):
        Ed25519Signer(b"short")
