"""The JavaScript agent (examples/browser-agent.user.js) in headless Chromium against
the agents API: a test page on another 127.0.0.1 port (so every call is a CORS call)
loads it, leases pull tasks, reports progress and completes them; a task whose last
lease expired is resumed from its checkpoint."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from sendscript.client import SendScriptClient
from sendscript.settings import Settings
from sendscript.store import RECORDS, TASKS
from tests.agents.support import Api, db_of, new_token, start_agents
from tests.support import Roles, wait_for

pytestmark = pytest.mark.e2e
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
PAGE = """<!doctype html><html><body><pre id="log"></pre>
<script src="/agent.js"></script>
<script>
const q = new URLSearchParams(location.search);
const out = document.getElementById("log");
window.agent = new SendscriptAgent({
  url: q.get("api"), token: q.get("token"), agentId: "browser-1", labels: ["chrome"],
  waitS: 2, log: (...a) => { out.textContent += a.join(" ") + "\\n"; },
  async handler(task, ctx) {
    const from = { ...ctx.checkpoint };
    for (let page = ctx.checkpoint.page || 1; page <= 3; page++) {
      await new Promise((r) => setTimeout(r, 20));
      await ctx.progress({ page: page + 1 });
    }
    return { browser: navigator.userAgent.includes("Chrome"), from, n: task.script.args.n };
  },
});
window.agent.start();
</script></body></html>"""


@pytest.fixture
def page_server(tmp_path: Path) -> Iterator[int]:
    (tmp_path / "index.html").write_text(PAGE)
    shutil.copy(EXAMPLES / "browser-agent.user.js", tmp_path / "agent.js")
    handler = partial(SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def test_javascript_agent_in_headless_chromium(settings: Settings, roles: Roles,
                                               page_server: int) -> None:
    webdriver = pytest.importorskip("selenium.webdriver")
    if not shutil.which("chromium") or not shutil.which("chromedriver"):
        pytest.skip("chromium and chromium-driver are not installed")
    origin = f"http://127.0.0.1:{page_server}"
    _, api = start_agents(roles, agent_cors_origins=origin, agent_lease_s=2,
                          agent_sweep_interval_s=0.2, agent_poll_interval_s=0.05)
    token = new_token(settings)
    with SendScriptClient(settings) as client:
        ids = [s.task_id for s in client.submit_many(
            [{"mode": "pull", "labels": ["chrome"], "script": {"id": "scrape", "args": {"n": i}}}
             for i in range(5)])]
    # One task is taken first by a Python agent that saves page 2 and goes silent.
    py = Api(api, token, "py-1")
    py.ok("register", labels=["chrome"])
    [first] = py.ok("lease", wait_s=5)["tasks"]
    py.ok("progress", task_id=first["task_id"], lease_token=first["lease_token"],
          checkpoint={"page": 2})
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or ""
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options,
                              service=webdriver.ChromeService(shutil.which("chromedriver")))
    try:
        driver.set_page_load_timeout(30)
        driver.get(f"{origin}/index.html?api={api}&token={token}")
        mongo, db = db_of(settings)
        with mongo:
            wait_for(lambda: db[TASKS].count_documents(
                {"_id": {"$in": ids}, "status": "success"}) == 5, 60,
                "the browser agent to complete every task", 0.3)
            tasks = {d["_id"]: d for d in db[TASKS].find({"_id": {"$in": ids}})}
            for tid, doc in tasks.items():
                assert doc["result"]["browser"] is True
                assert doc["checkpoint"] == {"page": 4}
                expected = {"page": 2} if tid == first["task_id"] else {}
                assert doc["result"]["from"] == expected, tid
                done = db[RECORDS].find_one({"task_id": tid, "status": "success"})
                assert done is not None and done["agent"] == "browser-1"
        log = driver.find_element("id", "log").text
        assert "failed" not in log, log
        assert driver.execute_script("return window.agent.completed") == 5
        driver.execute_script("window.agent.stop()")
    finally:
        driver.quit()
