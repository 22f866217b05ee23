"""`imgpipe-status --port N`: run the status service."""

from imgpipe.web import serve

from imgpipe_status.app import create_app


def main(argv: list[str] | None = None) -> None:
    serve(create_app, prog="imgpipe-status", default_port=8001, argv=argv)


if __name__ == "__main__":
    main()
