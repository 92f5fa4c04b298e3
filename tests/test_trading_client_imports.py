"""A strategy imports the order client without the trading process behind it.

Why it matters: a strategy process should pay for the ring client and the record layouts only,
not for the WS API session core, the signing libraries or a WebSocket client; and a module that
is never imported cannot break or slow down a strategy's start. Checked in a fresh interpreter,
since this test process has long since imported everything.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

# What the trading process needs and a strategy must not load. One module of pipeline.binance is
# allowed: filters.py (the venue's enums and symbol rules, standard library only), from which the
# order records take their list of self-trade prevention modes.
ALLOWED = frozenset({"pipeline.binance.filters"})
FORBIDDEN = (
    "pipeline.trading.session",
    "pipeline.trading.process",
    "pipeline.binance",  # the WS API codec, signing, keys, user data ...
    "nacl",
    "cryptography",
    "websockets",
    "picows",
)


def _loaded_after(statement: str) -> list[str]:
    code = (
        "import json, sys\n"
        f"{statement}\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
        f"{sorted({f.split('.')[0] for f in FORBIDDEN})!r})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded: list[str] = json.loads(out.stdout)
    return loaded


@pytest.mark.parametrize(
    "statement",
    [
        "import pipeline.trading.client",
        "from pipeline import OrderClient, ExecReport, TradingNotRunningError",
    ],
)
def test_the_strategy_client_loads_no_session_and_no_crypto(statement: str) -> None:
    loaded = _loaded_after(statement)
    bad = [
        m
        for m in loaded
        if m not in ALLOWED
        and any(m == f or m.startswith(f + ".") for f in FORBIDDEN)
        and not (m == "pipeline.binance" and ALLOWED & set(loaded))  # the package of filters
    ]
    assert bad == [], f"{statement!r} pulled in {bad}"
    assert "pipeline.trading.client" in loaded


@pytest.mark.parametrize(
    "module", ["pipeline.config", "pipeline.marketdata.ingest", "pipeline.consumers.cli"]
)
def test_processes_that_never_sign_do_not_load_libsodium(module: str) -> None:
    """The config types carry the trading session's settings, which import the WS API request
    rules; the signing library itself is loaded only by a signer."""
    loaded = _loaded_after(f"import {module}")
    assert [m for m in loaded if m == "nacl" or m.startswith("nacl.")] == []
