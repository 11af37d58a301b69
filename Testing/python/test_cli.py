"""The command line teaches: the top-level help lists every subcommand, each subcommand's help has an example."""

from __future__ import annotations

import subprocess
import sys

from decipher_mr.cli import COMMANDS, _available


def _help(*args: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "decipher_mr", *args, "--help"], capture_output=True, encoding="utf-8", errors="replace", check=True
    )
    return out.stdout


def test_top_level_help_lists_every_available_subcommand_with_its_summary():
    text = _help()
    for name, (_, summary) in _available().items():
        assert name in text
        assert summary.split()[0] in text


def test_every_available_subcommand_help_shows_an_example():
    available = _available()
    assert available, "no subcommand is installed"
    for name in available:
        text = _help(name)
        assert f"decipher-mr {name}" in text, f"`decipher-mr {name} --help` shows no example call"


def test_command_table_names_existing_modules_only_once():
    modules = [module for module, _ in COMMANDS.values()]
    assert len(modules) == len(set(modules))
