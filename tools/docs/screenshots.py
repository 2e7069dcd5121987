"""Screenshots of the built documentation site in headless Chromium: home, quickstart, benchmarks.

    mkdocs build --strict && python -m tools.docs.screenshots [--site site] [--out docs-screenshots]

(``nox -s screenshots`` does both.) The site is served over HTTP from a local port, as a reader's
browser would load it, and each page is shot at a desktop width: the top of the page, and the
benchmarks page whole (tall window), to look at before a release.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

# name -> (path in the site, window height in pixels)
PAGES = {
    "home": ("", 1400),
    "quickstart": ("quickstart/", 1400),
    "benchmarks": ("benchmarks/", 1400),
    "benchmarks-full": ("benchmarks/", 9000),
}
WIDTH = 1280


def chromium() -> str:
    """The Chromium (or Chrome) binary: ``$CHROMIUM``, else the first one on ``PATH``."""
    for candidate in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if candidate and shutil.which(candidate):
            return shutil.which(candidate)
    raise SystemExit("no Chromium found: apt-get install chromium (or set CHROMIUM=/path/to/chrome)")


def serve(site: Path) -> http.server.ThreadingHTTPServer:
    """``site`` on a free local port, in a daemon thread."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(site)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def shoot(browser: str, url: str, path: Path, height: int) -> None:
    command = [
        browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--force-device-scale-factor=1",
        f"--window-size={WIDTH},{height}", "--virtual-time-budget=5000", f"--screenshot={path}", url,
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    if result.returncode != 0 or not path.is_file() or path.stat().st_size == 0:
        raise SystemExit(f"screenshot of {url} failed ({result.returncode}):\n{result.stderr[-2000:]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--site", default="site", help="the built site (mkdocs build)")
    parser.add_argument("--out", default="docs-screenshots")
    args = parser.parse_args()
    site, out = Path(args.site), Path(args.out)
    if not (site / "index.html").is_file():
        raise SystemExit(f"{site}/index.html not found: build the site first (mkdocs build --strict)")
    out.mkdir(parents=True, exist_ok=True)
    browser = chromium()
    server = serve(site)
    try:
        for name, (page, height) in PAGES.items():
            path = out / f"{name}.png"
            shoot(browser, f"http://127.0.0.1:{server.server_port}/{page}", path, height)
            print(f"{path} ({path.stat().st_size // 1024} KiB)")
    finally:
        server.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
