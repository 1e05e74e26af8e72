"""The fleet under faults: a node stopped (SIGSTOP), killed (SIGKILL), one whose address accepts
connections and never answers, one the router cannot reach while it still heartbeats, one whose advertise
URL is unreachable, a node restarted with a new URL, and a router restart. Each scenario is bounded in
time, and every request the router accepted gets an answer, all of them 200: the README ("Scaling out")
says how the router re-dispatches what a lost node had not answered.

Probes and heartbeats are frequent here (set through the settings), so that each fault is noticed in a
second or two rather than the production defaults' tens of seconds. Leases are long (twice the tests'
patience), so that none runs out on a busy machine whose heartbeats come late: every fault here is found
by a probe or a failed call, and a test that saw a lease run out would have waited past its patience.
Renders are held on a node (each has its own step gate) until the router has sent it work, so that
requests are known to wait on the node a fault then strikes, however fast or slow the machine.
"""

from __future__ import annotations

import asyncio
import re
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.faults import StepGate
from tests.patience import PATIENCE, until
from tests.processes import free_port
from tests.router.fleet import GEN, Fleet, generate_many, statuses

BODY = {"prompt": "chaos", "size": "64x64", "steps": 2, "response_format": "b64_json"}
LOAD = 24
LEASE = 2 * PATIENCE  # the router's heartbeat timeout here: no lease runs out while a test waits
NAMES = ("chaos-a", "chaos-b", "chaos-c")


@pytest.fixture(scope="module")
def chaos(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    work = tmp_path_factory.mktemp("chaos")
    fleet = Fleet(models_dir, work,
                  ["--heartbeat-timeout", str(LEASE), "--heartbeat-interval", "1", "--probe-timeout", "1",
                   "--retries", "3", "--default-model", "tiny-sd15"],
                  node_args=["--heartbeat-interval", "0.5", "--threads", "1"])
    fleet.gates = {name: StepGate(work / f"gate-{name}") for name in NAMES}
    for name in NAMES:
        fleet.add_node(name, "tiny-sd15", proxied=True).env.update(fleet.gates[name].env)
    yield fleet.start()
    for gate in fleet.gates.values():
        gate.release()
    fleet.stop()


def load(fleet: Fleet, count: int = LOAD) -> list[httpx.Response | Exception]:
    return asyncio.run(asyncio.wait_for(generate_many(fleet.router.url, count, BODY), PATIENCE))


def under_load(fleet: Fleet, name: str, fault: Callable[[], None]) -> list[httpx.Response | Exception]:
    """A burst of LOAD requests; once node `name` holds one of them mid-render, `fault` strikes it; then the
    node's renders are released (what it still renders after a fault is nobody's answer any more)."""
    gate = fleet.gates[name]

    async def scenario() -> list[httpx.Response | Exception]:
        burst = asyncio.ensure_future(generate_many(fleet.router.url, LOAD, BODY))
        await asyncio.to_thread(gate.wait_held)
        assert fleet.views()[name]["in_flight"] > 0
        fault()
        return await asyncio.wait_for(burst, PATIENCE)

    gate.hold()
    try:
        return asyncio.run(scenario())
    finally:
        gate.release()


def test_sigstop_one_of_three_under_load(chaos: Fleet) -> None:
    """The stopped node's probe fails while requests wait on it: they go to the other nodes, and the client
    sees a slower 200."""
    chaos.wait_nodes(set(NAMES))
    victim = chaos.nodes["chaos-a"]
    before = chaos.views()
    try:
        responses = under_load(chaos, "chaos-a", lambda: victim.signal(signal.SIGSTOP))
    finally:
        victim.signal(signal.SIGCONT)
    assert statuses(responses) == [200] * LOAD
    served = chaos.served(before)
    assert served["chaos-a"] > 0, served  # some did wait on the stopped node
    assert sum(served.values()) >= LOAD + served["chaos-a"], served  # each of those sent again
    chaos.wait_nodes({"chaos-a"})  # back once a probe reaches it


def test_a_node_that_accepts_and_never_answers(chaos: Fleet) -> None:
    """It still heartbeats, so its lease never runs out: its probe (1 s here) takes it out, and requests
    waiting on it go elsewhere. Probes run concurrently, so it delays no other node's."""
    chaos.wait_nodes(set(NAMES))
    before = chaos.views()
    try:
        responses = under_load(chaos, "chaos-b", lambda: chaos.proxies["chaos-b"].set("hang"))
        views = chaos.views()
    finally:
        chaos.proxies["chaos-b"].set("pass")
    assert statuses(responses) == [200] * LOAD
    assert chaos.served(before)["chaos-b"] > 0
    assert views["chaos-b"]["state"] == "unhealthy"
    assert "probe" in views["chaos-b"]["last_error"]
    chaos.wait_nodes({"chaos-b"})


def test_a_node_the_router_cannot_reach_stays_out_while_it_heartbeats(chaos: Fleet) -> None:
    """One-way trouble: the node reaches the router, the router cannot reach the node. Heartbeats do not
    put it back (only a router → node call does), so it costs at most one failed attempt."""
    chaos.wait_nodes(set(NAMES))
    failures = chaos.views()["chaos-c"]["failures"]
    chaos.proxies["chaos-c"].set("refuse")
    try:
        until("the router finds chaos-c unreachable", lambda: chaos.views()["chaos-c"]["state"] != "healthy")
        out_since, seen, answers, heartbeat_since = time.monotonic(), [], [], False
        while len(seen) < 10 or not heartbeat_since:  # ten requests, and on until it has heartbeat since
            assert time.monotonic() < out_since + PATIENCE, f"no heartbeat from chaos-c since it went out: {seen}"
            answers.append(httpx.post(chaos.router.url + GEN, json=BODY, timeout=PATIENCE).status_code)
            asked = time.monotonic()  # before the router measures the heartbeat's age
            seen.append(chaos.views()["chaos-c"])
            heartbeat_since = seen[-1]["last_heartbeat_seconds"] < asked - out_since  # younger than the outage
            time.sleep(0.25)
    finally:
        chaos.proxies["chaos-c"].set("pass")
    assert answers == [200] * len(answers)
    assert [view["state"] for view in seen] == ["unhealthy"] * len(seen)  # heartbeats did not put it back
    assert seen[-1]["failures"] == failures + 1
    chaos.wait_nodes({"chaos-c"})


def test_a_node_whose_advertise_url_is_unreachable_never_joins(chaos: Fleet) -> None:
    ghost = chaos.add_node("ghost", "tiny-sd15", extra=["--advertise-url", f"http://127.0.0.1:{free_port()}"])
    ghost.start(ready=False)
    try:
        lines = ghost.log_lines("refused registration: 400")
        assert lines and "node_unreachable" in lines[0], ghost.log()[-2000:]
        assert "Errno" not in lines[0] and "Connection refused" not in lines[0]  # no connection error echoed
        assert statuses(load(chaos, 6)) == [200] * 6
        assert "ghost" not in chaos.views()
    finally:
        ghost.kill()
        del chaos.nodes["ghost"]


def test_sigkill_under_load(chaos: Fleet) -> None:
    """Requests waiting on a killed node are sent again; the node comes back when it is started again."""
    chaos.wait_nodes(set(NAMES))
    victim = chaos.nodes["chaos-b"]
    assert statuses(under_load(chaos, "chaos-b", victim.kill)) == [200] * LOAD
    victim.start(ready=False)
    chaos.wait_nodes({"chaos-b"})


def test_node_restarted_with_a_new_url_takes_its_place_under_load(chaos: Fleet) -> None:
    """A live node keeps its id (the newcomer is refused, 409); once the old address stops answering as
    that node, the newcomer takes its place at once, before the old lease would run out, and the requests
    waiting on the old registration go to other nodes."""
    chaos.wait_nodes(set(NAMES))
    old, old_proxy = chaos.nodes["chaos-a"], chaos.proxies.pop("chaos-a")
    new = chaos.add_node("chaos-a", "tiny-sd15", proxied=True)
    new.start(ready=False)
    assert new.log_lines("refused registration: 409", "node_id_taken")

    def replaced() -> None:
        old.signal(signal.SIGSTOP)
        until("the newcomer takes chaos-a's place", lambda: chaos.views()["chaos-a"]["url"] == new_url)

    new_url = chaos.proxies["chaos-a"].url
    try:
        assert statuses(under_load(chaos, "chaos-a", replaced)) == [200] * LOAD
    finally:
        old.kill()
        old_proxy.stop()
    taken = chaos.router.log_lines(f"node chaos-a registered again ({old_proxy.url} → {new_url}")
    silent = float(re.search(r"last heartbeat ([\d.]+) s ago", taken[0]).group(1))
    assert silent < LEASE  # the old lease still ran: the newcomer did not wait for it to run out
    chaos.wait_nodes({"chaos-a"})
    assert statuses(load(chaos)) == [200] * LOAD


def test_router_restart(chaos: Fleet) -> None:
    """The nodes notice the router forgot them (their heartbeat answers 409) and register again."""
    chaos.router.kill()
    chaos.router.start(ready=False)
    chaos.wait_nodes(set(NAMES))
    assert statuses(load(chaos)) == [200] * LOAD
    assert all(process.alive() for process in chaos.nodes.values())
