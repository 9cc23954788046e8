"""Agents' API tokens on the console's Agents page, in a real browser (Debian's headless
chromium through chromedriver), with the console and the agents API running as their
own role processes on the embedded servers.

An operator sees the tokens (name, short id, scope, created, last used), makes a
scoped one whose secret is shown once, sees it listed, removes it after confirming,
and the agents API then refuses it; a viewer sees no token and no control. The API the
page calls refuses viewers, other sites and bad input, and audits every change."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from sendscript import connect
from sendscript.agent_store import TOKENS, add_token_sync, hash_secret
from tests.agents.support import Api, start_agents
from tests.console.conftest import ConsoleRole, start_console
from tests.console.test_browser import CHROMEDRIVER, CHROMIUM, browser
from tests.support import Inspect, Roles, wait_for

needs_chromium = pytest.mark.skipif(
    not Path(CHROMEDRIVER).exists() or not Path(CHROMIUM).exists(),
    reason="chromium and chromium-driver are not installed "
    "(apt-get install -y chromium chromium-driver; .ci/run does)")


@pytest.fixture
def driver() -> Iterator[object]:
    d = browser()
    yield d
    d.quit()


def agent_token(c: ConsoleRole, name: str, **scope: list[str]) -> str:
    """Made the CLI's way (`sendscript agent token add`)."""
    with connect.mongo_sync(c.settings) as mongo:
        return add_token_sync(connect.database(mongo), name, **scope)


@pytest.mark.e2e
@needs_chromium
def test_operator_adds_and_removes_an_agent_token_in_the_browser(
        roles: Roles, inspect: Inspect, driver: object) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    _, agents_url = start_agents(roles)
    c = start_console(roles)
    operator, viewer = c.token("olga", "operator"), c.token("vic", "viewer")
    old = agent_token(c, "old-rack", prefixes=["west-"])
    Api(agents_url, old, "w1").ok("register", devices=["west-1"])  # so it was used
    d = driver
    wait = WebDriverWait(d, 15)

    def login(token: str) -> None:
        d.delete_all_cookies()
        d.get(f"{c.url}/login")
        # Waited for, not looked up at once: on a loaded machine the form was once not
        # there yet when `get` returned.
        wait.until(lambda drv: drv.find_elements(By.ID, "token"))[0].send_keys(token)
        d.find_element(By.ID, "login").click()
        wait.until(lambda drv: drv.find_elements(By.ID, "overview"))
        d.get(f"{c.url}/agents")

    def rows() -> dict[str, list[str]]:
        # read in one script: the page redraws the table after each change
        return dict(d.execute_script(
            "return Array.from(document.querySelectorAll('#token-table tbody tr[data-token]'))"
            ".map((r) => [r.dataset.name, Array.from(r.cells).slice(0, 5)"
            ".map((td) => td.textContent.trim())]);"))

    # the operator sees the existing token: its short id, scope and last use
    login(operator)
    [listed_old] = rows().values()
    short_old = hash_secret(old)[:12]
    assert listed_old[:3] == ["old-rack", short_old, "west-*"]
    assert listed_old[3].startswith("20") and listed_old[4].startswith("20")  # created, used
    assert old not in d.page_source and hash_secret(old) not in d.page_source

    # makes a scoped one: its secret is shown once, it is listed without a reload
    d.execute_script("window.__sameDocument = true;")
    d.find_element(By.ID, "token-name").send_keys("rack-9")
    d.find_element(By.ID, "token-prefixes").send_keys("east-, north-")
    d.find_element(By.ID, "token-groups").send_keys("lab")
    d.find_element(By.ID, "token-add").click()
    secret = wait.until(lambda drv: drv.find_element(By.ID, "token-secret").text)
    assert d.find_element(By.ID, "token-made").is_displayed()
    assert "shown this once" in d.find_element(By.ID, "token-made").text
    wait.until(lambda drv: "rack-9" in rows())
    short = hash_secret(secret)[:12]
    assert rows()["rack-9"] == ["rack-9", short, "east-*, north-*, group:lab",
                                rows()["rack-9"][3], "—"]
    assert d.execute_script("return window.__sameDocument === true;")
    stored = inspect.db[TOKENS].find_one({"_id": hash_secret(secret)})
    assert stored["name"] == "rack-9"
    assert stored["scope"] == {"prefixes": ["east-", "north-"], "groups": ["lab"]}
    # it works, within its scope only
    agent = Api(agents_url, secret, "e1")
    agent.ok("register", devices=["east-1"])
    assert agent.post("register", devices=["west-2"])[0] == 403
    # hidden once copied; never on the page again
    d.find_element(By.ID, "token-done").click()
    assert not d.find_element(By.ID, "token-made").is_displayed()
    assert secret not in d.page_source
    d.get(f"{c.url}/agents")
    assert secret not in d.page_source and "rack-9" in rows()

    # Remove asks first; Abort leaves it, Confirm removes exactly that token
    remove = f'#token-table tr[data-token="{short}"] button.token-remove'
    d.find_element(By.CSS_SELECTOR, remove).click()
    question = wait.until(lambda drv: drv.find_element(By.ID, "token-confirm"))
    assert question.is_displayed() and "rack-9" in question.text and short in question.text
    d.find_element(By.ID, "token-remove-abort").click()
    assert not question.is_displayed() and "rack-9" in rows()
    d.find_element(By.CSS_SELECTOR, remove).click()
    d.find_element(By.ID, "token-remove-run").click()
    wait.until(lambda drv: "rack-9" not in rows())
    assert "removed" in d.find_element(By.CSS_SELECTOR, "#flash.ok").text
    assert list(rows()) == ["old-rack"]

    # gone from the store and the API; the agents API refuses it (within a second)
    assert inspect.db[TOKENS].count_documents({"name": "rack-9"}) == 0
    with c.client(operator) as api:
        assert [t["name"] for t in api.get("/api/agent-tokens").json()] == ["old-rack"]
    wait_for(lambda: agent.post("heartbeat")[0] == 401, 5, "the removed token refused")
    status, body = agent.post("lease")
    assert status == 401 and "unknown agent token" in body["detail"]
    agent.close()
    actions = [(e["who"], e["action"], e["target"]) for e in inspect.db.audit.find({})]
    assert actions == [("olga", "agent token add", "rack-9"),
                       ("olga", "agent token remove", short)]
    assert secret not in str(list(inspect.db.audit.find({})))

    # a viewer sees the agents but no token and no token control
    login(viewer)
    assert d.find_elements(By.ID, "tokens-operators-only")
    for control in ("token-form", "token-table", "token-add", "token-confirm"):
        assert not d.find_elements(By.ID, control), control
    assert not d.find_elements(By.CSS_SELECTOR, "button.token-remove")
    assert "old-rack" not in d.page_source and short_old not in d.page_source
    assert d.find_elements(By.CSS_SELECTOR, 'tr[data-agent="w1"]')


def test_agent_token_api_refuses_viewers_other_sites_and_bad_input(
        console_role: ConsoleRole, inspect: Inspect) -> None:
    c = console_role
    operator, viewer = c.token("olga", "operator"), c.token("vic", "viewer")
    agent_token(c, "rack-1")
    with c.client(viewer) as v:
        assert v.get("/api/agent-tokens").status_code == 403
        assert v.post("/api/agent-tokens", json={"name": "v"}).status_code == 403
        assert v.post("/api/agent-tokens/rack-1/remove").status_code == 403
        page = v.get("/agents").text
        assert "rack-1" not in page and 'id="token-form"' not in page
    with c.client(operator) as o:
        port = c.url.rsplit(":", 1)[1]
        forged = o.post("/api/agent-tokens", json={"name": "x"},
                        headers={"Origin": f"http://evil.test:{port}"})
        assert forged.status_code == 403 and "cross-site" in forged.json()["detail"]
        assert o.post("/api/agent-tokens/rack-1/remove",
                      headers={"Origin": "http://evil.test"}).status_code == 403
        assert o.post("/api/agent-tokens", content="name=x",
                      headers={"Content-Type": "application/x-www-form-urlencoded"}
                      ).status_code == 415
        assert o.post("/api/agent-tokens", json={"name": "no spaces"}).status_code == 422
        assert o.post("/api/agent-tokens", json={"name": "x", "prefixes": ["a b"]}
                      ).status_code == 422
        assert o.post("/api/agent-tokens", json={"name": "x", "scope": []}).status_code == 422
        assert o.post("/api/agent-tokens/ghost/remove").status_code == 404
        page = o.get("/agents").text
        assert "rack-1" in page and 'id="token-form"' in page and "all devices" in page
    assert inspect.db[TOKENS].count_documents({}) == 1  # nothing refused was made or removed
    assert inspect.db.audit.count_documents({}) == 0
    with httpx.Client(base_url=c.url, timeout=10) as anonymous:
        assert anonymous.get("/api/agent-tokens").status_code == 401
