"""Acknowledged writes survive a Mongo server killed with SIGKILL (journaled writes),
on a server of this test's own: the session's shared servers are left alone."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from pymongo.errors import PyMongoError

from sendscript import connect
from sendscript.dev.embedded import MongoServer
from sendscript.settings import Settings


def test_acknowledged_inserts_survive_a_sigkill_of_the_server(tmp_path: Path) -> None:
    server = MongoServer(tmp_path)
    server.start()
    settings = Settings(mongo_url=server.url + "crash", mongo_timeout_s=2)
    assert settings.mongo_journal
    acked: list[int] = []
    stop = threading.Event()

    def write() -> None:
        client = connect.mongo_sync(settings)
        col = connect.database(client)["docs"]
        n = 0
        while not stop.is_set():
            try:
                col.insert_one({"_id": n, "pad": "x" * 200})
                acked.append(n)
            except PyMongoError:
                time.sleep(0.05)
            n += 1
        client.close()

    writer = threading.Thread(target=write)
    writer.start()
    try:
        deadline = time.monotonic() + 30
        while len(acked) < 500 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(acked) >= 500, "the writer never got going"
        server.kill()  # SIGKILL while writes are being acknowledged
        killed_after = len(acked)
        server.start()
        time.sleep(0.5)
    finally:
        stop.set()
        writer.join(30)
    try:
        client = connect.mongo_sync(settings)
        kept = {d["_id"] for d in connect.database(client)["docs"].find({}, {"_id": 1})}
        client.close()
        lost = [n for n in acked[:killed_after] if n not in kept]
        assert not lost, f"{len(lost)} of {killed_after} acknowledged inserts lost: {lost[:10]}"
        assert len(acked) > killed_after  # writes went on after the restart
    finally:
        server.stop()
