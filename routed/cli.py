"""Command-line parsing shared by the entry points: `--config=FILE[:VARIANT]`,
`--config.a.b=VALUE` overrides, and each command's own `--name=value` flags.

The syntax is ml_collections' config_flags syntax; we parse it ourselves so that every
mistake (a missing file, an unknown key, a value of the wrong type) becomes one line
naming the flag or key (with the nearest valid name for a typo), which the entry points
print before exiting with status 2. `--help` prints the entry point's Help (what it
does, each flag with its default, the config keys it reads, its exit codes) and exits 0.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib.util
import os
import sys

import ml_collections


class UsageError(Exception):
  """Bad command line or config: the message is one line naming what is wrong."""


@dataclasses.dataclass(frozen=True)
class Help:
  """What `--help` prints for an entry point."""
  command: str                  # how it is run: 'python -m routed.sample'
  doc: str                      # its module docstring: what it does
  flags: dict                   # flag -> one line (every flag of its FLAGS)
  exit_codes: dict              # exit status -> meaning
  reads: str = ''               # the config keys it reads ('' : none)

  def text(self, defaults: dict) -> str:
    width = max(len(f'--{name}={_shown(defaults[name])}') for name in self.flags)
    lines = [f'usage: {self.command} [flags]', '', self.doc.strip(), '', 'flags:']
    for name, line in self.flags.items():
      lines.append(f'  {f"--{name}={_shown(defaults[name])}":<{width}}  {line}')
    if any(isinstance(defaults[name], bool) for name in self.flags):
      lines.append('  (a true/false flag also reads --NAME and --noNAME)')
    if self.reads:
      lines += ['', f'config: {self.reads}']
    lines += ['', 'exit codes:'] + [f'  {code}  {meaning}'
                                    for code, meaning in sorted(self.exit_codes.items())]
    return '\n'.join(lines)


# What the entry points' --help says about exit status 2 and about --config.
BAD_INPUT = ('bad input: one line on stderr naming the flag, config key or path (no '
             'traceback; nothing already written is changed)')
CONFIG_KEYS = ('--config=FILE[:VARIANT] (a config file calling get_config(VARIANT)), then '
               '--config.KEY=VALUE overrides of any key of routed/config.py, each '
               'documented there beside its default')


def _shown(default) -> str:
  if default is None:
    return '(required)'
  if isinstance(default, bool):
    return str(default).lower()
  return repr(default) if default == '' else str(default)


def nearest(name: str, candidates) -> str:
  """' (did you mean X?)' for the closest candidate to a mistyped name, else ''."""
  match = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
  return f' (did you mean {match[0]}?)' if match else ''


def load_config(spec: str) -> ml_collections.ConfigDict:
  """Loads FILE[:VARIANT] by calling the file's get_config(VARIANT)."""
  path, _, variant = spec.partition(':')
  if not os.path.isfile(path):
    raise UsageError(f'--config: no such config file: {path}')
  module_spec = importlib.util.spec_from_file_location('routed_user_config', path)
  module = importlib.util.module_from_spec(module_spec)
  # Config files may import their siblings (dense_base.py builds on switch_base.py).
  sys.path.insert(0, os.path.dirname(os.path.abspath(path)))
  try:
    module_spec.loader.exec_module(module)
  except Exception as e:  # a user file: report, don't crash
    raise UsageError(f'--config: {path} failed to load: {type(e).__name__}: {e}') from e
  finally:
    sys.path.pop(0)
  if not hasattr(module, 'get_config'):
    raise UsageError(f'--config: {path} defines no get_config()')
  try:
    config = module.get_config(variant) if variant else module.get_config()
  except (ValueError, KeyError, TypeError) as e:
    raise UsageError(f'--config: {spec}: {e}') from e
  except Exception as e:  # pylint: disable=broad-except  # a user file: report, don't crash
    raise UsageError(f'--config: {spec}: get_config raised {type(e).__name__}: {e}') from e
  if not isinstance(config, ml_collections.ConfigDict):
    raise UsageError(f'--config: {spec}: get_config returned a {type(config).__name__}, not '
                     'an ml_collections.ConfigDict (start from routed.config.base_config())')
  config.lock()  # overrides may change keys, never add them
  return config


def parse_value(key: str, raw: str, current):
  """Parses `raw` as the type of the key's current value."""
  try:
    if isinstance(current, bool):
      lowered = raw.lower()
      if lowered not in ('true', 'false', '1', '0'):
        raise ValueError(raw)
      return lowered in ('true', '1')
    if isinstance(current, int):
      return int(raw)
    if isinstance(current, float):
      return float(raw)
    if isinstance(current, str):
      return raw
    value = ast.literal_eval(raw)
    if current is not None and not isinstance(value, type(current)):
      raise ValueError(raw)
    return value
  except (ValueError, SyntaxError):
    expected = type(current).__name__ if current is not None else 'a Python literal'
    raise UsageError(f'--config.{key}: expected {expected}, got {raw!r}') from None


def apply_override(config: ml_collections.ConfigDict, key: str, raw: str) -> None:
  *parents, leaf = key.split('.')
  node = config
  for i, name in enumerate(parents):
    if not isinstance(node, ml_collections.ConfigDict) or name not in node:
      known = [".".join(parents[:i] + [k]) for k in node] if isinstance(
          node, ml_collections.ConfigDict) else []
      wrong = ".".join(parents[:i + 1])
      raise UsageError(f'--config.{key}: unknown config key {wrong}{nearest(wrong, known)}')
    node = node[name]
  if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
    known = ['.'.join(parents + [k]) for k in node] if isinstance(
        node, ml_collections.ConfigDict) else []
    raise UsageError(f'--config.{key}: unknown config key {key}{nearest(key, known)}')
  if isinstance(node[leaf], ml_collections.ConfigDict):
    raise UsageError(f'--config.{key}: is a group of keys, not a value')
  with node.unlocked():
    node[leaf] = parse_value(key, raw, node[leaf])


def parse(argv: list[str], flags: dict[str, object], help: Help | None = None):  # pylint: disable=redefined-builtin
  """Parses argv (without the program name).

  flags: the command's own flags and their defaults (a default of None means a
  required string; bool defaults take --name / --noname too). help: what --help
  prints (then SystemExit(0)). Returns (config or None, {flag: value}).
  """
  if help is not None and any(a in ('--help', '-h') for a in argv):
    print(help.text(flags), flush=True)
    raise SystemExit(0)
  values = dict(flags)
  config_spec, overrides = None, []
  for arg in argv:
    if not arg.startswith('--'):
      raise UsageError(f'unexpected argument {arg!r} (flags look like --name=value)')
    name, eq, raw = arg[2:].partition('=')
    if name == 'config':
      config_spec = raw
    elif name.startswith('config.'):
      if not eq:
        raise UsageError(f'--{name}: give a value as --{name}=VALUE')
      overrides.append((name[len('config.'):], raw))
    elif name in flags:
      default = flags[name]
      if not eq and not isinstance(default, bool):
        raise UsageError(f'--{name}: give a value as --{name}=VALUE')
      # A required flag (default None) takes a string.
      values[name] = (raw if default is None else parse_value(name, raw, default)) if eq else True
    elif name.startswith('no') and isinstance(flags.get(name[2:]), bool) and not eq:
      values[name[2:]] = False
    else:
      raise UsageError(f'unknown flag --{name}{nearest(f"--{name}", [f"--{f}" for f in flags])}')
  config = None
  if 'config' in flags or config_spec is not None:
    if config_spec is None:
      raise UsageError('--config=FILE[:VARIANT] is required')
    config = load_config(config_spec)
    for key, raw in overrides:
      apply_override(config, key, raw)
  elif overrides:
    raise UsageError(f'--config.{overrides[0][0]} given without --config')
  missing = [name for name, value in values.items() if value is None and name != 'config']
  if missing:
    raise UsageError(f'--{missing[0]} is required')
  values.pop('config', None)
  return config, values
