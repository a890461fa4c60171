"""Options every `dr` command shares, accepted before or after the command name."""
from __future__ import annotations

import argparse
import tomllib
from pathlib import Path

from dr_model.config import ConfigError


def config_options(parser: argparse.ArgumentParser, top_level: bool = False) -> None:
    """--config / --set. On a subcommand they default to SUPPRESS so the top-level value stands."""
    default = None if top_level else argparse.SUPPRESS
    parser.add_argument("--config", type=Path, default=default,
                        help="TOML config with sections [model] [search] [mstep] [train] [eval] [split] "
                             "(see configs/); defaults are the paper's MovieLens settings")
    parser.add_argument("--set", action="append", default=[] if top_level else argparse.SUPPRESS,
                        metavar="SECTION.FIELD=VALUE",
                        help="override one config value, e.g. --set model.K=100 --set mstep.alpha=3e-7 (repeatable)")


def spark_options(parser: argparse.ArgumentParser) -> None:
    """--spark-master / --spark-conf: where the job's Spark runs and how it is sized."""
    parser.add_argument("--spark-master", default="local[2]",
                        help="Spark master URL: local[N], spark://host:7077, yarn, k8s://... (default local[2])")
    parser.add_argument("--spark-conf", action="append", default=[], metavar="KEY=VALUE",
                        help="one Spark setting, e.g. --spark-conf spark.sql.shuffle.partitions=64 "
                             "--spark-conf spark.executor.memory=8g (repeatable; over the config file's [spark] "
                             "table, itself over the built-in small-machine defaults)")


def spark_conf(args: argparse.Namespace) -> dict[str, str]:
    """The config file's [spark] table with --spark-conf on top -> {spark key: value}."""
    conf: dict[str, str] = {}
    path = getattr(args, "config", None)
    if path is not None:
        with open(path, "rb") as fh:
            conf.update({k: str(v) for k, v in tomllib.load(fh).get("spark", {}).items()})
    for item in getattr(args, "spark_conf", []):
        key, sep, value = item.partition("=")
        if not sep or not key.strip().startswith("spark."):
            raise ConfigError(f"--spark-conf {item!r}: expected spark.KEY=VALUE")
        conf[key.strip()] = value.strip()
    return conf


def spark_session(args: argparse.Namespace, app: str):  # noqa: ANN201
    """The command's SparkSession: --spark-master, sized by spark_conf(args)."""
    from jobs.spark import get_spark

    return get_spark(args.spark_master, app=app, conf=spark_conf(args))
