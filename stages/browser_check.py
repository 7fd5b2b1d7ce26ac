"""Click through a built feature browser (e.g. the demo's) in headless Chromium: every view at 1000 and
1400 px with a screenshot, and every absorbed-word chip, which must land on a page that lists the latents
firing for the word with its absorbing latent marked; no "not found" and no console error anywhere.

    .venv/bin/python stages/browser_check.py reports/demo/features [--shots DIR] [--readme-shot PNG]
Exit code 1 when a chip lands on "not found" or loses its absorbing latent, or the console logs an error.
tests/test_inspect.py checks the same on a small built browser; this runs it on a real one.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from test_inspect import check_layout, chromium, console_errors, open_page  # noqa: E402

WIDTHS = (1000, 1400)


def views(meta: dict) -> dict[str, tuple[str, str]]:
    """Every view of the browser: name → (route, a CSS selector present once it is drawn)."""
    out = {}
    for k, s in enumerate(meta["saes"]):
        out[f"index-{s['name']}"] = (f"#sae={k}", "#index tr.latent-row")
        density = s["stats"]["density"]
        with_page = s["pages"] if s["pages"] is not None else range(s["d_sae"])
        j = max(with_page, key=lambda i: density[i])
        out[f"latent-{s['name']}-{j}"] = (f"#sae={k}&latent={j}", "tr.context")
    out["absorption"] = ("#view=absorption", "table.absorption")
    out["compare"] = ("#view=compare", "h2")
    if meta.get("n_texts"):
        out["texts"] = ("#view=texts", "#text-0")
    return out


def chip_hrefs(driver, uri: str) -> list[str]:
    """The absorbed-word chips of the absorption view and of the compare view's landing page."""
    from selenium.webdriver.common.by import By

    hrefs = []
    for route in ("#view=absorption", "#view=compare"):
        open_page(driver, uri + route, "h2")
        hrefs += [a.get_attribute("href") for a in driver.find_elements(By.CSS_SELECTOR, "a.word")]
    return hrefs


def check_chips(driver, hrefs: list[str]) -> list[str]:
    """Each distinct chip's page: not "not found", and its absorbing latent marked. Returns the failures."""
    from selenium.webdriver.common.by import By

    failed = []
    for href in sorted(set(hrefs)):
        open_page(driver, href, "table.compare, #not-found")
        marked = [m.text for m in driver.find_elements(By.CSS_SELECTOR, ".flag.role")]
        if driver.find_elements(By.ID, "not-found") or not any(m.startswith("absorbs") for m in marked):
            failed.append(href)
    return failed


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("browser", type=Path, help="a folder written by `atmpipe inspect`")
    p.add_argument("--shots", type=Path, default=Path("reports/browser-check"))
    p.add_argument("--readme-shot", type=Path, help="also save a latent page at 1400 px here")
    p.add_argument(
        "--readme-route",
        help="that page's route, e.g. '#sae=1&latent=1685' (default: the first SAE's densest)",
    )
    args = p.parse_args()
    index = (args.browser / "index.html").resolve()
    meta = json.loads(
        (args.browser / "data" / "index.js").read_text().removeprefix("ATM.index=").rstrip(";\n")
    )
    args.shots.mkdir(parents=True, exist_ok=True)
    uri, driver = index.as_uri(), chromium()
    try:
        for width in WIDTHS:
            driver.set_window_size(width, 900)
            for name, (route, css) in views(meta).items():
                open_page(driver, uri + route, css)
                check_layout(driver, width, args.shots, name)
        if args.readme_shot:
            driver.set_window_size(1400, 900)
            route = args.readme_route or next(v[0] for n, v in views(meta).items() if n.startswith("latent-"))
            open_page(driver, uri + route, "tr.context")
            driver.save_screenshot(str(args.readme_shot))
        hrefs = chip_hrefs(driver, uri)
        failed = check_chips(driver, hrefs)
        errors = console_errors(driver)
    finally:
        driver.quit()
    print(f"{len(views(meta))} views at {', '.join(map(str, WIDTHS))} px (screenshots in {args.shots}); "
          f"{len(hrefs)} absorbed-word chips, {len(set(hrefs))} distinct: {len(failed)} failed; "
          f"{len(errors)} console errors")  # fmt: skip
    for f in failed:
        print("  chip failed:", f)
    for e in errors:
        print("  console:", e)
    return 1 if failed or errors else 0


if __name__ == "__main__":
    sys.exit(main())
