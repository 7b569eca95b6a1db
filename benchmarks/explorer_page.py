"""explorer.html's size and how fast it opens: file size, first contentful paint and the time until the page has
drawn the first image's panels (its `explorer-ready` mark), median over several loads in headless Chromium.

    distill-jax run --workdir runs/explorer200 --set explain.num_images=200
    python benchmarks/explorer_page.py runs/explorer200/explorer.html --loads 5

Needs playwright (`pip install playwright`) and a Chromium on PATH (Debian: `apt-get install chromium`).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics

TIMINGS = """() => ({
  fcp: performance.getEntriesByName("first-contentful-paint")[0]?.startTime ?? null,
  ready: performance.getEntriesByName("explorer-ready")[0]?.startTime ?? null,
  images: JSON.parse(document.getElementById("explorer-data").textContent).count,
  models: document.querySelectorAll("#predictions tr[data-model]").length,
  maps: document.querySelectorAll("canvas.map").length,
})"""


def load_times(path: str, loads: int, browser_path: str) -> list[dict]:
    """One dict of page timings (ms) per fresh load of `path`."""
    from playwright.sync_api import sync_playwright

    out = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=browser_path, args=["--no-sandbox"])
        for _ in range(loads):
            page = browser.new_page(viewport={"width": 1300, "height": 1000})
            page.goto("file://" + os.path.abspath(path))
            page.wait_for_selector("body[data-ready=true]", timeout=120_000)
            page.wait_for_timeout(200)  # let the paint entries land
            out.append(page.evaluate(TIMINGS))
            page.close()
        version = browser.version
        browser.close()
    for row in out:
        row["browser"] = version
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("explorer", help="path of an explorer.html")
    p.add_argument("--loads", type=int, default=5)
    p.add_argument("--browser", default=shutil.which("chromium") or shutil.which("google-chrome"))
    args = p.parse_args(argv)
    if not args.browser:
        p.error("no Chromium found: pass --browser PATH")
    rows = load_times(args.explorer, args.loads, args.browser)
    summary = {"file_mb": round(os.path.getsize(args.explorer) / 2**20, 2), "loads": len(rows),
               "first_contentful_paint_ms": round(statistics.median(r["fcp"] for r in rows), 1),
               "ready_ms": round(statistics.median(r["ready"] for r in rows), 1),
               "images": rows[0]["images"], "models": rows[0]["models"], "maps": rows[0]["maps"],
               "browser": rows[0]["browser"]}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
