"""The `unitscope` command: run, sites, record, verify, train, eval, explain, report.

Every failure the user can fix is one sentence on stderr and exit status 2; no traceback. Each command's parser
and body live in `commands/`, beside the stage it drives.
"""

from __future__ import annotations

import sys

from . import distributed
from .commands import MODULES
from .commands import compare as compare_command
from .commands import label as label_command
from .commands import synthetic as synthetic_command
from .commands.options import Parser
from .errors import UnitscopeError


def build_parser() -> Parser:
    parser = Parser(prog="unitscope", description=__doc__.splitlines()[0])
    common = Parser(add_help=False)
    common.add_argument("--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    add = sub.add_parser

    def add_parser(name: str, **kw):
        return add(name, parents=[common], **kw)

    sub.add_parser = add_parser  # type: ignore[method-assign]
    for module in (*MODULES, synthetic_command, compare_command, label_command):
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not distributed.for_command(args.command):  # under torchrun: eval, explain, run, ... on rank 0 only
        return 0
    try:
        return args.func(args) or 0
    except UnitscopeError as e:
        print(f"unitscope: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("unitscope: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
