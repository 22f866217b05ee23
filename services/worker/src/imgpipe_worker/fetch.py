"""Fetch image sources from user-supplied URLs without opening an SSRF hole.

Layers, each of which would stop the classic attacks on its own:

1. :func:`imgpipe.urlsafety.check_url` on the URL and on every redirect target
   (scheme, userinfo, literal IPs in any spelling, loopback/metadata names);
2. :class:`SafeResolver`, an aiohttp resolver that checks every address a name
   resolves to and refuses the whole host if any is forbidden. The connector connects
   to exactly the addresses the resolver returned, so DNS rebinding (public address
   at check time, private at connect time) cannot work: there is only one lookup;
3. a socket factory that checks the address of every socket right before it connects
   (defence in depth, and the only layer that sees IP-literal hosts besides check_url,
   since aiohttp does not send those through the resolver).

Plus: no proxies from the environment, no cookies, manual redirects with https->http
downgrade refused, a byte cap enforced while streaming, no transparent decompression.

Error codes (``FetchError.code``) and whether a retry may help (``transient``):

=========================  =========  ==========================================
code                       transient  meaning
=========================  =========  ==========================================
``url_invalid``            no         malformed URL / redirect target
``url_forbidden``          no         policy: scheme, address, host, downgrade
``url_too_large``          no         body (or Content-Length) over ``max_bytes``
``url_too_many_redirects`` no         more than ``max_redirects`` hops
``url_not_found``          no         HTTP 404 / 410
``url_http_error``         yes/no     5xx, 408, 425, 429 transient; other HTTP
                                      errors, compressed bodies, bad redirects not
``url_timeout``            yes        connect or total timeout
``url_unreachable``        yes/no     connection refused/reset, DNS temporary
                                      failure: transient. A name that does not
                                      exist (NXDOMAIN) and TLS certificate errors
                                      are permanent: retrying will not fix them.
=========================  =========  ==========================================
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import socket
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from ipaddress import IPv4Network, IPv6Network, ip_address
from typing import Any
from urllib.parse import urljoin, urlsplit

import aiohttp
import yarl
from aiohttp.abc import AbstractResolver, ResolveResult
from imgpipe.bodies import Admit, BodyNotAdmitted, BodyTooLarge, read_body
from imgpipe.urlsafety import DEFAULT_PORTS, UrlRejected, check_url, host_matches, is_forbidden_ip

__all__ = [
    "FetchError",
    "FetchPolicy",
    "Fetched",
    "LookupThreads",
    "SafeResolver",
    "fetch_url",
    "make_session",
]

log = logging.getLogger("imgpipe.worker")

_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_TRANSIENT_4XX = frozenset({408, 425, 429})
_MAX_REASON = 80  # characters of a server's reason phrase kept in a failed job's message
# getaddrinfo errors meaning "this name does not exist" (as opposed to "DNS is down").
_NO_SUCH_NAME = frozenset(
    e for e in (getattr(socket, "EAI_NONAME", None), getattr(socket, "EAI_NODATA", None)) if e is not None
)


class FetchError(Exception):
    """A fetch that failed; ``code`` is stable, ``message`` is for humans.

    ``transient`` says whether retrying the same URL later may succeed.
    """

    def __init__(self, code: str, message: str, *, transient: bool = False) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.transient = transient


@dataclass(frozen=True)
class Fetched:
    """A successfully fetched body (held once: `imgpipe.bodies`). ``url`` is the final URL after redirects."""

    data: bytearray
    content_type: str | None
    url: str


@dataclass(frozen=True)
class FetchPolicy:
    """Limits and opt-ins for :func:`fetch_url`.

    ``allowed_hosts``: optional host allow-list (exact names or ``*.example.com``).
    ``allowed_networks``: addresses exempt from the SSRF address policy (tests, an
    internal image host); empty by default, i.e. only globally routable addresses.
    ``allowed_ports``: the ports a URL (or a redirect) may name; None for any.
    """

    max_bytes: int = 50 * 1024 * 1024
    connect_timeout_s: float = 5.0
    total_timeout_s: float = 20.0
    max_redirects: int = 5
    allowed_hosts: tuple[str, ...] | None = None
    allowed_networks: tuple[IPv4Network | IPv6Network, ...] = ()
    allowed_ports: frozenset[int] | None = DEFAULT_PORTS
    user_agent: str = "imgpipe/0.1"


class _ForbiddenAddress(Exception):
    """Raised by SafeResolver and the socket factory.

    Deliberately not an OSError, so aiohttp's connector does not turn it into a
    generic DNS/connection error and we can report ``url_forbidden``. ``message`` is the
    client's; ``address`` is for our log alone: what a name resolves to inside our network
    (a cluster's service, a host's own name) is not a client's to learn from a failed job.
    """

    def __init__(self, message: str, address: str) -> None:
        super().__init__(f"{message} ({address})")
        self.message = message
        self.address = address


#: Threads of the URL sources' own lookups (`LookupThreads`).
LOOKUP_THREADS = 4


class LookupThreads(aiohttp.ThreadedResolver):
    """aiohttp's default resolver (the system's `getaddrinfo`), on a few threads of its own.

    aiohttp's default runs it on the event loop's default executor, which the worker shares: with
    aiohttp's lookups of the S3 endpoint and boto3's calls among others. A lookup cannot be
    cancelled: a fetch that gives up at its timeout leaves its thread waiting for the name servers
    (tens of seconds for a domain whose servers do not answer, which anyone can set up), and a few
    such URL jobs in turn took every thread of that executor, so every job's S3 traffic waited
    behind them. Here the URL sources can only wait for each other.
    """

    def __init__(self, threads: int = LOOKUP_THREADS) -> None:
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="url-lookup")
        # What aiohttp's resolver asks of its loop (these two calls) is run on those threads.
        super().__init__(loop=_OnThreads(self._pool))  # type: ignore[arg-type]

    async def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class _OnThreads:
    """The loop's `getaddrinfo` and `getnameinfo`, on `pool` instead of its default executor."""

    def __init__(self, pool: ThreadPoolExecutor) -> None:
        self._pool = pool

    async def getaddrinfo(self, host: str, port: int, **kwargs: Any) -> list[Any]:
        lookup = partial(socket.getaddrinfo, host, port, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(self._pool, lookup)

    async def getnameinfo(self, sockaddr: tuple[Any, ...], flags: int = 0) -> tuple[str, str]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, socket.getnameinfo, sockaddr, flags)


class SafeResolver(AbstractResolver):
    """Resolver wrapper that refuses hosts resolving to any forbidden address.

    ``inner`` does the actual lookup (`LookupThreads` if None); inject a
    stub to test without DNS. If *any* returned address is forbidden the whole host is
    refused: a name that mixes public and private addresses is suspicious, and quietly
    dropping entries would still let an attacker probe which ones exist.
    """

    def __init__(
        self,
        allowed_networks: Sequence[IPv4Network | IPv6Network] = (),
        inner: AbstractResolver | None = None,
        allowed_hosts: Sequence[str] | None = None,
    ) -> None:
        self._allowed = tuple(allowed_networks)
        self._inner = inner if inner is not None else LookupThreads()
        self._hosts = tuple(allowed_hosts) if allowed_hosts is not None else None

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        # As an absolute name: a resolver completes a relative one from its search list first when
        # it has fewer dots than `ndots` (5 in Kubernetes), so `images.example` could be answered
        # as `images.example.<namespace>.svc.cluster.local`, a service of the cluster's own. A name
        # the operator's allow-list vouches for is looked up as written: an absolute name is not
        # looked for in /etc/hosts (a pod's `hostAliases`, compose's `extra_hosts`), nor completed
        # from the search list (`minio` in Kubernetes).
        listed = self._hosts is not None and host_matches(host.rstrip(".").lower(), self._hosts)
        name = host if listed or host.endswith(".") else f"{host}."
        results = await self._inner.resolve(name, port, family)
        if not results:
            raise OSError(f"no addresses for {host}")
        refused = f"{host} resolves to an address that is not public"
        for result in results:
            try:
                address = ip_address(result["host"])
            except ValueError:
                raise _ForbiddenAddress(refused, str(result["host"])) from None  # fail closed
            if is_forbidden_ip(address, self._allowed):
                raise _ForbiddenAddress(refused, str(address))
        return results

    async def close(self) -> None:
        await self._inner.close()


def _guarded_socket_factory(allowed: tuple[IPv4Network | IPv6Network, ...]) -> Callable[..., socket.socket]:
    def factory(addr_info: tuple[Any, ...]) -> socket.socket:
        family, type_, proto, _canonname, sockaddr = addr_info
        try:
            address = ip_address(sockaddr[0])
        except ValueError:
            raise _ForbiddenAddress("refusing to connect to a non-IP address", str(sockaddr[0])) from None
        if is_forbidden_ip(address, allowed):
            raise _ForbiddenAddress("refusing to connect to an address that is not public", str(address))
        return socket.socket(family=family, type=type_, proto=proto)

    return factory


# aiohttp >= 3.12 lets us create (and so vet) each socket; older versions rely on the
# resolver and check_url alone.
_HAS_SOCKET_FACTORY = "socket_factory" in inspect.signature(aiohttp.TCPConnector).parameters


# Sessions built by make_session; fetch_url refuses any other (it could have a plain
# resolver, proxies or a cookie jar, which would silently undo the protections).
_SAFE_SESSIONS: weakref.WeakSet[aiohttp.ClientSession] = weakref.WeakSet()
_SESSION_POLICY: weakref.WeakKeyDictionary[aiohttp.ClientSession, tuple[object, ...]] = (
    weakref.WeakKeyDictionary()
)


def make_session(policy: FetchPolicy, *, resolver: AbstractResolver | None = None) -> aiohttp.ClientSession:
    """Create the safe client session (reuse it: one per worker; close it on shutdown).

    ``resolver`` is the *underlying* resolver wrapped by :class:`SafeResolver`
    (default: `LookupThreads`); it exists so tests can inject DNS answers. Must be called
    with a running event loop.
    """
    extra: dict[str, Any] = {}
    if _HAS_SOCKET_FACTORY:
        extra["socket_factory"] = _guarded_socket_factory(policy.allowed_networks)
    connector = aiohttp.TCPConnector(
        **extra,
        resolver=SafeResolver(policy.allowed_networks, inner=resolver, allowed_hosts=policy.allowed_hosts),
        # Caching is safe: only checked answers are ever cached, and the connector
        # connects to cached answers rather than looking the name up again.
        use_dns_cache=True,
        ttl_dns_cache=30,
        # No pool limits: aiohttp counts the wait for a pooled connection in the connect timeout, so a
        # ninth fetch from one host under `limit_per_host=8` failed as `url_timeout` after 5 s, the
        # server blamed for the worker's queue. The fetches in flight are the worker's prefetch.
        limit=0,
        limit_per_host=0,
    )
    session = aiohttp.ClientSession(
        connector=connector,
        trust_env=False,  # never route through HTTP(S)_PROXY: the proxy would do the resolving
        cookie_jar=aiohttp.DummyCookieJar(),
        auto_decompress=False,  # no decompression bombs; compressed bodies are refused
        timeout=aiohttp.ClientTimeout(
            total=policy.total_timeout_s,
            connect=policy.connect_timeout_s,
            sock_connect=policy.connect_timeout_s,
        ),
        headers={
            "User-Agent": policy.user_agent,
            "Accept": "image/*, */*;q=0.5",
            "Accept-Encoding": "identity",
        },
    )
    _SAFE_SESSIONS.add(session)
    _SESSION_POLICY[session] = (policy.allowed_networks,)
    return session


def _check(url: str, policy: FetchPolicy) -> str:
    try:
        return check_url(
            url,
            allowed_hosts=policy.allowed_hosts,
            allowed_networks=policy.allowed_networks,
            allowed_ports=policy.allowed_ports,
        )
    except UrlRejected as exc:
        raise FetchError(exc.code, exc.message) from None


def _resolve_redirect(current: str, location: str, policy: FetchPolicy) -> str:
    """The checked absolute URL a redirect from ``current`` to ``location`` leads to."""
    location = location.strip()
    if not location:
        raise FetchError("url_http_error", "redirect without a Location")
    target = _check(urljoin(current, location), policy)
    if urlsplit(current).scheme == "https" and urlsplit(target).scheme != "https":
        raise FetchError("url_forbidden", "redirect from https to http refused")
    return target


def _to_yarl(url: str) -> yarl.URL:
    # check_url already produced a plain-ASCII, fully encoded URL; encoded=True makes
    # aiohttp send exactly it. The host comparison guards against any disagreement
    # between urllib's and yarl's parsing about where we are connecting to.
    parsed = yarl.URL(url, encoded=True)
    if (parsed.raw_host or "").lower() != (urlsplit(url).hostname or "").lower():
        raise FetchError("url_invalid", "ambiguous URL host")
    return parsed


def _status_error(status: int, reason: str | None) -> FetchError:
    # The reason phrase is the server's, up to 8 KiB of it: a short, printable part is enough.
    reason = "".join(c for c in (reason or "")[:_MAX_REASON] if c.isprintable())
    text = f"HTTP {status} {reason}".strip()
    if status in (404, 410):
        return FetchError("url_not_found", text)
    if status >= 500 or status in _TRANSIENT_4XX:
        return FetchError("url_http_error", text, transient=True)
    return FetchError("url_http_error", text)


async def _read_body(response: aiohttp.ClientResponse, policy: FetchPolicy, admit: Admit | None) -> bytearray:
    # Every Content-Encoding field: repeated, they are one list, and the last coding is the outermost.
    codings = ",".join(response.headers.getall("Content-Encoding", ())).lower()
    encoding = ", ".join(
        c for c in (part.strip() for part in codings.split(",")) if c not in ("", "identity")
    )
    if encoding:
        raise FetchError("url_http_error", f"compressed response (Content-Encoding: {encoding}) refused")
    length = response.content_length
    try:
        # A length over the cap is refused before reading; without one, reading stops as soon as it is
        # past the cap: never more than max_bytes + one chunk.
        return await read_body(response.content, length=length, max_bytes=policy.max_bytes, admit=admit)
    except BodyTooLarge:
        said = f"Content-Length {length}" if length is not None else "body"
        raise FetchError("url_too_large", f"{said} exceeds {policy.max_bytes} bytes") from None


async def _fetch(
    url: str, policy: FetchPolicy, session: aiohttp.ClientSession, admit: Admit | None
) -> Fetched:
    current = _check(url, policy)
    timeout = aiohttp.ClientTimeout(
        total=policy.total_timeout_s,
        connect=policy.connect_timeout_s,
        sock_connect=policy.connect_timeout_s,
    )
    for hop in range(policy.max_redirects + 1):
        async with session.get(
            _to_yarl(current), allow_redirects=False, timeout=timeout, proxy=None
        ) as response:
            try:
                if response.status in _REDIRECT_STATUSES:
                    if hop == policy.max_redirects:
                        raise FetchError(
                            "url_too_many_redirects", f"more than {policy.max_redirects} redirects"
                        )
                    current = _resolve_redirect(current, response.headers.get("Location", ""), policy)
                    continue
                if not 200 <= response.status < 300:
                    raise _status_error(response.status, response.reason)
                data = await _read_body(response, policy, admit)
                return Fetched(data=data, content_type=response.content_type or None, url=current)
            except (FetchError, BodyNotAdmitted):
                # Do not let the connection go back to the pool with an unread body.
                response.close()
                raise
            finally:
                if response.status in _REDIRECT_STATUSES:
                    response.close()
    raise AssertionError("unreachable")  # pragma: no cover - the loop always returns or raises


def _find_cause(exc: BaseException, kind: type[BaseException]) -> BaseException | None:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, kind):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def _translate(exc: Exception) -> FetchError:
    forbidden = _find_cause(exc, _ForbiddenAddress)
    if isinstance(forbidden, _ForbiddenAddress):
        log.warning("URL source refused: %s", forbidden.message, extra={"address": forbidden.address})
        return FetchError("url_forbidden", forbidden.message)
    if isinstance(exc, asyncio.TimeoutError):  # also aiohttp's Server/Connection/SocketTimeoutError
        return FetchError("url_timeout", "timed out", transient=True)
    if isinstance(exc, aiohttp.InvalidURL):
        return FetchError("url_invalid", f"invalid URL: {exc}")
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        errno = getattr(exc.os_error, "errno", None)
        if errno in _NO_SUCH_NAME:
            # NXDOMAIN: retrying a name that does not exist only delays the failure.
            return FetchError("url_unreachable", f"host does not exist: {exc.host}")
        return FetchError("url_unreachable", f"DNS lookup failed for {exc.host}", transient=True)
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return FetchError("url_unreachable", "TLS error: the server's certificate did not verify")
    if isinstance(exc, aiohttp.ClientSSLError):
        # aiohttp's text quotes OpenSSL's, with our address and source file: not the client's.
        return FetchError("url_unreachable", "TLS error: the handshake failed")
    if isinstance(exc, aiohttp.ClientResponseError):
        # Raised for responses aiohttp cannot parse: the server is broken, not busy.
        return FetchError("url_http_error", f"invalid HTTP response: {exc.message}")
    if isinstance(exc, aiohttp.ClientError | OSError):
        return FetchError("url_unreachable", f"connection failed: {type(exc).__name__}", transient=True)
    raise exc


async def fetch_url(
    url: str,
    policy: FetchPolicy,
    *,
    session: aiohttp.ClientSession | None = None,
    admit: Admit | None = None,
) -> Fetched:
    """Fetch ``url`` under ``policy`` and return the body; raise :class:`FetchError`, or
    ``BodyNotAdmitted`` when ``admit`` has no room for the body now (see ``imgpipe.bodies``).

    ``session`` must come from :func:`make_session` (built with the same
    ``allowed_networks``); without one, a temporary session is created and closed.
    ``policy.total_timeout_s`` bounds the whole fetch, redirects included.
    """
    if session is None:
        async with make_session(policy) as own:
            return await fetch_url(url, policy, session=own, admit=admit)
    if session not in _SAFE_SESSIONS:
        raise ValueError("fetch_url needs a session created by make_session()")
    if _SESSION_POLICY.get(session) != (policy.allowed_networks,):
        # The resolver's exemptions are fixed at session creation; a mismatch would
        # make the resolver/socket checks and the URL checks disagree.
        raise ValueError("session was made with different allowed_networks than this policy")
    try:
        async with asyncio.timeout(policy.total_timeout_s):
            return await _fetch(url, policy, session, admit)
    except (FetchError, BodyNotAdmitted):
        raise
    except Exception as exc:
        raise _translate(exc) from exc
