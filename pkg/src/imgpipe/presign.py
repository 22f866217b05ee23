"""Presigned object URLs (AWS Signature Version 4, query form), made without botocore's request pipeline.

Every job costs three of them (the api's HEAD, the worker's GET and PUT), and botocore's
`generate_presigned_url` spends about 180 µs on each: it builds and serialises a whole request,
fires its event hooks and resolves the endpoint, for a result that is a few HMACs over strings.
`Presigner` does those HMACs only (about a tenth of the time) and gives the same URL, byte for byte
in what S3 checks: `tests/pkg/test_presign.py` holds it to botocore's own output.

What botocore still decides is everything that is not signing: the URL of the bucket (the endpoint,
path or virtual-host style, the region's host name) and the scope's region come from one URL it
presigns for a probe key, and the credentials are the client's own, so keys, IRSA and instance
roles, and their refresh, work as for every other call. (Neither of the small libraries that do
this, `libpresign` and `fast-s3-url`, signs extra headers or a session token.)

Browser-form uploads (`POST /uploads`) are signed here too (`Presigner.post`, a SigV4 POST policy):
botocore's `generate_presigned_post` cost about 300 µs, most of the api's signing work per upload.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import threading
import time
import weakref
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

from botocore.credentials import Credentials, ReadOnlyCredentials, RefreshableCredentials
from botocore.exceptions import NoCredentialsError

log = logging.getLogger("imgpipe.storage")

ALGORITHM = "AWS4-HMAC-SHA256"
_PROBE_KEY = "imgpipe-presign-probe"
_DEFAULT_PORTS = {"http": 80, "https": 443}
#: Seconds between two reads of credentials that refresh themselves (IRSA, an instance role), by a
#: thread of their own whether or not URLs are being made: botocore renews them 15 minutes before
#: they expire, so a copy this old is still good for long, even after an idle hour.
CREDENTIALS_RECHECK_S = 60.0
#: Seconds before trying again when there is no copy yet (STS failed at start-up).
CREDENTIALS_RETRY_S = 5.0


def _keep_fresh(presigner: weakref.ref[Presigner], closed: threading.Event, wait: float) -> None:
    """Renew a presigner's temporary credentials every `wait` seconds until it is closed (or gone)."""
    while not closed.wait(wait):
        current = presigner()
        if current is None:
            return
        current._refresh()
        wait = CREDENTIALS_RECHECK_S if current._frozen is not None else CREDENTIALS_RETRY_S
        del current  # not held while waiting, so that it can be collected


def _hmac(key: bytes, message: str) -> bytes:
    return hmac.new(key, message.encode(), hashlib.sha256).digest()


def _encode(value: str) -> str:
    """RFC 3986 encoding, as SigV4 wants for query names and values (only A-Z a-z 0-9 - _ . ~ kept)."""
    return quote(value, safe="-_.~")


class Presigner:
    """Presigns `GET`, `HEAD` and `PUT` of one bucket's objects (`url`), and browser-form uploads to
    it (`post`), for the credentials of `client`.

    `client` is a boto3 S3 client: it presigns once, for a probe key, to show where the bucket is
    and which region signs for it (on first use, or `locate`), and is let go of then: any client
    of the same endpoint and settings shows the same, whatever its credentials, and a client holds
    its service's model (about 10 MiB a process). `credentials` are the ones it signs with; they
    are read once here, and temporary ones again every `CREDENTIALS_RECHECK_S` by a thread until
    `close`: their refresh is a call to STS (or the instance's metadata service), which on the
    event loop would stall every request while it lasts (botocore's timeouts are 60 s).
    """

    def __init__(self, client: Any, credentials: Credentials | None, bucket: str) -> None:
        self._client: Any = client  # until `locate`
        self._credentials = credentials
        self._frozen: ReadOnlyCredentials | None = None
        # When the copy stops working (epoch s; None for keys that do not expire). Written after
        # `_frozen` and read before it, so that a signer never pairs an old copy with a new date.
        self._valid_until: float | None = None
        self._closed = threading.Event()
        if credentials is not None:
            # Blocking, but at start-up, where the session has just fetched them (or failed to) anyway.
            self._refresh()
        if isinstance(credentials, RefreshableCredentials):
            # It holds the presigner weakly: one nobody closed still lets its thread end.
            wait = CREDENTIALS_RECHECK_S if self._frozen is not None else CREDENTIALS_RETRY_S
            threading.Thread(
                target=_keep_fresh,
                args=(weakref.ref(self), self._closed, wait),
                name="imgpipe-credentials",
                daemon=True,
            ).start()
        self._bucket = bucket
        self._origin: str | None = None  # scheme://host[:port]
        self._prefix = ""  # the path before the quoted key: "/" or "/{bucket}/"
        self._host = ""
        self._region = ""
        self._post_url: str | None = None  # where a browser form posts: the bucket's URL
        self._signing_key: tuple[str, str, bytes] = ("", "", b"")  # secret, day, key

    def locate(self) -> None:
        """Learn where the bucket is (its objects' URLs, where a form posts, the signing region) from
        the client now, and let go of the client. Done on first use otherwise."""
        if self._client is None:
            return
        probe = self._client.generate_presigned_url(
            "get_object", Params={"Bucket": self._bucket, "Key": _PROBE_KEY}, ExpiresIn=60
        )
        url = urlsplit(probe)
        if not url.path.endswith("/" + _PROBE_KEY):
            raise RuntimeError(f"unexpected presigned URL layout: {url.scheme}://{url.netloc}{url.path}")
        scope = parse_qs(url.query)["X-Amz-Credential"][0].split("/")
        self._region = scope[2]
        # SigV4 signs the Host header a client sends: the name in lower case (urlsplit's `hostname`;
        # our URLs are written with it too, so that a client sending the name as written does not
        # send a header we did not sign), an IPv6 address in brackets, and no port where it is the
        # scheme's default.
        name = url.hostname or ""
        if ":" in name:
            name = f"[{name}]"
        self._host = name
        if url.port is not None and url.port != _DEFAULT_PORTS.get(url.scheme):
            self._host = f"{name}:{url.port}"
        self._prefix = url.path[: -len(_PROBE_KEY)]
        self._post_url = self._client.generate_presigned_post(self._bucket, _PROBE_KEY)["url"]
        self._origin = f"{url.scheme}://{name}" + (f":{url.port}" if url.port is not None else "")
        self._client = None

    def close(self) -> None:
        """Stop renewing the credentials."""
        self._closed.set()

    def _current_credentials(self) -> ReadOnlyCredentials:
        if self._frozen is None:  # none configured, or STS has not answered yet: a 503 for now
            raise NoCredentialsError()
        return self._frozen

    def _refresh(self) -> None:
        assert self._credentials is not None
        try:
            credentials = self._credentials
            frozen = credentials.get_frozen_credentials()  # renewed first when due, by botocore's rule
            expiry = getattr(credentials, "_expiry_time", None)  # temporary ones only
            if expiry is not None:
                # Another client of the same credentials (the reconciler's boto3 client) may have
                # renewed them since: the copy is taken again after the expiry. botocore publishes a
                # renewal's copy before its expiry, so this copy is never older than that expiry, and
                # a link never says it works longer than the copy it is signed with.
                frozen = getattr(credentials, "_frozen_credentials", None) or frozen
            self._frozen = frozen
            self._valid_until = expiry.timestamp() if expiry is not None else None
        except Exception as exc:
            # Keep the copy: it works until S3 refuses it (a 403, transient). Without one (STS down at
            # start-up, IRSA's first fetch), URLs wait for the thread's next try, rather than the
            # process dying and restarting in a loop.
            log.warning("could not refresh the S3 credentials: %s", type(exc).__name__)

    def lifetime(self, expires_s: int) -> int:
        """How long a URL or form signed now for `expires_s` seconds really works: no longer than
        the credentials it is signed with. S3 refuses a link once its session token has expired, and
        botocore renews temporary credentials (IRSA, an instance role) only 15 minutes before they
        expire: a 1-hour download link signed with a copy that has 20 minutes left works 20 minutes,
        and says so now (`X-Amz-Expires`, an upload's `expires_at`). At least 1 s."""
        valid_until = self._valid_until
        if valid_until is None:
            return expires_s
        return max(1, min(expires_s, int(valid_until - time.time())))

    def _key(self, secret: str, day: str) -> bytes:
        # One signing key per secret and UTC day: four HMACs, then reused until either changes.
        cached_secret, cached_day, key = self._signing_key
        if cached_secret != secret or cached_day != day:
            key = _hmac(("AWS4" + secret).encode(), day)
            for part in (self._region, "s3", "aws4_request"):
                key = _hmac(key, part)
            self._signing_key = (secret, day, key)
        return key

    def _start(self) -> tuple[ReadOnlyCredentials, float, str, str]:
        """What every signature starts from: the credentials, now (epoch s), its SigV4 stamp, the scope."""
        if self._origin is None:
            self.locate()
        credentials = self._current_credentials()
        now = time.time()
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
        return credentials, now, stamp, f"{stamp[:8]}/{self._region}/s3/aws4_request"

    def _sign(self, credentials: ReadOnlyCredentials, stamp: str, text: str) -> str:
        return hmac.new(
            self._key(credentials.secret_key, stamp[:8]), text.encode(), hashlib.sha256
        ).hexdigest()

    def url(
        self, method: str, key: str | None, *, expires_s: int, headers: Mapping[str, str] | None = None
    ) -> str:
        """A URL that lets its holder send `method` for `key` (`None`: the bucket itself, as for
        `HeadBucket`) for `expires_s` seconds.

        `headers` are signed too: the request must then carry exactly these values. The URL works
        no longer than the credentials it is signed with (`lifetime`).
        """
        expires_s = self.lifetime(expires_s)
        credentials, _, stamp, scope = self._start()
        signed = {"host": self._host}
        for name, value in (headers or {}).items():
            signed[name.lower()] = " ".join(value.split())
        names = sorted(signed)
        params = {
            "X-Amz-Algorithm": ALGORITHM,
            "X-Amz-Credential": f"{credentials.access_key}/{scope}",
            "X-Amz-Date": stamp,
            "X-Amz-Expires": str(expires_s),
            "X-Amz-SignedHeaders": ";".join(names),
        }
        if credentials.token:
            params["X-Amz-Security-Token"] = credentials.token
        query = "&".join(f"{_encode(k)}={_encode(v)}" for k, v in sorted(params.items()))
        if key is None:  # "/{bucket}" or, virtual-hosted, "/": as botocore writes it
            path = self._prefix.rstrip("/") or "/"
        else:
            path = self._prefix + quote(key, safe="/~")  # the key as botocore quotes it; signed as sent
        canonical = "\n".join(
            [
                method,
                path,
                query,
                "".join(f"{name}:{signed[name]}\n" for name in names),
                ";".join(names),
                "UNSIGNED-PAYLOAD",
            ]
        )
        to_sign = f"{ALGORITHM}\n{stamp}\n{scope}\n{hashlib.sha256(canonical.encode()).hexdigest()}"
        return f"{self._origin}{path}?{query}&X-Amz-Signature={self._sign(credentials, stamp, to_sign)}"

    def post(
        self,
        key: str,
        *,
        expires_s: int,
        fields: Mapping[str, str] | None = None,
        conditions: Sequence[Any] = (),
    ) -> tuple[str, dict[str, str]]:
        """A browser-form upload of exactly `key` for `expires_s` seconds: the form's URL and fields.

        `fields` go into the form as given, and `conditions` into its policy, which S3 checks the
        upload against (a content type, a `content-length-range`, ...). The policy then names the
        bucket and the key and carries the signature's own fields, in the order botocore writes them,
        so the form is the one `generate_presigned_post` would give. It works no longer than the
        credentials it is signed with (`lifetime`).
        """
        expires_s = self.lifetime(expires_s)
        credentials, now, stamp, scope = self._start()
        assert self._post_url is not None  # learnt by `_start`
        form = {**(fields or {}), "key": key}
        signed = {
            "x-amz-algorithm": ALGORITHM,
            "x-amz-credential": f"{credentials.access_key}/{scope}",
            "x-amz-date": stamp,
        }
        if credentials.token:
            signed["x-amz-security-token"] = credentials.token
        form.update(signed)
        policy = {
            "expiration": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now + expires_s)),
            "conditions": [
                *conditions,
                {"bucket": self._bucket},
                {"key": key},
                *({name: value} for name, value in signed.items()),
            ],
        }
        form["policy"] = base64.b64encode(json.dumps(policy).encode()).decode()
        form["x-amz-signature"] = self._sign(credentials, stamp, form["policy"])
        return self._post_url, form
