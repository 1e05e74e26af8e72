"""The fetch of an http(s) image URL from a JSON edit, where the operator enabled it (`fetch_image_urls`).

A client's URL makes this server send a request on its network, so:
* the host is resolved once, here, and the addresses checked; the connection goes to the checked address
  (the Host header and TLS SNI carry the name), so a second DNS answer cannot change where it goes;
* loopback, link-local, private, multicast, unspecified and reserved addresses are refused before any
  connection, unless inside a `fetch_allow_networks` network;
* redirects only to the same host, at most MAX_REDIRECTS, each hop resolved and checked again;
* the body is streamed and abandoned past the upload limit (413); one deadline, `fetch_timeout`, covers the
  whole fetch with its redirects (400); no proxy from the environment, no compressed bodies.
Every refusal is an ApiError naming the field (`images` or `mask`).
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import socket
import ssl

import anyio
import httpx

from server.errors import ApiError
from server.settings import Settings

log = logging.getLogger("sdserve.server")
MAX_REDIRECTS = 3
Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_BLOCKED = ("loopback", "link_local", "site_local", "private", "multicast", "unspecified", "reserved")


async def fetch(url: str, param: str, settings: Settings) -> bytes:
    """The body at `url`, at most `max_upload_bytes`; ApiError (400, 413) naming `param` otherwise."""
    allowed = [ipaddress.ip_network(network, strict=False) for network in settings.fetch_allow_networks]
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise ApiError(400, f"'{param}': image_url is not a valid URL ({exc})", param=param,
                       code=f"invalid_{param}") from exc
    if not parsed.raw_host:
        raise ApiError(400, f"'{param}': image_url has no host", param=param, code=f"invalid_{param}")
    if parsed.port is not None and not 0 < parsed.port < 65536:
        raise ApiError(400, f"'{param}': image_url has port {parsed.port}, outside 1-65535", param=param,
                       code=f"invalid_{param}")
    timeout = settings.fetch_timeout
    try:
        with anyio.fail_after(timeout):
            return await _follow(parsed, param, settings.max_upload_bytes, allowed, timeout)
    except (TimeoutError, httpx.TimeoutException) as exc:
        raise ApiError(400, f"'{param}': fetching image_url took longer than {timeout:g} s", param=param,
                       code="image_url_timeout") from exc
    except httpx.HTTPError as exc:
        raise ApiError(400, f"'{param}': fetching image_url failed ({type(exc).__name__}: {exc})", param=param,
                       code="image_url_fetch_failed") from exc


async def _follow(url: httpx.URL, param: str, limit: int, allowed: list[Network], timeout: float) -> bytes:
    """GET with same-host redirects; each hop connects to the address its host was checked at."""
    host = url.raw_host.lower()
    tls = await anyio.to_thread.run_sync(_tls_context)  # loads the CA bundle once, off the event loop
    async with httpx.AsyncClient(trust_env=False, verify=tls, timeout=timeout, follow_redirects=False) as client:
        for _ in range(MAX_REDIRECTS + 1):
            address = await _checked_address(url, param, allowed)
            name = url.raw_host.decode("ascii")
            request = client.build_request(
                "GET", url.copy_with(host=address), headers={"Host": url.netloc.decode("ascii"),
                                                             "Accept-Encoding": "identity"},
                extensions={"sni_hostname": name} if url.scheme == "https" else {})
            response = await client.send(request, stream=True)
            try:
                if response.has_redirect_location:
                    url = _redirect(url, response.headers["location"], host, param)
                    continue
                if not response.is_success:
                    raise ApiError(400, f"'{param}': image_url answered HTTP {response.status_code}", param=param,
                                   code="image_url_fetch_failed")
                body = await _read(response, param, limit)
                log.info("fetched %d bytes for %s from %s (%s)", len(body), param, name, address)
                return body
            finally:
                await response.aclose()
    raise ApiError(400, f"'{param}': image_url redirects more than {MAX_REDIRECTS} times", param=param,
                   code="image_url_redirect_not_allowed")


async def _checked_address(url: httpx.URL, param: str, allowed: list[Network]) -> str:
    """The first address of the host that may be fetched from; refused before any connection otherwise."""
    host = url.raw_host.decode("ascii")
    try:
        addresses: list[Address] = [ipaddress.ip_address(host)]
    except ValueError:  # a name: resolve it (in a worker thread; a literal never reaches the resolver)
        try:
            port = url.port or (443 if url.scheme == "https" else 80)
            infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise ApiError(400, f"'{param}': image_url's host {host!r} does not resolve", param=param,
                           code="image_url_fetch_failed") from exc
        addresses = [ipaddress.ip_address(info[4][0]) for info in infos]
    reasons = [_blocked(address, allowed) for address in addresses]
    for address, reason in zip(addresses, reasons, strict=True):
        if reason is None:
            return str(address)
    raise ApiError(400, f"'{param}': image_url's host {host!r} is a {reasons[0]} address ({addresses[0]}), which "
                   "this server does not fetch from", param=param, code="image_url_address_not_allowed")


def _blocked(address: Address, allowed: list[Network]) -> str | None:
    """Why an address may not be fetched from, or None. IPv6 forms that embed an IPv4 address are judged by
    that address."""
    if isinstance(address, ipaddress.IPv6Address):
        address = address.ipv4_mapped or address.sixtofour or address
    if any(address in network for network in allowed):
        return None
    for kind in _BLOCKED:
        if getattr(address, f"is_{kind}", False):  # is_site_local: IPv6 only
            return kind.replace("_", "-")
    return None if address.is_global else "non-global"


def _redirect(url: httpx.URL, location: str, host: bytes, param: str) -> httpx.URL:
    try:
        target = url.join(location)
    except httpx.InvalidURL:
        target = httpx.URL()
    if target.scheme not in ("http", "https") or target.raw_host.lower() != host:
        raise ApiError(400, f"'{param}': image_url redirects to another host ({target.host or location!r}); only "
                       "redirects on the same host are followed", param=param, code="image_url_redirect_not_allowed")
    return target


async def _read(response: httpx.Response, param: str, limit: int) -> bytes:
    """The body, read until it ends or passes `limit` (then 413 without reading on)."""
    too_large = ApiError(413, f"'{param}': image_url's body is over the limit of {limit} bytes", param=param,
                         code="file_too_large")
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for chunk in response.aiter_raw():
        body += chunk
        if len(body) > limit:
            raise too_large
    return bytes(body)


@functools.cache
def _tls_context() -> ssl.SSLContext:
    return httpx.create_ssl_context()
