"""python mobile_demo/screenshot.py [RUN] [--out mobile_demo/docs/demo_phone.png] [--seed 7]

Regenerates the demo's picture in README.md and mobile_demo/README.md from a run folder with an
ONNX export (python export/to_onnx.py RUN; RUN defaults to runs/quickstart, the quickstart's
run, which the picture shows): serves RUN with `python -m kvae.demo`'s server on a free port,
opens the page in Debian's Chromium (/usr/bin/chromium) through playwright on a 390x844 phone
viewport with touch emulation (the setup tests/test_demo.py drives), draws a "3" with real touch
events, taps a sample into Explore, sets the Interpolate ends from both and writes a full-page PNG.

Needs what the browser tests need: `apt-get install chromium`, `(cd mobile_demo && npm ci)` and
the playwright Python package (`pip install -e ".[test]"`); it never downloads a browser. Fails
(exit 1, nothing written) if the page shows an error, logs one, or a request fails.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from kvae.demo import make_server  # noqa: E402
from kvae.cli import ArgumentParser, cli_errors  # noqa: E402
from kvae.errors import KVAEError  # noqa: E402
from kvae.files import atomic_write_bytes  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = [  # docs/design.md, "Headless Chromium": quiet, offline, no GPU; playwright adds --headless itself
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
PHONE = dict(viewport={"width": 390, "height": 844}, device_scale_factor=2, is_mobile=True,
             has_touch=True)
QUICKSTART = ROOT / "runs" / "quickstart"  # the README's quickstart run: what the picture shows
THREE = [(0.3, 0.2), (0.68, 0.2), (0.45, 0.48), (0.7, 0.62), (0.6, 0.84), (0.3, 0.8)]  # a "3"


@contextlib.contextmanager
def demo_page(run: str | Path, profile: str | Path, timeout_ms: int = 60_000):
    """The demo for `run`, served by kvae.demo's server on a free port, open and ready in a
    phone-sized headless Chromium (`phone_page`); yields what phone_page yields."""
    server = make_server(run, port=0, quiet=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with phone_page(f"http://127.0.0.1:{server.server_address[1]}/", profile, timeout_ms) as opened:
            yield opened
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def phone_page(url: str, profile: str | Path, timeout_ms: int = 60_000, playwright=None):
    """The demo at `url`, open and ready in a phone-sized headless Chromium.

    Args:
      url: where the demo is served (kvae.demo's server, or any static server of its --bundle).
      profile: an empty folder for Chromium's profile (a fresh --user-data-dir).
      timeout_ms: playwright's default timeout for every wait (a safety net, not a speed goal).
      playwright: a started sync playwright to launch Chromium with (one thread runs one at a
        time); None starts one for this page.

    Yields:
      (page, problems, cdp): the playwright page; a list that collects console errors, uncaught
      exceptions, failed requests and HTTP errors while the page is open; a CDP session (touch).
    """
    from playwright.sync_api import sync_playwright

    problems: list[str] = []
    with contextlib.ExitStack() as stack:
        p = playwright or stack.enter_context(sync_playwright())
        context = p.chromium.launch_persistent_context(
            str(profile), executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS, headless=True, **PHONE)
        try:
            page = context.pages[0] if context.pages else context.new_page()
            page.set_default_timeout(timeout_ms)
            watch(page, problems)
            page.goto(url)
            page.wait_for_function("window.kvae !== undefined")
            page.evaluate("window.kvae.ready")
            yield page, problems, context.new_cdp_session(page)
        finally:
            context.close()


def watch(page, problems: list[str]) -> None:
    """Collects the page's console errors, uncaught exceptions, failed requests and HTTP errors."""
    page.on("console", lambda m: m.type == "error" and problems.append(f"console: {m.text}"))
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url}"))
    page.on("response", lambda r: r.status >= 400 and problems.append(f"HTTP {r.status}: {r.url}"))


def touch_stroke(cdp, points) -> None:
    """One finger down on points[0], moved through points, lifted: real touch events in Chromium."""
    cdp.send("Input.dispatchTouchEvent", {"type": "touchStart", "touchPoints": [{"x": points[0][0], "y": points[0][1]}]})
    for x, y in points[1:]:
        cdp.send("Input.dispatchTouchEvent", {"type": "touchMove", "touchPoints": [{"x": x, "y": y}]})
    cdp.send("Input.dispatchTouchEvent", {"type": "touchEnd", "touchPoints": []})


def polyline(box: dict, corners, steps: int = 12) -> list[tuple[float, float]]:
    """Canvas-relative corners (0..1) -> viewport points along the lines between them."""
    points = []
    for (u0, v0), (u1, v1) in zip(corners, corners[1:]):
        for k in range(steps):
            t = k / steps
            u, v = u0 + t * (u1 - u0), v0 + t * (v1 - v0)
            points.append((box["x"] + u * box["width"], box["y"] + v * box["height"]))
    u, v = corners[-1]
    points.append((box["x"] + u * box["width"], box["y"] + v * box["height"]))
    return points


def stage(page, cdp, seed: int) -> None:
    """Puts the page in the state the picture shows: a seeded sample grid, its first digit in
    Explore, a drawn "3" encoded and reconstructed, Interpolate from the drawing to that digit."""
    page.fill("#seed", str(seed))
    page.press("#seed", "Enter")
    page.wait_for_function(f"window.kvae.state.sample.seed === {seed}")
    grid = page.locator("#grid")
    grid.evaluate("el => el.scrollIntoView({block: 'center'})")  # clear of the sticky nav
    box = grid.bounding_box()
    version = page.evaluate("window.kvae.state.explore.version")
    page.touchscreen.tap(box["x"] + 0.125 * box["width"], box["y"] + 0.125 * box["height"])  # cell 0
    page.wait_for_function(f"window.kvae.state.explore.version > {version}")
    pen = page.locator("#pen")
    pen.evaluate("el => el.scrollIntoView({block: 'center'})")
    version = page.evaluate("window.kvae.state.draw.version")
    touch_stroke(cdp, polyline(pen.bounding_box(), THREE))
    page.wait_for_function(f"window.kvae.state.draw.version > {version} && window.kvae.state.draw.loc !== null")
    page.evaluate("window.kvae.settled()")
    for button, end in (("#a-from-draw", "a"), ("#b-from-explore", "b")):
        page.click(button)
        page.wait_for_function(f"window.kvae.state.slots.{end} !== null")
    page.wait_for_function("window.kvae.state.interp !== null && "
                           "window.kvae.state.interp.z[0] === window.kvae.state.slots.a[0]")
    page.evaluate("window.kvae.settled()")
    page.evaluate("window.scrollTo(0, 0)")


def screenshot(run: str | Path, out: str | Path, seed: int = 7) -> bytes:
    """Stages the demo for `run` and writes its full-page PNG to `out`; returns the PNG bytes."""
    with tempfile.TemporaryDirectory(prefix="kvae-chromium-") as profile:
        with demo_page(run, profile) as (page, problems, cdp):
            stage(page, cdp, seed)
            page.evaluate("window.kvae.offline")  # the footer says what the browser keeps offline
            status = page.text_content("#status")
            if problems or not status.startswith("Ready"):
                raise KVAEError(f"the demo did not run cleanly ({'; '.join(problems) or status}); "
                                f"nothing written")
            png = page.screenshot(full_page=True)
    png = _palette(png)
    atomic_write_bytes(out, png)
    return png


def _palette(png: bytes) -> bytes:
    """The PNG with 256 colours (gray digits on a dark page need no more): a third of the bytes."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.open(io.BytesIO(png)).convert("RGB").quantize(256).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def parse_args(argv=None) -> argparse.Namespace:
    parser = ArgumentParser(prog="python mobile_demo/screenshot.py",
                            description="Write the mobile demo's screenshot for RUN (headless Chromium, phone viewport).")
    parser.add_argument("run", metavar="RUN", nargs="?", default=str(QUICKSTART),
                        help="run folder with export/ (python export/to_onnx.py RUN; default "
                             "runs/quickstart: the README's picture)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "docs" / "demo_phone.png"),
                        help="PNG to write (default mobile_demo/docs/demo_phone.png)")
    parser.add_argument("--seed", type=int, default=7, help="seed of the sample grid (default 7)")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    with cli_errors("screenshot"):
        args = parse_args(argv)
        missing = [what for what, ok in (
            (f"{CHROMIUM} (apt-get install chromium)", CHROMIUM.is_file()),
            ('the playwright Python package (pip install -e ".[test]")', _has_playwright()),
        ) if not ok]
        if missing:
            raise KVAEError("the screenshot needs " + " and ".join(missing))
        screenshot(args.run, args.out, args.seed)
        print(f"screenshot: wrote {args.out}")


def _has_playwright() -> bool:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    main()
