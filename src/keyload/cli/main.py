"""``keyload``: the command line.

Every command accepts ``--home DIR`` (default ``$KEYLOAD_HOME`` or ``./keyload-home``) and
``--json``. Errors print one line on stderr and exit with the code of their class:

====  =====================================================
0     success
1     the job ran but something failed (units, vectors, receipts)
2     usage error (bad arguments)
3     invalid input (a value, a file, a range; a malformed ``$KEYLOAD_KEK``)
4     store error (missing or damaged file)
5     wrong or missing passphrase, KEK or PIN (none given, and no terminal to ask at)
6     refused by a unit or the authority (status word given)
7     integrity or authenticity failure (6982 / 6988, KCV mismatch)
8     done, evidence pending (``fetch``: the key is in the unit, its receipt is kept in
      ``HOME/outbox`` and sent later)
9     service unreachable (``fetch``: no connection, or the TLS handshake failed)
130   interrupted (Ctrl-C): stopped between units, nothing counted as failed; run it
      again to resume
141   the output's reader closed it (``keyload … | head``): stopped quietly, no message
====  =====================================================
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from .. import __version__
from ..core.errors import (
    AuthenticityError,
    IntegrityError,
    KcvMismatch,
    KeyloadError,
    MalformedData,
    StatusError,
    StoreError,
    WrongPassphrase,
)
from ..service.client import ServiceUnreachable
from ..station.load import LoadFailed
from . import campaigns, commands, demo, service_cmds

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INPUT, EXIT_STORE, EXIT_PASSPHRASE = 0, 1, 2, 3, 4, 5
EXIT_REFUSED, EXIT_INTEGRITY, EXIT_UNREACHABLE = 6, 7, 9
EXIT_PIPE = 141  # as a process killed by SIGPIPE: the output's reader closed it


def exit_code(e: BaseException) -> int:
    if isinstance(e, LoadFailed):  # a unit or the authority answered
        if isinstance(e.cause, (IntegrityError, AuthenticityError, KcvMismatch)):
            return EXIT_INTEGRITY
        if isinstance(e.cause, StatusError):
            return EXIT_REFUSED
        return exit_code(e.cause)
    if isinstance(e, (IntegrityError, AuthenticityError, KcvMismatch)):
        return EXIT_INTEGRITY
    if isinstance(e, ServiceUnreachable):
        return EXIT_UNREACHABLE
    # a message or header read outside a load (a file, a unit's status answer) that does
    # not parse; a bad value given by the caller is a ValueError (the default below)
    if isinstance(e, MalformedData):
        return EXIT_INPUT
    if isinstance(e, StatusError):
        return EXIT_REFUSED
    if isinstance(e, WrongPassphrase):
        return EXIT_PASSPHRASE
    if isinstance(e, StoreError):
        return EXIT_STORE
    if isinstance(e, KeyloadError):
        return EXIT_FAILED
    if isinstance(e, OSError):
        return EXIT_STORE
    return EXIT_INPUT


def _common() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--home", default=argparse.SUPPRESS,
                   help="keyload home directory (default $KEYLOAD_HOME or ./keyload-home)")
    p.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                   help="print machine-readable JSON")
    return p


def build_parser() -> argparse.ArgumentParser:
    common = _common()
    parser = argparse.ArgumentParser(
        prog="keyload", parents=[common],
        description="Load application keys into fleets of security units over KLP1.")
    parser.add_argument("--version", action="version", version=f"keyload {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(parent: argparse._SubParsersAction[argparse.ArgumentParser], name: str,
            fn: Callable[[argparse.Namespace], int], help_: str) -> argparse.ArgumentParser:
        sp = parent.add_parser(name, parents=[common], help=help_, description=help_)
        sp.set_defaults(func=fn)
        return sp

    # authority
    a = sub.add_parser("authority", help="the software authority (first security unit)")
    asub = a.add_subparsers(dest="sub", required=True, metavar="ACTION")
    p = add(asub, "init", commands.authority_init,
            "create the authority: a sealed software keystore, or a PKCS#11 token")
    p.add_argument("--signing-key", action="store_true",
                   help="also generate an Ed25519 SAS signing key")
    p.add_argument("--pkcs11", metavar="MODULE",
                   help="keep the keys in a PKCS#11 token (path of the module); the PIN "
                        "comes from $KEYLOAD_PKCS11_PIN")
    p.add_argument("--token", metavar="LABEL", help="the token's label (with --pkcs11)")
    p.add_argument("--clear-sas", action="store_true",
                   help="(PKCS#11) allow exports to unsigned sets: the symmetric SAS needs "
                        "the key in clear outside the token for an instant")
    add(asub, "show", commands.authority_show, "what the authority holds (never key values)")
    p = add(asub, "exports", commands.authority_exports, "the authority's export records")
    p.add_argument("--limit", type=int, default=20)

    # set
    s = sub.add_parser("set", help="sets of units and their transport keys")
    ssub = s.add_subparsers(dest="sub", required=True, metavar="ACTION")
    p = add(ssub, "create", commands.set_create, "create a set: generate T or assemble it")
    p.add_argument("--name", required=True)
    p.add_argument("--components", type=int, default=0, metavar="N",
                   help="assemble T from N hex components (read without echo, or from stdin)")
    p.add_argument("--signed", action="store_true",
                   help="exports to this set carry an Ed25519 SAS")
    add(ssub, "list", commands.set_list, "list sets")

    # key
    k = sub.add_parser("key", help="application keys (by REF1)")
    ksub = k.add_subparsers(dest="sub", required=True, metavar="ACTION")
    for name, fn, help_ in (("generate", commands.key_generate, "generate an application key"),
                            ("import", commands.key_import,
                             "import an application key (value or components)")):
        p = add(ksub, name, fn, help_)
        p.add_argument("--ref1", required=True, help="REF1: ASCII text, or 0x-prefixed hex")
        p.add_argument("--type", required=True, help="aes128, aes192, aes256, hmac-sha256")
        p.add_argument("--usage", required=True, help="X9.143 key usage, e.g. K0, P0, M7")
        p.add_argument("--mode", required=True, help="X9.143 mode of use, e.g. B, E, D, C")
        p.add_argument("--exportability", required=True, choices=["N", "E", "S"])
        p.add_argument("--version", dest="key_version", type=int, required=True)
        p.add_argument("--diversify", action="store_true",
                       help="diversify per unit: TA' = KDF(TA, SN) (AES only)")
        p.add_argument("--sets", required=True,
                       help="set ids allowed to receive the key, comma separated, or 'any'")
        p.add_argument("--slots", required=True,
                       help="REF2 slots allowed, e.g. 1,2,10-20, or 'any'")
        p.add_argument("--label", default="")
        if name == "generate":
            p.add_argument("--length", type=int, help="HMAC key length in bytes (16-64)")
        else:
            p.add_argument("--components", type=int, default=1, metavar="N")
    add(ksub, "list", commands.key_list, "list application keys (never a value)")

    # unit
    u = sub.add_parser("unit", help="emulated units")
    usub = u.add_subparsers(dest="sub", required=True, metavar="ACTION")
    p = add(usub, "create", commands.unit_create, "create an emulated unit of a set")
    p.add_argument("--set", required=True, dest="set_id", help="set id (hex)")
    p.add_argument("--sn", required=True, help="serial number, hex (1-32 bytes)")
    p.add_argument("--slot", action="append", default=[], metavar="REF2=TYPES",
                   help="a slot and the key types it accepts, e.g. 1=aes256 or "
                        "2=aes128,aes256 (repeatable; default 1=aes256)")
    p.add_argument("--lock", action="append", type=int, default=[], metavar="REF2",
                   help="lock this slot")
    p.add_argument("--suites", default="1,2", help="suites the unit speaks (default 1,2)")
    p.add_argument("--components", type=int, default=0, metavar="N",
                   help="give the set's transport key as N components (needed when T "
                        "lives in a token)")
    p = add(usub, "status", commands.unit_status, "a unit's slots (GET SLOT STATUS)")
    p.add_argument("--sn", required=True)
    add(usub, "list", commands.unit_list, "list emulated units")
    p = add(usub, "serve-card", commands.unit_serve_card,
            "serve emulated units as virtual cards to pcscd (vpcd), one after another")
    p.add_argument("--sn", action="append", default=[], help="a unit (repeatable; default all)")
    p.add_argument("--port", type=int, default=35963, help="vpcd port (35963: first reader)")

    # load
    p = add(sub, "load", commands.load, "load one key into one unit")
    p.add_argument("--unit", required=True, metavar="SN", help="the unit's SN (hex)")
    p.add_argument("--ref1", required=True)
    p.add_argument("--ref2", required=True, type=int)

    # receipts
    p = add(sub, "receipts", commands.receipts_verify,
            "have the authority verify every receipt in the station records")

    # demo
    p = add(sub, "demo", demo.run, "customize a set of emulated units end to end")
    p.add_argument("--units", type=int, default=1000)
    p.add_argument("--workdir", help="keep everything in this directory (default: a temporary "
                                     "one)")
    p.add_argument("--authority", choices=["software", "pkcs11", "card"], default="software",
                   help="software keystore, a PKCS#11 token (SoftHSM2), or the authority "
                        "as a smart card over PC/SC")
    p.add_argument("--transport", choices=["local", "pcsc"], default="local",
                   help="reach the units in-process, or as cards fed through a PC/SC reader")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    campaigns.add_parsers(sub, common)
    service_cmds.add_parsers(sub, common)

    # conformance
    p = add(sub, "conformance", commands.conformance,
            "run KLP1 vector files (docs/protocol.md §9)")
    p.add_argument("files", nargs="+", metavar="FILE")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    _python_handles_sigint()
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if not hasattr(args, "json"):
            args.json = False
        if not hasattr(args, "home"):
            args.home = None
        rc: int = args.func(args)
    except KeyboardInterrupt:
        sys.stderr.write("keyload: interrupted\n")
        return 130
    except BrokenPipeError:  # `keyload … | head`: the reader has left; end quietly
        _quiet_stdout()
        return EXIT_PIPE
    except (KeyloadError, ValueError, OSError) as e:
        sys.stderr.write(f"keyload: error: {_one_line(e)}\n")
        return exit_code(e)
    return rc


def _python_handles_sigint() -> None:
    """From here on a Ctrl-C is a KeyboardInterrupt (see :mod:`keyload.cli`)."""
    import signal
    import threading

    from . import _interrupted_early

    if threading.current_thread() is threading.main_thread() and \
            signal.getsignal(signal.SIGINT) is _interrupted_early:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _quiet_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's last flush of what could not
    be written raises nothing more."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


def _one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        where = f" ({e.filename})" if e.filename else ""
        return f"{e.strerror}{where}"
    text = str(e) or e.__class__.__name__
    return " ".join(text.split())


if __name__ == "__main__":
    sys.exit(main())
