"""`imgpipe-worker --port N`: run a worker; the port serves only /healthz, /readyz and /metrics."""

from imgpipe.web import serve

from imgpipe_worker.app import create_app


def main(argv: list[str] | None = None) -> None:
    serve(create_app, prog="imgpipe-worker", default_port=8002, argv=argv)


if __name__ == "__main__":
    main()
