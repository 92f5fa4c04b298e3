"""Prices and quantities as integers in 1e-8 units, and their wire and Decimal forms.

Why a module of its own: the market, the encoders, REST and the venue all convert between
the integer units the simulated book works in and the 8-decimal strings / Decimals Binance
publishes; one place keeps the rule (and its caches) single.
``"60000.01000000"`` is ``6000001000000``.
"""

from __future__ import annotations

from decimal import Decimal

SCALE = 100_000_000  # wire decimals: 8


def to_units(value: Decimal | str | int) -> int:
    """Decimal -> integer 1e-8 units. Raises ValueError if it has more than 8 decimals."""
    d = Decimal(value) * SCALE
    i = int(d)
    if d != i:
        raise ValueError(f"{value} has more than 8 decimals")
    return i


_FMT_CACHE: dict[int, str] = {}


def fmt_units(units: int) -> str:
    """Integer 1e-8 units -> Binance's fixed 8-decimal string ("0.01000000").

    Cached: prices and quantities repeat a lot on the hot path."""
    s = _FMT_CACHE.get(units)
    if s is None:
        if units < 0:
            return "-" + fmt_units(-units)
        s = f"{units // SCALE}.{units % SCALE:08d}"
        if len(_FMT_CACHE) > 200_000:
            _FMT_CACHE.clear()
        _FMT_CACHE[units] = s
    return s


_DEC_CACHE: dict[int, Decimal] = {}


def units_to_decimal(units: int) -> Decimal:
    """Integer 1e-8 units -> Decimal with 8 places (cached: listeners get one per fill)."""
    d = _DEC_CACHE.get(units)
    if d is None:
        d = Decimal(fmt_units(units))
        if len(_DEC_CACHE) > 200_000:
            _DEC_CACHE.clear()
        _DEC_CACHE[units] = d
    return d

