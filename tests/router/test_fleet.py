"""A real fleet on loopback: one router and several nodes, each its own process."""

from __future__ import annotations

import asyncio
import base64
import io
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import msgspec
import pytest
from openai import OpenAI
from PIL import Image

from engines.backends import openvino
from server.wire import PROTOCOL_VERSION, NodeReport
from tests.faults import StepGate
from tests.patience import PATIENCE, until
from tests.processes import ServerProcess, free_port
from tests.router.fleet import (
    ADMIN,
    ADMIN_HEADERS,
    ENV,
    GEN,
    LEASE,
    NODE_HEADERS,
    TOKEN,
    Fleet,
    generate_many,
    statuses,
)
from tests.server.test_openai_client import assert_usage, opaque_png, prompt_tokens


@pytest.fixture(scope="module")
def gate(tmp_path_factory: pytest.TempPathFactory) -> StepGate:
    return StepGate(tmp_path_factory.mktemp("gate"))


@pytest.fixture(scope="module")
def fleet(models_dir: Path, tmp_path_factory: pytest.TempPathFactory, gate: StepGate) -> Iterator[Fleet]:
    fleet = Fleet(models_dir, tmp_path_factory.mktemp("fleet"), ["--default-model", "tiny-sd15",
                                                                  "--drain-timeout", "120"])
    for name in ("node-a", "node-b", "node-c"):
        fleet.add_node(name, "tiny-sd15").env.update(gate.env)
    yield fleet.start()
    fleet.stop()


def test_150_concurrent_generations_spread_over_three_nodes(fleet: Fleet) -> None:
    before = {name: view["requests"] for name, view in fleet.views().items()}
    body = {"prompt": "a crowd", "size": "64x64", "steps": 2, "response_format": "b64_json"}
    responses = asyncio.run(generate_many(fleet.router.url, 150, body))
    assert statuses(responses) == [200] * 150, statuses(responses)
    served = {name: view["requests"] - before.get(name, 0) for name, view in fleet.views().items()}
    assert sum(served.values()) == 150
    assert max(served.values()) <= 75, served  # no node takes more than half
    assert min(served.values()) > 0, served
    metrics = httpx.get(fleet.router.url + "/metrics").text
    assert 'sdserve_node_requests_total{node="node-a"}' in metrics
    assert "sdserve_node_seconds_bucket" in metrics


def test_router_lists_models_and_nodes(fleet: Fleet) -> None:
    models = httpx.get(fleet.router.url + "/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["tiny-sd15"]
    views = fleet.views()
    assert set(views) == {"node-a", "node-b", "node-c"}
    backend = "openvino" if openvino.available() else "cpu"  # what auto picks on a CPU host
    assert all(v["backend"] == backend and v["state"] == "healthy" for v in views.values())
    assert all(v["model_backends"] == {"tiny-sd15": backend} for v in views.values())
    assert models["data"][0]["backends"] == [backend]
    assert httpx.get(fleet.router.url + "/v0/nodes").status_code == 401
    assert httpx.get(fleet.router.url + "/v0/nodes", headers={"Authorization": "Bearer nope"}).status_code == 401


def test_urls_point_at_the_router(fleet: Fleet) -> None:
    response = httpx.post(fleet.router.url + GEN, json={"prompt": "x", "size": "64x64", "steps": 1}, timeout=60)
    url = response.json()["data"][0]["url"]
    assert url.startswith(fleet.router.url + "/v1/images/files/")
    assert httpx.get(url).headers["content-type"] == "image/png"


def test_edits_and_variations_through_the_router(fleet: Fleet) -> None:
    """Uploads are checked (and fitted) at the router; only what renders travels to a node."""
    picture = Image.new("RGBA", (300, 200), (40, 90, 160, 255))
    picture.paste((0, 0, 0, 0), (0, 0, 150, 200))  # transparent left half: inpaint there
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    fields = {"size": "64x64", "steps": "1", "response_format": "b64_json"}
    for path, extra in (("/v1/images/edits", {"prompt": "a door"}), ("/v1/images/variations", {})):
        response = httpx.post(fleet.router.url + path, data=fields | extra, timeout=60,
                              files={"image": ("a.png", buffer.getvalue(), "image/png")})
        assert response.status_code == 200, response.text
        image = Image.open(io.BytesIO(base64.b64decode(response.json()["data"][0]["b64_json"])))
        assert image.size == (64, 64)
    before = sum(view["requests"] for view in fleet.views().values())
    oversize = httpx.post(fleet.router.url + "/v1/images/edits", data={"prompt": "x"}, timeout=60,
                          files={"image": ("a.png", b"\x89PNG" + b"\0" * (26 * 1024 * 1024), "image/png")})
    assert oversize.status_code == 413 and oversize.json()["error"]["param"] == "image"
    assert sum(view["requests"] for view in fleet.views().values()) == before  # never forwarded


def test_usage_through_the_router(fleet: Fleet, models_dir: Path) -> None:
    """The stock OpenAI client reads `usage` on the router's answers as on a standalone server's."""
    client = OpenAI(base_url=fleet.router.url + "/v1", api_key="not-needed", max_retries=0, timeout=120)
    prompt = "a harbour in the rain"
    tokens = prompt_tokens(models_dir / "tiny-sd15", prompt)
    assert_usage(client.images.generate(prompt=prompt, size="64x64", extra_body={"steps": 1}), tokens)
    picture = ("a.png", opaque_png(64, 64), "image/png")
    assert_usage(client.images.edit(image=picture, prompt=prompt, size="64x64", extra_body={"steps": 1}), tokens)


def test_probes_and_heartbeats_are_not_logged_one_line_each(fleet: Fleet) -> None:
    """The router probes each node every second and nodes heartbeat every second here: httpx's line per
    request would bury everything else, in both logs."""
    # the router's probes, as the node's access log records them, and the nodes' heartbeats in the router's
    until("three probes", lambda: len(fleet.nodes["node-a"].log_lines("GET /v0/status")) >= 3)
    until("three heartbeats", lambda: len(fleet.router.log_lines("/heartbeat 200")) >= 3)
    for process in (fleet.router, fleet.nodes["node-a"]):
        assert not [line for line in process.log().splitlines() if "httpx" in line or "HTTP Request:" in line]


def test_bad_tokens_change_nothing(fleet: Fleet) -> None:
    before = fleet.views()
    report = NodeReport(node_id="intruder", url="http://127.0.0.1:9", version="x", models=[], backend="cpu",
                        device="cpu", render_slots=1)
    body = msgspec.json.encode(report)
    headers = {"content-type": "application/json"}
    for auth in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Bearer {ADMIN}"}):
        response = httpx.post(fleet.router.url + "/v0/nodes/register", content=body, headers=headers | auth)
        assert response.status_code == 401
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    beat = httpx.post(fleet.router.url + "/v0/nodes/node-a/heartbeat", content=body,
                      headers=headers | {"Authorization": f"Bearer {TOKEN}", "x-node-lease": "stolen"})
    assert beat.status_code in (403, 409)
    leave = httpx.delete(fleet.router.url + "/v0/nodes/node-a",
                         headers={"Authorization": f"Bearer {TOKEN}", "x-node-lease": "stolen"})
    assert leave.status_code == 403
    # Taking over a live node's identity from another address is refused.
    hijack = NodeReport(node_id="node-b", url=fleet.nodes["node-a"].url, version="x", models=[], backend="cpu",
                        device="cpu", render_slots=1)
    taken = httpx.post(fleet.router.url + "/v0/nodes/register", content=msgspec.json.encode(hijack),
                       headers=headers | {"Authorization": f"Bearer {TOKEN}"})
    assert taken.status_code == 409
    after = fleet.views()
    assert set(after) == set(before)
    assert {n: v["url"] for n, v in after.items()} == {n: v["url"] for n, v in before.items()}


def register(fleet: Fleet, node_id: str, url: str, **fields: object) -> httpx.Response:
    report = NodeReport(node_id=node_id, url=url, version="x", models=[], backend="cpu", device="cpu", render_slots=1,
                        **fields)
    return httpx.post(fleet.router.url + "/v0/nodes/register", content=msgspec.json.encode(report),
                      headers=NODE_HEADERS, timeout=30)


def test_protocol_is_checked_before_the_router_calls_back(fleet: Fleet) -> None:
    with socket.socket() as listener:  # a node address that counts the router's call-backs
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        listener.settimeout(0.5)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        mismatch = register(fleet, "future", url, protocol=PROTOCOL_VERSION + 1)
        assert mismatch.status_code == 400, mismatch.text
        assert mismatch.json()["error"]["code"] == "protocol_mismatch"
        assert mismatch.json()["error"]["param"] == "protocol"
        with pytest.raises(TimeoutError):
            listener.accept()  # nobody called
    assert "future" not in fleet.views()


def test_registration_never_echoes_the_call_back_error(fleet: Fleet) -> None:
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens
    refused = register(fleet, "ghost", closed)
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "node_unreachable"
    message = refused.json()["error"]["message"]
    for detail in ("refused", "Errno", "ConnectError", "111"):  # 111: ECONNREFUSED (the port may hold it too)
        assert detail not in message.replace(closed, "NODE"), message
    assert fleet.router.log_lines("ghost", "ConnectError")  # the details are in the router's log


def test_registration_only_from_node_networks_and_never_the_router(fleet: Fleet) -> None:
    """The default allow-list is loopback and the private ranges: not public, not link-local (metadata)."""
    for url in ("http://8.8.8.8:80", "http://169.254.169.254", "http://[2001:4860:4860::8888]:80"):
        response = register(fleet, "outsider", url)
        assert response.status_code == 400, (url, response.text)
        assert response.json()["error"]["code"] == "node_network_not_allowed", url
    for url in (fleet.router.url, f"http://localhost:{fleet.router.port}"):
        itself = register(fleet, "mirror", url)
        assert itself.status_code == 400 and itself.json()["error"]["code"] == "url_is_router", itself.text
    assert not {"outsider", "mirror"} & set(fleet.views())


def test_node_networks_setting_narrows_who_may_join(models_dir: Path, tmp_path: Path) -> None:
    fleet = Fleet(models_dir, tmp_path, ["--node-networks", "10.0.0.0/8"])
    try:
        fleet.router.start(ready=False)
        response = register(fleet, "local-node", f"http://127.0.0.1:{free_port()}")
        assert response.status_code == 400, response.text
        assert response.json()["error"]["code"] == "node_network_not_allowed"
    finally:
        fleet.stop()


def test_node_with_a_wrong_token_never_joins(fleet: Fleet, tmp_path: Path) -> None:
    rogue = ServerProcess("node", ["--models-dir", str(fleet.models_dir), "--model", "tiny-sd15", "--router",
                                   fleet.router.url, "--node-id", "rogue"], tmp_path,
                          env={"SDSERVE_NODE_TOKEN": "not-the-token"}, name="rogue").start(ready=False)
    try:
        assert rogue.log_lines("refused registration: 401"), rogue.log()[-2000:]
        assert "rogue" not in fleet.views()
    finally:
        rogue.kill()


def test_kill_9_during_load_loses_nothing_and_the_node_comes_back(fleet: Fleet, gate: StepGate) -> None:
    victim = fleet.nodes["node-c"]
    body = {"prompt": "under fire", "size": "128x128", "steps": 6, "response_format": "b64_json"}

    async def scenario() -> list:
        load = asyncio.ensure_future(generate_many(fleet.router.url, 45, body))
        # renders are held: requests wait on node-c, however fast the hardware renders
        await asyncio.to_thread(until, "requests wait on node-c", lambda: fleet.views()["node-c"]["in_flight"] > 0)
        victim.kill()  # SIGKILL: no goodbye
        gate.release()
        return await asyncio.wait_for(load, timeout=PATIENCE)  # nothing hangs

    gate.hold()
    try:
        responses = asyncio.run(scenario())
    finally:
        gate.release()
    assert statuses(responses) == [200] * 45  # retried on the survivors
    assert fleet.views()["node-c"]["state"] == "unhealthy"
    after = httpx.post(fleet.router.url + GEN, json={"prompt": "x", "size": "64x64", "steps": 1}, timeout=PATIENCE)
    assert after.status_code == 200
    victim.start()  # same port, same id
    fleet.wait_nodes({"node-c"})


def test_draining_node_finishes_its_work_and_leaves(fleet: Fleet, gate: StepGate) -> None:
    """node-b is sent a render, held; it drains (SIGTERM) while the render runs: it finishes that one, takes
    no new work, and leaves."""
    fleet.wait_nodes({"node-a", "node-b", "node-c"})
    node = fleet.nodes["node-b"]
    slow = {"prompt": "long", "size": "256x256", "steps": 20, "response_format": "b64_json"}

    async def scenario() -> tuple[list, list, dict]:
        first = asyncio.ensure_future(generate_many(fleet.router.url, 3, slow))
        await asyncio.to_thread(until, "node-b renders", lambda: fleet.views()["node-b"]["in_flight"] > 0)
        node.signal(signal.SIGTERM)
        await asyncio.to_thread(until, "node-b's heartbeat says it drains",
                                lambda: fleet.views().get("node-b", {}).get("state") != "healthy")
        gate.release()
        before = sent_to(fleet, "node-b")  # counted by the router's metrics: node-b may leave meanwhile
        # Enough light work that the least-loaded choice would pick node-b too, if draining did not count.
        second = await generate_many(fleet.router.url, 24, {**slow, "steps": 2})
        return await first, second, sent_to(fleet, "node-b") - before

    gate.hold()
    try:
        first, second, to_b = asyncio.run(scenario())
    finally:
        gate.release()
    assert statuses(first) == [200] * 3
    assert statuses(second) == [200] * 24
    assert to_b == 0  # new work went elsewhere
    assert node.process.wait(PATIENCE) == 0
    assert node.log_lines("draining: taking no new work")
    assert node.log_lines("deregistered from router")
    assert fleet.router.log_lines("node node-b", "deregistered")
    assert "node-b" not in fleet.views()
    node.start()
    fleet.wait_nodes({"node-b"})


def sent_to(fleet: Fleet, node: str) -> float:
    for line in httpx.get(fleet.router.url + "/metrics").text.splitlines():
        if line.startswith(f'sdserve_node_requests_total{{node="{node}"}}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_router_sigterm_finishes_in_flight_then_restart_nodes_register_again(fleet: Fleet, gate: StepGate) -> None:
    """Three renders held on the nodes while the router stops: its closed listener takes no heartbeats, yet
    it waits for them past the nodes' 4 s leases (probes say they live) and answers all three."""
    fleet.wait_nodes({"node-a", "node-b", "node-c"})
    body = {"prompt": "in flight", "size": "64x64", "steps": 4, "response_format": "b64_json"}

    async def scenario() -> list:
        load = asyncio.ensure_future(generate_many(fleet.router.url, 3, body))
        await asyncio.to_thread(gate.wait_held)
        await asyncio.to_thread(until, "three requests on the nodes",
                                lambda: sum(v["in_flight"] for v in fleet.views().values()) >= 3)
        fleet.router.signal(signal.SIGTERM)  # stops accepting, finishes what it has
        await asyncio.sleep(LEASE + 2)  # past the heartbeat timeout and a probe round: leases would have expired
        gate.release()
        return await load

    gate.hold()
    try:
        responses = asyncio.run(scenario())
    finally:
        gate.release()
    assert [getattr(r, "status_code", repr(r)) for r in responses] == [200] * 3
    assert fleet.router.process.wait(PATIENCE) == 0
    fleet.router.start(ready=False)
    fleet.wait_nodes({"node-a", "node-b", "node-c"})
    response = httpx.post(fleet.router.url + GEN, json={"prompt": "again", "size": "64x64", "steps": 1}, timeout=60)
    assert response.status_code == 200
    for name in ("node-a", "node-b", "node-c"):
        assert fleet.nodes[name].alive()  # nobody restarted the nodes


@pytest.fixture(scope="module")
def split_fleet(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    fleet = Fleet(models_dir, tmp_path_factory.mktemp("split"), ["--default-model", "tiny-sd51"])  # a typo
    fleet.add_node("sd15-node", "tiny-sd15")
    fleet.add_node("sdxl-node", "tiny-sdxl")
    yield fleet.start()
    fleet.stop()


def test_requests_land_where_the_model_is(split_fleet: Fleet) -> None:
    before = {name: view["requests"] for name, view in split_fleet.views().items()}
    for model, count in (("tiny-sd15", 4), ("tiny-sdxl", 3)):
        responses = asyncio.run(generate_many(split_fleet.router.url, count,
                                              {"model": model, "prompt": "p", "size": "64x64", "steps": 1}))
        assert all(r.status_code == 200 and r.json()["model"] == model for r in responses)
    served = {name: view["requests"] - before[name] for name, view in split_fleet.views().items()}
    assert served == {"sd15-node": 4, "sdxl-node": 3}
    models = {m["id"] for m in httpx.get(split_fleet.router.url + "/v1/models").json()["data"]}
    assert models == {"tiny-sd15", "tiny-sdxl"}
    unknown = httpx.post(split_fleet.router.url + GEN, json={"model": "tiny-sd99", "prompt": "p"})
    assert unknown.status_code == 404 and unknown.json()["error"]["param"] == "model"


def test_a_default_model_no_node_has_is_reported(split_fleet: Fleet) -> None:
    """A router cannot check its default at start-up (nodes come later): it warns once nodes report their
    models, /readyz says so, and a request without a model says which setting to fix."""
    ready = httpx.get(split_fleet.router.url + "/readyz")
    assert ready.status_code == 200
    assert "tiny-sd51" in ready.json()["default_model"]
    assert split_fleet.router.log_lines("WARNING", "--default-model 'tiny-sd51'")
    response = httpx.post(split_fleet.router.url + GEN, json={"prompt": "p", "size": "64x64", "steps": 1}, timeout=60)
    assert response.status_code == 503 and "--default-model" in response.json()["error"]["message"]
    named = httpx.post(split_fleet.router.url + GEN, json={"model": "tiny-sd15", "prompt": "p", "size": "64x64",
                                                           "steps": 1}, timeout=60)
    assert named.status_code == 200


def test_known_model_without_a_healthy_node_is_503(split_fleet: Fleet) -> None:
    split_fleet.nodes["sdxl-node"].kill()
    response = httpx.post(split_fleet.router.url + GEN, json={"model": "tiny-sdxl", "prompt": "p", "size": "64x64",
                                                              "steps": 1}, timeout=60)
    assert response.status_code == 503, response.text
    assert int(response.headers["retry-after"]) >= 1
    assert response.json()["error"]["type"] == "server_error"
    still = httpx.post(split_fleet.router.url + GEN, json={"model": "tiny-sd15", "prompt": "p", "size": "64x64",
                                                           "steps": 1}, timeout=60)
    assert still.status_code == 200


def test_standalone_accepts_remote_nodes(models_dir: Path, tmp_path: Path) -> None:
    """The default role is a router with an in-process node; other nodes may join it."""
    port = free_port()
    standalone = ServerProcess("standalone", ["--models-dir", str(models_dir), "--model", "tiny-sd15",
                                              "--images-dir", str(tmp_path / "images")], tmp_path, env=ENV,
                               port=port, name="standalone").start()
    helper = ServerProcess("node", ["--models-dir", str(models_dir), "--model", "tiny-sdxl", "--router",
                                    standalone.url, "--node-id", "helper"], tmp_path, env=ENV, name="helper").start()
    try:
        until("the standalone lists the helper's model too", lambda: {
            m["id"] for m in httpx.get(standalone.url + "/v1/models").json()["data"]} == {"tiny-sd15", "tiny-sdxl"})
        response = httpx.post(standalone.url + GEN, json={"model": "tiny-sdxl", "prompt": "p", "size": "64x64",
                                                          "steps": 1}, timeout=60)
        assert response.status_code == 200
        nodes = httpx.get(standalone.url + "/v0/nodes", headers=ADMIN_HEADERS).json()["data"]
        assert {n["node_id"] for n in nodes} == {"local", "helper"}
    finally:
        helper.kill()
        standalone.kill()


def test_a_router_without_a_default_takes_its_fleets_only_model(models_dir: Path, tmp_path: Path) -> None:
    """No --default-model: while the nodes serve one model, a request naming none gets it; once they serve
    several, it is 400 `model_required` saying which models there are and how to pick."""
    fleet = Fleet(models_dir, tmp_path)
    fleet.add_node("only-sd15", "tiny-sd15")
    fleet.start()
    try:
        body = {"prompt": "p", "size": "64x64", "steps": 1}
        one = httpx.post(fleet.router.url + GEN, json=body, timeout=60)
        assert one.status_code == 200 and one.json()["model"] == "tiny-sd15", one.text
        options = httpx.get(fleet.router.url + "/sdapi/v1/options", timeout=10).json()
        assert options["sd_model_checkpoint"] == "tiny-sd15"
        fleet.add_node("only-sdxl", "tiny-sdxl").start(ready=False)
        fleet.wait_nodes({"only-sd15", "only-sdxl"})
        several = httpx.post(fleet.router.url + GEN, json=body, timeout=60)
        assert several.status_code == 400, several.text
        error = several.json()["error"]
        assert error["code"] == "model_required" and error["param"] == "model"
        assert "tiny-sd15, tiny-sdxl" in error["message"] and "--default-model" in error["message"]
        named = httpx.post(fleet.router.url + GEN, json={**body, "model": "tiny-sdxl"}, timeout=60)
        assert named.status_code == 200 and named.json()["model"] == "tiny-sdxl"
    finally:
        fleet.stop()
