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
import contextlib
import json
import sys
from collections.abc import Sequence
from typing import cast

from .. import __version__
from ..core import errors
from ..dashboard.serve import OPTIONS as DASHBOARD
from ..service.client import ServiceUnreachable
from ..station.load import LoadFailed
from . import campaigns, commands, demo, service_cmds
from .args import JOURNAL, SET_ID, SN, Help, Opt, Parser, Sub, Usage, cmd, common, group, opt

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INPUT, EXIT_STORE, EXIT_PASSPHRASE = 0, 1, 2, 3, 4, 5
EXIT_REFUSED, EXIT_INTEGRITY, EXIT_UNREACHABLE = 6, 7, 9
EXIT_PIPE = 141  # as a process killed by SIGPIPE: the output's reader closed it


INTEGRITY = (errors.IntegrityError, errors.AuthenticityError, errors.KcvMismatch)
#: An error's exit code: that of the first kind it is (none: a bad value given by the
#: caller, a ValueError, is EXIT_INPUT).
EXITS: tuple[tuple[type[BaseException] | tuple[type[BaseException], ...], int], ...] = (
    (INTEGRITY, EXIT_INTEGRITY), (ServiceUnreachable, EXIT_UNREACHABLE),
    # a message or header read outside a load (a file, a unit's status answer) that does
    # not parse
    (errors.MalformedData, EXIT_INPUT), (errors.StatusError, EXIT_REFUSED),
    (errors.WrongPassphrase, EXIT_PASSPHRASE), (errors.StoreError, EXIT_STORE),
    (errors.KeyloadError, EXIT_FAILED), (OSError, EXIT_STORE))


def exit_code(e: BaseException) -> int:
    if isinstance(e, LoadFailed):  # a unit or the authority answered: a status word refuses
        refused = isinstance(e.cause, errors.StatusError) and not isinstance(e.cause, INTEGRITY)
        return EXIT_REFUSED if refused else exit_code(e.cause)
    return next((code for kinds, code in EXITS if isinstance(e, kinds)), EXIT_INPUT)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="keyload", parents=[common()], formatter_class=Help,
        description="Load application keys into fleets of security units over KLP1.")
    parser.add_argument("--version", action="version", version=f"keyload {__version__}")
    sub = cast(Sub, parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))

    a = group(sub, "authority", "the software authority (first security unit)")
    cmd(a, "init", commands.authority_init,
        "create the authority: a sealed software keystore, or a PKCS#11 token",
        opt("--signing-key", action="store_true", help="also generate an Ed25519 SAS signing key"),
        opt("--pkcs11", metavar="MODULE", help="keep the keys in a PKCS#11 token (path of the "
            "module); the PIN comes from $KEYLOAD_PKCS11_PIN"),
        opt("--token", metavar="LABEL", help="the token's label (with --pkcs11)"),
        opt("--clear-sas", action="store_true", help="(PKCS#11) allow exports to unsigned sets: "
            "the symmetric SAS needs the key in clear outside the token for an instant"))
    cmd(a, "show", commands.authority_show, "what the authority holds (never key values)")
    cmd(a, "exports", commands.authority_exports, "the authority's export records",
        opt("--limit", type=int, default=20, help="show the last N records (0: all)"))

    s = group(sub, "set", "sets of units and their transport keys")
    cmd(s, "create", commands.set_create, "create a set: generate T or assemble it",
        opt("--name", required=True, help="the set's name (unique)"),
        opt("--components", type=int, default=0, metavar="N", help="assemble T from N hex "
            "components (read without echo, or from stdin; default: T generated)"),
        opt("--signed", action="store_true", help="exports to this set carry an Ed25519 SAS"),
        opt("--identity", action="store_true", help="an identity set (suite 0x03): a set CA "
            "key and an authority key instead of T; its units hold their own keys"))
    cmd(s, "list", commands.set_list, "list sets")
    cmd(s, "ca", campaigns.set_ca, "an identity set's Q_CA and C_A: what an auditor needs to "
        "verify its receipts (keyload ledger verify --auditor --ca SETID=Q_CA)", SET_ID)

    k = group(sub, "key", "application keys (by REF1)")
    IN_HOST = opt("--open-in-host", action="store_true", help="(PKCS#11) allow the key block "
                  "to be opened or made in host memory (the KBPK stays in the token)")

    def key_opts(req: bool, policy: bool = True) -> tuple[Opt, ...]:  # req: not from a block
        return (
            opt("--ref1", required=True, help="REF1: ASCII text, or 0x-prefixed hex"),
            opt("--type", required=req, help="aes128, aes192, aes256, hmac-sha256"),
            opt("--usage", required=req, help="X9.143 key usage, e.g. K0, P0, M7"),
            opt("--mode", required=req, help="X9.143 mode of use, e.g. B, E, D, C"),
            opt("--exportability", required=req, choices=["E", "N", "S"], help="X9.143 "
                "exportability, carried in the key's header: E: exportable under a key-"
                "encryption key in a key block (key export --tr31); N: not exportable; S: "
                "sensitive, exportable under a KEK in other forms too"),
            opt("--key-version", type=int, required=req, old=["--version"],
                help="the key's version (0-255): a unit takes only a higher one into a slot"),
            opt("--diversify", action="store_true",
                help="diversify per unit: TA' = KDF(TA, SN) (AES only)"),
            opt("--sets", required=policy,
                help="set ids allowed to receive the key, comma separated, or 'any'"),
            opt("--slots", required=policy, help="REF2 slots allowed, e.g. 1,2,10-20, or 'any'"),
            opt("--label", default="", help="a free text kept with the key"))
    length = opt("--length", type=int, help="HMAC key length in bytes (16-64)")
    typed = (opt("--components", type=int, default=1, metavar="N", help="type the value as N "
                 "hex components, each shown with its KCV"),
             opt("--tr31", metavar="BLOCK", help="an X9.143 (TR-31) key block, version D: "
                 "type, usage, mode, exportability and version from its header (--key-version "
                 "when it has none)"),
             opt("--kbpk", metavar="REF1", help="(--tr31) the authority key protecting the "
                 "block (usage K1)"), IN_HOST)
    cmd(k, "generate", commands.key_generate, "generate an application key", *key_opts(True),
        length)
    cmd(k, "import", commands.key_import, "import an application key (value, components, "
        "or an X9.143 key block)", *key_opts(False), *typed, usage_error=True)
    cmd(k, "rotate", commands.key_rotate, "the next version of a key, generated or taken in "
        "as by import (--typed, --components, --tr31); it keeps the type, attributes and "
        "policy not given, and the older versions", *key_opts(False, False), length, *typed,
        opt("--typed", action="store_true", help="read the value (hex) as key import does"),
        usage_error=True)
    cmd(k, "export", commands.key_export, "print an X9.143 key block (version D) of a key "
        "whose exportability is E or S", opt("--ref1", required=True, help="the key"),
        opt("--tr31", action="store_true", required=True, help="as a TR-31 key block"),
        opt("--kbpk", required=True, metavar="REF1", help="the authority key protecting the "
            "block (usage K1)"), IN_HOST)
    cmd(k, "list", commands.key_list, "list application keys (never a value)")

    u = group(sub, "unit", "emulated units")
    cmd(u, "create", commands.unit_create, "create emulated units of a set: one (--sn) or "
        "many at once (--sn-start and --count, or --manifest)", SET_ID,
        opt("--sn", help="serial number, hex (1-32 bytes)"),
        opt("--sn-start", metavar="HEX", help="the first SN of --count units, counted up"),
        opt("--count", type=int, metavar="N", help="how many units from --sn-start"),
        opt("--manifest", metavar="CSV", help="the units' SNs: a CSV with an sn column"),
        opt("--slot", action="append", default=[], metavar="REF2=TYPES", help="a slot and the "
            "key types it accepts, e.g. 1=aes256 or 2=aes128,aes256 (repeatable; default "
            "1=aes256)"),
        opt("--lock", action="append", type=int, default=[], metavar="REF2",
            help="lock this slot"),
        opt("--suites", help="suites the unit speaks (default 1,2; a unit of an identity "
            "set: 3)"),
        opt("--components", type=int, default=0, metavar="N", help="give the set's transport "
            "key as N components (needed when T lives in a token)"),
        opt("--unenrolled", action="store_true", help="(identity set) leave the unit without "
            "key and certificate, to serve it as a card and enrol it with unit enrol"),
        usage_error=True)
    cmd(u, "enrol", commands.unit_enrol, "enrol the card in a PC/SC reader in an identity "
        "set: it makes its key, the authority certifies it, the card stores C_U", SET_ID,
        opt("--reader", required=True, help="the PC/SC reader holding the card"),
        opt("--sn", required=True, help="the card's SN, hex (a card tells it only once "
            "enrolled)"))
    cmd(u, "status", commands.unit_status, "a unit's slots (GET SLOT STATUS)", SN)
    cmd(u, "list", commands.unit_list, "list emulated units; with --set, an identity set's "
        "register (each unit certified, active or revoked)",
        opt("--set", dest="set_id", help="an identity set's id (hex)"))
    cmd(u, "revoke", commands.unit_revoke, "revoke a unit of an identity set: its exports "
        "are refused (6983) from then on", SET_ID, SN)
    cmd(u, "certify", commands.unit_certify, "certify a unit of an identity set enrolled "
        "elsewhere: print C_U", SET_ID, SN,
        opt("--public-key", required=True, help="the unit's Q_U: an uncompressed P-256 point, "
            "hex (65 bytes, 04 || X || Y)"))
    cmd(u, "serve-card", commands.unit_serve_card,
        "serve emulated units as virtual cards to pcscd (vpcd), one after another",
        opt("--sn", action="append", default=[], help="a unit (repeatable; default all)"),
        opt("--port", type=int, default=35963, help="vpcd port (35963: first reader)"))

    cmd(sub, "readers", commands.readers, "the PC/SC readers and the card in each: its ATR, "
        "whether it answers keyload's SELECT, a unit's SN, set id and suites")
    ik_type = opt("--ik-type", help="the initial key's type (default the BDK's): aes128, "
                  "aes192, aes256, no longer than the BDK")
    cmd(sub, "load", commands.load, "load one key into one unit: an emulated one, or the card "
        "in a PC/SC reader", opt("--sn", old=["--unit"], help="the unit's SN (hex); with "
                                 "--reader, the card must be this unit"),
        opt("--reader", help="load the card in this PC/SC reader (suite 0x03 for a unit of "
            "an identity set)"),
        opt("--ref1", required=True, help="the key (REF1)"),
        opt("--ref2", required=True, type=int, help="the unit's slot (1-254)"),
        opt("--initial-key-id", metavar="HEX", help="REF1 a BDK (usage B0): load the unit's "
            "AES DUKPT initial key of this ID (8 bytes: BDK ID || derivation ID)"), ik_type,
        usage_error=True)
    d = group(sub, "dukpt", "AES DUKPT (X9.24-3) keys of a BDK, derived in the authority")
    cmd(d, "derive", commands.dukpt_derive, "the KCV of a transaction's working key",
        opt("--ref1", required=True, help="the BDK"), opt("--ksn", required=True, help="the "
            "terminal's KSN, hex (12 bytes: initial key ID || counter)"),
        opt("--usage", required=True, choices=["pin", "mac", "data"], help="the working "
            "key's use: PIN encryption, MAC generation, or data encryption"), ik_type)
    cmd(sub, "receipts", commands.receipts_verify,
        "have the authority verify every receipt in the station records")
    cmd(sub, "demo", demo.run, "customize a set of emulated units end to end",
        opt("--units", type=int, default=1000, help="how many emulated units"),
        opt("--workdir", help="keep everything in this directory, or --home's (default: a "
            "temporary one, removed at the end)"),
        opt("--authority", choices=["software", "pkcs11", "card"], default="software",
            help="software keystore, a PKCS#11 token (SoftHSM2), or the authority as a smart "
                 "card over PC/SC"),
        opt("--transport", choices=["local", "pcsc"], default="local",
            help="reach the units in-process, or as cards fed through a PC/SC reader"),
        opt("--suite", type=int, choices=[1, 2, 3],
            help="units offering only this suite; 3: units of an identity set, each with "
                 "its own key pair and certificate (default: units offering 1 and 2)"),
        opt("--quiet", action="store_true", help="no progress bar"), usage_error=True)
    campaigns.add_parsers(sub)
    service_cmds.add_parsers(sub)
    cmd(sub, "dashboard", commands.dashboard, "a read-only web page, live: campaigns (progress, "
        "loads/s, ETA, failures), the ledger, the audit chain, and a service's health",
        JOURNAL, *DASHBOARD)
    cmd(sub, "conformance", commands.conformance, "run KLP1 vector files (docs/protocol.md §9)",
        opt("files", nargs="*", metavar="FILE", help="default: the public vectors that come "
            "with keyload"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    _python_handles_sigint()
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        # --home and --json may come before or after the command: unless given, these
        args = build_parser().parse_args(argv, argparse.Namespace(json=False, home=None))
        rc: int = args.func(args)
    except KeyboardInterrupt:
        sys.stderr.write("keyload: interrupted\n")
        return 130
    except BrokenPipeError:  # `keyload … | head`: the reader has left; end quietly
        _quiet_stdout()
        return EXIT_PIPE
    except Usage as e:  # argparse's usage line and message, as argparse prints them
        e.parser.print_usage(sys.stderr)
        return _failed("--json" in argv, f"{e.parser.prog}: error: {e}", "usage", str(e),
                       EXIT_USAGE)
    except (errors.KeyloadError, ValueError, OSError) as e:
        return _failed("--json" in argv, f"keyload: error: {errors.one_line(e)}",
                       errors.error_code(e), errors.one_line(e), exit_code(e))
    return rc


def _failed(as_json: bool, line: str, code: str, message: str, rc: int) -> int:
    """An error: one line on stderr; with ``--json``, also ``{"error": {"code", "message",
    "exit"}}`` on stdout (``code``: the status word, or the error's class, or ``usage``)."""
    sys.stderr.write(line + "\n")
    if as_json:
        print(json.dumps({"error": {"code": code, "message": message, "exit": rc}}, indent=2))
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

    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


if __name__ == "__main__":
    sys.exit(main())
