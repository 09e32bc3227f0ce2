"""`unitscope serve RUN`: the run's feature browser with live activations, ablation and steering."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import UnitscopeError
from . import options


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve a run's feature browser with a live model API (127.0.0.1 by default)")
    p.add_argument("run", help="run directory (runs/NAME) with a report")
    p.add_argument("--port", type=options.positive_int, default=8765, help="port (default 8765)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind; other than local needs --allow-remote")
    p.add_argument("--allow-remote", action="store_true", help="allow a --host that other machines can reach")
    p.add_argument("--max-new-tokens", type=options.positive_int, default=64,
                   help="longest generation a steering request may ask for")
    p.add_argument("--max-body", type=options.positive_int, default=64 * 1024, help="largest request body in bytes")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from ..serve import Limits, check_host, create_app
    except ImportError as e:
        raise UnitscopeError(f"unitscope serve needs the serve extra ({e.name} is missing): "
                             "pip install 'unitscope[serve]'") from None
    if args.port > 65535:
        raise UnitscopeError(f"--port must be at most 65535, not {args.port}")
    check_host(args.host, args.allow_remote)
    app = create_app(Path(args.run), limits=Limits(body_bytes=args.max_body, new_tokens=args.max_new_tokens))
    print(f"serving {args.run} at http://{args.host}:{args.port}/ (Ctrl-C stops)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
