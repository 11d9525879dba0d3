"""The web console against a real ``turnfleet serve``, real Redis, real workers and telemetry.

One module-scoped fleet (``tests/console_scenario.py``): the demo scenario plus a retried,
redacted turn and one whose text is HTML, run through burst workers and burst telemetry,
then ``turnfleet serve`` as a subprocess. Nothing a test does changes what another reads
(the alert test adds alerts only it looks for), so each passes alone and in any order.

Browser tests drive Debian's Chromium (``/usr/bin/chromium``) with Playwright: its
``expect`` waits for the page to get there (auto-retrying assertions with a timeout), so no
test sleeps. Playwright rather than Selenium: it talks to Chromium over the DevTools protocol
directly, so no ``chromedriver`` has to match the browser's version, and its waiting
assertions make "appears without reload" a one-liner. ``make test`` installs Chromium with
apt when it is missing; without it these tests fail and say so, unless
``TURNFLEET_SKIP_BROWSER=1`` is set. The other tests here speak HTTP with httpx: auth, the
cookie, scoping, escaping.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis as redis_sync

from tests.console_scenario import (
    C100,
    C102,
    CHROMIUM,
    FAILED,
    FAILED_ATTEMPTS,
    MARKUP,
    OPERATOR,
    RETRIED,
    WRONG_REFUND,
    WRONG_REFUND_ASKED,
    WRONG_REFUND_ORDER,
    ConsoleFleet,
    console_fleet,
    launch_chromium,
)
from turnfleet import keys
from turnfleet.models import Alert
from turnfleet.formatting import money

PRIYA = "console-priya-refund"  # C-102: refund of order 1047, $229.00
DANA = "console-dana"  # C-100
SKIP_BROWSER = os.environ.get("TURNFLEET_SKIP_BROWSER") == "1"
browser_test = pytest.mark.skipif(SKIP_BROWSER, reason="TURNFLEET_SKIP_BROWSER=1")
WAIT_MS = 15_000  # what an expect() waits at most


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ConsoleFleet]:
    with console_fleet(tmp_path_factory.mktemp("console"), markup=True) as served:
        yield served


@pytest.fixture
def http(fleet: ConsoleFleet) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=fleet.url, timeout=30) as client:
        yield client


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def replay(http: httpx.Client, conversation_id: str) -> dict[str, Any]:
    """The JSON API's replay of a conversation (what the console must show)."""
    r = http.get(f"/v1/conversations/{conversation_id}", headers=bearer(OPERATOR))
    assert r.status_code == 200, r.text
    return r.json()


def count_nodes(nodes: list[dict[str, Any]]) -> int:
    return sum(1 + count_nodes(n["children"]) for n in nodes)


# -- the browser -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser(fleet: ConsoleFleet) -> Iterator[Any]:
    """Chromium under Playwright's sync API. After ``fleet``: while Playwright runs, this
    thread has a running event loop, and the scenario's ``asyncio.run`` must come first."""
    if SKIP_BROWSER:
        pytest.skip("TURNFLEET_SKIP_BROWSER=1")
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: `make test` installs it (apt-get install chromium), "
                    "or set TURNFLEET_SKIP_BROWSER=1 to skip the browser tests knowingly")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = launch_chromium(playwright)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser: Any, fleet: ConsoleFleet) -> Iterator[Any]:
    """A fresh browser context (no cookies) on a laptop-sized window."""
    context = browser.new_context(viewport={"width": 1280, "height": 800}, base_url=fleet.url)
    context.set_default_timeout(WAIT_MS)
    tab = context.new_page()
    try:
        yield tab
    finally:
        context.close()


def sign_in(page: Any, key: str, target: str = "/console/search") -> None:
    """Open ``target``, get sent to the login form, sign in, land back on ``target``."""
    from playwright.sync_api import expect

    page.goto(target)
    expect(page).to_have_url(re.compile(r"/console/login\?next="))
    page.get_by_label("API key").fill(key)
    page.get_by_role("button", name="Sign in").click()
    expect(page).to_have_url(re.compile(re.escape(target.split("?")[0]) + r"(\?|$)"))


@browser_test
def test_search_finds_the_refund_conversation_by_tool_name(page: Any) -> None:
    from playwright.sync_api import expect

    sign_in(page, OPERATOR)
    page.get_by_label("Tool called").fill("process_refund")
    page.get_by_role("button", name="Search").click()
    expect(page).to_have_url(re.compile(r"tool=process_refund"))
    links = page.locator("table.results tbody th a")
    # Exactly the conversations that refunded; the late refund was only checked.
    expect(links).to_have_text([RETRIED, WRONG_REFUND, PRIYA])
    links.filter(has_text=PRIYA).click()
    expect(page.get_by_role("heading", level=1)).to_have_text(f"Conversation {PRIYA}")


@browser_test
def test_tool_called_offers_the_known_names_and_matches_a_prefix(page: Any) -> None:
    from playwright.sync_api import expect

    sign_in(page, OPERATOR)
    offered = page.locator("datalist#tools option")
    expect(offered.filter(has=page.locator("[value=process_refund]"))).to_have_count(0)
    assert "process_refund" in offered.evaluate_all("options => options.map(o => o.value)")
    expect(page.get_by_label("Tool called")).to_have_attribute("list", "tools")
    page.get_by_label("Tool called").fill("process_")
    page.get_by_role("button", name="Search").click()
    expect(page.locator("p.tool-match")).to_contain_text("Tool called: process_refund")
    expect(page.locator("table.results tbody th a")).to_have_text([RETRIED, WRONG_REFUND, PRIYA])
    # No name starts with "refund": nothing, and the page says so, naming the known tools.
    page.get_by_label("Tool called").fill("refund")
    page.get_by_role("button", name="Search").click()
    expect(page.locator("p.tool-match")).to_contain_text("No known tool name starts with refund")
    expect(page.locator("p.tool-match")).to_contain_text("process_refund")
    expect(page.locator("table.results tbody tr")).to_have_count(0)


@browser_test
def test_conversation_shows_the_refund_amount_in_the_process_refund_result(page: Any) -> None:
    from playwright.sync_api import expect

    sign_in(page, OPERATOR, f"/console/conversations/{PRIYA}")
    tool = page.locator("li.node-tool").filter(has=page.locator("summary", has_text="process_refund"))
    expect(tool).to_have_count(1)
    result = tool.locator("pre.result")
    expect(result).to_be_visible()
    expect(result).to_contain_text('"amount": "229.00"')
    expect(result).to_contain_text('"refunded": true')
    expect(tool.locator("pre.args")).to_contain_text('"order_id": "1047"')
    # The tree collapses from the keyboard, and "Expand all" opens it again.
    billing = page.locator("li.node-agent > details > summary").filter(has_text="Billing")
    billing.focus()
    page.keyboard.press("Enter")
    expect(result).to_be_hidden()
    page.get_by_role("button", name="Expand all").click()
    expect(result).to_be_visible()


@browser_test
def test_the_timeline_has_one_bar_per_span(page: Any, http: httpx.Client) -> None:
    from playwright.sync_api import expect

    sign_in(page, OPERATOR, f"/console/conversations/{RETRIED}")
    attempts = replay(http, RETRIED)["turns"][0]["attempts"]
    assert [a["status"] for a in attempts] == ["failed", "completed"]
    sections = page.locator("section.attempt")
    expect(sections).to_have_count(2)
    for section, attempt in zip((sections.nth(0), sections.nth(1)), attempts):
        spans = count_nodes(attempt["tree"])
        assert spans >= 2
        expect(section.locator("table.waterfall rect.bar.span")).to_have_count(spans)
        expect(section.locator("ul.tree li.node")).to_have_count(spans)
    expect(sections.nth(0)).to_contain_text("InternalServerError: Error code: 500")
    # The turn's time split: queue wait, model and tool time, each with its figure.
    legend = page.locator("figure.breakdown .legend")
    for part in ("queue wait", "model", "tools", "other"):
        expect(legend).to_contain_text(part)
    expect(page.locator("figure.breakdown rect.seg-model")).to_have_count(1)


@browser_test
def test_errors_column_says_recovered_for_a_retried_turn_and_failed_for_a_failed_one(page: Any) -> None:
    from playwright.sync_api import expect

    sign_in(page, OPERATOR)
    rows = page.locator("table.results tbody tr")
    retried = rows.filter(has=page.get_by_role("link", name=RETRIED, exact=True))
    failed = rows.filter(has=page.get_by_role("link", name=FAILED, exact=True))
    expect(retried.locator("td.errors")).to_have_text("recovered (InternalServerError)")
    expect(failed.locator("td.errors")).to_have_text("failed (InternalServerError)")
    expect(rows.filter(has=page.get_by_role("link", name=PRIYA, exact=True)).locator("td.errors")).to_have_text("–")


@browser_test
def test_a_failed_turn_shows_the_time_its_attempts_spent(page: Any, http: httpx.Client) -> None:
    from playwright.sync_api import expect

    [turn] = replay(http, FAILED)["turns"]
    assert turn["turn"]["status"] == "failed"
    assert [a["status"] for a in turn["attempts"]] == ["failed"] * FAILED_ATTEMPTS
    sign_in(page, OPERATOR, f"/console/conversations/{FAILED}")
    figures = page.locator("section.turn dl.figures")
    duration = figures.locator("div").filter(has=page.locator("dt", has_text="Duration")).locator("dd")
    expect(duration).to_have_text(re.compile(r"^[\d,.]+ (ms|s)$"))
    model = page.locator("figure.breakdown .legend li").filter(has_text="model").locator("strong")
    expect(model).not_to_have_text(re.compile(r"^(0 ms|–)$"))
    expect(model).to_have_text(re.compile(r"^[\d,.]+ (ms|s)$"))


@browser_test
def test_money_view_lists_every_refund_and_marks_the_one_a_money_path_check_failed_on(
    page: Any, http: httpx.Client,
) -> None:
    from playwright.sync_api import expect

    sign_in(page, OPERATOR, "/console/money")
    rows = page.locator("table.money tbody tr")
    # Newest first: the retried refund (1042, $89), the flawed model's (1049), Priya's (1047).
    expect(rows.locator("th.order")).to_have_text(["1042", WRONG_REFUND_ORDER, "1047"])
    expect(rows.locator("td.amount")).to_have_text(["89.00", re.compile(r"^\d+\.\d\d$"), "229.00"])
    priya = rows.filter(has=page.get_by_role("link", name=PRIYA, exact=True))
    expect(priya.locator("td.eligibility")).to_have_text("229.00")
    expect(priya.locator("td.checks")).to_have_text("passed")
    wrong = rows.filter(has=page.get_by_role("link", name=WRONG_REFUND, exact=True))
    expect(wrong).to_have_class(re.compile(r"\banomaly\b"))
    expect(wrong.locator("td.checks")).to_contain_text("anomaly: refund_order_named_by_customer")
    expect(page.locator("table.money tr.anomaly")).to_have_count(1)
    # The amount the flawed model refunded is the eligible one: only the check catches it.
    [refund] = [r for r in http.get("/console/money.json", headers=bearer(OPERATOR)).json()["refunds"]
                if r["conversation_id"] == WRONG_REFUND]
    assert refund["amount_matches"] is True and refund["eligible"] is True
    assert [a["check"] for a in refund["anomalies"]] == ["refund_order_named_by_customer"]
    # Anomalies only.
    page.get_by_label("Anomalies only").check()
    page.get_by_role("button", name="Filter").click()
    expect(rows.locator("th.order")).to_have_text([WRONG_REFUND_ORDER])
    # Sorted by amount, both ways; filtered by order.
    page.goto("/console/money")
    page.get_by_role("link", name="Amount").click()
    amounts = [float(a) for a in rows.locator("td.amount").all_inner_texts()]
    assert amounts == sorted(amounts) and len(amounts) == 3
    page.get_by_role("link", name="Amount ↑").click()
    expect(page).to_have_url(re.compile(r"sort=amount&dir=desc"))
    assert [float(a) for a in rows.locator("td.amount").all_inner_texts()] == sorted(amounts, reverse=True)
    page.get_by_label("Order").fill("1047")
    page.get_by_role("button", name="Filter").click()
    expect(rows.locator("th.order")).to_have_text(["1047"])


@browser_test
def test_conversation_page_marks_the_wrong_refund_inline_and_the_money_view_links_to_its_turn(
    page: Any, http: httpx.Client,
) -> None:
    from playwright.sync_api import expect

    [refund] = [r for r in http.get("/console/money.json", headers=bearer(OPERATOR)).json()["refunds"]
                if r["conversation_id"] == WRONG_REFUND]
    [anomaly] = refund["anomalies"]
    assert anomaly["check"] == "refund_order_named_by_customer" and anomaly["reason"]
    sign_in(page, OPERATOR, "/console/money")
    row = page.locator("table.money tbody tr").filter(has=page.get_by_role("link", name=WRONG_REFUND, exact=True))
    row.locator("td.turn a").click()
    expect(page).to_have_url(re.compile(
        rf"/console/conversations/{re.escape(WRONG_REFUND)}#turn:{re.escape(refund['turn_id'])}$"))
    turn = page.locator("section.turn:target")  # the anchor is the refund's turn
    expect(turn.locator("h2")).to_contain_text(refund["turn_id"])
    expect(turn.locator("h2")).to_contain_text("wrong refund")
    call = turn.locator("li.node-tool").filter(has=page.locator("summary", has_text="process_refund"))
    expect(call).to_have_count(1)
    expect(call.locator(":scope > details > summary")).to_contain_text("wrong refund")
    mark = call.locator(".refund-mark")
    expect(mark).to_be_visible()
    expect(mark).to_have_class(re.compile(r"\banomaly\b"))
    expect(mark.locator(".order")).to_have_text(WRONG_REFUND_ORDER)
    expect(mark.locator(".amount")).to_have_text(refund["amount"])
    expect(mark.locator(".eligibility")).to_have_text(refund["eligibility_amount"])
    expect(mark.locator(".check")).to_have_text("refund_order_named_by_customer")
    expect(mark.locator(".reason")).to_have_text(anomaly["reason"])
    expect(mark.locator(".reason")).to_contain_text(WRONG_REFUND_ASKED)  # the order the customer named
    # A right refund shows what it paid, unmarked.
    page.goto(f"/console/conversations/{PRIYA}")
    right = page.locator("li.node-tool").filter(has=page.locator("summary", has_text="process_refund"))
    expect(right.locator(".refund-mark .amount")).to_have_text("229.00")
    expect(right.locator(".refund-mark .eligibility")).to_have_text("229.00")
    expect(page.locator(".refund-mark.anomaly")).to_have_count(0)
    expect(page.get_by_text("wrong refund")).to_have_count(0)


def test_money_json_is_scoped_to_the_key_and_names_a_bad_filter(http: httpx.Client) -> None:
    def conversations(key: str, **params: str) -> list[str]:
        r = http.get("/console/money.json", params=params, headers=bearer(key))
        assert r.status_code == 200, r.text
        return [row["conversation_id"] for row in r.json()["refunds"]]

    assert conversations(OPERATOR) == [RETRIED, WRONG_REFUND, PRIYA]
    assert conversations(C100) == [RETRIED]
    assert conversations(C102) == [PRIYA]
    assert conversations(C100, customer="C-102") == []  # another customer's: as if none
    assert conversations(OPERATOR, customer="C-102") == [PRIYA]
    assert conversations(OPERATOR, anomalies="1") == [WRONG_REFUND]
    [row] = http.get("/console/money.json", params={"order": "1047"}, headers=bearer(OPERATOR)).json()["refunds"]
    assert (row["amount"], row["eligibility_amount"], row["refunded"], row["customer_id"]) == \
        ("229.00", "229.00", True, "C-102")
    assert row["turn_id"] == f"{PRIYA}-t1" and row["anomalies"] == [] and row["checks"] is True
    r = http.get("/console/money.json", params={"sort": "price"}, headers=bearer(OPERATOR))
    assert r.status_code == 400 and r.json()["field"] == "sort"
    assert http.get("/console/money.json").status_code == 401
    assert http.get("/console/money").status_code == 303


@browser_test
def test_an_alert_appears_on_the_live_page_without_reload(page: Any, fleet: ConsoleFleet) -> None:
    from playwright.sync_api import expect

    sign_in(page, C100, "/console/live")
    page.evaluate("window.loadedOnce = true")  # gone if the page reloads
    expect(page.locator("#alert-status")).to_contain_text("live")
    client = redis_sync.Redis.from_url(fleet.redis_url, decode_responses=True)
    try:
        for customer, subject in (("C-102", "not-for-c100"), ("C-100", "for-c100")):
            alert = Alert(alert_id=f"al_console_{subject}", rule="conversation_cost",
                          subject_kind="conversation", subject=DANA, window="lifetime",
                          message=f"Console test alert {subject}", conversation_id=DANA,
                          customer_id=customer)
            client.xadd(keys.ALERTS_STREAM, {"alert": alert.model_dump_json()})
    finally:
        client.close()
    arrived = page.locator("#alerts li").filter(has_text="Console test alert for-c100")
    expect(arrived).to_be_visible()
    expect(arrived.get_by_role("link", name=DANA)).to_have_attribute(
        "href", f"/console/conversations/{DANA}")
    # Alerts come in stream order: the other customer's, written first, was not shown.
    expect(page.locator("#alerts li").filter(has_text="not-for-c100")).to_have_count(0)
    assert page.evaluate("window.loadedOnce") is True


@browser_test
def test_live_page_shows_spend_today_and_the_last_hour(page: Any) -> None:
    from playwright.sync_api import expect

    sign_in(page, OPERATOR, "/console/live")
    spend = page.locator("section.spend")
    expect(spend.locator("table").first.locator("tbody th")).to_contain_text(
        ["C-104", "C-103", "C-100", "C-102", "C-101"])  # by cost today
    expect(spend).to_contain_text("turnfleet-offline")
    expect(spend).to_contain_text("gpt-4o-mini")
    for chart in ("turns", "errors", "p95"):
        expect(page.locator(f"#chart-{chart} svg")).to_be_visible()
    expect(page.locator("#chart-turns polyline")).not_to_have_count(0)


@browser_test
def test_live_charts_draw_their_latest_point_whole_and_round(page: Any) -> None:
    """The scenario's turns all finished in the last minute or two: one data point per chart."""
    from playwright.sync_api import expect

    sign_in(page, OPERATOR, "/console/live")
    for chart in ("turns", "errors", "p95"):
        svg = page.locator(f"#chart-{chart} svg")
        dots = svg.locator(".dot")
        expect(dots).not_to_have_count(0)
        box, dot = svg.bounding_box(), dots.last.bounding_box()
        assert box and dot, chart
        # A visible round dot (not an ellipse squeezed by the stretched box), wholly inside.
        assert dot["width"] >= 5 and dot["height"] >= 5 and abs(dot["width"] - dot["height"]) < 1, (chart, dot)
        assert box["x"] <= dot["x"] and dot["x"] + dot["width"] <= box["x"] + box["width"], (chart, dot, box)
        assert box["y"] <= dot["y"] and dot["y"] + dot["height"] <= box["y"] + box["height"], (chart, dot, box)
        expect(page.locator(f"#chart-{chart} .axis")).to_contain_text("0 – ")


@browser_test
def test_a_customer_key_gets_the_not_found_page_for_another_customers_conversation(
    page: Any,
) -> None:
    from playwright.sync_api import expect

    sign_in(page, C100, f"/console/conversations/{DANA}")  # C-100's own: shown
    expect(page.get_by_role("heading", level=1)).to_have_text(f"Conversation {DANA}")
    response = page.goto(f"/console/conversations/{PRIYA}")  # C-102's
    assert response is not None and response.status == 404
    expect(page.get_by_role("heading", level=1)).to_have_text("Not found")
    hidden = page.locator("main").inner_text()
    response = page.goto("/console/conversations/console-no-such-conversation")
    assert response is not None and response.status == 404
    missing = page.locator("main").inner_text()
    assert hidden.replace(PRIYA, "ID") == missing.replace("console-no-such-conversation", "ID")
    # Its search does not find the other customer's refund either.
    page.goto("/console/search?tool=process_refund")
    expect(page.locator("table.results tbody th a")).to_have_text([RETRIED])


@browser_test
def test_sign_in_refuses_an_unknown_key_and_sign_out_forgets_the_key(page: Any) -> None:
    from playwright.sync_api import expect

    page.goto("/console/live")
    page.get_by_label("API key").fill("tfk_not-a-key")
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("alert")).to_have_text("That key is not known here.")
    page.get_by_label("API key").fill(OPERATOR)
    page.get_by_role("button", name="Sign in").click()
    expect(page).to_have_url(re.compile(r"/console/live$"))
    page.get_by_role("button", name="Sign out").click()
    expect(page).to_have_url(re.compile(r"/console/login$"))
    page.goto("/console/search")
    expect(page).to_have_url(re.compile(r"/console/login\?next="))


# -- HTTP: auth, cookie, scoping, escaping ------------------------------------------------------


def test_without_a_key_pages_redirect_to_login_and_streams_are_refused(http: httpx.Client) -> None:
    r = http.get("/console/search?tool=process_refund")
    assert r.status_code == 303
    assert r.headers["location"] == "/console/login?next=%2Fconsole%2Fsearch%3Ftool%3Dprocess_refund"
    for path in (f"/console/conversations/{PRIYA}", "/console/live", "/console", "/console/nope"):
        r = http.get(path)
        assert r.status_code == 303 and r.headers["location"].startswith("/console/"), path
    assert http.get("/console/live/alerts").status_code == 401
    assert http.get("/console/live/panels").status_code == 401
    with httpx.Client(base_url=str(http.base_url), cookies={"turnfleet_console": "tfk_not-a-key"}) as c:
        assert c.get("/console/search").status_code == 303
    # The JSON API's headers work too (scripts, curl).
    assert http.get("/console/search", headers=bearer(OPERATOR)).status_code == 200
    assert http.get("/console/search", headers={"X-API-Key": C100}).status_code == 200


def test_login_sets_an_httponly_strict_cookie_for_the_console_only(http: httpx.Client) -> None:
    r = http.post("/console/login", data={"api_key": C100, "next": "/console/live"})
    assert r.status_code == 303 and r.headers["location"] == "/console/live"
    cookie = r.headers["set-cookie"]
    assert cookie.startswith(f"turnfleet_console={C100};")
    attributes = {part.strip().split("=")[0].lower() for part in cookie.split(";")[1:]}
    assert {"httponly", "path", "samesite", "max-age"} <= attributes
    assert "Path=/console" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict")
    assert "secure" not in attributes  # plain http here; https gets Secure
    # Only this server's pages: a foreign `next` is ignored, a foreign Origin refused.
    r = http.post("/console/login", data={"api_key": C100, "next": "https://evil.example/"})
    assert r.headers["location"] == "/console/search"
    r = http.post("/console/login", data={"api_key": C100, "next": "//evil.example/console"})
    assert r.headers["location"] == "/console/search"
    r = http.post("/console/login", data={"api_key": C100}, headers={"Origin": "https://evil.example"})
    assert r.status_code == 403 and "set-cookie" not in r.headers
    r = http.post("/console/login", data={"api_key": "tfk_nope"})
    assert r.status_code == 401 and "set-cookie" not in r.headers
    with httpx.Client(base_url=str(http.base_url), cookies={"turnfleet_console": C100}) as c:
        assert c.get("/console/search").status_code == 200  # the cookie alone signs in
        r = c.post("/console/logout")
    assert r.status_code == 303 and 'turnfleet_console=""' in r.headers["set-cookie"]
    assert "Max-Age=0" in r.headers["set-cookie"]


def test_another_customers_conversation_is_the_same_404_as_a_missing_one(http: httpx.Client) -> None:
    own = http.get(f"/console/conversations/{DANA}", headers=bearer(C100))
    assert own.status_code == 200 and f"Conversation <code>{DANA}</code>" in own.text
    hidden = http.get(f"/console/conversations/{PRIYA}", headers=bearer(C100))
    missing = http.get("/console/conversations/console-nope", headers=bearer(C100))
    assert hidden.status_code == missing.status_code == 404
    assert hidden.text.replace(PRIYA, "X") == missing.text.replace("console-nope", "X")
    assert http.get(f"/console/conversations/{PRIYA}", headers=bearer(OPERATOR)).status_code == 200
    # Search: another customer's conversations are as invisible as a customer with none.
    r = http.get("/console/search", params={"customer": "C-102"}, headers=bearer(C100))
    assert r.status_code == 200 and "No conversation matches these filters." in r.text
    assert PRIYA not in r.text
    # Live: spend of its own customer only, and no fleet-wide charts.
    live = http.get("/console/live", headers=bearer(C100)).text
    assert "<th scope=\"row\">C-100</th>" in live and "C-102" not in live.split("Spend today")[1]
    assert "need an operator key" in live and 'id="chart-turns"' not in live


def test_pages_escape_what_they_show_and_mark_redacted_values(http: httpx.Client) -> None:
    page = http.get(f"/console/conversations/{MARKUP}", headers=bearer(OPERATOR))
    assert page.status_code == 200
    assert "&lt;img src=x onerror=&#34;alert(1)&#34;&gt; &lt;b&gt;Where&lt;/b&gt;" in page.text
    assert "<img" not in page.text and "<b>Where" not in page.text
    assert page.headers["content-security-policy"].startswith("default-src 'none'; script-src 'self'")
    assert page.headers["x-frame-options"] == "DENY" and page.headers["cache-control"] == "no-store"
    # The retried turn: the card and email are shown as redacted, never as written.
    retried = http.get(f"/console/conversations/{RETRIED}", headers=bearer(OPERATOR)).text
    assert '<mark class="redacted" title="redacted: card">[REDACTED:card]</mark>' in retried
    assert "[REDACTED:email]" in retried
    assert "4242" not in retried and "example.com" not in retried


def test_conversation_page_shows_tokens_and_cost_per_turn_and_in_total(http: httpx.Client) -> None:
    data = replay(http, "console-aiko-long")
    page = http.get("/console/conversations/console-aiko-long", headers=bearer(OPERATOR)).text
    totals = data["totals"]
    assert len(data["turns"]) == 6 and totals["turns_completed"] == 6
    figures = re.findall(r"<dt>Cost</dt><dd>([^<]+)</dd>", page)
    assert figures == [money(totals["cost_usd"])] + [money(t["telemetry"]["cost_usd"]) for t in data["turns"]]
    tokens = re.findall(r"<dt>Tokens in → out</dt><dd>([^<]+)</dd>", page)
    assert tokens[0] == f"{totals['input_tokens']:,} → {totals['output_tokens']:,}"
    assert tokens[1:] == [f"{t['turn']['usage']['input_tokens']:,} → {t['turn']['usage']['output_tokens']:,}"
                          for t in data["turns"]]


def test_search_says_which_filter_is_wrong_and_pages_stay_inside_the_console(http: httpx.Client) -> None:
    r = http.get("/console/search", params={"since": "yesterday", "min_cost": "-1"},
                 headers=bearer(OPERATOR))
    assert r.status_code == 400
    assert "not a time: &#39;yesterday&#39;" in r.text and "a number of dollars, 0 or more" in r.text
    assert 'id="f-since" name="since" type="text" value="yesterday"' in r.text
    r = http.get("/console/search", params={"min_cost": "0.004"}, headers=bearer(OPERATOR))
    assert r.status_code == 200 and "console-aiko-long" in r.text and PRIYA not in r.text
    assert http.get("/console/static/console.js").headers["content-type"].startswith("text/javascript")
    for path in ("/console/static/console.py", "/console/static/..%2Fconsole.py",
                 "/console/static/%2E%2E/console.py"):
        r = http.get(path)
        assert r.status_code in (303, 404) and "import" not in r.text, path
    paths = http.get("/openapi.json").json()["paths"]
    assert paths and not [p for p in paths if p.startswith("/console")]


def test_search_pages_through_conversations_newest_first(http: httpx.Client, fleet: ConsoleFleet) -> None:
    everything = [row["conversation_id"] for row in http.get("/v1/find", headers=bearer(OPERATOR)).json()]
    assert len(everything) == len(fleet.scenario.conversations) == 9

    def shown(page: str) -> list[str]:
        return re.findall(r'<th scope="row"><a href="/console/conversations/([^"]+)">', page)

    r = http.get("/console/search", headers=bearer(OPERATOR))
    assert shown(r.text) == everything and 'rel="next"' not in r.text  # one page of 25
    pages, url = [], "/console/search?size=3"
    while url:
        r = http.get(url, headers=bearer(OPERATOR))
        assert r.status_code == 200
        pages.append(shown(r.text))
        older = re.search(r'<a href="([^"]+)" rel="next">', r.text)
        url = older.group(1).replace("&amp;", "&") if older else None
    assert pages == [everything[0:3], everything[3:6], everything[6:]]
    assert "Conversations 7–9, newest last event first" in r.text and 'rel="prev"' in r.text


def test_a_turn_shows_its_workflow_and_version_and_search_filters_by_them(http: httpx.Client) -> None:
    [first, *_] = replay(http, "console-aiko-long")["turns"]
    workflow, version = first["turn"]["workflow"], first["turn"]["version"]
    assert workflow == "support-desk" and version  # the built-in app, fingerprinted
    page = http.get("/console/conversations/console-aiko-long", headers=bearer(OPERATOR)).text
    assert f"<dt>Workflow</dt><dd>{workflow}</dd>" in page
    assert f"<dt>Version</dt><dd><code>{version}</code></dd>" in page
    found = http.get("/console/search", params={"workflow": workflow, "version": version},
                     headers=bearer(OPERATOR)).text
    assert "console-aiko-long" in found and f"<code>{version}</code>" in found
    none = http.get("/console/search", params={"workflow": workflow, "version": "0@0000"},
                    headers=bearer(OPERATOR)).text
    assert "No conversation matches these filters" in none
