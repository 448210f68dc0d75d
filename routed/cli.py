"""Command-line parsing shared by the entry points: `--config=FILE[:VARIANT]`,
`--config.a.b=VALUE` overrides, and each command's own `--name=value` flags.

The syntax is ml_collections' config_flags syntax; we parse it ourselves so that every
mistake (a missing file, an unknown key, a value of the wrong type) becomes one line
naming the flag or key, which the entry points print before exiting with status 2.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import sys

import ml_collections


class UsageError(Exception):
  """Bad command line or config: the message is one line naming what is wrong."""


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
      raise UsageError(f'--config.{key}: unknown config key {".".join(parents[:i + 1])}')
    node = node[name]
  if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
    raise UsageError(f'--config.{key}: unknown config key {key}')
  if isinstance(node[leaf], ml_collections.ConfigDict):
    raise UsageError(f'--config.{key}: is a group of keys, not a value')
  with node.unlocked():
    node[leaf] = parse_value(key, raw, node[leaf])


def parse(argv: list[str], flags: dict[str, object]):
  """Parses argv (without the program name).

  flags: the command's own flags and their defaults (a default of None means a
  required string; bool defaults take --name / --noname too). Returns (config or None, {flag: value}).
  """
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
      raise UsageError(f'unknown flag --{name}')
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
