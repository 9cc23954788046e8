"""The console in a real browser (Debian's headless chromium through chromedriver) on a
real service: simulator, consumer, master and console as role processes.

An operator logs in with a token, finds a task by its device, opens it, retries it
and watches it succeed without a reload (Server-Sent Events); cancels every task a
filter selects after the count is shown; a viewer is refused an action; the audit
page shows what was done."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from sendscript.client import SendScriptClient
from tests.console.conftest import ConsoleRole, start_console
from tests.support import Inspect, Roles, wait_for

CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not Path(CHROMEDRIVER).exists() or not Path(CHROMIUM).exists(),
                       reason="chromium and chromium-driver are not installed "
                       "(apt-get install -y chromium chromium-driver; .ci/run does)"),
]


def browser() -> object:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,1000", "--disable-extensions", "--no-first-run"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    return driver


@pytest.fixture
def driver() -> Iterator[object]:
    d = browser()
    yield d
    d.quit()


def test_operator_and_viewer_in_the_browser(roles: Roles, inspect: Inspect,
                                            driver: object) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    roles.simulator(run_ms=50, fail_rate=1.0)
    roles.consumer()
    roles.master()
    c: ConsoleRole = start_console(roles)
    operator, viewer = c.token("olga", "operator"), c.token("vic", "viewer")
    settings = roles.settings
    with SendScriptClient(settings) as client:
        target = client.submit("phone-find", {"id": "open-app"}, max_retries=0).task_id
        later = [client.submit("phone-bulk", {"id": "sync", "args": {"i": i}},
                               run_at="2099-01-01T00:00:00Z").task_id for i in range(4)]
    wait_for(lambda: inspect.db.script_tasks.find_one({"_id": target})["status"] == "failed",
             30, "the task to fail")
    d = driver
    wait = WebDriverWait(d, 20)

    def login(token: str) -> None:
        d.delete_all_cookies()
        d.get(f"{c.url}/login")
        # Waited for, not looked up at once: on a loaded machine the form was once not
        # there yet when `get` returned.
        wait.until(lambda drv: drv.find_elements(By.ID, "token"))[0].send_keys(token)
        d.find_element(By.ID, "login").click()
        wait.until(lambda drv: drv.find_elements(By.ID, "overview"))

    # an operator logs in and finds the task by its device
    login(operator)
    assert "olga" in d.find_element(By.ID, "who").text
    d.find_element(By.LINK_TEXT, "Tasks").click()
    box = wait.until(lambda drv: drv.find_element(By.ID, "f-device"))
    box.send_keys("phone-find")
    d.find_element(By.ID, "search-go").click()
    wait.until(lambda drv: "device=phone-find" in drv.current_url)
    rows = d.find_elements(By.CSS_SELECTOR, "#task-table tbody tr[data-task]")
    assert [r.get_attribute("data-task") for r in rows] == [target]
    d.find_element(By.LINK_TEXT, target).click()
    status = wait.until(lambda drv: drv.find_element(By.ID, "task-status"))
    assert status.text == "failed"

    # retry it; the page is not reloaded, yet its status moves on to success
    roles.configure_farm(fail_rate=0.0)
    d.execute_script("window.__sameDocument = true;")
    d.find_element(By.ID, "retry").click()
    wait.until(lambda drv: drv.find_element(By.ID, "task-status").text == "success")
    assert d.execute_script("return window.__sameDocument === true;")
    assert d.find_element(By.ID, "task-attempt").text == "2"
    assert inspect.db.script_tasks.find_one({"_id": target})["status"] == "success"

    # cancel every waiting task of phone-bulk: the count first, then the action
    d.get(f"{c.url}/tasks?device=phone-bulk&status=waiting")
    assert len(d.find_elements(By.CSS_SELECTOR, "#task-table tbody tr[data-task]")) == 4
    Select(d.find_element(By.ID, "bulk-action")).select_by_value("cancel")
    d.find_element(By.ID, "bulk-preview").click()
    count = wait.until(lambda drv: drv.find_element(By.ID, "bulk-count"))
    wait.until(lambda drv: count.text == "cancel 4 task(s)?")
    assert inspect.count("cancelled") == 0
    d.find_element(By.ID, "bulk-run").click()
    wait.until(lambda drv: "4 of 4" in drv.find_element(By.ID, "flash").text)
    statuses = {t["_id"]: t["status"] for t in inspect.db.script_tasks.find(
        {"_id": {"$in": later}})}
    assert set(statuses.values()) == {"cancelled"}

    # a viewer sees everything but may not act
    login(viewer)
    d.get(f"{c.url}/tasks/{later[0]}")
    wait.until(lambda drv: drv.find_element(By.ID, "task-status").text == "cancelled")
    d.find_element(By.ID, "retry").click()
    flash = wait.until(lambda drv: drv.find_element(By.CSS_SELECTOR, "#flash.bad"))
    assert "403" in flash.text and "viewer" in flash.text
    assert inspect.db.script_tasks.find_one({"_id": later[0]})["status"] == "cancelled"

    # the audit page lists both actions, by whom, with the filter and the count
    d.find_element(By.LINK_TEXT, "Audit").click()
    wait.until(lambda drv: drv.find_elements(By.CSS_SELECTOR, "#audit td.audit-action"))
    rows = [r.text for r in d.find_elements(By.CSS_SELECTOR, "#audit tbody tr")]
    assert any("bulk cancel" in r and "olga" in r and "phone-bulk" in r and " 4 " in f" {r} "
               for r in rows), rows
    assert any(r.split()[2:4] == ["olga", "(operator)"] and target in r and "retry" in r
               for r in rows), rows
    who = {e.text for e in d.find_elements(By.CSS_SELECTOR, "#audit tbody td:nth-child(2)")}
    assert who == {"olga (operator)"}  # the viewer's refused click left no entry


def test_the_devices_page_lists_a_working_device_and_finds_it_by_prefix(
        roles: Roles, inspect: Inspect, driver: object) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    roles.simulator(run_ms=50, fail_rate=0.0)
    roles.consumer()
    roles.master()
    c: ConsoleRole = start_console(roles)
    with SendScriptClient(roles.settings) as client:
        done = [client.submit(device, {"id": "open-app"}).task_id
                for device in ("phone-fleet-1", "tablet-2")]
    lock = roles.settings.keys.device_lock("phone-fleet-1")
    # the consumer writes the devices' documents with the results, then frees the devices
    wait_for(lambda: inspect.count("success") == 2 and inspect.redis.get(lock) is None
             and inspect.db.devices.count_documents({}) == 2, 30, "both results applied")
    d = driver
    wait = WebDriverWait(d, 20)
    d.get(f"{c.url}/login")
    d.find_element(By.ID, "token").send_keys(c.token("olga", "operator"))
    d.find_element(By.ID, "login").click()
    wait.until(lambda drv: drv.find_elements(By.ID, "overview"))

    d.find_element(By.LINK_TEXT, "Devices").click()
    listed = "#device-table tr[data-device]"
    rows = wait.until(lambda drv: drv.find_elements(By.CSS_SELECTOR, listed))
    assert [r.get_attribute("data-device") for r in rows] == ["phone-fleet-1", "tablet-2"]
    phone = rows[0]
    cell = {k: phone.find_element(By.CSS_SELECTOR, f"td.{k}").text
            for k in ("device-state", "last-task", "last-result", "day-tasks", "day-rate")}
    assert cell == {"device-state": "free", "last-task": done[0], "last-result": "SUCCESS",
                    "day-tasks": "1", "day-rate": "100 %"}

    d.find_element(By.ID, "f-prefix").send_keys("phone-")
    d.find_element(By.ID, "device-search-go").click()
    wait.until(lambda drv: "prefix=phone-" in drv.current_url)
    rows = d.find_elements(By.CSS_SELECTOR, listed)
    assert [r.get_attribute("data-device") for r in rows] == ["phone-fleet-1"]
    d.find_element(By.LINK_TEXT, "phone-fleet-1").click()
    day = wait.until(lambda drv: drv.find_element(By.ID, "device-day"))
    assert day.text == "1 task(s), 100 % success"
    assert done[0] in d.find_element(By.ID, "device-last").text
