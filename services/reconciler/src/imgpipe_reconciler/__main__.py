"""`imgpipe-reconciler --port N`: the scheduled reconciler; the port serves health and metrics only."""

from imgpipe.web import serve

from imgpipe_reconciler.app import create_app


def main(argv: list[str] | None = None) -> None:
    serve(create_app, prog="imgpipe-reconciler", default_port=8003, argv=argv)


if __name__ == "__main__":
    main()
