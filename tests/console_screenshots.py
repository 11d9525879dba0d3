"""``make screenshots``: the README's pictures of the web console, from a real run.

Runs what the console's browser tests run (``tests/console_scenario.py``: its own
``redis-server``, the demo scenario, a retried and redacted turn, a failed one and a wrong
refund through burst workers and telemetry, then ``turnfleet serve``), signs in with an operator key in Debian's Chromium and
writes 1280×800 PNGs of its four pages to ``docs/``::

    .venv/bin/python -m tests.console_screenshots [--out docs]
"""

from __future__ import annotations

import argparse
import re
import tempfile
from pathlib import Path

from tests.console_scenario import OPERATOR, WRONG_REFUND, console_fleet, launch_chromium

SIZE = {"width": 1280, "height": 800}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    from playwright.sync_api import expect, sync_playwright

    with tempfile.TemporaryDirectory(prefix="turnfleet-shots-") as workdir, \
            console_fleet(Path(workdir)) as fleet, sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        context = browser.new_context(viewport=SIZE, base_url=fleet.url, device_scale_factor=1)
        page = context.new_page()
        page.goto("/console/search")
        page.get_by_label("API key").fill(OPERATOR)
        page.get_by_role("button", name="Sign in").click()
        expect(page.locator("table.results tbody tr")).to_have_count(len(fleet.scenario.conversations))
        page.screenshot(path=args.out / "console-search.png")

        page.goto("/console/money")
        expect(page.locator("table.money tr.anomaly")).to_have_count(1)
        page.screenshot(path=args.out / "console-money.png")

        # The wrong refund, as an operator reaches it: its turn link in the money view. Fold
        # Triage and the eligibility check so that the refund's call, marked, is in the picture.
        page.locator("table.money tr.anomaly td.turn a").click()
        expect(page).to_have_url(re.compile(re.escape(f"/console/conversations/{WRONG_REFUND}#turn:")))
        page.locator("li.node-agent > details").first.evaluate("d => d.open = false")
        page.locator("li.node-tool > details").first.evaluate("d => d.open = false")
        mark = page.locator(".refund-mark.anomaly")
        expect(mark).to_be_visible()
        page.evaluate("window.scrollTo(0, document.querySelector('section.turn').offsetTop - 12)")
        page.screenshot(path=args.out / "console-conversation.png")

        page.goto("/console/live")
        expect(page.locator("#alert-status")).to_contain_text("live")
        expect(page.locator("#alerts li")).not_to_have_count(0)
        page.screenshot(path=args.out / "console-live.png")
        browser.close()
    for name in ("console-search.png", "console-money.png", "console-conversation.png", "console-live.png"):
        print(args.out / name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
