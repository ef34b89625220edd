"""The ``homeserver`` command: generate-config and run."""

import argparse
import sys

from homeserver.config import ConfigError, load_config
from homeserver.config.generate import generate_config
from storage import SchemaError

EXIT_CONFIG_ERROR = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="homeserver", description="A Matrix homeserver.")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate-config", help="write a new config and signing key")
    gen.add_argument("--server-name", required=True, help="e.g. example.com")
    gen.add_argument("--config-path", required=True)
    gen.add_argument("--port", type=int, default=8008)
    gen.add_argument("--bind-address", default="127.0.0.1")

    run = sub.add_parser("run", help="run the server in the foreground")
    run.add_argument(
        "--config-path", action="append", required=True,
        help="config file; repeat to layer overrides (later files win key by key)",
    )
    run.add_argument(
        "--generate-config", action="store_true",
        help="first run: write the (first) config file if it does not exist yet",
    )
    run.add_argument("--server-name", help="server name for --generate-config")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "generate-config":
        try:
            generate_config(args.config_path, args.server_name, args.port, args.bind_address)
        except FileExistsError as e:
            print(f"homeserver: {e}", file=sys.stderr)
            return 1
        print(f"wrote {args.config_path}; start with: homeserver run --config-path {args.config_path}")
        return 0

    from pathlib import Path

    first = Path(args.config_path[0])
    if args.generate_config and not first.exists():
        generate_config(first, args.server_name or "localhost")
        print(f"wrote {first}", file=sys.stderr)
    try:
        config = load_config(args.config_path)
    except ConfigError as e:
        print(f"homeserver: config error: {e}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    from homeserver.app.lazy_modules import release_startup_modules
    from homeserver.app.reactor import install_reactor

    # The config is read: PyYAML's memory goes to the modules imported next.
    release_startup_modules()

    # Before anything imports the reactor: without a TLS listener, TLS loads on first use.
    install_reactor(any(listener.get("tls") for listener in config.get("listeners") or ()))
    from twisted.internet.error import CannotListenError

    from homeserver.app.lazy_modules import withdraw_presets
    from homeserver.app.server import run

    withdraw_presets()  # Twisted and jsonschema have what they took from the stand-ins
    try:
        return run(config)
    except ConfigError as e:
        print(f"homeserver: config error: {e}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    except SchemaError as e:
        print(f"homeserver: database error: {e}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    except CannotListenError as e:
        print(f"homeserver: cannot listen: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
