"""Image URLs fetched for a caller, without letting the caller reach our network.

Every hop (the URL, then each redirect) is checked the same way: http or https; the host
resolved here, and every address it resolves to must be global (not private, loopback,
link-local, metadata, shared, multicast or reserved; IPv4 inside IPv6 is unwrapped) unless
it lies in an explicitly allowed network. The connection then goes to the checked address
itself, with the name in `Host` and TLS SNI, so a second DNS answer cannot move it
elsewhere. The whole fetch has one deadline (a body that trickles a byte a second ends
there); the body is read raw, never decompressed, and stops at the byte cap.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import httpx

from .errors import FetchFailed, FetchTooLarge, UrlNotAllowed

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Awaitable[list[str]]]

_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def _embedded_ipv4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    if ip.version != 6:
        return None
    assert isinstance(ip, ipaddress.IPv6Address)
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def address_allowed(ip: IPAddress, allow: Sequence[ipaddress._BaseNetwork] = ()) -> bool:
    """Whether a fetch may connect to `ip`: listed in `allow`, or global and unicast."""
    inner = _embedded_ipv4(ip)
    if inner is not None:
        ip = inner
    if any(ip.version == net.version and ip in net for net in allow):
        return True
    if ip.version == 6 and ip.teredo is not None:  # tunnels to an address we cannot check
        return False
    return ip.is_global and not ip.is_multicast


async def system_resolver(host: str, port: int) -> list[str]:
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


@dataclass(frozen=True)
class FetchConfig:
    allow_networks: tuple[str, ...] = ()
    connect_timeout_s: float = 3.0
    timeout_s: float = 10.0  # the whole fetch, every hop and the body
    max_bytes: int = 16 * 2**20
    max_redirects: int = 3


class UrlFetcher:
    """Fetches image URLs under `FetchConfig`; `on_outcome(outcome)` counts each fetch:
    ok, blocked, too_large, timeout or failed."""

    def __init__(self, config: FetchConfig, *, resolver: Resolver = system_resolver,
                 on_outcome: Callable[[str], None] = lambda outcome: None):
        self.config = config
        self._allow = [ipaddress.ip_network(n, strict=False) for n in config.allow_networks]
        self._resolve = resolver
        self._on_outcome = on_outcome
        self._client = httpx.AsyncClient(
            follow_redirects=False,
            trust_env=False,  # no proxies or netrc from the environment
            timeout=httpx.Timeout(config.timeout_s, connect=config.connect_timeout_s),
            headers={"Accept-Encoding": "identity", "User-Agent": "clip-server"},
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def fetch(self, url: str, index: int) -> bytes:
        """The body at `url`; UrlNotAllowed, FetchTooLarge or FetchFailed naming image
        `index`, never echoing the URL."""
        try:
            if sys.version_info >= (3, 11):
                async with asyncio.timeout(self.config.timeout_s):
                    data = await self._follow(url, index)
            else:  # no asyncio.timeout yet; wait_for runs the fetch as a task of its own
                data = await asyncio.wait_for(self._follow(url, index), self.config.timeout_s)
        except UrlNotAllowed:
            self._on_outcome("blocked")
            raise
        except FetchTooLarge:
            self._on_outcome("too_large")
            raise
        except (TimeoutError, asyncio.TimeoutError):  # one class from 3.11 on, two before
            self._on_outcome("timeout")
            raise FetchFailed(f"image {index}: fetching the URL took longer than "
                              f"{self.config.timeout_s:g} s") from None
        except FetchFailed:
            self._on_outcome("failed")
            raise
        self._on_outcome("ok")
        return data

    async def _follow(self, url: str, index: int) -> bytes:
        try:
            target = httpx.URL(url)
        except (httpx.InvalidURL, TypeError, ValueError):
            raise UrlNotAllowed(f"image {index}: not a valid URL") from None
        for _ in range(self.config.max_redirects + 1):
            ip = await self._check(target, index)
            result = await self._get(target, ip, index)
            if isinstance(result, bytes):
                return result
            try:
                target = target.join(result)
            except (httpx.InvalidURL, ValueError):
                raise FetchFailed(f"image {index}: the URL redirects to an invalid URL") from None
        raise FetchFailed(f"image {index}: more than {self.config.max_redirects} redirects")

    async def _check(self, url: httpx.URL, index: int) -> str:
        """The address to connect to, after checking every address the host resolves to."""
        if url.scheme not in ("http", "https"):
            raise UrlNotAllowed(f"image {index}: only http and https URLs are accepted")
        if not url.host:
            raise UrlNotAllowed(f"image {index}: the URL has no host")
        port = url.port or (443 if url.scheme == "https" else 80)
        try:
            addresses = [ipaddress.ip_address(a.split("%")[0])
                         for a in await self._resolve(url.host, port)]
        except (OSError, UnicodeError, ValueError):
            raise FetchFailed(f"image {index}: the URL's host does not resolve") from None
        if not addresses:
            raise FetchFailed(f"image {index}: the URL's host does not resolve")
        if not all(address_allowed(a, self._allow) for a in addresses):
            raise UrlNotAllowed(f"image {index}: the URL's host is a private or reserved "
                                f"address")
        return str(addresses[0])

    async def _get(self, url: httpx.URL, ip: str, index: int) -> bytes | str:
        """The body, or the Location of a redirect."""
        request = self._client.build_request(
            "GET", url.copy_with(host=ip), headers={"Host": url.netloc.decode("ascii")},
            extensions={"sni_hostname": url.host} if url.scheme == "https" else {},
        )
        try:
            response = await self._client.send(request, stream=True)
        except httpx.HTTPError:
            raise FetchFailed(f"image {index}: the URL could not be fetched") from None
        try:
            if response.is_redirect and "location" in response.headers:
                return response.headers["location"]
            if response.status_code != 200:
                raise FetchFailed(f"image {index}: the URL answered HTTP "
                                  f"{response.status_code}")
            if response.headers.get("content-encoding", "identity").lower() != "identity":
                raise FetchFailed(f"image {index}: compressed responses are not accepted")
            declared = response.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > self.config.max_bytes:
                raise FetchTooLarge(self._too_large(index))
            body = bytearray()
            try:
                async for chunk in response.aiter_raw():
                    body += chunk
                    if len(body) > self.config.max_bytes:
                        raise FetchTooLarge(self._too_large(index))
            except httpx.HTTPError:
                raise FetchFailed(f"image {index}: the URL's body was cut short") from None
            return bytes(body)
        finally:
            await response.aclose()

    def _too_large(self, index: int) -> str:
        return f"image {index}: the URL's body is over {self.config.max_bytes} bytes"
