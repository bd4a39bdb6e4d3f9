# -*- test-case-name: tests.unit.test_ctl -*-
"""``pocketproxyctl``: the operators' command line.

For now it offers ``hash-password`` (for the users file); the admin-socket
commands join it with the admin socket.
"""

import argparse
import getpass
import sys

from ovpnmgr.directory import hash_password


def _hash_password(args):
    if args.stdin or not sys.stdin.isatty():
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != password:
            sys.stderr.write("pocketproxyctl: passwords do not match\n")
            return 1
    if not password:
        sys.stderr.write("pocketproxyctl: empty password refused\n")
        return 1
    print(hash_password(password))
    return 0


def main(argv=None):
    """Entry point of the ``pocketproxyctl`` console script; returns the exit code."""
    parser = argparse.ArgumentParser(prog="pocketproxyctl", description="Operate a pocketproxy daemon.")
    sub = parser.add_subparsers(dest="command", required=True)
    hp = sub.add_parser("hash-password", help="print a scrypt hash for a users-file 'password:' entry")
    hp.add_argument("--stdin", action="store_true", help="read the password from the first line of stdin")
    hp.set_defaults(func=_hash_password)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
