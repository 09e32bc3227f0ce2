"""The feature browser in headless Chromium (Debian's /usr/bin/chromium through Selenium): from the file system, a
search for a concept lands on the matching unit, its page shows its examples, a deep link survives a reload, the
list sorts and hides dead units as the tables say; against the live server, typing a text shows the activations
the API computes and a steering request shows a generation. Saves the screenshots docs/browser.md shows."""

from pathlib import Path

import httpx
import pyarrow.parquet as pq
import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select
from test_report import LLM_LABEL, tiny_run, wait_for  # noqa: F401 -- shared fixtures
from test_serve import server  # noqa: F401

SHOTS = Path(__file__).resolve().parents[1] / "docs" / "screenshots"
DID = "topk-64-k4"


def shot(browser, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(SHOTS / name))


def rows(browser) -> list[list[str]]:
    return browser.execute_script("return [...document.querySelectorAll('#list tbody tr')]"
                                  ".map(r => [...r.cells].map(c => c.textContent))")


def test_search_lands_on_the_unit_and_its_page_survives_a_reload(browser, tiny_run):  # noqa: F811
    index = tiny_run / "report" / "index.html"
    units = pq.read_table(tiny_run / "explain" / DID / "units.parquet").to_pylist()
    examples = [e for e in pq.read_table(tiny_run / "explain" / DID / "examples.parquet").to_pylist()
                if e["unit"] == LLM_LABEL[0]]
    browser.set_window_size(1200, 900)
    browser.get(index.as_uri())
    wait_for(browser, "return document.querySelector('#dicts') !== null")
    wait_for(browser, "return [...document.images].every(i => i.complete && i.naturalWidth > 0)")
    assert browser.execute_script("return document.querySelectorAll('#dicts tbody tr').length") == 2
    shot(browser, "overview.png")

    browser.find_element(By.LINK_TEXT, DID).click()  # overview -> the unit list
    wait_for(browser, "return document.querySelectorAll('#list tbody tr').length > 0")
    assert len(rows(browser)) == min(100, len(units))
    Select(browser.find_element(By.ID, "sort")).select_by_value("max")
    assert int(rows(browser)[0][0]) == max(units, key=lambda u: u["max_activation"])["unit"]
    dead = browser.find_element(By.ID, "hide-dead")
    dead.click()
    alive = sum(u["frequency"] > 0 for u in units)
    assert browser.find_element(By.ID, "count").text == f"{alive} of {len(units)} units"
    dead.click()

    box = browser.find_element(By.ID, "q")  # the concept, as a new user would type it
    box.send_keys("loop")
    found = rows(browser)
    assert str(LLM_LABEL[0]) in [r[0] for r in found]
    assert all("loop" in (r[3] + r[5]).lower() for r in found)  # every row shown matches (label or tokens)
    shot(browser, "search.png")

    browser.find_element(By.LINK_TEXT, str(LLM_LABEL[0])).click()  # search -> the unit's page
    title = f"return document.querySelector('h1') && document.querySelector('h1').textContent === " \
            f"'{DID} · unit {LLM_LABEL[0]}'"
    wait_for(browser, title)
    assert browser.current_url.endswith(f"#/{DID}/{LLM_LABEL[0]}")

    def page():
        return browser.execute_script("return {ex: document.querySelectorAll('.ex').length, "
                                      "top: document.querySelectorAll('.ex[data-kind=top]').length, "
                                      "labels: document.querySelector('#labels').textContent, "
                                      "effects: document.querySelector('#effects').textContent, "
                                      "bars: document.querySelectorAll('#hist div').length}")

    first = page()
    assert first["ex"] == len(examples) and first["top"] == sum(e["kind"] == "top" for e in examples)
    assert LLM_LABEL[1] in first["labels"] and "detection 0.91" in first["labels"]
    assert "KL when ablated" in first["effects"] and "boosts:" in first["effects"]  # effects.parquet, measured
    assert first["bars"] == len(next(u for u in units if u["unit"] == LLM_LABEL[0])["hist_counts"])
    browser.set_window_size(1200, 1600)
    shot(browser, "unit.png")
    browser.refresh()  # the deep link survives a reload
    wait_for(browser, title)
    assert page() == first


def test_live_server_shows_activations_and_a_steered_generation(browser, server):  # noqa: F811
    url, _ = server
    text = "The for statement iterates over the items"
    browser.set_window_size(1200, 1000)
    browser.get(f"{url}/index.html#/{DID}/{LLM_LABEL[0]}")
    wait_for(browser, "return document.querySelector('#try-text') !== null")
    browser.find_element(By.ID, "try-text").send_keys(text)
    browser.find_element(By.ID, "try-go").click()
    wait_for(browser, "return document.querySelectorAll('#try-tokens span').length > 0", timeout=60)
    api = httpx.post(url + "/api/activations", json={"text": text, "dictionary": DID, "units": [LLM_LABEL[0]]},
                     timeout=60).json()
    shown = browser.execute_script("return [...document.querySelectorAll('#try-tokens span')]"
                                   ".map(s => [s.textContent, s.title])")
    assert [t for t, _ in shown] == api["tokens"]
    assert [float(v) for _, v in shown] == pytest.approx(api["activations"][str(LLM_LABEL[0])])
    assert browser.execute_script("return document.querySelectorAll('#try-top tr').length") == len(api["tokens"]) + 1
    browser.execute_script("document.querySelector('#live').scrollIntoView()")
    shot(browser, "live-activations.png")

    Select(browser.find_element(By.ID, "steer-mode")).select_by_value("alpha")
    value = browser.find_element(By.ID, "steer-value")
    value.clear()
    value.send_keys("3000")
    browser.find_element(By.ID, "steer-go").click()
    wait_for(browser, "return document.querySelectorAll('#steer-out .steered, #steer-out .err').length > 0", 120)
    assert browser.execute_script("return document.querySelectorAll('#steer-out .err').length") == 0
    steered = browser.execute_script("return [...document.querySelectorAll('#steer-out .steered')]"
                                     ".map(g => g.textContent)")
    api = httpx.post(url + "/api/steer", json={"prompt": text, "dictionary": DID, "unit": LLM_LABEL[0],
                                               "alpha": 3000, "max_new_tokens": 8}, timeout=120).json()
    assert steered == api["steered"] and len(steered[0]) > 0
    browser.execute_script("document.querySelector('#steer-out').scrollIntoView()")
    shot(browser, "live-steer.png")
