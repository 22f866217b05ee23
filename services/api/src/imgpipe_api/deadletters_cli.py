"""`imgpipe-dead-letters list [--limit N]` and `imgpipe-dead-letters replay (--all [--limit N] | JOB_ID...)`.

The same listing and replay as `GET /admin/dead-letters` and `POST /admin/dead-letters/replay`,
from a shell next to the services: RabbitMQ and Redis come from the same `IMGPIPE_*` settings.
Prints one JSON object on stdout (the api's answer). Exit codes: 0 done, 1 RabbitMQ or Redis
unavailable (or another listing or replay held the lock too long), 2 bad arguments or configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from datetime import timedelta
from typing import Any

from imgpipe import broker
from imgpipe.broker import BrokerUnavailable
from imgpipe.deadletters import MAX_LIMIT, DeadLetters, DeadLettersBusy
from imgpipe.resources import redis_client
from imgpipe.settings import AmqpSettings, CommonSettings, ConfigError, RedisSettings, load
from imgpipe.store import JobStore
from imgpipe.telemetry import setup_logging
from redis.exceptions import RedisError

PROG = "imgpipe-dead-letters"


def _limit(raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError("must be an integer") from None
    if not 1 <= value <= MAX_LIMIT:
        raise argparse.ArgumentTypeError(f"must be from 1 to {MAX_LIMIT}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    listing = commands.add_parser("list", help="show the dead-letter queue; nothing is taken out")
    listing.add_argument("--limit", type=_limit, default=100, help="most items shown (1-1000, default 100)")
    replay = commands.add_parser("replay", help="put dead-lettered jobs back to pending and queue them")
    replay.add_argument("job_ids", nargs="*", metavar="JOB_ID", help="the jobs to replay")
    replay.add_argument("--all", action="store_true", help="replay the first --limit replayable jobs")
    replay.add_argument("--limit", type=_limit, help="with --all: most jobs replayed (default 100)")
    return parser


async def _run(args: argparse.Namespace, common: CommonSettings) -> dict[str, Any]:
    amqp = load(AmqpSettings)
    redis_settings = load(RedisSettings)
    client = redis_client(redis_settings)
    try:
        connection = await broker.connect(amqp.amqp_url.get_secret_value(), wait_s=10.0)
    except Exception as exc:
        await client.aclose()
        raise BrokerUnavailable(f"{type(exc).__name__}: {exc}") from exc
    try:
        store = JobStore(
            client, common.namespace, retention=timedelta(days=redis_settings.job_retention_days)
        )
        dead = DeadLetters(connection, broker.Topology(common.namespace, amqp.retry_delays_s), store)
        if args.command == "list":
            count, items = await dead.list(args.limit)
            return {"count": count, "items": [item.public() for item in items]}
        job_ids = None if args.all else args.job_ids
        return (await dead.replay(job_ids, limit=args.limit or 100)).public()
    finally:
        await connection.close()
        await client.aclose()


def main(argv: list[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "replay":
        if args.all == bool(args.job_ids):
            parser.error("replay needs either --all or one or more JOB_IDs")
        if args.limit is not None and not args.all:
            parser.error("--limit goes with --all only")
        if len(args.job_ids) > MAX_LIMIT:
            parser.error(f"at most {MAX_LIMIT} JOB_IDs at a time")
    try:
        common = load(CommonSettings)
    except ConfigError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        sys.exit(2)
    # Logs go to stderr (JSON), so stdout holds only the answer.
    setup_logging("dead-letters", env=common.env, level=common.log_level)
    try:
        answer = asyncio.run(_run(args, common))
    except ConfigError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        sys.exit(2)
    except BrokerUnavailable as exc:
        print(f"{PROG}: RabbitMQ unavailable: {exc}", file=sys.stderr)
        sys.exit(1)
    except RedisError as exc:
        print(f"{PROG}: Redis unavailable: {type(exc).__name__}: {exc}", file=sys.stderr)
        sys.exit(1)
    except DeadLettersBusy as exc:
        print(f"{PROG}: {exc}; try again shortly", file=sys.stderr)
        sys.exit(1)
    print(json.dumps(answer))


if __name__ == "__main__":
    main()
