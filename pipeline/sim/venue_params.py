"""The simulated venue's wire vocabulary: errors, enum values, messages, parameter parsing.

Why a module of its own: every part of the venue (filters, accounts, orders, matching, the
coordinator) and the WS API shell speak these words, so they live below all of them and import
nothing of the venue. Parameter values arrive as the TEXT the client sent, so numbers are parsed
with :class:`~decimal.Decimal`, never float.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from decimal import ROUND_DOWN, Decimal
from typing import Any

from pipeline.binance.filters import STP_MODES as VENUE_STP_MODES

ZERO = Decimal(0)
Q8 = Decimal("0.00000001")  # Binance's 8 decimals: rendering and commission rounding

VenueEvent = tuple[str, dict[str, Any]]
"""(account, user-data payload); the shell wraps it in ``{"subscriptionId":N,"event":...}``."""

_DECIMAL_RE = re.compile(r"^([0-9]{1,20})(\.[0-9]{1,20})?$")
_INT_RE = re.compile(r"^[0-9]{1,20}$")
_CLIENT_ID_RE = re.compile(r"^[a-zA-Z0-9\-_]{1,36}$")
_CLIENT_ID_RANGE = "^[a-zA-Z0-9-_]{1,36}$"
_DECIMAL_RANGE = "^([0-9]{1,20})(\\.[0-9]{1,20})?$"

SIDES = ("BUY", "SELL")
TIFS = ("GTC", "IOC", "FOK")
SIMULATED_TYPES = ("LIMIT", "LIMIT_MAKER", "MARKET")
RESP_TYPES = ("ACK", "RESULT", "FULL")
CANCEL_REPLACE_MODES = ("STOP_ON_FAILURE", "ALLOW_FAILURE")
CANCEL_RESTRICTIONS = ("ONLY_NEW", "ONLY_PARTIALLY_FILLED")
OPEN_STATUSES = ("NEW", "PARTIALLY_FILLED")
STP_MODES = VENUE_STP_MODES  # all six (the one list is in pipeline/binance/filters.py)

MSG_INSUFFICIENT = "Account has insufficient balance for requested action."
MSG_WOULD_TAKE = "Order would immediately match and take."
MSG_DUPLICATE = "Duplicate order sent."
MSG_UNKNOWN_ORDER = "Unknown order sent."
MSG_NO_SUCH_ORDER = "Order does not exist."
MSG_BAD_SYMBOL = "Invalid symbol."


class VenueError(Exception):
    """A refused request: ``status`` (HTTP semantics), ``code`` and ``msg`` as on the wire.

    ``data`` carries the extra object of cancelReplace failures (section 2.10) and rate-limit
    errors (``retryAfter``); it is ``None`` otherwise.
    """

    def __init__(
        self, code: int, msg: str, status: int = 400, data: dict[str, Any] | None = None
    ) -> None:
        super().__init__(f"{code} {msg}")
        self.code = code
        self.msg = msg
        self.status = status
        self.data = data

    def error_obj(self) -> dict[str, Any]:
        """The ``error`` member of a response envelope."""
        out: dict[str, Any] = {"code": self.code, "msg": self.msg}
        if self.data is not None:
            out["data"] = self.data
        return out


def missing(name: str) -> VenueError:
    return VenueError(
        -1102, f"Mandatory parameter '{name}' was not sent, was empty/null, or malformed."
    )


def illegal(name: str, legal: str | None = None) -> VenueError:
    if legal is None:
        return VenueError(-1100, f"Illegal characters found in parameter '{name}'.")
    return VenueError(
        -1100, f"Illegal characters found in parameter '{name}'; legal range is '{legal}'."
    )


def not_required(name: str) -> VenueError:
    return VenueError(-1106, f"Parameter '{name}' sent when not required.")


def fmt(d: Decimal) -> str:
    """Binance's decimal rendering: fixed 8 decimals, no exponent (section 5, pitfall 4)."""
    return f"{d.quantize(Q8, rounding=ROUND_DOWN):f}"


# --------------------------------------------------------------------------------------------
# parameter parsing (values are the text the client sent)


def param_text(params: Mapping[str, str], name: str, *, required: bool = False) -> str | None:
    """The param's text; absent or empty is None, or -1102 if ``required``."""
    value = params.get(name)
    if value is None or value == "":
        if required:
            raise missing(name)
        return None
    return value


def parse_decimal(
    params: Mapping[str, str], name: str, *, required: bool, precision: int = 8
) -> Decimal | None:
    """Decimal param: -1102 if required and absent, -1100 if malformed, -1111 if too precise."""
    text = param_text(params, name, required=required)
    if text is None:
        return None
    if not _DECIMAL_RE.match(text):
        raise illegal(name, _DECIMAL_RANGE)
    value = Decimal(text)
    exponent = value.normalize().as_tuple().exponent
    if isinstance(exponent, int) and -exponent > precision:
        raise VenueError(-1111, f"Parameter '{name}' has too much precision.")
    return value


def parse_int(params: Mapping[str, str], name: str, *, required: bool) -> int | None:
    text = param_text(params, name, required=required)
    if text is None:
        return None
    if not _INT_RE.match(text):
        raise illegal(name)
    return int(text)


def parse_enum(
    params: Mapping[str, str],
    name: str,
    allowed: Sequence[str],
    *,
    required: bool,
    error: VenueError | None = None,
) -> str | None:
    text = param_text(params, name, required=required)
    if text is None:
        return None
    if text not in allowed:
        raise error if error is not None else illegal(name)
    return text


def parse_cancel_restriction(params: Mapping[str, str]) -> str | None:
    """``cancelRestrictions`` of order.cancel and order.cancelReplace (-1145 if not known)."""
    return parse_enum(
        params,
        "cancelRestrictions",
        CANCEL_RESTRICTIONS,
        required=False,
        error=VenueError(-1145, "Invalid cancelRestrictions"),
    )


def parse_client_id(params: Mapping[str, str], name: str) -> str | None:
    text = param_text(params, name)
    if text is None:
        return None
    if not _CLIENT_ID_RE.match(text):
        raise illegal(name, _CLIENT_ID_RANGE)
    return text
