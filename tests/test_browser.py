"""The search page of ``cart serve`` in a real browser: Debian's headless Chromium through Selenium.

The server (``api.make_server``: load, compile, uvicorn) runs in a thread on a free port over the
session's ``served_run`` (tests/tiny_runs.py). The browser loads ``/``, types a query, submits it and waits; the
result cards must carry the ids of the library's search for that query, in order, with their
identifiers and scores, and the first thumbnail must have loaded (``naturalWidth > 0``: the image
came through ``/media``). A screenshot goes to the test's temporary directory (and to
``$CART_SCREENSHOT`` when set).

Chromium and its driver are Debian packages (``chromium``, ``chromium-driver``) that ``make
install`` installs when run as root. When they are missing the test fails, naming the packages,
unless the user is not root (then nothing could have installed them): it is skipped with that reason.
Selenium gets both paths, so Selenium Manager never tries to download a browser or a driver.
"""
import os
import shutil
import threading
import time

import pytest

from tiny_runs import free_port

pytestmark = pytest.mark.integration  # trains or loads a real CART run (still in `make test`)

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
QUERY = "grinning face"


def _browser_or_skip():
  missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not (os.path.isfile(p) and os.access(p, os.X_OK))]
  if missing:
    msg = (f"{', '.join(missing)} not found: install the Debian packages chromium and "
           "chromium-driver (`make install` does, as root)")
    if os.geteuid() != 0:
      pytest.skip(msg + "; not root, so the browser test is skipped")
    pytest.fail(msg)
  pytest.importorskip("selenium")
  from selenium import webdriver
  from selenium.webdriver.chrome.service import Service
  os.environ["SE_OFFLINE"] = "true"  # Selenium Manager, should anything call it: no downloads
  opts = webdriver.ChromeOptions()
  opts.binary_location = CHROMIUM
  for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              "--window-size=1100,900", "--disable-extensions", "--no-first-run"):
    opts.add_argument(arg)
  return webdriver.Chrome(options=opts, service=Service(executable_path=CHROMEDRIVER))


@pytest.fixture(scope="module")
def server(served_run):
  pytest.importorskip("uvicorn")
  from cart_jax import api
  from cart_jax.serve import ServeConfig
  t = served_run
  port = free_port()
  srv = api.make_server(t.run, ServeConfig(port=port, max_batch=4, batch_sizes=(1,)),
                        log=lambda s: None)
  thread = threading.Thread(target=srv.uvicorn.run, daemon=True)  # signals: only on the main thread
  thread.start()
  deadline = time.monotonic() + 30
  while not srv.uvicorn.started:
    assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
    time.sleep(0.05)
  t.base = f"http://127.0.0.1:{port}"
  yield t
  srv.uvicorn.should_exit = True
  thread.join(30)


def test_the_page_shows_the_librarys_results_with_thumbnails(server, tmp_path):
  from cart_jax import api
  from selenium.webdriver.common.by import By
  from selenium.webdriver.support.ui import Select, WebDriverWait
  want = api.search(server.run, [QUERY], k=5, beam=10, log=lambda s: None)[0]["results"]
  driver = _browser_or_skip()
  try:
    wait = WebDriverWait(driver, 30)
    driver.get(server.base + "/")
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "ready")
    assert "24 items (24 image)" in driver.find_element(By.ID, "about").text
    box = driver.find_element(By.ID, "query")
    box.send_keys(QUERY)
    Select(driver.find_element(By.ID, "k")).select_by_value("5")
    driver.find_element(By.ID, "submit").click()
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") in ("done", "error"))
    assert driver.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "done", \
        driver.find_element(By.ID, "status").text
    cards = driver.find_elements(By.CSS_SELECTOR, "#results li.result")
    assert [c.get_attribute("data-id") for c in cards] == [r["item_id"] for r in want]
    for card, r in zip(cards, want):
      assert r["item_id"] in card.text
      ident = card.find_element(By.CSS_SELECTOR, ".identifier").text
      assert ident == "id (" + ", ".join(str(c) for c in r["identifier"]) + ")"
      score = float(card.find_element(By.CSS_SELECTOR, ".score").text.split()[1])
      assert score == pytest.approx(r["score"], abs=2e-3)  # shown with 3 decimals
    # Every thumbnail loaded through /media: a decoded image has a natural width.
    wait.until(lambda d: d.execute_script(
        "return [...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth > 0)"))
    widths = driver.execute_script("return [...document.querySelectorAll('#results img')].map(i => i.naturalWidth)")
    assert len(widths) == 5 and min(widths) > 0
    shot = tmp_path / "serve_page.png"
    assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    if os.environ.get("CART_SCREENSHOT"):
      shutil.copyfile(shot, os.environ["CART_SCREENSHOT"])
    # A bad request shows the server's message, not a broken page.
    box.clear()
    box.send_keys("x" * 1001)
    driver.find_element(By.ID, "submit").click()
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "error")
    assert "at most 1000" in driver.find_element(By.ID, "status").text
  finally:
    driver.quit()
