"""The launchers' command line: argparse whose --help shows every default and the exit
codes, and whose errors are one line and exit status 2, as routed's own commands."""

from __future__ import annotations

import argparse


class UsageError(Exception):
  """Bad command line: the message is one line naming the flag."""


class Parser(argparse.ArgumentParser):
  """argparse.ArgumentParser(exit_codes=...): they end the --help text."""

  def __init__(self, *, exit_codes: str, **kwargs):
    kwargs['epilog'] = ((kwargs.get('epilog') or '') + '\n\nexit codes: ' + exit_codes).strip()
    super().__init__(formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)

  def add_argument(self, *args, **kwargs):
    if (kwargs.get('default') not in (None, False, argparse.SUPPRESS) and
        'default' not in kwargs.get('help', '')):
      kwargs['help'] = (kwargs.get('help', '') + ' (default: %(default)s)').strip()
    return super().add_argument(*args, **kwargs)

  def error(self, message):
    raise UsageError(message)
