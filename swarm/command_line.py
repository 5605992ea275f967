"""The settings parser every long-running command shares (`swarm-dht`, `swarm-peer`, `swarm-monitor`).

Each option is read from the command line, a `BLOCKSWARM_<NAME>` environment variable or a YAML `--config` file,
in that order of precedence, and `--help` shows the defaults.
"""

from __future__ import annotations

import configargparse

ENV_PREFIX = "BLOCKSWARM_"


def command_parser(prog: str, description: str) -> configargparse.ArgumentParser:
    """A parser for `prog` that already takes `--config FILE`."""
    parser = configargparse.ArgumentParser(
        prog=prog,
        description=description,
        auto_env_var_prefix=ENV_PREFIX,
        config_file_parser_class=configargparse.YAMLConfigFileParser,
        formatter_class=configargparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--config", is_config_file=True, help="YAML file with any of the options below")
    return parser
