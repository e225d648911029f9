"""`python -m promptcache.server`: the same server as `promptcache serve`, with flags made from
ServerSettings' fields (--workers, --max-queue, ...). Parses arguments only.
"""

from __future__ import annotations

import argparse
import sys
import types
import typing

from promptcache.errors import ConfigError
from promptcache.server.settings import ServerSettings


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m promptcache.server",
        description="Serve an OpenAI-compatible API whose workers share one prefix cache.",
    )
    for name, info in ServerSettings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        kind = info.annotation
        # "X | None": the flag takes an X
        if typing.get_origin(kind) in (typing.Union, types.UnionType):
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        if kind is bool:
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=None, help=info.description
            )
        elif typing.get_origin(kind) is typing.Literal:
            parser.add_argument(
                flag, choices=typing.get_args(kind), default=None, help=info.description
            )
        else:
            parser.add_argument(flag, type=kind, default=None, help=info.description)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = vars(_parser().parse_args(argv))
    config = args.pop("config")
    try:
        settings = ServerSettings.load(config, **args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from promptcache.server import run

    run(settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
