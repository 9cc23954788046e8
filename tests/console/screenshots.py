"""Screenshots of the console for the README, from a demo-like run (embedded servers,
simulated farm with some failures, a few hundred tasks, a fan-out, a schedule, a
quarantined item): `python -m tests.console.screenshots docs/screenshots [OTHERS]`
(OTHERS: a directory for shots of the other pages)."""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from console import auth
from sendscript import connect
from sendscript.client import SendScriptClient
from sendscript.dev.stack import LocalStack
from sendscript.schedules import Schedule
from sendscript.settings import Settings
from tests.console.test_browser import browser


def main(out: Path, extra: Path | None = None) -> None:
    from selenium.webdriver.common.by import By

    out.mkdir(parents=True, exist_ok=True)
    data = Path(tempfile.mkdtemp(prefix="console-shots-"))
    local = Settings(_env_file=None, data_dir=data, workers=2)
    stack = LocalStack(local, workers=2, data_dir=data, console=True,
                       sim_args=["--run-ms", "300", "--fail-rate", "0.08"],
                       extra_env={"SENDSCRIPT_LOG_LEVEL": "WARNING",
                                  "SENDSCRIPT_CONSOLE_PORT": "0",
                                  "SENDSCRIPT_CONSOLE_LIVE_INTERVAL_S": "1"})
    stack.start(log_dir=data / "logs")
    driver = None
    try:
        settings = stack.effective
        mongo = connect.mongo_sync(settings)
        token = auth.add_token(connect.database(mongo), "olga", "operator")
        mongo.close()
        with SendScriptClient(settings) as client:
            client.group_add("rack-7", [f"phone-{i:03d}" for i in range(8)])
            client.schedule_add(Schedule.model_validate({
                "_id": "nightly-sync", "cron": "0 3 * * *", "group": "rack-7",
                "template": {"script": {"id": "sync"}}}))
            client.push_raw(["{not json", {"device_id": "", "script": {}}])
            driver = browser()
            driver.get(f"{stack.console_url}login")
            driver.find_element(By.ID, "token").send_keys(token)
            driver.find_element(By.ID, "login").click()
            # a steady load for the chart: a batch every second for half a minute
            client.submit_fanout({"id": "update-app"}, group="rack-7")
            for second in range(40):
                client.submit_many([{"device_id": f"phone-{(second * 7 + i) % 30:03d}",
                                     "script": {"id": ("open-app", "sync", "screenshot")[i % 3],
                                                "args": {"n": i}}}
                                    for i in range(8 + second % 9)])
                if second == 2:
                    driver.get(stack.console_url or "")  # the chart fills live from here
                time.sleep(1)
            driver.save_screenshot(str(out / "overview.png"))
        driver.get(f"{stack.console_url}tasks?device=phone-003")
        driver.save_screenshot(str(out / "tasks.png"))
        driver.get(f"{stack.console_url}devices/phone-003")
        driver.save_screenshot(str(out / "device.png"))
        if extra is not None:  # the other pages, to look at (not for the README)
            extra.mkdir(parents=True, exist_ok=True)
            first = driver.find_element(By.CSS_SELECTOR, "table.grid tbody a").text
            for name in ("masters", "batches", "schedules", "quarantine", "dead-letters",
                         "devices", "audit", f"tasks/{first}"):
                driver.get(f"{stack.console_url}{name}")
                driver.save_screenshot(str(extra / f"{name.split('/')[0]}.png"))
    finally:
        if driver is not None:
            driver.quit()
        stack.stop()
    print("\n".join(str(p) for p in sorted(out.glob("*.png"))))


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/screenshots"),
         Path(sys.argv[2]) if len(sys.argv) > 2 else None)
