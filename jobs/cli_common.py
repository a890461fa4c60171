"""Options every `dr` command shares, accepted before or after the command name."""
from __future__ import annotations

import argparse
from pathlib import Path


def config_options(parser: argparse.ArgumentParser, top_level: bool = False) -> None:
    """--config / --set. On a subcommand they default to SUPPRESS so the top-level value stands."""
    default = None if top_level else argparse.SUPPRESS
    parser.add_argument("--config", type=Path, default=default,
                        help="TOML config with sections [model] [search] [mstep] [train] [eval] [split] "
                             "(see configs/); defaults are the paper's MovieLens settings")
    parser.add_argument("--set", action="append", default=[] if top_level else argparse.SUPPRESS,
                        metavar="SECTION.FIELD=VALUE",
                        help="override one config value, e.g. --set model.K=100 --set mstep.alpha=3e-7 (repeatable)")
