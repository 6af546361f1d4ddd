#!/usr/bin/env python3
"""Render a robustops report in headless Chromium and check it: every figure loaded, every section
present. Writes a screenshot PNG.

    python scripts/report_check.py [REPORT_DIR] [--screenshot PNG] [--sections ...] [--skip-missing]

Chromium (Debian package ``chromium``) runs with ``--headless --no-sandbox --disable-gpu``:
``--dump-dom`` gives the DOM after the page's own check has run (report/html.py marks every
``<img>`` that failed to load and counts them in ``#render-check``), ``--screenshot`` the picture.
Exit 0: all good; 1: a check failed; 3: no Chromium (0 with ``--skip-missing``, after a message).
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile

SECTIONS = ("robustness", "fragile", "detection", "explanations", "speed")
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")


def find_browser(explicit: str | None = None) -> str | None:
    if explicit:
        return explicit if shutil.which(explicit) or os.path.isfile(explicit) else None
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    return None


def _run(browser: str, args: list, timeout: int) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="robustops-chromium-") as profile:
        cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               "--hide-scrollbars", "--allow-file-access-from-files", f"--user-data-dir={profile}",
               "--virtual-time-budget=15000"] + args
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def check(report_dir: str, screenshot: str, sections=SECTIONS, browser: str | None = None,
          width: int = 1280, height: int = 2400, timeout: int = 120) -> list:
    """Return the list of problems (empty: the report renders fully)."""
    index = os.path.abspath(os.path.join(report_dir, "index.html"))
    if not os.path.isfile(index):
        return [f"{index} does not exist; run `robustops report --out {report_dir}` first"]
    url = "file://" + index
    source = open(index, encoding="utf-8").read()
    n_img_source = len(re.findall(r"<img\b", source))
    problems = []
    dom = _run(browser, ["--dump-dom", url], timeout)
    if dom.returncode != 0 or "<html" not in dom.stdout:
        return [f"chromium --dump-dom failed (exit {dom.returncode}): {dom.stderr.strip()[-400:]}"]
    m = re.search(r'<div id="render-check"([^>]*)>', dom.stdout)
    if not m:
        problems.append("the page's render check did not run (no #render-check element)")
    else:
        attrs = dict(re.findall(r'data-([a-z]+)="([^"]*)"', m.group(1)))
        if "images" not in attrs:
            problems.append("the page's load handler did not run (JavaScript off or page never loaded)")
        else:
            if int(attrs["images"]) != n_img_source:
                problems.append(f"{attrs['images']} images in the rendered page, {n_img_source} in the source")
            if int(attrs.get("broken", "0")) != 0:
                names = re.findall(r'<img[^>]*data-broken="1"[^>]*data-file="([^"]*)"', dom.stdout)
                names += re.findall(r'<img[^>]*data-file="([^"]*)"[^>]*data-broken="1"', dom.stdout)
                problems.append(f"{attrs['broken']} broken image(s): {', '.join(sorted(set(names))) or '?'}")
    for s in sections:
        if not re.search(rf'<section[^>]*data-section="{s}"', dom.stdout):
            problems.append(f"section {s!r} is missing from the rendered page")
    if n_img_source == 0:
        problems.append("the report has no figure at all")
    os.makedirs(os.path.dirname(os.path.abspath(screenshot)) or ".", exist_ok=True)
    shot = _run(browser, [f"--screenshot={os.path.abspath(screenshot)}", f"--window-size={width},{height}", url],
                timeout)
    if not os.path.isfile(screenshot) or os.path.getsize(screenshot) < 1000:
        problems.append(f"no screenshot written (exit {shot.returncode}): {shot.stderr.strip()[-300:]}")
    return problems


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("report_dir", nargs="?", default="report")
    ap.add_argument("--screenshot", default=None, help="PNG to write (default: REPORT_DIR/screenshot.png)")
    ap.add_argument("--sections", nargs="+", default=list(SECTIONS))
    ap.add_argument("--browser", default=None, help="path or name of the Chromium binary")
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--height", type=int, default=2400)
    ap.add_argument("--skip-missing", action="store_true", help="exit 0 with a message when Chromium is absent")
    args = ap.parse_args(argv)
    browser = find_browser(args.browser)
    if browser is None:
        print("report_check: no Chromium found (apt-get install chromium); check skipped", file=sys.stderr)
        return 0 if args.skip_missing else 3
    shot = args.screenshot or os.path.join(args.report_dir, "screenshot.png")
    problems = check(args.report_dir, shot, args.sections, browser, args.width, args.height)
    if problems:
        for p in problems:
            print(f"report_check: FAIL: {p}", file=sys.stderr)
        return 1
    print(f"report_check: OK: {args.report_dir}/index.html renders with every figure and section "
          f"({', '.join(args.sections)}); screenshot {shot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
