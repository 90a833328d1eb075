"""The options of `hf-matta run` without the weight of their dataclasses: config files read into command-line tokens,
and a light copy of the parser that answers `--help` and refuses a bad option or value in a fraction of a second.

The real parser (`arguments.build_parser`) is built from the stages' dataclasses, and one of them subclasses
Transformers' `TrainingArguments`, whose import loads torch, Transformers and PEFT (5-10 s on 2 busy cores). So each
time the real parser is built, what it holds is saved as JSON: every option's names, type, choices and number of
values, and its help and usage text. The file lives in `$XDG_CACHE_HOME/hf_matta` (default `~/.cache/hf_matta`),
named after a hash of hf_matta's source, the Python and Transformers versions, the program's name and the terminal's
width, so that any change makes a new one. A later `hf-matta run` builds a plain argparse parser from it and checks
the command line and the config file's values before importing anything heavy: `--help` prints the saved text, a
bad option or value exits with status 2 at once. The copy only refuses: what it accepts goes through the real parser
as before, and without a saved file (the first run on a machine, or after an upgrade) the real parser does it all.
"""

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import sys
from collections.abc import Callable, Collection
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import yaml

from ..files import write_json_atomic


NONE_TOKENS = ("None", "null")  # not "none": report_to takes it as a value
_KEEP = 8  # saved option files kept (hf-matta run and the recipe, a few terminal widths)


def field_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Each field's own option (`--name`; not the `--no_name` complement of a boolean), by field name."""
    return {
        action.dest: action
        for action in parser._actions
        if action.option_strings and action.option_strings[0] == f"--{action.dest}"
    }


def or_none(convert: Any) -> Any:
    """An argparse type that reads `None` / `null` as None and anything else as `convert` does."""

    def convert_or_none(text: str) -> Any:
        return None if text in NONE_TOKENS else convert(text)

    convert_or_none.__name__ = getattr(convert, "__name__", "value")  # argparse names the type in its errors
    return convert_or_none


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """The fields of a YAML or JSON config file, as a dict."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config {str(path)!r} does not exist; see recipes/configs/ for examples.")
    try:
        with open(path) as f:
            config = json.load(f) if path.suffix == ".json" else yaml.safe_load(f)
    except (json.JSONDecodeError, yaml.YAMLError) as error:
        kind = "JSON" if path.suffix == ".json" else "YAML"
        raise ValueError(f"config {path} is not valid {kind}: {error}") from None
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise ValueError(f"config {path} must map field names to values, not hold a {type(config).__name__}.")
    return config


def config_to_argv(
    config: dict[str, Any], parser: argparse.ArgumentParser, source: str, optional: Collection[str]
) -> list[str]:
    """Command-line tokens for the fields of a config file, each value checked by its option's own type and choices
    first, so that an error names the file, the field and the value. `null` leaves a field of `optional` unset."""
    import difflib

    actions = field_actions(parser)
    tokens = []
    for name, value in config.items():
        action = actions.get(name)
        if action is None:
            close = difflib.get_close_matches(str(name), list(actions), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ValueError(f"{source}: unknown field {name!r}{hint}; `--help` lists the valid ones.")
        if value is None:
            if name not in optional:
                raise ValueError(f"{source}: {name} is null, but it cannot be unset; give a value or drop the line.")
            if action.nargs == "+":  # an unset list: its default (None)
                continue
        if isinstance(value, list) and action.nargs != "+":
            raise ValueError(f"{source}: {name} is a list ({value!r}), but {name} takes one value.")
        texts = [_as_text(item) for item in (value if isinstance(value, list) else [value])]
        for text in texts:
            _check_value(action, name, text, source)
        tokens += [f"--{name}", *texts]
    return tokens


def _as_text(value: Any) -> str:
    """A config value as the command line would spell it (dicts as JSON, which TrainingArguments parses)."""
    if value is None:
        return "None"
    if isinstance(value, dict):
        return json.dumps(value)
    return str(value)


def _check_value(action: argparse.Action, name: str, text: str, source: str) -> None:
    """Convert `text` as the option's argparse type does; a `ValueError` naming the file and the field otherwise."""
    try:
        value = action.type(text) if action.type is not None else text
    except (TypeError, ValueError, argparse.ArgumentTypeError):
        kind = getattr(action.type, "__name__", "value").replace("string_to_bool", "bool")
        raise ValueError(f"{source}: {name}: {text!r} is not a valid {kind}.") from None
    if action.choices is not None and value not in action.choices:
        raise ValueError(f"{source}: {name}: {text!r} is not one of {list(action.choices)}.")


# --- the light copy of the parser ----------------------------------------------------------------------------------


def _string_to_bool(text: str) -> bool:
    """Transformers' own reading of a boolean option, imported only when a boolean value is given."""
    from transformers.hf_argparser import string_to_bool

    return string_to_bool(text)


_string_to_bool.__name__ = "string_to_bool"
_CONVERTERS: dict[str, Callable[[str], Any]] = {"int": int, "float": float, "string_to_bool": _string_to_bool}


def save_options(
    parser: argparse.ArgumentParser, optional: Collection[str], prog: str | None, config_positional: bool
) -> None:
    """Save what `parser` (the real one) holds for `check_quickly`, unless it is saved already; a cache that cannot be
    written (a read-only home) is skipped."""
    path = _options_file(prog, config_positional)
    if path.is_file():
        return
    actions = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        converter = getattr(action.type, "__name__", None)
        actions.append(
            {
                "options": action.option_strings,
                "dest": action.dest,
                "nargs": action.nargs,
                "const": action.const if isinstance(action.const, bool | int | float | str) else None,
                "store_false": isinstance(action, argparse._StoreFalseAction),
                "type": converter if converter in _CONVERTERS else "str",  # the rest is the real parser's to judge
                "optional": action.dest in optional,
                "choices": None if action.choices is None else [c if c is None else str(c) for c in action.choices],
            }
        )
    usage = parser.format_usage().removeprefix("usage: ").rstrip("\n")
    with contextlib.suppress(OSError):
        write_json_atomic(path, {"usage": usage, "help": parser.format_help(), "actions": actions})
        for stale in sorted(path.parent.glob("run_options-*.json"), key=os.path.getmtime)[:-_KEEP]:
            stale.unlink()  # saved for sources or versions that are gone


def check_quickly(
    argv: list[str], prog: str, config_positional: bool, default_config: str | os.PathLike | None = None
) -> None:
    """Answer `--help` (exit 0) and refuse a bad option or config value (exit 2, or `ValueError` / `FileNotFoundError`
    naming the file and the field) from the saved options, without importing the dataclasses; do nothing when there
    are none saved for this source and these versions."""
    saved = _read_options(prog, config_positional)
    if saved is None:
        return
    parser = argparse.ArgumentParser(prog=prog, usage=saved["usage"], add_help=False, allow_abbrev=False)
    parser.add_argument("-h", "--help", action=_SavedHelp, nargs=0, help=saved["help"])
    for entry in saved["actions"]:
        if not entry["options"]:  # the positional CONFIG
            parser.add_argument(entry["dest"], nargs=entry["nargs"])
        elif entry["store_false"]:
            parser.add_argument(*entry["options"], dest=entry["dest"], action="store_false")
        else:
            convert = _CONVERTERS.get(entry["type"], str)
            parser.add_argument(
                *entry["options"],
                dest=entry["dest"],
                type=or_none(convert) if entry["optional"] and entry["nargs"] != "+" else convert,
                nargs=entry["nargs"],
                const=entry["const"],
                choices=entry["choices"],
                default=argparse.SUPPRESS,  # nothing is required here: a config file may hold it
            )
    known = parser.parse_args(argv)
    config = getattr(known, "config_file", None) or getattr(known, "config", None) or default_config
    if config is not None:
        optional = {entry["dest"] for entry in saved["actions"] if entry["optional"]}
        config_to_argv(read_config_file(config), parser, str(config), optional)


class _SavedHelp(argparse.Action):
    """`--help` printing the real parser's saved help text (held in `help`)."""

    def __call__(self, parser, namespace, values, option_string=None):
        print(self.help, end="")
        parser.exit()


def _options_file(prog: str, config_positional: bool) -> Path:
    """Where the options of this source, these versions and this terminal width are saved."""
    digest = hashlib.sha256()
    for source in sorted(Path(__file__).parents[1].rglob("*.py")):
        digest.update(source.read_bytes())
    try:
        transformers = version("transformers")
    except PackageNotFoundError:
        transformers = None
    width = shutil.get_terminal_size().columns  # argparse wraps the help text to it
    digest.update(json.dumps([sys.version, transformers, prog, config_positional, width]).encode())
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hf_matta"
    return cache / f"run_options-{digest.hexdigest()[:16]}.json"


def _read_options(prog: str, config_positional: bool) -> dict | None:
    """The saved options, or None when there are none (or they cannot be read)."""
    try:
        return json.loads(_options_file(prog, config_positional).read_text())
    except (OSError, ValueError):
        return None


__all__ = [
    "NONE_TOKENS",
    "check_quickly",
    "config_to_argv",
    "field_actions",
    "or_none",
    "read_config_file",
    "save_options",
]
