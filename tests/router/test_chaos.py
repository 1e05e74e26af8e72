"""The fleet under faults: a node stopped (SIGSTOP), killed (SIGKILL), one whose address accepts
connections and never answers, one the router cannot reach while it still heartbeats, one whose advertise
URL is unreachable, a node restarted with a new URL, and a router restart. Each scenario is bounded in
time, and every request the router accepted gets an answer, all of them 200: the README ("Scaling out")
says how the router re-dispatches what a lost node had not answered.

Leases, heartbeats and probes are short here (set through the settings) so that each fault is noticed in
a second or two rather than the production defaults' tens of seconds.
"""

from __future__ import annotations

import asyncio
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.processes import free_port
from tests.router.fleet import GEN, Fleet, generate_many, statuses

BODY = {"prompt": "chaos", "size": "64x64", "steps": 2, "response_format": "b64_json"}
LOAD = 24
BOUND = 60  # seconds any scenario's requests may take in all


@pytest.fixture(scope="module")
def chaos(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    fleet = Fleet(models_dir, tmp_path_factory.mktemp("chaos"),
                  ["--heartbeat-timeout", "3", "--heartbeat-interval", "1", "--probe-timeout", "1", "--retries", "3",
                   "--default-model", "tiny-sd15"],
                  node_args=["--heartbeat-interval", "0.5", "--threads", "1"])
    for name in ("chaos-a", "chaos-b", "chaos-c"):
        fleet.add_node(name, "tiny-sd15", proxied=True)
    yield fleet.start()
    fleet.stop()


def load(fleet: Fleet, count: int = LOAD) -> list[httpx.Response | Exception]:
    return asyncio.run(asyncio.wait_for(generate_many(fleet.router.url, count, BODY), BOUND))


def test_sigstop_one_of_three_under_load(chaos: Fleet) -> None:
    """The stopped node's lease runs out (or its probe fails) while requests wait on it: they go to the
    other nodes, and the client sees a slower 200."""
    victim = chaos.nodes["chaos-a"]
    before = chaos.views()
    victim.signal(signal.SIGSTOP)
    try:
        responses = load(chaos)
    finally:
        victim.signal(signal.SIGCONT)
    assert statuses(responses) == [200] * LOAD
    served = chaos.served(before)
    assert served["chaos-a"] > 0, served  # some did wait on the stopped node
    assert sum(served.values()) >= LOAD + served["chaos-a"], served  # each of those sent again
    chaos.wait_nodes({"chaos-a"}, timeout=30)  # back once a probe reaches it


def test_a_node_that_accepts_and_never_answers(chaos: Fleet) -> None:
    """It still heartbeats, so its lease never runs out: its probe (1 s here) takes it out, and requests
    waiting on it go elsewhere. Probes run concurrently, so it delays no other node's."""
    before = chaos.views()
    chaos.proxies["chaos-b"].set("hang")
    try:
        responses = load(chaos)
        views = chaos.views()
    finally:
        chaos.proxies["chaos-b"].set("pass")
    assert statuses(responses) == [200] * LOAD
    assert chaos.served(before)["chaos-b"] > 0
    assert views["chaos-b"]["state"] == "unhealthy"
    assert "probe" in views["chaos-b"]["last_error"]
    chaos.wait_nodes({"chaos-b"}, timeout=30)


def test_a_node_the_router_cannot_reach_stays_out_while_it_heartbeats(chaos: Fleet) -> None:
    """One-way trouble: the node reaches the router, the router cannot reach the node. Heartbeats do not
    put it back (only a router → node call does), so it costs at most one failed attempt."""
    chaos.wait_nodes({"chaos-a", "chaos-b", "chaos-c"})
    failures = chaos.views()["chaos-c"]["failures"]
    chaos.proxies["chaos-c"].set("refuse")
    try:
        deadline = time.monotonic() + 10
        while chaos.views()["chaos-c"]["state"] == "healthy" and time.monotonic() < deadline:
            time.sleep(0.1)
        seen, answers = [], []
        for _ in range(10):  # 2.5 s: five heartbeats
            answers.append(httpx.post(chaos.router.url + GEN, json=BODY, timeout=BOUND).status_code)
            seen.append(chaos.views()["chaos-c"])
            time.sleep(0.25)
    finally:
        chaos.proxies["chaos-c"].set("pass")
    assert answers == [200] * 10
    assert [view["state"] for view in seen] == ["unhealthy"] * 10
    assert seen[-1]["last_heartbeat_seconds"] < 3  # it did heartbeat meanwhile
    assert seen[-1]["failures"] == failures + 1
    chaos.wait_nodes({"chaos-c"}, timeout=30)


def test_a_node_whose_advertise_url_is_unreachable_never_joins(chaos: Fleet) -> None:
    ghost = chaos.add_node("ghost", "tiny-sd15", extra=["--advertise-url", f"http://127.0.0.1:{free_port()}"])
    ghost.start(ready=False)
    try:
        lines = ghost.log_lines("refused registration: 400", timeout=60)
        assert lines and "node_unreachable" in lines[0], ghost.log()[-2000:]
        assert "Errno" not in lines[0] and "Connection refused" not in lines[0]  # no connection error echoed
        assert statuses(load(chaos, 6)) == [200] * 6
        assert "ghost" not in chaos.views()
    finally:
        ghost.kill()
        del chaos.nodes["ghost"]


def test_sigkill_under_load(chaos: Fleet) -> None:
    """Requests waiting on a killed node are sent again; the node comes back when it is started again."""
    chaos.wait_nodes({"chaos-a", "chaos-b", "chaos-c"})
    victim = chaos.nodes["chaos-b"]

    async def scenario() -> list:
        victim.signal(signal.SIGSTOP)  # so that requests wait on it, however fast the hardware
        burst = asyncio.ensure_future(generate_many(chaos.router.url, LOAD, BODY))
        deadline = time.monotonic() + 10
        while chaos.views()["chaos-b"]["in_flight"] == 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert chaos.views()["chaos-b"]["in_flight"] > 0
        victim.kill()
        return await asyncio.wait_for(burst, BOUND)

    assert statuses(asyncio.run(scenario())) == [200] * LOAD
    victim.start(ready=False)
    chaos.wait_nodes({"chaos-b"}, timeout=60)


def test_node_restarted_with_a_new_url_takes_its_place_under_load(chaos: Fleet) -> None:
    """A live node keeps its id (the newcomer is refused, 409); once the old address stops answering as
    that node, the newcomer takes its place at once, before the old lease would run out, and the requests
    waiting on the old registration go to other nodes."""
    chaos.wait_nodes({"chaos-a", "chaos-b", "chaos-c"})
    old, old_proxy = chaos.nodes["chaos-a"], chaos.proxies.pop("chaos-a")
    new = chaos.add_node("chaos-a", "tiny-sd15", proxied=True)
    new.start(ready=False)
    assert new.log_lines("refused registration: 409", "node_id_taken", timeout=60)

    async def scenario() -> list:
        old.signal(signal.SIGSTOP)
        burst = asyncio.ensure_future(generate_many(chaos.router.url, LOAD, BODY))
        deadline = time.monotonic() + 30
        while chaos.views()["chaos-a"]["url"] != chaos.proxies["chaos-a"].url and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return await asyncio.wait_for(burst, BOUND)

    try:
        assert statuses(asyncio.run(scenario())) == [200] * LOAD
    finally:
        old.kill()
        old_proxy.stop()
    taken = chaos.router.log_lines(f"node chaos-a registered again ({old_proxy.url} → {chaos.proxies['chaos-a'].url}")
    silent = float(re.search(r"last heartbeat ([\d.]+) s ago", taken[0]).group(1))
    assert silent < 3  # the heartbeat timeout here: it did not wait for the old lease to run out
    chaos.wait_nodes({"chaos-a"}, timeout=30)
    assert statuses(load(chaos)) == [200] * LOAD


def test_router_restart(chaos: Fleet) -> None:
    """The nodes notice the router forgot them (their heartbeat answers 409) and register again."""
    chaos.router.kill()
    chaos.router.start(ready=False)
    chaos.wait_nodes({"chaos-a", "chaos-b", "chaos-c"}, timeout=30)
    assert statuses(load(chaos)) == [200] * LOAD
    assert all(process.alive() for process in chaos.nodes.values())
