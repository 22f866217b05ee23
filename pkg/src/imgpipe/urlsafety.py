"""URL and address policy for fetching user-supplied image URLs (SSRF defence).

This module is pure (no DNS, no I/O) so it can run both in the api at submit time
(reject obviously bad URLs early, with a clear error) and in the worker's fetcher,
which additionally checks every address a host name resolves to.

The policy is deliberately strict and fails closed:

* only ``http`` and ``https``; a host is required; ``user:pass@`` is refused;
* only the ports allowed (80 and 443 unless configured): a public host's other ports are its
  mail, database and admin services, which the fetcher has no business knocking on;
* any host that a C resolver would read as an IPv4 address (``127.1``,
  ``2130706433``, ``0x7f000001``, ``0177.0.0.1``, ...; the ``inet_aton`` rules)
  is treated as that address, and a host whose last label is numeric but which
  is not a valid address is refused as invalid;
* an address is forbidden unless it is globally routable (see :func:`is_forbidden_ip`);
* names that always mean loopback or a cloud metadata service are forbidden even
  though checking them would otherwise need DNS.

Error codes: ``url_invalid`` (cannot be parsed / malformed / too long) and
``url_forbidden`` (well-formed but not allowed: scheme, userinfo, address, host).
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Collection, Sequence
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from urllib.parse import quote, urlsplit

import pydantic_core

__all__ = [
    "DEFAULT_PORTS",
    "MAX_URL_LENGTH",
    "UrlRejected",
    "check_url",
    "host_matches",
    "is_forbidden_ip",
    "parse_networks",
]

MAX_URL_LENGTH = 2048

IPAddress = IPv4Address | IPv6Address
IPNetwork = IPv4Network | IPv6Network

_ALLOWED_SCHEMES = {"http": 80, "https": 443}
#: The ports a URL may name (or imply) unless configured otherwise: the schemes' own.
DEFAULT_PORTS: frozenset[int] = frozenset(_ALLOWED_SCHEMES.values())


class UrlRejected(Exception):
    """A URL refused by policy.

    ``code`` is ``"url_invalid"`` (malformed) or ``"url_forbidden"`` (not allowed);
    ``message`` is a human-readable reason that is safe to return to the client.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def _invalid(message: str) -> UrlRejected:
    return UrlRejected("url_invalid", message)


def _forbidden(message: str) -> UrlRejected:
    return UrlRejected("url_forbidden", message)


# --------------------------------------------------------------------------- addresses

# Explicit lists on top of ``is_global``: the stdlib's notion of "global" has moved
# between Python patch releases (and, e.g., treats multicast as global), so the ranges
# we care about most are spelled out here and do not depend on that.
_FORBIDDEN_V4 = tuple(
    IPv4Network(n)
    for n in (
        "0.0.0.0/8",  # "this network"; 0.0.0.0 reaches the local host on Linux
        "10.0.0.0/8",
        "100.64.0.0/10",  # carrier-grade NAT
        "127.0.0.0/8",
        "169.254.0.0/16",  # link-local, incl. 169.254.169.254 cloud metadata
        "172.16.0.0/12",
        "192.0.0.0/24",  # IETF protocol assignments
        "192.0.2.0/24",  # TEST-NET-1
        "192.88.99.0/24",  # deprecated 6to4 relay anycast
        "192.168.0.0/16",
        "198.18.0.0/15",  # benchmarking
        "198.51.100.0/24",  # TEST-NET-2
        "203.0.113.0/24",  # TEST-NET-3
        "224.0.0.0/4",  # multicast
        "240.0.0.0/4",  # reserved, incl. 255.255.255.255 broadcast
    )
)

_FORBIDDEN_V6 = tuple(
    IPv6Network(n)
    for n in (
        "::/128",
        "::1/128",
        "::/96",  # IPv4-compatible (deprecated, never legitimate on the internet)
        "64:ff9b:1::/48",  # local-use NAT64 (RFC 8215)
        "100::/64",  # discard-only
        "2001::/32",  # Teredo: the real endpoint is hidden in the address
        "2001:db8::/32",  # documentation
        "3fff::/20",  # documentation (RFC 9637)
        "fc00::/7",  # unique local, incl. fd00:ec2::254 (AWS metadata)
        "fe80::/10",  # link-local
        "fec0::/10",  # deprecated site-local
        "ff00::/8",  # multicast
    )
)

#: Refused even inside the operator's allowed networks: the link-local ranges, where the cloud
#: metadata and credential services answer (169.254.169.254, ECS's 169.254.170.2, EKS Pod
#: Identity's 169.254.170.23), AWS's, Google Cloud's and Scaleway's IPv6 forms of them, Alibaba's,
#: Azure's and Oracle Cloud Classic's. What they hand out (the node's or the pod's credentials) is
#: never an image, and an allowed network as broad as `0.0.0.0/0` or `fc00::/7` must not open them.
_NEVER = (
    IPv4Network("169.254.0.0/16"),
    IPv4Network("100.100.100.200/32"),  # Alibaba Cloud metadata
    IPv4Network("168.63.129.16/32"),  # Azure wire server
    IPv4Network("192.0.0.192/32"),  # Oracle Cloud Classic metadata
    IPv6Network("fe80::/10"),
    IPv6Network("fd00:ec2::/32"),  # AWS: metadata fd00:ec2::254, Pod Identity fd00:ec2::23
    IPv6Network("fd20:ce::254/128"),  # Google Cloud metadata over IPv6
    IPv6Network("fd00:42::42/128"),  # Scaleway metadata over IPv6
)

_NAT64_WKP = IPv6Network("64:ff9b::/96")
_SIX_TO_FOUR = IPv6Network("2002::/16")


def _embedded_ipv4(ip: IPv6Address) -> IPv4Address | None:
    """The IPv4 address a packet to ``ip`` really ends up at, for the forms that embed one."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip in _NAT64_WKP:
        return IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip in _SIX_TO_FOUR:
        return ip.sixtofour
    return None


def _in_networks(ip: IPAddress, networks: Sequence[IPNetwork]) -> bool:
    # ``in`` across address families is simply False, so mixed lists are fine.
    return any(ip in net for net in networks)


def is_forbidden_ip(ip: IPAddress, allowed: Sequence[IPNetwork] = ()) -> bool:
    """Return True if connecting to ``ip`` must be refused.

    Anything that is not globally routable is forbidden: loopback, private, link-local
    (incl. cloud metadata), unspecified, CGNAT, multicast, reserved, broadcast,
    documentation/benchmark ranges, Teredo, and IPv4-compatible addresses. For the IPv6
    forms that carry an IPv4 address (IPv4-mapped, NAT64 ``64:ff9b::/96``, 6to4) the
    verdict is that of the embedded IPv4 address, since that is where traffic goes.

    ``allowed`` is an operator opt-in (tests, an internal image host): addresses in
    those networks are not forbidden, except link-local and cloud metadata addresses,
    which nothing allows. For embedded-IPv4 forms the embedded address is also matched
    against ``allowed``.
    """
    embedded = _embedded_ipv4(ip) if isinstance(ip, IPv6Address) else None
    if _in_networks(ip, _NEVER) or (embedded is not None and _in_networks(embedded, _NEVER)):
        return True
    if _in_networks(ip, allowed):
        return False
    if isinstance(ip, IPv6Address):
        if ip.scope_id:
            # A zone only makes sense for link-local/multicast targets on this host.
            return True
        if embedded is not None:
            return is_forbidden_ip(embedded, allowed)
        if _in_networks(ip, _FORBIDDEN_V6):
            return True
    elif _in_networks(ip, _FORBIDDEN_V4):
        return True
    return (
        not ip.is_global
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_unspecified
        or ip.is_private
    )


def parse_networks(spec: str) -> list[IPNetwork]:
    """Parse a comma/whitespace separated list of networks, e.g. ``"127.0.0.0/8, ::1/128"``.

    Meant for an environment variable. A bare address means a single host. Host bits
    set (``10.1.2.3/8``) are a configuration mistake and raise ``ValueError``.
    """
    networks: list[IPNetwork] = []
    for item in re.split(r"[\s,]+", spec.strip()):
        if not item:
            continue
        try:
            networks.append(ipaddress.ip_network(item, strict=True))
        except ValueError as exc:
            raise ValueError(f"invalid network {item!r}: {exc}") from exc
    return networks


# --------------------------------------------------------------------------- hosts

# Names that are never looked up in public DNS, or always mean this host / metadata.
_FORBIDDEN_NAMES = frozenset(
    {
        "localhost",
        "localhost.localdomain",
        "ip6-localhost",
        "ip6-loopback",
        "metadata",
        "metadata.google.internal",
        "metadata.goog",
        "instance-data",
        "instance-data.ec2.internal",
    }
)
_FORBIDDEN_SUFFIXES = (".localhost",)
# Names of a private network's hosts, never of a public one: a single label (`redis`, `minio`,
# which a resolver completes from its search list: in Kubernetes, the cluster's own services) and
# the special-use domains of local networks (RFC 6762's `.local`, RFC 8375's `.home.arpa`, ICANN's
# `.internal`), and the ones routers and offices use that ICANN will never delegate (`.lan`,
# `.corp`, `.home`). Whether such a name exists, or what it points at, is not a client's to learn
# from a failed job; refused unless the operator's `allowed_hosts` names them.
_PRIVATE_SUFFIXES = (".local", ".internal", ".home.arpa", ".localdomain", ".lan", ".corp", ".home")

_LABEL_RE = re.compile(r"^[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?$")
_NUMERIC_LABEL_RE = re.compile(r"^(?:[0-9]+|0[xX][0-9a-fA-F]*)$")


def _parse_inet_aton(host: str) -> IPv4Address | None:
    """Parse ``host`` the way C ``inet_aton`` does, or return None.

    1 to 4 parts, each decimal, octal (leading 0) or hex (0x); the last part fills all
    remaining bytes (so ``127.1`` is 127.0.0.1 and ``2130706433`` is 127.0.0.1).
    """
    parts = host.split(".")
    if not 1 <= len(parts) <= 4:
        return None
    values: list[int] = []
    for part in parts:
        if not _NUMERIC_LABEL_RE.fullmatch(part):
            return None  # int() is laxer than inet_aton: signs, underscores, unicode digits
        try:
            if part[:2] in ("0x", "0X"):
                if len(part) == 2:
                    return None
                value = int(part[2:], 16)
            elif len(part) > 1 and part[0] == "0":
                value = int(part[1:], 8)
            else:
                value = int(part, 10)
        except ValueError:
            return None
        values.append(value)
    *head, last = values
    if any(v > 0xFF for v in head) or last >= 1 << (8 * (4 - len(head))):
        return None
    number = last
    for index, value in enumerate(head):
        number |= value << (8 * (3 - index))
    return IPv4Address(number)


def _literal_ipv4(host: str) -> IPv4Address | None:
    address = _parse_inet_aton(host)
    if address is None:
        # Belt and braces: ask the platform's own inet_aton too (host has no whitespace
        # here, so its trailing-garbage quirk cannot apply).
        try:
            address = IPv4Address(socket.inet_aton(host))
        except (OSError, ValueError):
            return None
    return address


def _idna(name: str) -> str | None:
    """The non-ASCII host `name` in ASCII, as every URL source is written: by pydantic's URL parser
    (WHATWG URL, UTS 46 processing), so that a host is checked as the worker will fetch it. Not
    Python's `idna` codec: IDNA 2003 maps "ß" to "ss", where UTS 46 keeps it (`faß.de` is
    `xn--fa-hia.de`, another domain than `fass.de`). None when it is not a valid name."""
    if any(c in name for c in ":/?#@[]\\"):
        return None  # not a host alone: the parse below must not find one inside it
    try:
        return pydantic_core.Url(f"http://{name}/").host
    except ValueError:
        return None


def _normalise_pattern(pattern: str) -> str:
    pattern = pattern.strip().lower().rstrip(".")
    wildcard = pattern.startswith("*.")
    name = pattern[2:] if wildcard else pattern
    if not name.isascii():
        name = _idna(name) or name  # an unencodable pattern simply never matches
    return f"*.{name}" if wildcard else name


def host_matches(host: str, patterns: Sequence[str]) -> bool:
    """True if ``host`` (normalised, no trailing dot) matches an allow-list entry.

    Entries are exact names (``images.example.com``) or ``*.example.com``, which
    matches any subdomain at any depth but not ``example.com`` itself.
    """
    for raw in patterns:
        pattern = _normalise_pattern(raw)
        if pattern.startswith("*."):
            if host.endswith(pattern[1:]):
                return True
        elif host == pattern:
            return True
    return False


def _split_netloc(netloc: str) -> tuple[str, str | None, bool]:
    """Split an authority (no userinfo) into (host, port-or-None, bracketed)."""
    if netloc.startswith("["):
        end = netloc.find("]")
        if end == -1:
            raise _invalid("unterminated IPv6 literal")
        host, rest = netloc[1:end], netloc[end + 1 :]
        if rest and not rest.startswith(":"):
            raise _invalid("garbage after IPv6 literal")
        return host, (rest[1:] if rest else None), True
    host, sep, port = netloc.rpartition(":")
    if not sep:
        return netloc, None, False
    return host, port, False


def _check_host(
    raw_host: str, bracketed: bool, allowed_networks: Sequence[IPNetwork]
) -> tuple[str, IPAddress | None]:
    """Validate a host; return (normalised host for the URL, literal address or None)."""
    if bracketed:
        if "%" in raw_host:
            raise _forbidden("IPv6 zone identifiers are not allowed")
        try:
            ip6 = IPv6Address(raw_host)
        except ValueError:
            raise _invalid("invalid IPv6 literal") from None
        if is_forbidden_ip(ip6, allowed_networks):
            raise _forbidden(f"address {ip6} is not allowed")
        return f"[{ip6.compressed}]", ip6

    if not raw_host:
        raise _invalid("URL has no host")
    if "%" in raw_host:
        # Percent-decoding of hosts differs between parsers; never guess.
        raise _invalid("percent-encoded host")
    # IDNA first: the mapping turns e.g. fullwidth digits into ASCII ones, so an
    # innocent-looking unicode host can turn into an IP literal.
    encoded = raw_host if raw_host.isascii() else _idna(raw_host)
    if encoded is None:
        raise _invalid("host is not a valid internationalised domain name")
    host = encoded.lower()
    if host.endswith("."):
        host = host[:-1]  # a single trailing dot is a fully-qualified name
    if not host or len(host) > 253:
        raise _invalid("invalid host length")

    labels = host.split(".")
    if _NUMERIC_LABEL_RE.match(labels[-1]) or ":" in host:
        # Looks like an address: it must be one (WHATWG does the same), anything else
        # would be handed to a resolver that may interpret it in its own way.
        ip4 = _literal_ipv4(host)
        if ip4 is None:
            raise _invalid("malformed IP address in host")
        if is_forbidden_ip(ip4, allowed_networks):
            raise _forbidden(f"address {ip4} is not allowed")
        return str(ip4), ip4
    if not all(_LABEL_RE.match(label) for label in labels):
        raise _invalid("invalid host name")
    if host in _FORBIDDEN_NAMES or host.endswith(_FORBIDDEN_SUFFIXES):
        raise _forbidden(f"host {host} is not allowed")
    return host, None


def _quote_part(part: str) -> str:
    # Keep what is already percent-encoded and the RFC 3986 reserved characters;
    # encode everything else (non-ASCII, quotes, braces...) so the result is plain
    # ASCII and every HTTP client sends exactly this string.
    quoted = quote(part, safe="/%:@!$&'()*+,;=-._~?")
    return re.sub(r"%(?![0-9A-Fa-f]{2})", "%25", quoted)


def check_url(
    url: str,
    *,
    allowed_hosts: Sequence[str] | None = None,
    allowed_networks: Sequence[IPNetwork] = (),
    allowed_ports: Collection[int] | None = DEFAULT_PORTS,
) -> str:
    """Check a user-supplied URL against the fetch policy, without DNS.

    Returns the normalised URL: lower-case scheme and host, IDNA-encoded host,
    canonical IP literals (``http://127.1`` would become ``http://127.0.0.1``, were it
    allowed), default port and fragment dropped, path and query percent-encoded to
    ASCII. Fetch exactly the returned string.

    ``allowed_hosts``: when not None, only hosts matching one of these entries
    (``host_matches``) are permitted. ``allowed_networks``: addresses in these
    networks are exempt from the address policy. ``allowed_ports``: the ports the URL may name,
    or imply by its scheme (None: any).

    Raises :class:`UrlRejected` with code ``url_invalid`` or ``url_forbidden``.
    Host names still have to be resolved and every address checked before connecting;
    this function cannot do that part.
    """
    if not isinstance(url, str):
        raise _invalid("URL must be a string")
    url = url.strip(" \t\r\n")
    if not url:
        raise _invalid("empty URL")
    if len(url) > MAX_URL_LENGTH:
        raise _invalid(f"URL longer than {MAX_URL_LENGTH} characters")
    if any(ord(c) <= 0x20 or ord(c) == 0x7F for c in url):
        raise _invalid("URL contains whitespace or control characters")
    try:
        url.encode("utf-8")
    except UnicodeEncodeError:
        raise _invalid("URL is not valid Unicode (a lone surrogate)") from None
    if "\\" in url:
        # Browsers and some libraries treat "\" as "/", others do not: a classic
        # source of parser differentials around the authority.
        raise _invalid("URL contains a backslash")

    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise _invalid(f"unparseable URL: {exc}") from None
    scheme = parts.scheme.lower()
    if not scheme:
        raise _invalid("URL has no scheme")
    if scheme not in _ALLOWED_SCHEMES:
        raise _forbidden(f"scheme {scheme!r} is not allowed (only http and https)")
    if not url[len(parts.scheme) + 1 :].startswith("//") or not parts.netloc:
        raise _invalid("URL has no host")
    if "@" in parts.netloc:
        raise _forbidden("credentials (user:password@) in URLs are not allowed")

    raw_host, raw_port, bracketed = _split_netloc(parts.netloc)
    port: int | None = None
    if raw_port:  # "host:" (empty port) means the default port, per RFC 3986
        if not raw_port.isascii() or not raw_port.isdigit() or len(raw_port) > 5:
            raise _invalid("invalid port")
        port = int(raw_port)
        if not 0 < port <= 65535:
            raise _invalid("port out of range")
    host, literal = _check_host(raw_host, bracketed, allowed_networks)

    bare = host[1:-1] if host.startswith("[") else host
    listed = allowed_hosts is not None and host_matches(bare, allowed_hosts)
    if allowed_hosts is not None and not listed:
        raise _forbidden(f"host {bare} is not in the allow-list")
    if literal is None and not listed and ("." not in host or f".{host}".endswith(_PRIVATE_SUFFIXES)):
        raise _forbidden(f"host {host} is not a public name")
    default_port = _ALLOWED_SCHEMES[scheme]
    if allowed_ports is not None and (port or default_port) not in allowed_ports:
        raise _forbidden(f"port {port or default_port} is not allowed")

    netloc = host if port is None or port == default_port else f"{host}:{port}"
    path = _quote_part(parts.path) or "/"
    query = f"?{_quote_part(parts.query)}" if parts.query else ""
    normalised = f"{scheme}://{netloc}{path}{query}"
    if len(normalised) > MAX_URL_LENGTH:
        raise _invalid(f"URL longer than {MAX_URL_LENGTH} characters")
    return normalised
