"""`python -m promptcache.server`: the same server, and the same options, as `promptcache serve`.

Owns the argparse parser made from settings.command_line_options(); never defines an option itself.
"""

from __future__ import annotations

import argparse
import sys

from promptcache.errors import ConfigError
from promptcache.server.settings import (
    ServerSettings,
    command_line_options,
    settings_from_command_line,
)


def parser() -> argparse.ArgumentParser:
    """The argument parser: one flag per ServerSettings field (a bool field is --x / --no-x)."""
    parser = argparse.ArgumentParser(
        prog="python -m promptcache.server",
        description="Serve an OpenAI-compatible API whose workers share one prefix cache. Every "
        "option is also a PROMPTCACHE_<OPTION> variable and a key of the --config file.",
    )
    for option in command_line_options():
        if option.kind is bool:
            parser.add_argument(
                option.flag,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=option.help,
            )
        else:
            parser.add_argument(
                option.flag,
                type=option.kind,
                choices=option.choices or None,
                default=None,
                help=option.help,
            )
    return parser


def parse_settings(argv: list[str] | None = None) -> ServerSettings:
    """ServerSettings from a command line (sys.argv[1:] by default), the config file it names and
    the environment. Raises ConfigError; argparse exits with status 2 on an unknown option."""
    return settings_from_command_line(vars(parser().parse_args(argv)))


def main(argv: list[str] | None = None) -> int:
    try:
        settings = parse_settings(argv)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from promptcache.server import run

    run(settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
