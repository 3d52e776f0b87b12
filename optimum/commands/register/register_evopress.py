"""Registers `optimum-cli evopress ...` (the `evopress` commands) with Optimum's CLI.

Optimum imports every module of the `optimum.commands.register` namespace at start-up and registers its
`REGISTER_COMMANDS`; this module stays light: the commands import torch and transformers only when they run.
"""

from optimum.commands.base import BaseOptimumCLICommand, CommandInfo


class EvoPressCommand(BaseOptimumCLICommand):
    COMMAND = CommandInfo(name="evopress", help="EvoPress: search, apply, evaluate and push non-uniform compression")

    @staticmethod
    def parse_args(parser):
        import argparse

        from optimum_evopress.cli import _DESCRIPTION, _EXAMPLES, add_commands

        parser.description, parser.formatter_class = _DESCRIPTION, argparse.RawDescriptionHelpFormatter
        parser.epilog = _EXAMPLES.replace("  evopress ", "  optimum-cli evopress ")
        add_commands(parser, parser.epilog)

    def run(self):
        import sys

        from optimum_evopress.cli import run_command

        code = run_command(self.args, prog="optimum-cli evopress")
        if code:
            sys.exit(code)


REGISTER_COMMANDS = [EvoPressCommand]
