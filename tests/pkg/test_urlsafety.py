"""URL/address policy: every SSRF spelling is refused without DNS, public URLs pass."""

from __future__ import annotations

from ipaddress import IPv4Network, IPv6Network, ip_address

import pytest
from imgpipe.models import UrlSource
from imgpipe.urlsafety import MAX_URL_LENGTH, UrlRejected, check_url, is_forbidden_ip, parse_networks

FORBIDDEN_URLS = [
    # loopback, every spelling a C resolver accepts
    "http://127.0.0.1/",
    "http://127.1/",
    "http://127.0.1/",
    "http://2130706433/",
    "http://0x7f000001/",
    "http://0X7F.0.0.1/",
    "http://0x7f.1/",
    "http://0177.0.0.1/",
    "http://017700000001/",
    "http://127.0.0.1./",
    "http://127.0.0.1:8080/x",
    "http://127.255.255.254/",
    "http://\uff11\uff12\uff17.\uff10.\uff10.\uff11/",  # fullwidth digits, IDNA-mapped to 127.0.0.1
    "http://[::1]/",
    "http://[0:0:0:0:0:0:0:1]:80/",
    "http://[::ffff:127.0.0.1]/",
    "http://[::ffff:7f00:1]/",
    "http://[::FFFF:7F00:0001]/",
    "http://[::127.0.0.1]/",  # IPv4-compatible
    "http://[64:ff9b::127.0.0.1]/",  # NAT64
    "http://[64:ff9b::a9fe:a9fe]/",  # NAT64 of 169.254.169.254
    "http://[2002:7f00:1::]/",  # 6to4 of 127.0.0.1
    "http://[2001:0:4136:e378:8000:63bf:3fff:fdd2]/",  # Teredo
    "http://localhost/",
    "http://LOCALHOST./",
    "http://localhost:8000/",
    "http://foo.localhost/",
    "http://a.b.localhost/",
    "http://ip6-localhost/",
    # unspecified / this network
    "http://0.0.0.0/",
    "http://0/",
    "http://0.0.0.7/",
    "http://[::]/",
    "http://[::ffff:0.0.0.0]/",
    # private
    "http://10.0.0.1/",
    "http://10.255.255.255/",
    "http://012.1/",  # octal 10.0.0.1
    "http://167772161/",  # decimal 10.0.0.1
    "http://172.16.0.1/",
    "http://172.31.255.254/",
    "http://192.168.0.1/",
    "http://192.168.1.1:443/",
    "http://[::ffff:192.168.0.1]/",
    "http://[::ffff:10.0.0.1]/",
    "http://[fc00::1]/",
    "http://[fd00::1]/",
    "http://[fd00:ec2::254]/",  # AWS IPv6 metadata
    # CGNAT
    "http://100.64.0.1/",
    "http://100.127.255.254/",
    # link-local and cloud metadata
    "http://169.254.169.254/latest/meta-data/",
    "http://169.254.0.1/",
    "http://2852039166/",  # decimal 169.254.169.254
    "http://0xa9fea9fe/",
    "http://0251.0376.0251.0376/",
    "http://[::ffff:169.254.169.254]/",
    "http://[::ffff:a9fe:a9fe]/",
    "http://metadata.google.internal/computeMetadata/v1/",
    "http://metadata/",
    "http://[fe80::1]/",
    "http://[fe80::1%25eth0]/",
    "http://[fe80::]/",
    # multicast, reserved, broadcast, documentation, benchmark
    "http://224.0.0.1/",
    "http://239.255.255.250/",
    "http://240.0.0.1/",
    "http://255.255.255.255/",
    "http://4294967295/",
    "http://192.0.2.1/",
    "http://198.51.100.7/",
    "http://203.0.113.9/",
    "http://198.18.0.1/",
    "http://192.0.0.8/",
    "http://[ff02::1]/",
    "http://[2001:db8::1]/",
    "http://[100::1]/",
    "http://[fec0::1]/",
    # schemes
    "file:///etc/passwd",
    "file://localhost/etc/passwd",
    "ftp://example.com/a.jpg",
    "gopher://example.com:70/_GET",
    "data:image/png;base64,iVBORw0KGgo=",
    "javascript:alert(1)",
    "dict://example.com:11211/stat",
    "ws://example.com/",
    # userinfo (and the classic confusions around it)
    "http://user:pass@example.com/",
    "http://user@example.com/",
    "http://example.com@127.0.0.1/",
    "http://@example.com/",
    # names of a private network: resolved from a search list, or special-use domains
    "http://redis/",
    "http://minio./",
    "http://printer.local/",
    "http://db.corp.internal/",
    "http://router.home.arpa/",
    "http://box.localdomain/",
    "http://home.arpa/",
    "http://nas.lan/",
    "http://intranet.corp/",
]

INVALID_URLS = [
    "",
    "   ",
    "example.com/a.jpg",
    "//example.com/a.jpg",
    "http://",
    "http:///a.jpg",
    "http:example.com",
    "http:/example.com",
    "https://example.com/" + "a" * MAX_URL_LENGTH,
    "http://exa mple.com/",
    "http://example.com/a\nb",
    "http://example.com\\@127.0.0.1/",
    "http://127.0.0.1\\.example.com/",
    "http://exa%6dple.com/",
    "http://1.2.3.4.5/",
    "http://256.0.0.1/",
    "http://1.2.3.256/",
    "http://08.0.0.1/",
    "http://0x/",
    "http://4294967296/",
    "http://example.123/",
    "http://[::1/",
    "http://[::1]x/",
    "http://[zz::1]/",
    "http://example.com:0/",
    "http://example.com:65536/",
    "http://example.com:8o/",
    "http://-bad-.example.com/",
    "http://a..b.example.com/",
    # A sign on a numeric part: int() takes it, inet_aton does not (a negative address crashed).
    "http://-1.8/",
    "http://+1.8/",
    "http://1.-8/",
    # A lone surrogate (JSON can carry one): not text any HTTP client can send.
    "http://example.com/\ud800",
    "http://example.com/?q=\udcff",
]

PUBLIC_URLS = [
    ("https://example.com/a.jpg", "https://example.com/a.jpg"),
    ("https://93.184.216.34/x", "https://93.184.216.34/x"),
    ("http://example.com", "http://example.com/"),
    ("HTTPS://Example.COM:443/A.JPG#frag", "https://example.com/A.JPG"),
    ("http://example.com:8080/p?q=1&r=2", "http://example.com:8080/p?q=1&r=2"),
    ("http://example.com:/x", "http://example.com/x"),
    ("http://images.example.com./x", "http://images.example.com/x"),
    ("  https://example.com/a.jpg\n", "https://example.com/a.jpg"),
    ("https://ex\u00e4mple.com/\u00e4.jpg?x=\u00fc", "https://xn--exmple-cua.com/%C3%A4.jpg?x=%C3%BC"),
    ("https://example.com/a%20b%zz", "https://example.com/a%20b%25zz"),
    ("http://1.1.1.1/", "http://1.1.1.1/"),
    ("http://16843009/", "http://1.1.1.1/"),  # decimal spelling normalised
    ("http://[2606:4700:4700::1111]/x", "http://[2606:4700:4700::1111]/x"),
    ("http://[::ffff:93.184.216.34]/", "http://[::ffff:5db8:d822]/"),  # mapped public v4
    ("http://100.63.255.255/", "http://100.63.255.255/"),  # just below CGNAT
    ("http://172.32.0.1/", "http://172.32.0.1/"),  # just above 172.16/12
    ("http://localhost.example.com/", "http://localhost.example.com/"),
    ("http://my_host.example.com/", "http://my_host.example.com/"),
]


@pytest.mark.parametrize("url", FORBIDDEN_URLS)
def test_ssrf_urls_are_forbidden(url: str) -> None:
    with pytest.raises(UrlRejected) as info:
        check_url(url)
    assert info.value.code == "url_forbidden", info.value.message


@pytest.mark.parametrize("url", INVALID_URLS)
def test_malformed_urls_are_invalid(url: str) -> None:
    with pytest.raises(UrlRejected) as info:
        check_url(url)
    assert info.value.code == "url_invalid", info.value.message


@pytest.mark.parametrize(("url", "normalised"), PUBLIC_URLS)
def test_public_urls_are_accepted_and_normalised(url: str, normalised: str) -> None:
    assert check_url(url, allowed_ports=None) == normalised
    # Normalisation is idempotent: the fetcher re-checks what it is given.
    assert check_url(normalised, allowed_ports=None) == normalised


@pytest.mark.parametrize(
    "url",
    [
        "http://example.com:22/a.jpg",
        "http://example.com:25/",
        "https://example.com:6379/",
        "http://example.com:8080/a.jpg",
        "https://example.com:8443/a.jpg",
    ],
)
def test_ports_other_than_80_and_443_are_forbidden_by_default(url: str) -> None:
    """A public host's other ports are its mail, database and admin services: any client could have
    the fetcher knock on them (and read from the error which are open)."""
    with pytest.raises(UrlRejected) as info:
        check_url(url)
    assert info.value.code == "url_forbidden"
    assert info.value.message == f"port {url.split(':')[2].split('/')[0]} is not allowed"


def test_allowed_ports_are_the_ones_configured() -> None:
    for url, normalised in (
        ("http://example.com/a.jpg", "http://example.com/a.jpg"),  # 80 implied
        ("https://example.com:443/a.jpg", "https://example.com/a.jpg"),
        ("http://example.com:443/a.jpg", "http://example.com:443/a.jpg"),  # a port, not a scheme
    ):
        assert check_url(url) == normalised
    assert check_url("http://example.com:8080/", allowed_ports={8080, 443}) == "http://example.com:8080/"
    with pytest.raises(UrlRejected, match="port 80 is not allowed"):
        check_url("http://example.com/", allowed_ports={8080, 443})
    # An address refused as such says so, whatever its port.
    with pytest.raises(UrlRejected, match=r"address 10\.0\.0\.1 is not allowed"):
        check_url("http://10.0.0.1:8080/")


def test_allowed_networks_exempt_literal_addresses() -> None:
    allowed = parse_networks("127.0.0.0/8, ::1/128")
    assert check_url("http://127.0.0.1:8080/a", allowed_networks=allowed, allowed_ports=None) == (
        "http://127.0.0.1:8080/a"
    )
    assert check_url("http://127.1/", allowed_networks=allowed) == "http://127.0.0.1/"
    assert check_url("http://[::1]/", allowed_networks=allowed) == "http://[::1]/"
    # Only the listed networks: the rest of the policy still applies.
    for url in ("http://10.0.0.1/", "http://169.254.169.254/", "http://localhost/"):
        with pytest.raises(UrlRejected):
            check_url(url, allowed_networks=allowed)


def test_allowed_hosts() -> None:
    hosts = ["images.example.com", "*.cdn.example.net"]
    assert check_url("https://images.example.com/a", allowed_hosts=hosts)
    assert check_url("https://IMAGES.example.com./a", allowed_hosts=hosts)
    assert check_url("https://a.cdn.example.net/a", allowed_hosts=hosts)
    assert check_url("https://x.y.cdn.example.net/a", allowed_hosts=hosts)
    for url in (
        "https://example.com/a",
        "https://cdn.example.net/a",  # the wildcard does not cover the apex
        "https://evilcdn.example.net/a",
        "https://images.example.com.evil.org/a",
        "https://93.184.216.34/a",
    ):
        with pytest.raises(UrlRejected) as info:
            check_url(url, allowed_hosts=hosts)
        assert info.value.code == "url_forbidden"
    with pytest.raises(UrlRejected):
        check_url("https://example.com/a", allowed_hosts=())  # empty list allows nothing


def test_private_names_are_refused_unless_the_operator_lists_them() -> None:
    # Whether `redis` (completed from a resolver's search list: in Kubernetes, the cluster's own
    # services) or `x.internal` exists is not a client's to learn; an allowed network does not
    # change that, a listed host does.
    everything = parse_networks("0.0.0.0/0, ::/0")
    for url in ("http://minio/a", "http://images.corp.internal/a"):
        with pytest.raises(UrlRejected) as info:
            check_url(url, allowed_networks=everything)
        assert (info.value.code, info.value.message.endswith("is not a public name")) == (
            "url_forbidden",
            True,
        )
    hosts = ["minio", "*.corp.internal"]
    assert check_url("http://minio/a", allowed_hosts=hosts) == "http://minio/a"
    assert check_url("http://images.corp.internal/a", allowed_hosts=hosts) == "http://images.corp.internal/a"
    with pytest.raises(UrlRejected):
        check_url("http://metadata.google.internal/", allowed_hosts=["*.google.internal"])  # never


def test_international_names_are_checked_as_the_job_carries_them() -> None:
    """A URL source reaches the worker as pydantic's URL parser writes it (UTS 46), and hosts and
    allow-list entries were encoded with Python's IDNA 2003 codec, which maps "ß" to "ss":
    `faß.de` was checked as `fass.de` (another domain), and an entry `faß.de` never matched the job
    the api had accepted. Both are encoded as the job carries the URL now."""
    carried = str(UrlSource(url="https://faß.de/a.jpg").url)
    assert carried == "https://xn--fa-hia.de/a.jpg"
    assert check_url("https://faß.de/a.jpg") == check_url(carried) == carried
    for entry in ("faß.de", "*.faß.de", "xn--fa-hia.de"):
        host = "img.xn--fa-hia.de" if entry.startswith("*") else "xn--fa-hia.de"
        assert check_url(f"https://{host}/a", allowed_hosts=[entry]), entry
    with pytest.raises(UrlRejected) as info:
        check_url(carried, allowed_hosts=["fass.de"])
    assert info.value.code == "url_forbidden"
    # A name UTS 46 refuses (a label that starts with a combining mark), which IDNA 2003 took.
    with pytest.raises(UrlRejected) as info:
        check_url("https://\u0301a.com/a")
    assert info.value.code == "url_invalid"


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "0.0.0.0",
        "0.1.2.3",
        "10.1.2.3",
        "100.64.0.1",
        "169.254.169.254",
        "172.16.5.5",
        "192.168.1.1",
        "224.0.0.251",
        "255.255.255.255",
        "::",
        "::1",
        "::ffff:127.0.0.1",
        "::ffff:10.0.0.1",
        "::10.0.0.1",
        "::8.8.8.8",  # IPv4-compatible is deprecated: refused whatever it embeds
        "64:ff9b::10.0.0.1",
        "64:ff9b:1::1",
        "2002:c0a8:0101::1",  # 6to4 of 192.168.1.1
        "2001::1",  # Teredo
        "fc00::1",
        "fd00:ec2::254",
        "fe80::1",
        "fe80::1%eth0",
        "ff02::1",
        "2001:db8::1",
    ],
)
def test_forbidden_ips(address: str) -> None:
    assert is_forbidden_ip(ip_address(address))


@pytest.mark.parametrize(
    "address",
    ["93.184.216.34", "8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "::ffff:8.8.8.8", "64:ff9b::8.8.8.8"],
)
def test_public_ips(address: str) -> None:
    assert not is_forbidden_ip(ip_address(address))


def test_allowed_networks_for_ips() -> None:
    allowed = [IPv4Network("127.0.0.0/8"), IPv6Network("fd00::/8")]
    assert not is_forbidden_ip(ip_address("127.0.0.1"), allowed)
    assert not is_forbidden_ip(ip_address("::ffff:127.0.0.1"), allowed)
    assert not is_forbidden_ip(ip_address("fd00::5"), allowed)
    assert is_forbidden_ip(ip_address("10.0.0.1"), allowed)
    assert is_forbidden_ip(ip_address("::1"), allowed)


@pytest.mark.parametrize(
    "address",
    [
        "169.254.169.254",  # AWS, GCP, Azure, OpenStack metadata
        "169.254.170.2",  # ECS task credentials
        "169.254.170.23",  # EKS Pod Identity agent
        "::ffff:169.254.169.254",
        "64:ff9b::169.254.169.254",
        "fd00:ec2::254",
        "fd00:ec2::23",
        "fd20:ce::254",  # Google Cloud over IPv6
        "fd00:42::42",  # Scaleway over IPv6
        "192.0.0.192",  # Oracle Cloud Classic
        "100.100.100.200",  # Alibaba Cloud
        "168.63.129.16",  # Azure wire server
        "fe80::1",
    ],
)
def test_no_allowed_network_opens_metadata_addresses(address: str) -> None:
    """An operator's allow-list opens private networks, but never the credential services."""
    everything = parse_networks("0.0.0.0/0, ::/0")
    assert is_forbidden_ip(ip_address(address), everything)
    assert is_forbidden_ip(ip_address(address), parse_networks("169.254.0.0/16, fc00::/7, fe80::/10"))
    # The same allow-list does open the rest of what it covers.
    assert not is_forbidden_ip(ip_address("10.0.0.1"), everything)
    assert not is_forbidden_ip(ip_address("fd00::5"), everything)
    host = f"[{address}]" if ":" in address else address
    with pytest.raises(UrlRejected) as refused:
        check_url(f"http://{host}/latest/meta-data/", allowed_networks=everything)
    assert refused.value.code == "url_forbidden"


def test_parse_networks() -> None:
    assert parse_networks("127.0.0.0/8, ::1/128") == [IPv4Network("127.0.0.0/8"), IPv6Network("::1/128")]
    assert parse_networks(" 10.0.0.0/8 192.168.0.0/16,,") == [
        IPv4Network("10.0.0.0/8"),
        IPv4Network("192.168.0.0/16"),
    ]
    assert parse_networks("10.1.2.3") == [IPv4Network("10.1.2.3/32")]
    assert parse_networks("") == []
    with pytest.raises(ValueError):
        parse_networks("10.1.2.3/8")
    with pytest.raises(ValueError):
        parse_networks("not-a-network")


def test_rejection_carries_code_and_message() -> None:
    with pytest.raises(UrlRejected) as info:
        check_url("http://169.254.169.254/")
    assert info.value.code == "url_forbidden"
    assert "169.254.169.254" in info.value.message
