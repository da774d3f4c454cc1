"""The built-in dashboard (``GET /dashboard``) in Debian's real headless Chromium.

The real server (auth required, OCR and the demo ERNIE, untrained: only its counts matter)
serves known traffic for two tenants; Chromium, driven through chromium-driver by
Selenium, opens the page, which asks for a key, is given an auditor-of-all key, and then
shows today's figures. The tokens, characters and cost on the page for each tenant and
model equal the ledger's sums; the budget and the last minute's throughput are shown; the
page fetched nothing from any other host. A screenshot is saved as a test artifact
(``$PADDLE_METER_TEST_ARTIFACTS``, else the test's tmp dir).
"""

from __future__ import annotations

import base64
import os
import shutil
import sqlite3
import uuid
from decimal import Decimal
from pathlib import Path

import httpx
import pytest
from imaging import render_line
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait
from support.ernie_demo import ernie_model, make_demo_ernie
from support.keys import auth_env, create_key
from support.server import ServerProcess


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    work = tmp_path_factory.mktemp("dashboard")
    demo = make_demo_ernie(work / "ernie-demo")
    config = {
        "models": {"ocr": {"kind": "ocr"}, "ernie": ernie_model(demo)},
        "ledger": {"url": str(work / "ledger.sqlite3")},
        "auth": {"mode": "required"},
        "budgets": {"limits": [{"tenant": "legal", "period": "month", "limit_tokens": 5000}]},
    }
    env = auth_env()
    with ServerProcess(work, config, env=env) as server:
        caller_fin = create_key(server, "finance", "caller", env=env)[1]
        caller_legal = create_key(server, "legal", "caller", env=env)[1]
        auditor = create_key(server, "*", "auditor", env=env)[1]
        for i in range(3):
            image = base64.b64encode(render_line(f"INVOICE {i} TOTAL 12.50")).decode()
            body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                "data": [image]}]}
            reply = httpx.post(f"{server.http_url}/v2/models/ocr/infer", json=body, timeout=60,
                               headers={"authorization": f"Bearer {caller_fin}"})
            assert reply.status_code == 200
        for text in ("合同 第一条", "判决书 第二页 内容", "hello world"):
            body = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1],
                                "data": [text]}]}
            reply = httpx.post(f"{server.http_url}/v2/models/ernie/infer", json=body, timeout=60,
                               headers={"authorization": f"Bearer {caller_legal}",
                                        "x-request-id": uuid.uuid4().hex})
            assert reply.status_code == 200
        yield server, work, auditor


def _ledger(work: Path) -> dict[tuple[str, str], tuple[int, int, str]]:
    with sqlite3.connect(work / "ledger.sqlite3") as conn:
        rows = conn.execute(
            "SELECT tenant, model, SUM(billable_tokens), SUM(characters), SUM(cost_micros) "
            "FROM usage_records WHERE status = 'ok' GROUP BY tenant, model").fetchall()
    return {(t, m): (int(b), int(c), str((Decimal(micros) / 10**6).quantize(Decimal("0.000001"))))
            for t, m, b, c, micros in rows}


def _browser(profile: Path) -> webdriver.Chrome:
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--window-size=1400,1300",
                 f"--user-data-dir={profile}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    driver_path = shutil.which("chromedriver") or "/usr/bin/chromedriver"
    return webdriver.Chrome(service=Service(driver_path), options=options)


def test_dashboard_numbers_equal_the_ledger(stack, tmp_path):
    server, work, auditor = stack
    browser = _browser(tmp_path / "profile")
    try:
        browser.get(f"{server.http_url}/dashboard")
        wait = WebDriverWait(browser, 30)
        login = wait.until(lambda b: b.find_element(By.CSS_SELECTOR, '[data-testid="login"]')
                           if b.find_element(By.CSS_SELECTOR, '[data-testid="login"]')
                           .is_displayed() else None)
        login.find_element(By.ID, "key").send_keys(auditor)
        login.find_element(By.TAG_NAME, "button").click()
        wait.until(lambda b: b.find_elements(By.CSS_SELECTOR,
                                             '[data-testid="today"] tbody tr[data-tenant]'))
        shown = {}
        for row in browser.find_elements(By.CSS_SELECTOR,
                                         '[data-testid="today"] tbody tr[data-tenant]'):
            cells = {c.get_attribute("data-key"): c.text
                     for c in row.find_elements(By.TAG_NAME, "td")}
            shown[(row.get_attribute("data-tenant"), row.get_attribute("data-model"))] = (
                int(cells["billable_tokens"]), int(cells["characters"]), cells["cost"])
        assert shown == _ledger(work)
        assert float(browser.find_element(By.CSS_SELECTOR, '[data-testid="live-tps"]').text) > 0
        budgets = browser.find_element(By.CSS_SELECTOR, '[data-testid="budgets"]').text
        assert "legal" in budgets and "month tokens" in budgets and "5000 tokens" in budgets
        assert browser.find_element(By.CSS_SELECTOR, '[data-testid="anomalies"]').text == "无 none"
        hosts = {entry["message"].split('"url":"')[1].split("/")[2]
                 for entry in browser.get_log("performance")
                 if '"Network.requestWillBeSent"' in entry["message"]
                 and '"url":"http' in entry["message"]}
        assert hosts == {f"127.0.0.1:{server.http_port}"}, hosts  # no CDN, nothing outside
        artifacts = Path(os.environ.get("PADDLE_METER_TEST_ARTIFACTS", tmp_path))
        artifacts.mkdir(parents=True, exist_ok=True)
        assert browser.save_screenshot(str(artifacts / "dashboard.png"))
    finally:
        browser.quit()


def test_dashboard_data_needs_an_auditor_or_admin_key(stack):
    server, _, _ = stack
    page = httpx.get(f"{server.http_url}/dashboard", timeout=10)
    assert page.status_code == 200 and "AI 计量仪表盘" in page.text
    assert "http://" not in page.text.split("<script>")[1]  # the script loads nothing else
    assert httpx.get(f"{server.http_url}/v1/dashboard", timeout=10).status_code == 401
