"""A whole flash sale through the two pages, in headless Chromium (run by scripts/browser-test).

An operator signs in to the console, creates a sale of one unit starting in 25 seconds,
preheats it (and backs out of a forced rebuild at its confirmation). Two shoppers, each in a
browser of their own (one desktop-sized, one phone-sized), sign in on the storefront with the
development sign-in and watch the countdown; at the start both press "Buy now": the first wins,
watches the reservation reach "confirmed", pays and sees "paid"; the other is told it is sold
out. The console then shows remaining 0 and one order, and lists it, paid.

Every step asserts what a person would read; any miss raises, and the script exits non-zero.
Screenshots of each page go to $ARTIFACTS. Environment: SHOP_URL, CONSOLE_URL, ADMIN_TOKEN,
ARTIFACTS.
"""

import datetime
import json
import os
import re
import shutil
import sys
import time
import urllib.request

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import WebDriverWait

SHOP = os.environ["SHOP_URL"]
CONSOLE = os.environ["CONSOLE_URL"]
ADMIN_TOKEN = os.environ["ADMIN_TOKEN"]
ARTIFACTS = os.environ.get("ARTIFACTS", "target/browser")
STARTS_IN = 25  # seconds from creation to the sale's start

browsers = []


# 1999 minor units of EUR as the browser's language writes them ("€19.99" in en-US).
EURO = r"€\s?19\.99|19,99\s?€"


def step(text):
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def browser(width, height):
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--no-first-run",
        "--disable-extensions",
        f"--window-size={width},{height}",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(
        options=options,
        service=Service(shutil.which("chromedriver") or "/usr/bin/chromedriver"),
    )
    driver.set_page_load_timeout(30)
    browsers.append(driver)
    return driver


def find(driver, css):
    return driver.find_element(By.CSS_SELECTOR, css)


def wait(driver, what, condition, timeout=20):
    """Waits for condition(driver) to be truthy; on timeout, says what was awaited."""
    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.1).until(condition)
    except Exception as e:  # TimeoutException, with the page's state for the reader
        body = driver.find_element(By.TAG_NAME, "body").text
        raise AssertionError(f"timed out waiting for {what}; the page reads:\n{body}") from e


def wait_text(driver, css, pattern, timeout=20):
    """Waits until the element's visible text matches pattern (a regex); returns the text."""

    def seen(d):
        try:
            text = find(d, css).text
        except Exception:
            return False
        return text if re.search(pattern, text) else False

    return wait(driver, f"{css} to read /{pattern}/", seen, timeout)


def shot(driver, name):
    path = os.path.join(ARTIFACTS, f"{name}.png")
    driver.save_screenshot(path)
    step(f"screenshot {path}")


def no_script_errors(driver, who):
    """The page's console has no error: no CSP violation, no exception. The browser also
    reports every 4xx answer, which the pages expect and put in words (404 no_reservation
    before a purchase, 410 sold_out): those are not errors of the page."""
    errors = [
        e["message"]
        for e in driver.get_log("browser")
        if e["level"] == "SEVERE"
        and "favicon.ico" not in e["message"]
        and "the server responded with a status of 4" not in e["message"]
        # The event stream ends when the reservation is over: the browser reports the closed
        # connection, which the page expects.
        and "/events?token=" not in e["message"]
    ]
    assert not errors, f"{who}'s browser console has errors: {errors}"


def operator_creates_and_preheats(console):
    step("operator: console, sign in")
    console.get(f"{CONSOLE}/console")
    wait(console, "the sign-in form", EC.visibility_of_element_located((By.ID, "admin-token")))
    # Signed out, the page body is the sign-in: a heading and how to get the token.
    wait_text(console, "#signin-title", r"^Sign in$")
    assert "SECKILL_ADMIN_TOKEN" in find(console, "#signed-out").text
    find(console, "#admin-token").send_keys(ADMIN_TOKEN)
    find(console, "#login button[type=submit]").click()
    wait(console, "the console", EC.visibility_of_element_located((By.ID, "create")))
    assert not find(console, "#signed-out").is_displayed(), "the sign-in goes once signed in"
    wait_text(console, "#queue-depth", r"^\d+$")

    step("operator: create a sale of 1 unit, priced in euros")
    name = find(console, "#c-name")
    name.send_keys("Lucky cat")
    for css, value in (("#c-stock", 1), ("#c-price", 1999), ("#c-currency", "EUR"), ("#c-starts", STARTS_IN), ("#c-lasts", 10)):
        field = find(console, css)
        field.clear()
        field.send_keys(str(value))
    find(console, "#create button[type=submit]").click()
    text = wait_text(console, "#notice", r"Created product \d+")
    product = int(re.search(r"Created product (\d+)", text).group(1))
    card = f'.card[data-product-id="{product}"]'
    wait_text(console, f"{card} .badge", r"Not preheated")
    wait_text(console, f'{card} [data-figure="price"]', EURO)

    step(f"operator: preheat product {product}")
    find(console, f"{card} .actions button:not(.secondary)").click()
    wait_text(console, "#notice", rf"Preheated product {product}: 1 units on sale")
    wait_text(console, f"{card} .badge", r"Upcoming")
    wait_text(console, f'{card} dd[data-figure="remaining"]', r"^1$")

    step("operator: a forced rebuild asks first; back out")
    find(console, f"{card} .actions button.secondary").click()
    alert = wait(console, "the confirmation", EC.alert_is_present(), 5)
    assert "Rebuild sale" in alert.text, alert.text
    alert.dismiss()
    wait_text(console, "#notice", rf"Forced preheat of {product} not done")
    shot(console, "console-preheated")
    return product, card


def shopper_finds_the_sale(driver, product):
    """The storefront's front page lists the sales on now or coming; the shopper follows it."""
    driver.get(f"{SHOP}/")
    link = wait(
        driver,
        "the sale in the front page's listing",
        EC.element_to_be_clickable((By.CSS_SELECTOR, f"#sales-list a[href='/p/{product}']")),
    )
    assert "Lucky cat" in link.text, link.text
    item = link.find_element(By.XPATH, "..")
    assert re.search(EURO, item.text), item.text
    link.click()


def shopper_signs_in(driver, product, user, navigate=True):
    if navigate:
        driver.get(f"{SHOP}/p/{product}")
    wait_text(driver, "#name", r"Lucky cat")
    wait_text(driver, "#price", rf"^({EURO})$")
    user_field = wait(driver, "the development sign-in", EC.visibility_of_element_located((By.ID, "dev-user")))
    user_field.send_keys(str(user), Keys.ENTER)  # the keyboard, as a person would
    wait_text(driver, "#who-text", rf"Signed in as shopper {user}")
    wait_text(driver, "#phase", r"Starts in")
    wait_text(driver, "#countdown", r"^00:\d\d$")
    wait_text(driver, "#remaining", r"^1$")
    assert not find(driver, "#buy").is_enabled(), "the buy button is enabled before the start"


def page_bytes(driver):
    """What loading the page took (Navigation and Resource Timing): bytes over the network for
    the document and for its files under /assets/, and how many files there were."""
    return driver.execute_script(
        """
        const nav = performance.getEntriesByType("navigation")[0];
        const files = performance.getEntriesByType("resource").filter((e) => e.name.includes("/assets/"));
        return {
          page: nav.transferSize, page_body: nav.encodedBodySize,
          files: files.reduce((n, e) => n + e.transferSize, 0),
          files_body: files.reduce((n, e) => n + e.encodedBodySize, 0),
          count: files.length,
        };
        """
    )


def metric_sum(prefix, having=""):
    """The sum of the seckill /metrics lines that start with prefix and contain having."""
    req = urllib.request.Request(f"{CONSOLE}/metrics", headers={"authorization": f"Bearer {ADMIN_TOKEN}"})
    with urllib.request.urlopen(req, timeout=10) as res:
        return sum(float(line.rsplit(" ", 1)[1]) for line in res.read().decode().splitlines()
                   if line.startswith(prefix) and having in line)


def room_sale(console, alice, bob):
    """A product with a waiting room that takes a proof of work: both shoppers solve it (a Web
    Worker, WebCrypto) and join the line before the start, are admitted after it (the room
    admits 2 for the one unit here), and one wins."""
    now = datetime.datetime.now(datetime.timezone.utc)
    body = json.dumps({
        "name": "Waiting cat", "stock": 1, "price_cents": 500, "currency": "EUR",
        "starts_at": (now + datetime.timedelta(seconds=12)).isoformat(),
        "ends_at": (now + datetime.timedelta(seconds=45)).isoformat(), "waiting_room": True,
        "proof_of_work": True,
    }).encode()
    def call(path, data):
        req = urllib.request.Request(f"{CONSOLE}{path}", data=data, method="POST", headers={
            "authorization": f"Bearer {ADMIN_TOKEN}", "content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as res:
            return json.load(res)
    product = call("/api/v1/admin/products", body)["product_id"]
    call(f"/api/v1/admin/products/{product}/preheat", b"{}")
    for who in (alice, bob):
        who.get(f"{SHOP}/p/{product}")
        wait_text(who, "#name", r"Waiting cat")
        wait(who, "the join button", EC.element_to_be_clickable((By.ID, "join"))).click()
        wait_text(who, "#room-status", r"You're in line")
        assert not find(who, "#buy").is_enabled(), "the buy button is enabled in the line"
    shot(bob, "storefront-room-in-line")
    # Their places come over the room's event streams (one each), not by polling.
    wait(console, "the two shoppers' room streams",
         lambda _: metric_sum("seckill_sse_streams_open ") >= 2, 10)
    for who in (alice, bob):
        wait_text(who, "#room-status", r"It's your turn", 40)
        wait(who, "the buy button to enable", lambda d: find(d, "#buy").is_enabled(), 10)
    shot(alice, "storefront-room-admitted")
    find(alice, "#buy").click()
    wait_text(alice, "#answer", r"You won")
    find(bob, "#buy").click()
    wait_text(bob, "#answer", r"Sold out")
    shot(bob, "storefront-room-sold-out")
    # The console shows the room: two joined, two admitted.
    room = f'article[data-product-id="{product}"] dd[data-figure="room"]'
    wait_text(console, room, r"^2 in line, 2 admitted, .*proof of work$", 30)
    # The sale ends (45 s after it was created): the page told sold out stops asking the room
    # (its stream ends, one read says `ended`), rather than reopening it every few seconds.
    ends = now + datetime.timedelta(seconds=45)
    time.sleep(max(0.0, (ends - datetime.datetime.now(datetime.timezone.utc)).total_seconds()) + 6)
    room_requests = ("seckill_http_requests_total{", 'route="/api/v1/products/{id}/room')
    asked = metric_sum(*room_requests)
    assert asked > 0, "no room request counted: the metric's name or labels changed"
    time.sleep(8)
    again = metric_sum(*room_requests)
    assert again == asked, f"the pages kept asking an ended sale's room: {asked} then {again} requests"


def main():
    os.makedirs(ARTIFACTS, exist_ok=True)
    began = time.monotonic()
    step("starting three browsers: the operator's, shopper 1's (desktop), shopper 2's (phone)")
    console = browser(1280, 1000)
    alice = browser(1100, 900)
    bob = browser(390, 844)

    product, card = operator_creates_and_preheats(console)

    step("shoppers: open the product page and sign in (development sign-in)")
    shopper_finds_the_sale(alice, product)
    shopper_signs_in(alice, product, 1, navigate=False)
    shopper_signs_in(bob, product, 2)
    first = page_bytes(bob)
    assert first["count"] == 3 and first["files"] >= first["files_body"] > 0, first
    step(f"first visit: page {first['page']} B, its {first['count']} files {first['files']} B over the network")
    shot(alice, "storefront-before-start")
    shot(bob, "storefront-phone-before-start")

    step("shoppers: the buy button enables at the start (server time)")
    for who in (alice, bob):
        wait(who, "the buy button to enable", lambda d: find(d, "#buy").is_enabled(), STARTS_IN + 30)
    wait_text(alice, "#phase", r"On sale now")

    step("shopper 1 buys first, shopper 2 right after")
    find(alice, "#buy").click()
    wait_text(alice, "#answer", r"You won")
    shot(alice, "storefront-won")
    bob_clicked = find(bob, "#buy").is_enabled()
    if bob_clicked:
        # Shopper 2 uses the keyboard: focus on the button, press Enter.
        bob.execute_script("arguments[0].focus()", find(bob, "#buy"))
        bob.switch_to.active_element.send_keys(Keys.ENTER)
        wait_text(bob, "#answer", r"Sold out")
    # Either way (told by the purchase, or the page learnt it first), shopper 2 reads sold out.
    wait_text(bob, "#phase", r"Sold out")
    wait_text(bob, "#remaining", r"^0$")
    assert not find(bob, "#buy").is_enabled(), "the buy button is still enabled when sold out"
    step(f"shopper 2 sees sold out ({'answer to the purchase' if bob_clicked else 'page state'})")
    shot(bob, "storefront-phone-sold-out")

    step("shopper 1: the reservation is pushed live to confirmed; pay")
    wait_text(alice, "#reservation-status", r"Confirmed", 30)
    pay = wait(alice, "the pay button", EC.element_to_be_clickable((By.ID, "pay")))
    shot(alice, "storefront-confirmed")
    pay.click()
    wait_text(alice, "#reservation-status", r"Paid\. Thank you!")
    assert not find(alice, "#pay").is_displayed(), "the pay button is still shown after paying"
    # Reloading shows the same: the state lives on the server, not in the page.
    alice.refresh()
    wait_text(alice, "#reservation-status", r"Paid\. Thank you!")
    wait_text(alice, "#buy", r"It's yours")
    # A repeat visit revalidates the page (a 304: headers only) and takes its files, named by
    # content hash, from the browser's cache (nothing over the network).
    repeat = page_bytes(alice)
    assert repeat["count"] == 3, repeat
    assert 0 < repeat["page"] < repeat["page_body"], f"the page was downloaded again: {repeat}"
    assert repeat["files"] == 0, f"files downloaded again: {repeat}"
    step(f"repeat visit: page {repeat['page']} B (a 304 for {repeat['page_body']} B), files 0 B")
    shot(alice, "storefront-paid")

    step("operator: remaining reaches 0, one order, sold out")
    wait_text(console, f'{card} dd[data-figure="remaining"]', r"^0$")
    wait_text(console, f'{card} dd[data-figure="sold"]', r"^1$", 30)
    wait_text(console, f"{card} .badge", r"Sold out")
    wait_text(console, f'{card} dd[data-figure="pending"]', r"^0$")
    time.sleep(1.5)  # one more refresh, so the chart has a few points
    shot(console, "console-sold-out")
    step("operator: the sale's orders: one, paid")
    find(console, f'{card} .actions button[aria-label^="Orders of product"]').click()
    wait_text(console, f"{card} .orders-table caption", r": 1$")
    wait_text(console, f"{card} .orders-table tbody", r"paid")
    shot(console, "console-orders")
    console.set_window_size(390, 844)
    console.execute_script("arguments[0].scrollIntoView()", find(console, card))
    time.sleep(1.2)
    shot(console, "console-phone")

    step("a sale with a waiting room: both shoppers join the line, are admitted, one wins")
    room_sale(console, alice, bob)

    for who, name in ((console, "the operator"), (alice, "shopper 1"), (bob, "shopper 2")):
        no_script_errors(who, name)
    step(f"ok: the whole sale in {time.monotonic() - began:.0f} s")


if __name__ == "__main__":
    try:
        main()
    except Exception as e:
        print(f"FAILED: {e}", file=sys.stderr, flush=True)
        for i, driver in enumerate(browsers):
            try:
                driver.save_screenshot(os.path.join(ARTIFACTS, f"failure-{i}.png"))
            except Exception:
                pass
        sys.exit(1)
    finally:
        for driver in browsers:
            try:
                driver.quit()
            except Exception:
                pass
