"""``python -m bridge.simulator --port 8765 --scenario demo --token pt-…``"""

from __future__ import annotations

import argparse
import os
import sys

from bridge.errors import ConfigError
from bridge.simulator import NAMED, serve


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bridge.simulator", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument(
        "--scenario", default="demo", help=f"a .json/.toml file or one of: {', '.join(NAMED)}"
    )
    parser.add_argument("--token", default=os.environ.get("QODER_ACCESS_TOKEN", ""))
    args = parser.parse_args(argv)
    try:
        serve(args.host, args.port, args.scenario, args.token)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
