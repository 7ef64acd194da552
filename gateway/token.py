"""Print a bearer token for the embedded HS256 secret.

    python -m gateway.token --role agent --sub alice [--org acme] [--org-wide] [--ttl 86400]
"""
import argparse
import sys

from contracts.tickets import ROLES
from gateway.auth import mint_token


def main(argv=None):
    parser = argparse.ArgumentParser(description="Mint a development bearer token (HS256).")
    parser.add_argument("--role", required=True, choices=ROLES)
    parser.add_argument("--sub", required=True, help="user id")
    parser.add_argument("--org", default=None, help="organization id")
    parser.add_argument("--org-wide", action="store_true",
                        help="a requester sees every ticket of their organization")
    parser.add_argument("--ttl", type=int, default=86400, help="seconds until expiry")
    args = parser.parse_args(argv)
    if not args.sub.strip():
        parser.error("--sub must not be empty")
    sys.stdout.write(mint_token(args.sub, args.role, args.org or None, args.org_wide, args.ttl) + "\n")


if __name__ == "__main__":
    main()
