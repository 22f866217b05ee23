"""`imgpipe-token --sub alice [--scope admin]`: mint a token with the configured HS* secret.

For local development and the README's curl examples; production tokens come from an identity
provider. Refuses to run outside the local and test environments.
"""

from __future__ import annotations

import argparse
import sys

from imgpipe.auth import TokenVerifier
from imgpipe.settings import LOCAL_ENVIRONMENTS, AuthSettings, ConfigError, load


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="imgpipe-token", description=__doc__.splitlines()[0])
    parser.add_argument("--sub", required=True, help="the subject (user id) that will own jobs")
    parser.add_argument("--scope", default="", help="space-separated scopes, e.g. 'admin'")
    parser.add_argument("--ttl", type=int, default=3600, help="lifetime in seconds (default 3600)")
    args = parser.parse_args(argv)
    try:
        settings = load(AuthSettings)
    except ConfigError as exc:
        sys.exit(str(exc))
    if settings.env not in LOCAL_ENVIRONMENTS:
        sys.exit(f"imgpipe-token only runs with IMGPIPE_ENV in {sorted(LOCAL_ENVIRONMENTS)}")
    if settings.jwt_jwks_url:
        # The services would not accept an HS256 token then; the identity provider issues tokens.
        sys.exit("imgpipe-token mints HS256 tokens; with IMGPIPE_JWT_JWKS_URL set, get one from your IdP")
    print(TokenVerifier(settings).issue(args.sub, scopes=args.scope, ttl_s=args.ttl))


if __name__ == "__main__":
    main()
