"""`imgpipe-api --port N`: run the api service."""

from imgpipe.web import serve

from imgpipe_api.app import create_app


def main(argv: list[str] | None = None) -> None:
    serve(create_app, prog="imgpipe-api", default_port=8000, argv=argv)


if __name__ == "__main__":
    main()
