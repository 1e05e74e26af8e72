"""Who may join: the checks a registration passes before the router accepts a node, cheapest and safest
first, so that a token holder cannot use the router to probe addresses:

1. the node speaks this router's protocol (checked before any call back);
2. its advertised URL resolves only into `--node-networks` and is not this router itself;
3. the router reaches it there and it answers with the same node id (a node can only register an address
   that is its own); a failure is answered without the connection error, which goes to the router's log;
4. a live node already holding the id at another URL keeps it, unless that URL no longer answers as it
   (a node restarted elsewhere takes its place at once). The replaced record is retired: the requests
   waiting on it are sent to other nodes, and its client is closed once none is using it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import time
from functools import cache
from urllib.parse import urlsplit

from server.errors import ApiError
from server.router.node_client import NodeClient
from server.router.registry import NodeRecord, Registry, check_protocol
from server.settings import Settings
from server.wire import NodeReport, NodeUnavailable

log = logging.getLogger("sdserve.router")
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


async def admit(report: NodeReport, settings: Settings, registry: Registry) -> NodeRecord:
    check_protocol(report)
    await check_address(report.url, settings)
    client = NodeClient(report.url, settings.node_token, settings.connect_timeout, settings.request_timeout)
    try:
        await _call_back(client, report, settings.probe_timeout)
        previous = registry.nodes.get(report.node_id)
        if previous is not None and previous.report.url != report.url and await _still_there(previous, settings):
            raise ApiError(409, f"node id {report.node_id} is registered by a live node at {previous.report.url}",
                           param="node_id", code="node_id_taken")
        # read again: a registration of the same id may have landed while this one awaited its checks
        previous = registry.nodes.get(report.node_id)
        record = registry.register(report, client)
    except BaseException:
        await client.close()
        raise
    if previous is not None:
        log.info("node %s registered again (%s → %s; the old one last heartbeat %.1f s ago); requests waiting on "
                 "the old registration go elsewhere", report.node_id, previous.report.url, report.url,
                 time.monotonic() - previous.last_seen)
        await registry.retire(previous)
    return record


async def _call_back(client: NodeClient, report: NodeReport, timeout: float) -> None:
    try:
        answer = await client.status(timeout)
    except NodeUnavailable as exc:
        log.warning("registration of node %s: %s/v0/status: %s", report.node_id, report.url, exc)
        raise ApiError(400, f"the router could not reach a node at {report.url}/v0/status; check --advertise-url "
                       "(the router's log has the details)", param="url", code="node_unreachable") from None
    if answer.node_id != report.node_id:
        raise ApiError(409, f"the node at {report.url} has another node id", param="node_id",
                       code="identity_mismatch")


async def _still_there(previous: NodeRecord, settings: Settings) -> bool:
    """Whether the id's current holder still answers as itself at its own URL."""
    try:
        answer = await previous.transport.status(settings.probe_timeout)
    except NodeUnavailable:
        return False
    return answer.node_id == previous.id


async def check_address(url: str, settings: Settings) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ApiError(400, f"'{url}' is not an http(s) URL", param="url", code="invalid_url")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        found = await asyncio.get_running_loop().getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)
    except (ValueError, OSError):
        raise ApiError(400, f"the host of '{url}' does not resolve", param="url", code="invalid_url") from None
    addresses = {_plain(ipaddress.ip_address(info[4][0])) for info in found}
    networks = allowed_networks(tuple(settings.node_networks))
    for address in sorted(addresses, key=str):
        if not any(address in network for network in networks):
            raise ApiError(400, f"'{url}' resolves to {address}, outside the networks nodes may use "
                           "(--node-networks)", param="url", code="node_network_not_allowed")
    if _is_this_router(parts.hostname, port, addresses, settings):
        raise ApiError(400, f"'{url}' is this router's own address; give the node's --advertise-url",
                       param="url", code="url_is_router")


@cache
def allowed_networks(cidrs: tuple[str, ...]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(cidr.strip(), strict=False) for cidr in cidrs if cidr.strip())


def _plain(address: Address) -> Address:
    mapped = getattr(address, "ipv4_mapped", None)
    return mapped or address


def _is_this_router(host: str, port: int, addresses: set[Address], settings: Settings) -> bool:
    public = urlsplit(settings.public_url or "")
    public_port = public.port or (443 if public.scheme == "https" else 80)
    if public.hostname and public.hostname.lower() == host.lower() and public_port == port:
        return True
    if port != settings.port:
        return False
    return any(a.is_loopback or a.is_unspecified or a in _own_addresses(settings.host) for a in addresses)


@cache
def _own_addresses(bound: str) -> frozenset[Address]:
    """The addresses this router answers on: the one it binds, or every address of this host."""
    own: set[Address] = set()
    for name in (bound, socket.gethostname()):
        try:
            own.update(_plain(ipaddress.ip_address(info[4][0])) for info in socket.getaddrinfo(name, None))
        except OSError:
            continue
    return frozenset(own)
