"""``pipeline trade``, ``pipeline keygen`` and ``pipeline order``: the trading command line.

- ``trade`` runs the trading process (:mod:`pipeline.trading.process`) until SIGTERM/SIGINT (exit 0,
  segments unlinked) or Failed (exit 3: logon rejected, do not restart blindly; exit 4: gave up
  reconnecting). Exit 2: bad arguments or an unusable key (the message says why).
- ``keygen --out DIR`` writes an Ed25519 key pair (private PEM mode 0600) and prints the public
  key's path: register that public key with Binance to get the API key; store it in a file
  (mode 0600) for ``--api-key-file`` or pass it in an environment variable named by
  ``--api-key-env``. ``--api-key KEY`` still works but puts the key in argv, where every local
  user can read it (``ps``): it warns, and is meant for interactive use only.
- ``order place|cancel|modify|amend|status`` talks to a running ``trade`` through
  :class:`pipeline.trading.client.OrderClient` and prints the answer as one JSON line;
  ``order open-orders [--symbol S]|cancel-all --symbol S|account`` print the exchange's JSON
  answer (``{"ok", "status", "result", "error", ...}``, carried on the reply ring).
  Exit 0 when the exchange accepted, 1 when it (or the risk check) refused or no answer came.
- ``trade`` checks every order against its symbol's exchangeInfo rules (tick and step size,
  min/max quantity and notional, status incl. CANCEL_ONLY) once they are loaded: a violating
  order is answered at once with a REJECT carrying the venue's code (-1013, -2010) and the
  filter's name, never sent. ``--rules-refresh 0`` turns this off.
- ``trade --risk-limits NAME`` checks every order against the risk consumer's limits table
  first; a refused order is answered with a REJECT, error_code -9009 and the limit in
  ``error_msg`` (``order place`` also prints it to stderr).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import TYPE_CHECKING, Any

from pipeline.binance.filters import STP_MODES

if TYPE_CHECKING:  # imported where used: `pipeline order` must not load the session types
    from pipeline.trading.config import TradingConfig


def register(subparsers: Any) -> None:
    _register_trade(subparsers)
    _register_keygen(subparsers)
    _register_order(subparsers)


# ---- trade --------------------------------------------------------------------------------


def _register_trade(subparsers: Any) -> None:
    from pipeline.settings import add_arguments
    from pipeline.trading.config import TradingConfig

    p = subparsers.add_parser(
        "trade",
        help="run the trading session (WS API, order entry over shared memory)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    # the settings: one flag per field of pipeline.trading.config.TradingConfig (and its
    # flattened session), so `pipeline run` writes this command line from the same type
    add_arguments(p, TradingConfig)
    # key sources (never a setting: the API key itself must not be another process's argv value)
    key = p.add_mutually_exclusive_group(required=True)
    key.add_argument(
        "--api-key-file",
        metavar="PATH",
        help="file holding the API key registered for the public key (mode 0600; under "
        "systemd: LoadCredential= and %%d/NAME)",
    )
    key.add_argument(
        "--api-key-env", metavar="VAR", help="environment variable holding the API key"
    )
    key.add_argument(
        "--api-key",
        metavar="KEY",
        help="the API key itself, for interactive use only: it is visible to every local user "
        "in the process list (ps); prefer --api-key-file or --api-key-env",
    )
    p.add_argument(
        "--passphrase-env",
        metavar="VAR",
        help="environment variable holding the private key's passphrase",
    )
    p.set_defaults(func=_trade)


def config_from_args(args: argparse.Namespace, api_key: str = "") -> TradingConfig:
    """The process's config from `pipeline trade`'s flags (the round-trip tests use it too);
    ``ValueError`` when a nested type's own check refuses (the reconnect backoff)."""
    from pipeline.binance.wsapi import PROD_URL, TESTNET_URL
    from pipeline.settings import values_from_args
    from pipeline.trading.config import TradingConfig

    cfg = TradingConfig(**values_from_args(TradingConfig, args))
    if not cfg.url:
        cfg.url = TESTNET_URL if cfg.testnet else PROD_URL
    if api_key:
        cfg.session = dataclasses.replace(cfg.session, api_key=api_key)
    return cfg


def _trade(args: argparse.Namespace) -> int:
    import logging

    from pipeline import aio
    from pipeline.binance.keys import KeyLoadError, load_private_key
    from pipeline.trading.process import TradingProcess

    log = logging.getLogger("pipeline.trading")
    api_key = api_key_from_args(args)
    if api_key is None:
        return 2
    passphrase = None
    if args.passphrase_env:
        passphrase = os.environ.get(args.passphrase_env)
        if passphrase is None:
            print(f"error: environment variable {args.passphrase_env} is not set", file=sys.stderr)
            return 2
    try:
        signer = load_private_key(args.private_key, passphrase)
    except KeyLoadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        cfg = config_from_args(args, api_key)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    url = cfg.url
    tp = TradingProcess(cfg, signer)
    log.info("trading starting", extra={"event": "trading_start", "url": url})
    from pipeline.ipc.metrics import MetricsError
    from pipeline.ipc.ring import RingError

    try:
        code = aio.run(tp.run(install_signals=True))
    except (MetricsError, RingError) as exc:
        print(f"error: {exc} (is another `pipeline trade` running?)", file=sys.stderr)
        return 2
    if code:
        print(f"error: trading session failed: {tp.exit_reason}", file=sys.stderr)
    return code


def api_key_from_args(args: argparse.Namespace) -> str | None:
    """The API key from ``--api-key-file``, ``--api-key-env`` or ``--api-key``; None (after a
    message on stderr that never contains the key) when the source is unusable.

    Why not just ``--api-key``: a process's argv is world-readable (``ps``, /proc/PID/cmdline),
    so a key there is handed to every local account. ``--api-key`` stays for typing at a
    terminal, with a warning.
    """
    from pipeline.config import SecretFileError, check_api_key, read_api_key_env, read_api_key_file

    try:
        if args.api_key_file:
            return read_api_key_file(args.api_key_file)
        if args.api_key_env:
            return read_api_key_env(args.api_key_env)
        print(
            "warning: --api-key puts the API key in this process's command line, readable by "
            "every local user (ps); use --api-key-file PATH or --api-key-env VAR",
            file=sys.stderr,
        )
        return check_api_key(args.api_key or "", "--api-key")
    except SecretFileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None


# ---- keygen -------------------------------------------------------------------------------


def _register_keygen(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "keygen", help="write a new Ed25519 key pair (PEM) for the Binance WS API"
    )
    p.add_argument("--out", required=True, metavar="DIR", help="directory for the two PEM files")
    p.add_argument(
        "--passphrase-env",
        metavar="VAR",
        help="encrypt the private key with the passphrase in this variable",
    )
    p.set_defaults(func=_keygen)


def _keygen(args: argparse.Namespace) -> int:
    from pipeline.binance.keys import generate_keypair

    passphrase = None
    if args.passphrase_env:
        value = os.environ.get(args.passphrase_env)
        if not value:
            print(f"error: environment variable {args.passphrase_env} is not set", file=sys.stderr)
            return 2
        passphrase = value.encode()
    try:
        priv, pub = generate_keypair(args.out, passphrase)
    except (FileExistsError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"private key: {priv} (mode 0600; keep it secret)", file=sys.stderr)
    print(
        "register the public key with Binance, then store the API key it gives in a file "
        "(mode 0600) for `pipeline trade --api-key-file PATH`",
        file=sys.stderr,
    )
    print(pub)
    return 0


# ---- order --------------------------------------------------------------------------------


def _register_order(subparsers: Any) -> None:
    from pipeline.trading.wire import EXEC_RING, ORDER_RING_PREFIX

    p = subparsers.add_parser("order", help="send an order to the running trading process")
    sub = p.add_subparsers(dest="order_command", metavar="ACTION")
    sub.required = True

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--exec-ring", default=EXEC_RING, metavar="NAME")
        sp.add_argument("--client", default=None, help="client name (default cli<pid>)")
        sp.add_argument("--timeout", type=float, default=10.0, metavar="S")
        sp.add_argument("--reply-ring", default=None, metavar="NAME")
        sp.add_argument("--order-prefix", default=ORDER_RING_PREFIX, metavar="PREFIX")

    def stp_flag(sp: argparse.ArgumentParser, whose: str = "") -> None:
        sp.add_argument(
            "--stp",
            default="",
            type=str.upper,
            choices=("", *STP_MODES),
            help=f"selfTradePreventionMode{whose} (default: the venue's for the symbol)",
        )

    pl = sub.add_parser("place", help="place a new order")
    pl.add_argument("--symbol", required=True)
    pl.add_argument("--side", required=True, choices=("BUY", "SELL"), type=str.upper)
    pl.add_argument(
        "--type", default="LIMIT", choices=("LIMIT", "MARKET", "LIMIT_MAKER"), type=str.upper
    )
    pl.add_argument("--price", type=float)
    pl.add_argument("--qty", required=True, type=float)
    pl.add_argument("--tif", choices=("GTC", "IOC", "FOK"), type=str.upper)
    pl.add_argument("--id", dest="client_order_id", help="client order id (default: generated)")
    stp_flag(pl)
    common(pl)

    cx = sub.add_parser("cancel", help="cancel an order by client order id")
    cx.add_argument("--id", dest="client_order_id", required=True)
    cx.add_argument("--symbol", default="")
    common(cx)

    md = sub.add_parser(
        "modify",
        help="cancel-replace an order: a price change or a quantity increase (queue priority "
        "lost, a new order and client id); to only reduce the quantity use amend",
    )
    md.add_argument("--id", dest="client_order_id", required=True)
    md.add_argument("--qty", required=True, type=float)
    md.add_argument("--price", type=float)
    md.add_argument("--symbol", default="")
    md.add_argument("--side", default="", choices=("", "BUY", "SELL"), type=str.upper)
    md.add_argument(
        "--type", default="", choices=("", "LIMIT", "MARKET", "LIMIT_MAKER"), type=str.upper
    )
    stp_flag(md, " of the replacement (not carried over from the replaced order)")
    common(md)

    am = sub.add_parser(
        "amend",
        help="reduce an order's quantity keeping its queue priority and client id "
        "(order.amend.keepPriority; at most 10 per order); for a price change use modify",
    )
    am.add_argument("--id", dest="client_order_id", required=True)
    am.add_argument("--qty", required=True, type=float, help="the new, smaller quantity")
    am.add_argument("--symbol", default="")
    common(am)

    st = sub.add_parser("status", help="ask the exchange for an order's status")
    st.add_argument("--id", dest="client_order_id", required=True)
    st.add_argument("--symbol", required=True)
    common(st)

    oo = sub.add_parser("open-orders", help="list open orders (openOrders.status)")
    oo.add_argument("--symbol", default="", help="one symbol (default: all)")
    common(oo)

    ca = sub.add_parser("cancel-all", help="cancel every open order on a symbol")
    ca.add_argument("--symbol", required=True)
    common(ca)

    ac = sub.add_parser("account", help="balances and permissions (account.status)")
    common(ac)
    p.set_defaults(func=_order)


def _order(args: argparse.Namespace) -> int:
    import json

    from pipeline.trading.client import (
        AMEND_ANSWERS,
        CANCEL_ANSWERS,
        STATUS_ANSWERS,
        OrderClient,
        ReplyLostError,
        TradingNotRunningError,
    )
    from pipeline.trading.wire import LOCAL_RISK, OrderAction

    def out(obj: dict[str, Any]) -> None:
        print(json.dumps(obj, sort_keys=True))

    if args.order_command == "place" and args.type == "LIMIT" and args.price is None:
        out({"error": "a LIMIT order needs --price"})
        return 2
    name = args.client or f"cli{os.getpid()}"
    try:
        client = OrderClient.attach(
            name, exec_ring=args.exec_ring, reply_ring=args.reply_ring, prefix=args.order_prefix
        )
    except (TradingNotRunningError, ValueError) as exc:
        out({"error": str(exc)})
        return 1
    kinds = None
    requests = {
        "open-orders": OrderAction.OPEN_ORDERS,
        "cancel-all": OrderAction.CANCEL_ALL,
        "account": OrderAction.ACCOUNT,
    }
    try:
        if args.order_command in requests:
            try:
                rid = client.request(requests[args.order_command], getattr(args, "symbol", ""))
                reply = client.wait_reply(rid, args.timeout)
            except TradingNotRunningError as exc:
                out({"error": str(exc)})
                return 1
            except (TimeoutError, ReplyLostError) as exc:
                out({"status": "TIMEOUT", "error": str(exc)})
                return 1
            out(reply)
            return 0 if reply.get("ok") else 1
        if args.order_command == "place":
            coid = client.place(
                symbol=args.symbol,
                side=args.side,
                type=args.type,
                qty=args.qty,
                price=args.price,
                tif=args.tif,
                client_order_id=args.client_order_id,
                stp=args.stp,
            )
        elif args.order_command == "amend":
            coid = client.amend(args.client_order_id, qty=args.qty, symbol=args.symbol)
            kinds = AMEND_ANSWERS
        elif args.order_command == "cancel":
            coid = client.cancel(args.client_order_id, symbol=args.symbol)
            kinds = CANCEL_ANSWERS
        elif args.order_command == "modify":
            coid = client.modify(
                args.client_order_id,
                qty=args.qty,
                price=args.price,
                symbol=args.symbol,
                side=args.side,
                type=args.type,
                stp=args.stp,
            )
        else:
            coid = client.status(args.client_order_id, symbol=args.symbol)
            kinds = STATUS_ANSWERS
        try:
            report = client.wait(coid, args.timeout, kinds)
        except TimeoutError:
            out(
                {
                    "client_order_id": coid,
                    "status": "TIMEOUT",
                    "error": f"no answer within {args.timeout} s",
                }
            )
            return 1
        out(report.as_dict())
        if report.error_code == LOCAL_RISK:
            print(f"error: refused by the risk check: {report.error_msg}", file=sys.stderr)
        return 0 if report.error_code == 0 else 1
    except ValueError as exc:
        out({"error": str(exc)})
        return 2
    finally:
        client.close()
