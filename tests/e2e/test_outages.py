"""RabbitMQ and Redis go down and come back while jobs flow; services also start before the broker.

The outages run against a PRIVATE RabbitMQ node and a PRIVATE Redis that this module starts on free
ports (the shared broker and Redis other test runs use are never touched): a second node of the
installed RabbitMQ, stopped and started with `rabbitmqctl stop_app` / `start_app`, and a
`redis-server` with AOF persistence (`appendfsync always`, as production must run it), killed with
SIGKILL and started again on the same port and directory.

What is proved, with an api + status + worker started against them and a steady flow of
`POST /jobs` from a background task:
- while a dependency is down, `POST /jobs` answers 503 (`broker_unavailable` / `store_unavailable`)
  within a few seconds, never 202, and `/readyz` of api and worker names the failing check: 503 on
  the worker, 200 on the api, which has been ready before and answers those quick JSON 503s itself
  (every replica shares the dependency: the load balancer must not take them all out at once);
- once it is back, every check passes again and new jobs are accepted, by the same processes;
- every job that was ever answered 202 (before, during or after) ends `succeeded`, with exactly
  one set of variants;
- api, worker and reconciler started while RabbitMQ is not there yet serve `/healthz`, say 503 on
  `/readyz`, and become ready (and consume) once the broker appears, without a restart.

S3 goes away too, on a private moto server: `POST /jobs` answers 503 `storage_unavailable` at once,
and a job accepted before is retried with back-off by the worker until S3 is back, then succeeds.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis
import redis.asyncio as aioredis
from imgpipe.models import JobStatus
from imgpipe.store import JobStore

from tests.isolated import BrokerProxy, fresh_namespace, start_unready
from tests.stack import (
    BUCKET,
    Client,
    Service,
    Stack,
    drop_namespace,
    free_port,
    s3_client,
    start_moto,
    token,
)
from tests.worker.test_consumer import eventually, job_prefix, jpeg, log_records, s3_objects

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(420)]

#: "Never hangs": a request made while a dependency is down is answered within this long.
QUICK_S = 3.0
#: How long each outage lasts once it has been seen (the flow keeps posting through it).
OUTAGE_S = 4.0


def _rabbit_bin(name: str) -> str | None:
    """A RabbitMQ script that runs as the current user (Debian's /usr/sbin ones `su` to rabbitmq)."""
    for directory in (os.environ.get("IMGPIPE_TEST_RABBITMQ_SBIN"), "/usr/lib/rabbitmq/bin"):
        if directory and os.access(Path(directory) / name, os.X_OK):
            return str(Path(directory) / name)
    found = shutil.which(name)
    return os.path.realpath(found) if found else None


# --------------------------------------------------------------------------------------------------------
# Private dependencies.


@dataclass
class PrivateRabbit:
    """A RabbitMQ node of our own: its name, ports, data, logs, config and cookie in `base`."""

    base: Path
    port: int = field(default_factory=free_port)
    dist_port: int = field(default_factory=free_port)
    node: str = field(default_factory=lambda: f"imgpipe-{uuid.uuid4().hex[:8]}@localhost")

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    def _env(self) -> dict[str, str]:
        self.base.mkdir(parents=True, exist_ok=True)
        (self.base / "rabbitmq-env.conf").write_text("")  # not /etc/rabbitmq's (its node name, port)
        (self.base / "rabbitmq.conf").write_text(f"listeners.tcp.local = 127.0.0.1:{self.port}\n")
        (self.base / "enabled_plugins").write_text("[].\n")  # no management plugin: no clash on 15672
        return {
            **os.environ,
            "HOME": str(self.base),  # the Erlang cookie the node and rabbitmqctl share
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "RABBITMQ_CONF_ENV_FILE": str(self.base / "rabbitmq-env.conf"),
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_CONFIG_FILE": str(self.base / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.base / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.base / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(self.base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.base / "log"),
            "RABBITMQ_PID_FILE": str(self.base / "node.pid"),
        }

    def ctl(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [_rabbit_bin("rabbitmqctl") or "rabbitmqctl", "-n", self.node, *args],
            env=self._env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def start(self, within: float = 120) -> None:
        server = _rabbit_bin("rabbitmq-server")
        assert server, "rabbitmq-server not found"
        subprocess.run([server, "-detached"], env=self._env(), check=True, timeout=30)
        # await_startup fails at once while the node is not registered with epmd yet: poll it.
        deadline = time.monotonic() + within
        while True:
            done = self.ctl("await_startup", "--timeout", "20", timeout=40)
            if done.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{self.node} did not start: {done.stdout}{done.stderr}\n{self.log_tail()}"
                )
            time.sleep(0.5)

    def stop_app(self) -> None:
        done = self.ctl("stop_app")
        assert done.returncode == 0, done.stderr

    def start_app(self) -> None:
        done = self.ctl("start_app")
        assert done.returncode == 0, done.stderr

    def stop(self) -> None:
        """Halt the node (always called, from a `finally`); kill it if it does not halt."""
        try:
            self.ctl("stop", timeout=60)
        except subprocess.TimeoutExpired:
            pass
        pidfile = self.base / "node.pid"
        if pidfile.exists():
            try:
                pid = int(pidfile.read_text().strip())
                os.kill(pid, 0)
            except (ValueError, ProcessLookupError):
                return
            os.kill(pid, signal.SIGKILL)

    def log_tail(self, lines: int = 30) -> str:
        logs = sorted((self.base / "log").glob("*.log"))
        return "\n".join(
            "\n".join(p.read_text(errors="replace").splitlines()[-lines:]) for p in logs if p.is_file()
        )


@dataclass
class PrivateRedis:
    """A redis-server of our own with AOF persistence, fsynced on every write."""

    base: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        log = (self.base / "redis.log").open("ab")
        with log:
            self.proc = subprocess.Popen(
                [
                    "redis-server",
                    *("--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.base)),
                    *("--appendonly", "yes", "--appendfsync", "always", "--save", ""),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        client = redis.Redis.from_url(self.url, socket_connect_timeout=1)
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    if client.ping():
                        return
                except redis.exceptions.RedisError:
                    if self.proc.poll() is not None or time.monotonic() > deadline:
                        raise
                time.sleep(0.05)
        finally:
            client.close()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture(scope="module")
def rabbit_available() -> None:
    if not (_rabbit_bin("rabbitmq-server") and _rabbit_bin("rabbitmqctl")):
        pytest.skip("RabbitMQ is not installed here: no private node can be started")
    if not shutil.which("redis-server"):
        pytest.skip("redis-server is not installed here")


@pytest.fixture(scope="module")
def private_rabbit(
    rabbit_available: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PrivateRabbit]:
    node = PrivateRabbit(tmp_path_factory.mktemp("rabbit"))
    try:
        node.start()
        yield node
    finally:
        node.stop()


@pytest.fixture(scope="module")
def private_redis(rabbit_available: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path_factory.mktemp("redis"))
    try:
        server.start()
        yield server
    finally:
        server.kill()


def _start_all(stack: Stack, logdir: Path, names: tuple[str, ...]) -> None:
    with ThreadPoolExecutor(len(names)) as pool:
        started = {name: pool.submit(stack.start, name, logdir) for name in names}
        for name, future in started.items():
            stack.services[name] = future.result()


@pytest.fixture(scope="module")
def outage_stack(
    base_env: dict[str, str],
    private_rabbit: PrivateRabbit,
    private_redis: PrivateRedis,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    """api + status + worker on the private RabbitMQ and Redis (and the session's moto S3)."""
    stack = Stack(
        {
            **base_env,
            "IMGPIPE_NAMESPACE": fresh_namespace(),
            "IMGPIPE_AMQP_URL": private_rabbit.url,
            "IMGPIPE_REDIS_URL": private_redis.url,
            "IMGPIPE_WORKER_CONCURRENCY": "2",
        }
    )
    try:
        _start_all(stack, tmp_path_factory.mktemp("outage-logs"), ("api", "status", "worker"))
        yield stack
    finally:
        for service in stack.services.values():
            stack.stop(service)


@pytest.fixture
async def private_store(outage_stack: Stack, private_redis: PrivateRedis) -> AsyncIterator[JobStore]:
    client = aioredis.Redis.from_url(private_redis.url, socket_connect_timeout=1)
    try:
        yield JobStore(client, outage_stack.env["IMGPIPE_NAMESPACE"], retention=timedelta(days=1))
    finally:
        await client.aclose()


# --------------------------------------------------------------------------------------------------------
# The flow of jobs and the checks on it.


@dataclass
class Attempt:
    """One `POST /jobs`: when it started and how long it took, and what came back."""

    started: float
    elapsed: float
    status: int | None  # None: no answer within the client's own limit (a hang)
    code: str | None = None
    job_id: str | None = None


class Flow:
    """Posts jobs one after another from a background task, recording every answer."""

    def __init__(self, client: Client, key: str, variants: list[str]) -> None:
        self.client = client
        self.key = key
        self.variants = variants
        self.attempts: list[Attempt] = []
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Flow:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task

    async def _run(self) -> None:
        while not self._stop.is_set():
            await self.post()
            await asyncio.sleep(0.1)

    async def post(self) -> Attempt:
        started = time.monotonic()
        attempt = Attempt(started, 0.0, None)
        try:
            async with (
                asyncio.timeout(30),
                self.client.http.post(
                    f"{self.client.stack.api}/jobs",
                    json={"source": {"key": self.key}, "variants": self.variants},
                    headers=self.client.headers,
                ) as response,
            ):
                body = await response.json(content_type=None)
                attempt.status = response.status
                if response.status == 202:
                    attempt.job_id = body["id"]
                else:
                    attempt.code = body.get("error", {}).get("code")
        except TimeoutError:
            pass
        attempt.elapsed = time.monotonic() - started
        self.attempts.append(attempt)
        return attempt

    def accepted(self, after: float = 0.0) -> list[str]:
        return [a.job_id for a in self.attempts if a.job_id is not None and a.started >= after]

    def within(self, start: float, end: float) -> list[Attempt]:
        """The attempts made entirely inside [start, end]."""
        return [a for a in self.attempts if a.started >= start and a.started + a.elapsed <= end]

    async def wait_accepted(self, count: int, *, after: float = 0.0, within: float = 60) -> None:
        await eventually(lambda: len(self.accepted(after)) >= count, within=within)


async def _readyz(http: aiohttp.ClientSession, service: Service) -> tuple[int, dict[str, Any]]:
    started = time.monotonic()
    async with asyncio.timeout(10), http.get(f"{service.url}/readyz") as response:
        body = await response.json()
    assert time.monotonic() - started < QUICK_S, "/readyz hung"
    return response.status, body


#: Services whose `/readyz` stays 200 through an outage of a dependency once they have been ready
#: (`imgpipe.web.base_app`'s `serves_clients`).
SERVES_CLIENTS = frozenset({"api", "status"})


async def _until_check(
    http: aiohttp.ClientSession, service: Service, check: str, *, failing: bool, within: float
) -> tuple[int, dict]:
    """`/readyz`'s status and body once its `check` fails (or passes), whatever the status."""

    async def probe() -> tuple[int, dict] | None:
        status, body = await _readyz(http, service)
        return (status, body) if body["checks"][check].startswith("error") is failing else None

    try:
        return await eventually(probe, within=within)
    except TimeoutError:
        status, body = await _readyz(http, service)
        raise AssertionError(f"{service.name} /readyz stayed {status} {body}:\n{service.tail()}") from None


async def _until_ready(http: aiohttp.ClientSession, service: Service, want: int, within: float) -> dict:
    async def probe() -> dict | None:
        status, body = await _readyz(http, service)
        return body if status == want else None

    try:
        return await eventually(probe, within=within)
    except TimeoutError:
        status, body = await _readyz(http, service)
        raise AssertionError(f"{service.name} /readyz stayed {status} {body}:\n{service.tail()}") from None


async def _all_succeed(stack: Stack, client: Client, ids: list[str], variants: list[str]) -> None:
    """Every job ends `succeeded`, seen through the status service, with one set of variants."""
    expected_names = sorted(variants)

    async def finished() -> dict[str, dict] | None:
        views = {}
        for job_id in ids:
            status, body = await client.get(job_id)
            assert status == 200, (job_id, body)  # an accepted job is never lost
            if body["status"] not in ("succeeded", "failed"):
                return None
            views[job_id] = body
        return views

    try:
        views = await eventually(finished, within=180)
    except TimeoutError:
        raise AssertionError(f"jobs still not finished:\n{stack.services['worker'].tail()}") from None
    failed = {job_id: view["error"] for job_id, view in views.items() if view["status"] != "succeeded"}
    assert not failed, failed
    for job_id, view in views.items():
        assert sorted(v["name"] for v in view["variants"]) == expected_names, view
        objects = await asyncio.to_thread(
            s3_objects, stack.env["IMGPIPE_S3_ENDPOINT_URL"], job_prefix(client.sub, job_id)
        )
        assert set(objects) == {v["key"] for v in view["variants"]}, (job_id, objects)


def _alive(stack: Stack, pids: dict[str, int]) -> None:
    """No service was restarted: the same processes are still running."""
    for name, service in stack.services.items():
        assert service.proc.poll() is None, f"{name} exited:\n{service.tail()}"
        assert service.proc.pid == pids[name]


# --------------------------------------------------------------------------------------------------------
# The tests.

VARIANTS = ["thumb", "small"]


@pytest.fixture(scope="module")
def picture() -> bytes:
    return jpeg(1600, 1200)


async def _outage(
    http: aiohttp.ClientSession,
    flow: Flow,
    services: tuple[Service, ...],
    *,
    down: str,
    up: str,
    stop: Callable[[], object],
    start: Callable[[], object],
) -> tuple[float, float]:
    """Stop a dependency while `flow` keeps submitting, bring it back, wait for recovery.

    Returns the (monotonic) span in which it was certainly down: every service's readiness check
    of it was failing, and it had not been started again.
    """
    await asyncio.to_thread(stop)
    for service in services:
        status, body = await _until_check(http, service, down, failing=True, within=20)
        assert status == (200 if service.name in SERVES_CLIENTS else 503), (service.name, body)
        assert body["ready"] is (status == 200), body
        assert body["checks"][up] == "ok", body
    down_from = time.monotonic()
    await asyncio.sleep(OUTAGE_S)
    down_to = time.monotonic()
    await asyncio.to_thread(start)
    for service in services:
        await _until_check(http, service, down, failing=False, within=60)
        await _until_ready(http, service, 200, within=10)
    back = time.monotonic()
    # New jobs are accepted again, by the same processes.
    await flow.wait_accepted(5, after=back, within=30)
    return down_from, down_to


def _answers_during(flow: Flow, outage: tuple[float, float], code: str) -> None:
    """Every submission in the outage was a quick 503 `code`; none at all hung, failed or lied."""
    during = flow.within(*outage)
    assert len(during) >= 3, flow.attempts
    for attempt in during:
        assert (attempt.status, attempt.code) == (503, code), attempt
    # Whatever the moment, an answer came quickly and was a 202 or a 503 (no hang, no 500).
    for attempt in flow.attempts:
        assert attempt.status in (202, 503), attempt
        if attempt.status == 503:
            assert attempt.code == code, attempt
            assert attempt.elapsed < QUICK_S, attempt


async def test_rabbitmq_restart_while_jobs_flow(
    outage_stack: Stack, private_rabbit: PrivateRabbit, http: aiohttp.ClientSession, picture: bytes
) -> None:
    stack = outage_stack
    pids = {name: service.proc.pid for name, service in stack.services.items()}
    client = Client(http, stack, "alice")
    key = await client.upload(picture)
    api, worker = stack.services["api"], stack.services["worker"]

    async with Flow(client, key, VARIANTS) as flow:
        await flow.wait_accepted(5)
        outage = await _outage(
            http,
            flow,
            (api, worker),
            down="rabbitmq",
            up="redis",
            stop=private_rabbit.stop_app,
            start=private_rabbit.start_app,
        )
    _answers_during(flow, outage, "broker_unavailable")
    _alive(stack, pids)
    # No accepted job is lost: before, during and after the outage, every 202 ends `succeeded`.
    await _all_succeed(stack, client, flow.accepted(), VARIANTS)
    _alive(stack, pids)
    consuming = [r for r in log_records(worker) if r["message"] == "consuming"]
    assert len(consuming) == 1  # subscribed once; the reconnect restored the consumer by itself


async def test_redis_restart_while_jobs_flow(
    outage_stack: Stack,
    private_redis: PrivateRedis,
    private_store: JobStore,
    http: aiohttp.ClientSession,
    picture: bytes,
) -> None:
    stack = outage_stack
    pids = {name: service.proc.pid for name, service in stack.services.items()}
    client = Client(http, stack, "alice")
    key = await client.upload(picture)
    api, worker = stack.services["api"], stack.services["worker"]
    big = await client.upload(jpeg(3000, 2000))

    async with Flow(client, key, VARIANTS) as flow:
        await flow.wait_accepted(5)
        # A batch of sizeable jobs, so the worker is in the middle of some when Redis goes.
        batch = [(await client.submit({"key": big}, VARIANTS))["id"] for _ in range(6)]

        async def busy() -> bool:
            records = await asyncio.gather(*(private_store.get(job_id) for job_id in batch))
            return any(r is not None and r.status is JobStatus.PROCESSING for r in records)

        await eventually(busy, within=60)
        outage = await _outage(
            http,
            flow,
            (api, worker),
            down="redis",
            up="rabbitmq",
            stop=private_redis.kill,
            start=private_redis.start,  # same port, same directory: the AOF is replayed
        )
    _answers_during(flow, outage, "store_unavailable")
    _alive(stack, pids)
    await _all_succeed(stack, client, [*batch, *flow.accepted()], VARIANTS)
    _alive(stack, pids)
    # Jobs were being settled while Redis was away: the worker held them and retried the write.
    assert any(r["message"].startswith("write failed") for r in log_records(worker)), worker.tail()


async def test_services_start_before_rabbitmq_and_become_ready(
    base_env: dict[str, str],
    rabbit_available: None,
    private_redis: PrivateRedis,
    tmp_path: Path,
    http: aiohttp.ClientSession,
) -> None:
    """api, worker and reconciler start with no broker, and need no restart once it appears."""
    node = PrivateRabbit(tmp_path / "rabbit")  # its port has nothing listening yet
    env = {
        **base_env,
        "IMGPIPE_NAMESPACE": fresh_namespace(),
        "IMGPIPE_AMQP_URL": node.url,
        "IMGPIPE_REDIS_URL": private_redis.url,
        "IMGPIPE_WORKER_CONCURRENCY": "1",
    }
    stack = Stack(env)
    try:
        with ThreadPoolExecutor(4) as pool:
            started = {
                name: pool.submit(start_unready, name, env, tmp_path)
                for name in ("api", "status", "worker", "reconciler")
            }
            for name, future in started.items():
                stack.services[name] = future.result()
        pids = {name: service.proc.pid for name, service in stack.services.items()}
        client = Client(http, stack, "alice")
        key = await client.upload(jpeg(640, 480))  # uploads need Redis and S3 only

        for name in ("api", "worker", "reconciler"):
            body = await _until_ready(http, stack.services[name], 503, within=10)
            assert body["checks"]["rabbitmq"].startswith("error"), (name, body)
        # A job cannot be queued yet: a quick 503, and nothing is left behind for it.
        flow = Flow(client, key, ["thumb"])
        refused = await flow.post()
        assert (refused.status, refused.code) == (503, "broker_unavailable"), refused
        assert refused.elapsed < QUICK_S, refused

        await asyncio.to_thread(node.start)
        for name in ("api", "worker", "reconciler"):
            await _until_ready(http, stack.services[name], 200, within=60)
        # The same processes now take jobs, and the worker consumes them.
        job = await client.submit({"key": key}, ["thumb"])
        assert (await client.wait(job["id"], within=60))["status"] == "succeeded"
        # ... and the reconciler consumes its commands.
        admin = {"Authorization": f"Bearer {token('ops', scopes='admin')}"}
        async with http.post(
            f"{stack.api}/admin/reconcile", params={"dry_run": "true"}, headers=admin
        ) as response:
            assert response.status == 202, await response.text()
            run_id = (await response.json())["run_id"]

        async def run_done() -> dict | None:
            async with http.get(f"{stack.api}/admin/reconcile/{run_id}", headers=admin) as response:
                body = await response.json()
            return body if body["status"] not in ("queued", "running") else None

        assert (await eventually(run_done, within=60))["status"] == "succeeded"
        _alive(stack, pids)
    finally:
        for service in stack.services.values():
            stack.stop(service)
        node.stop()


def _bucket(url: str) -> Any:
    """The test bucket on the S3 at `url`, created; returns the client."""
    s3 = s3_client(url)
    s3.create_bucket(Bucket=BUCKET)
    return s3


async def test_s3_outage_is_503_and_the_worker_retries_until_it_is_back(
    base_env: dict[str, str], http: aiohttp.ClientSession, tmp_path: Path, picture: bytes
) -> None:
    port = free_port()
    moto, url = await asyncio.to_thread(start_moto, port=port)
    await asyncio.to_thread(_bucket, url)
    # The services reach S3 through a relay: cut, S3 is out of reach for them, and comes back with
    # everything it held (a restarted moto would come back empty, and a retry could find the
    # source missing before the test had put it back).
    relay = BrokerProxy(target=port)
    await relay.start()
    env = {
        **base_env,
        "IMGPIPE_NAMESPACE": fresh_namespace(),
        "IMGPIPE_S3_ENDPOINT_URL": f"http://127.0.0.1:{relay.port}",
        "IMGPIPE_MAX_ATTEMPTS": "6",  # retries 1 s, then 2 s apart: about 9 s for S3 to come back
    }
    stack = Stack(env)
    try:
        # In a thread: the relay runs on this event loop, and must answer their readiness checks.
        await asyncio.to_thread(_start_all, stack, tmp_path, ("api", "status"))  # no worker: the job waits
        client = Client(http, stack, "alice")
        key = await client.upload(picture)
        job = await client.submit({"key": key}, ["thumb"])

        await relay.cut()
        # Ready before, so still in its Service: it answers the requests that need S3 itself.
        status, _ = await _until_check(http, stack.services["api"], "s3", failing=True, within=20)
        assert status == 200
        started = time.monotonic()
        async with http.post(
            f"{stack.api}/jobs", json={"source": {"key": key}}, headers=client.headers
        ) as response:
            refused = (response.status, (await response.json())["error"]["code"])
        assert refused == (503, "storage_unavailable")
        assert time.monotonic() - started < QUICK_S  # a refused connection, not a hang

        # The worker takes the accepted job, cannot fetch its source, and parks it for a retry.
        worker = await asyncio.to_thread(start_unready, "worker", env, tmp_path)
        stack.services["worker"] = worker

        def parked() -> bool:
            return any(
                r["message"] == "transient failure, retrying" and r.get("code") == "storage_unavailable"
                for r in log_records(worker, job["id"])
            )

        await eventually(parked, within=30)
        await relay.start()  # S3 is back, its source with it: a retry finds it
        done = await client.wait(job["id"], within=60)
        assert done["status"] == "succeeded", done
        await _until_check(http, stack.services["api"], "s3", failing=False, within=20)
    finally:
        for service in stack.services.values():
            stack.stop(service)
        await relay.cut()
        moto.kill()
        moto.wait()
        await asyncio.to_thread(drop_namespace, env["IMGPIPE_NAMESPACE"])
