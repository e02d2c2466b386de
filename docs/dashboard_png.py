"""Make docs/dashboard.png: ``keyload dashboard`` during a running campaign, in headless
Chromium (Debian's ``chromium``, driven by Playwright as the dashboard's tests drive it).

The home is the demo's (an authority with two sets and three keys, emulated units, the
campaign ``demo`` planned: two loads per unit), made in a temporary directory. The campaign
runs in a thread, slowed to about 60 units/s so that the page shows it under way; every
37th unit's EXPORTKEY request has its challenge altered on its way to the authority, so
that unit refuses the key (6982) and the page has failures to show. The page is served by
the ``keyload`` command itself, and photographed once a third of the loads are done.

    python docs/dashboard_png.py [--units 600] [--out docs/dashboard.png]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path

from keyload.core import messages as msg
from keyload.core.aids import INS_EXPORT
from keyload.core.apdu import CommandAPDU, encode_command
from keyload.station.campaign import Interrupt, RunOptions
from keyload.station.demo import CAMPAIGN, DEMO_PASSPHRASE, setup_demo
from keyload.station.home import Home
from keyload.station.journal import open_journal
from keyload.station.run import run_emulated
from keyload.transports import Connection
from keyload.transports.local import LocalConnection
from keyload.units.authority import Authority
from keyload.units.storage import KekSource

CHROMIUM = "/usr/bin/chromium"
EVERY = 37  # every EVERY-th export is altered on its way: that unit refuses it (6982)


class Altering:
    """The station's path to the authority, altering R in every EVERY-th EXPORTKEY."""

    def __init__(self, inner: Connection) -> None:
        self.inner, self.exports = inner, 0

    def transmit(self, apdu: bytes) -> bytes:
        if apdu[1] == INS_EXPORT:
            self.exports += 1
            if self.exports % EVERY == 0:
                req = msg.ExportRequest.decode(CommandAPDU.decode(apdu).data)
                r = bytes((req.r[0] ^ 1,)) + req.r[1:]
                apdu = encode_command(0x80, INS_EXPORT, 0, 0, req._replace(r=r).encode(), 256)
        return self.inner.transmit(apdu)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--units", type=int, default=600)
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("dashboard.png"))
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    root = Path(tempfile.mkdtemp(prefix="keyload-dashboard-"))
    with ExitStack() as stack:
        stack.callback(shutil.rmtree, root, True)
        home = Home(root / "home", KekSource(passphrase=DEMO_PASSPHRASE))
        home.ensure()
        intr = Interrupt()
        setup_demo(home, home.create_authority(), args.units, say=print,
                   on_unit=lambda ok: None, interrupt=intr)
        journal = open_journal(home.journal_path)
        stack.callback(journal.close)
        opts = RunOptions(station="station-1", batch_units=16, lease_s=60.0, retries=1)

        def slowly(ok: bool) -> None:
            time.sleep(1 / 60)

        def connect(authority: Authority, _: ExitStack) -> Connection:
            return Altering(LocalConnection(authority))

        run = threading.Thread(target=run_emulated, daemon=True, args=(
            home, journal, CAMPAIGN, opts), kwargs={"on_unit": slowly, "interrupt": intr,
                                                    "connect": connect})
        run.start()
        stack.callback(run.join, 60)
        stack.callback(intr.stop.set)
        keyload = Path(sys.executable).with_name("keyload")
        dash = subprocess.Popen([str(keyload), "dashboard", "--home", str(home.root),
                                 "--port", "0"], stdout=subprocess.PIPE, text=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        stack.callback(dash.wait, 10)
        stack.callback(dash.terminate)
        assert dash.stdout is not None
        line = dash.stdout.readline()
        m = re.search(r"(http://\S+/)", line)
        if not m:
            print(f"the dashboard did not start: {line!r}", file=sys.stderr)
            return 1
        url = m.group(1)
        print(f"dashboard at {url}")
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                         args=["--no-sandbox"])
            try:
                page = browser.new_page(viewport={"width": 1100, "height": 900})
                page.goto(url)
                art = page.locator(f'article[data-campaign="{CAMPAIGN}"]')
                art.wait_for(timeout=10_000)
                want = 2 * args.units // 3
                while int(art.locator('[data-k="imported"]').inner_text()
                          .replace(",", "") or 0) < want:
                    time.sleep(0.2)
                time.sleep(1.2)  # a page refresh with the rate over a few samples
                page.screenshot(path=str(args.out), full_page=True)
            finally:
                browser.close()
    print(f"{args.out}: {args.out.stat().st_size:,} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
