"""The simulated venue's accounts: balances, what orders reserve, what fills move, account.status.

Why a module of its own: every balance rule (starting funds, reserving for an open order,
releasing on cancel/amend/close, a fill's effect and commission) has one owner here, so the
matching engine and the request handlers move money only through these methods.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from decimal import ROUND_DOWN, Decimal
from typing import Any

from pipeline.sim.venue_filters import SymbolRules
from pipeline.sim.venue_orders import Order
from pipeline.sim.venue_params import Q8, ZERO, fmt, param_text


@dataclass
class AssetBalance:
    free: Decimal = ZERO
    locked: Decimal = ZERO


@dataclass
class Account:
    """One trading account; the simulator maps each API key to its own account."""

    name: str
    balances: dict[str, AssetBalance] = field(default_factory=dict)
    update_time: int = 0

    def bal(self, asset: str) -> AssetBalance:
        b = self.balances.get(asset)
        if b is None:
            b = self.balances[asset] = AssetBalance()
        return b


class Ledger:
    """All accounts of the simulated exchange and the rules that move their balances."""

    def __init__(
        self,
        rules: Mapping[str, SymbolRules],
        *,
        quote_balance: Decimal | str | int,
        base_balance: Decimal | str | int,
        balances: Mapping[str, Decimal | str | int] | None,
        maker_commission: Decimal | str,
        taker_commission: Decimal | str,
    ) -> None:
        self.rules = rules
        self._start_balances: dict[str, Decimal] = {}
        for r in rules.values():
            self._start_balances.setdefault(r.quote_asset, Decimal(quote_balance))
            self._start_balances.setdefault(r.base_asset, Decimal(base_balance))
        if balances:
            self._start_balances.update({k: Decimal(v) for k, v in balances.items()})
        self.maker_commission = Decimal(maker_commission)
        self.taker_commission = Decimal(taker_commission)
        self.accounts: dict[str, Account] = {}

    def add_account(
        self, name: str, balances: Mapping[str, Decimal | str | int] | None = None
    ) -> Account:
        """Create (or return) an account, funded with the configured starting balances."""
        acct = self.accounts.get(name)
        if acct is not None:
            return acct
        acct = Account(name)
        start = dict(self._start_balances)
        if balances:
            start.update({k: Decimal(v) for k, v in balances.items()})
        for asset, amount in start.items():
            acct.balances[asset] = AssetBalance(free=amount)
        self.accounts[name] = acct
        return acct

    def get(self, name: str) -> Account:
        """The account of an API key; an unknown key gets a freshly funded one."""
        acct = self.accounts.get(name)
        return acct if acct is not None else self.add_account(name)

    def reserved_balance(self, order: Order) -> AssetBalance:
        """The balance an open order reserves from: quote if BUY, base if SELL."""
        rules = self.rules[order.symbol]
        acct = self.get(order.account)
        return acct.bal(rules.quote_asset if order.side == "BUY" else rules.base_asset)

    @staticmethod
    def reserve(order: Order, bal: AssetBalance, amount: Decimal) -> None:
        """An accepted order reserves ``amount`` of ``bal`` until it fills or leaves the book."""
        bal.free -= amount
        bal.locked += amount
        order.locked = amount

    def release_part(self, order: Order, amount: Decimal) -> None:
        """An amend shrank the order: give back what the removed quantity reserved."""
        bal = self.reserved_balance(order)
        order.locked -= amount
        bal.locked -= amount
        bal.free += amount

    def release_rest(self, order: Order) -> None:
        """Order left the book: release what it still reserved."""
        if order.locked:
            bal = self.reserved_balance(order)
            bal.locked -= order.locked
            bal.free += order.locked
            order.locked = ZERO

    def settle_fill(
        self, order: Order, px: Decimal, q: Decimal, *, maker: bool
    ) -> tuple[Decimal, str]:
        """Move the balances of one fill; returns ``(commission, commission_asset)``.

        Commission is a flat rate on the received asset. A MARKET BUY reserved nothing and pays
        from free; a LIMIT BUY gets back what it reserved above the fill price.
        """
        acct = self.get(order.account)
        rules = self.rules[order.symbol]
        base, quote = acct.bal(rules.base_asset), acct.bal(rules.quote_asset)
        notional = px * q
        rate = self.maker_commission if maker else self.taker_commission
        if order.side == "BUY":
            commission = (q * rate).quantize(Q8, rounding=ROUND_DOWN)
            commission_asset = rules.base_asset
            if order.type == "MARKET":
                quote.free -= notional
            else:
                reserved = order.price * q
                order.locked -= reserved
                quote.locked -= reserved
                quote.free += reserved - notional
            base.free += q - commission
        else:
            commission = (notional * rate).quantize(Q8, rounding=ROUND_DOWN)
            commission_asset = rules.quote_asset
            order.locked -= q
            base.locked -= q
            quote.free += notional - commission
        return commission, commission_asset

    def commission_rates(self) -> dict[str, Any]:
        """order.test with ``computeCommissionRates=true`` (section 2.8)."""
        m, t = fmt(self.maker_commission), fmt(self.taker_commission)
        return {
            "standardCommissionForOrder": {"maker": m, "taker": t},
            "specialCommissionForOrder": {"maker": fmt(ZERO), "taker": fmt(ZERO)},
            "taxCommissionForOrder": {"maker": fmt(ZERO), "taker": fmt(ZERO)},
            "discount": {
                "enabledForAccount": False,
                "enabledForSymbol": False,
                "discountAsset": "BNB",
                "discount": fmt(ZERO),
            },
        }

    def status(self, account: str, params: Mapping[str, str]) -> dict[str, Any]:
        """account.status (section 2.12); ``omitZeroBalances=true`` drops empty assets."""
        acct = self.get(account)
        omit = param_text(params, "omitZeroBalances") == "true"
        balances = [
            {"asset": a, "free": fmt(b.free), "locked": fmt(b.locked)}
            for a, b in sorted(acct.balances.items())
            if not (omit and b.free == 0 and b.locked == 0)
        ]
        m, t = self.maker_commission, self.taker_commission
        return {
            "makerCommission": int(m * 10000),
            "takerCommission": int(t * 10000),
            "buyerCommission": 0,
            "sellerCommission": 0,
            "commissionRates": {
                "maker": fmt(m),
                "taker": fmt(t),
                "buyer": fmt(ZERO),
                "seller": fmt(ZERO),
            },
            "canTrade": True,
            "canWithdraw": True,
            "canDeposit": True,
            "brokered": False,
            "requireSelfTradePrevention": False,
            "preventSor": False,
            "updateTime": acct.update_time,
            "accountType": "SPOT",
            "balances": balances,
            "permissions": ["SPOT"],
            "uid": 100000000 + sorted(self.accounts).index(account),
        }

    @staticmethod
    def position(acct: Account, assets: Iterable[str], now_ms: int) -> dict[str, Any]:
        """The ``outboundAccountPosition`` user-data event for ``assets`` (section 2.15)."""
        return {
            "e": "outboundAccountPosition",
            "E": now_ms,
            "u": acct.update_time or now_ms,
            "B": [
                {"a": a, "f": fmt(acct.bal(a).free), "l": fmt(acct.bal(a).locked)}
                for a in sorted(assets)
            ],
        }
