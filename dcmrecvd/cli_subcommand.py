"""What the subcommands (``dcmrecvd forward``, ``dcmrecvd journal``) share: reading the
configuration as the daemon does, so that they find its state where it keeps it."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path

from dcmrecvd.conf import config as config_mod


def add_config_options(p: argparse.ArgumentParser) -> None:
    """--config, --config-dir and -od, as the daemon takes them."""
    p.add_argument("--config", "-c", type=Path, help="an extra config file (as for the daemon)")
    p.add_argument("--config-dir", type=Path, help="the config directory (default /etc/dcmrecvd)")
    p.add_argument(
        "-od",
        "--output-directory",
        help="the daemon's output directory, when it is given on its command line",
    )


def load_config(opts: argparse.Namespace, env: Mapping[str, str]) -> config_mod.Config:
    """The daemon's configuration, with -od as on its command line."""
    overrides = {"output": {"directory": opts.output_directory}} if opts.output_directory else {}
    return config_mod.Loader(opts.config_dir, opts.config, overrides, env)()
