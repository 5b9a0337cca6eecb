"""Args dataclasses as the single schema of each command: defaults < `--config FILE.yaml` < flags.

A field is declared once with `opt(default, "help text")`; the same text becomes `--help`, the YAML key is the
field name (dashes or underscores), and the flag is `--field-name`. Flags default to "not given", so a flag the
user did not type never overrides the YAML file.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from rlhf_cli.core.errors import ConfigError


def opt(default: Any = None, help: str = "", *, flag: str | None = None, short: str | None = None,
        hidden: bool = False, choices: tuple[str, ...] | None = None, metavar: str | None = None,
        min: float | None = None, max: float | None = None, above: float | None = None,
        below: float | None = None, expect: str | None = None, joins_list: bool = False) -> Any:
    """A documented args field. `choices` restricts a string field; `flag` renames the CLI flag; `metavar` names
    the value in --help. Bounds: `min`/`max` inclusive, `above`/`below` exclusive, checked by `validate` on every
    value that is not None; `expect` words the expected value in the error (else it is worded from the bounds).
    `joins_list`: a comma-list string field that YAML may also give as a list."""
    meta = {"help": help, "flag": flag, "short": short, "hidden": hidden, "choices": choices, "metavar": metavar,
            "bounds": (min, max, above, below), "expect": expect, "joins_list": joins_list}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def base_type(tp: Any) -> type:
    """`int | None` -> int, `str` -> str."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else str
    return tp


def fields_of(cls: type) -> list[tuple[dataclasses.Field, type]]:
    hints = typing.get_type_hints(cls)
    return [(f, base_type(hints[f.name])) for f in dataclasses.fields(cls) if f.init]


def _coerce(value: Any, tp: type, where: str) -> Any:
    if value is None:
        return None
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{where}: expected true or false, found {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ConfigError(f"{where}: expected an integer, found {value!r}")
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{where}: expected an integer, found {value!r}") from None
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, found {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, found {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where}: expected a string, found {value!r}")
        return str(value)
    return value


def load_yaml(path: str | Path) -> dict[str, Any]:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--config {path}: no such file; expected a YAML file of settings")
    raw = p.read_bytes()
    try:
        data = yaml.safe_load(raw.decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x}); expected a UTF-8 YAML file: "
                          f"re-save it as UTF-8") from None
    except yaml.YAMLError as e:
        mark, start = getattr(e, "problem_mark", None), getattr(e, "context_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        context = getattr(e, "context", None)
        if context and start is not None and (mark is None or start.line != mark.line):
            context = f"{context} that starts on line {start.line + 1}"  # where the unclosed [ or { is
        why = "; ".join(str(x) for x in (getattr(e, "problem", None) or e, context) if x)
        raise ConfigError(f"{path}{line}: not valid YAML ({why}); expected `setting: value` lines, for example "
                          f"`lr: 1e-5`") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        fix = "; write one `setting: value` per line, without a leading `- `" if isinstance(data, list) else ""
        raise ConfigError(f"{path}: expected a mapping of setting: value, found {type(data).__name__}{fix}")
    return data


# transformers / TRL names people bring from their own configs
_HF_NAMES = {"learning_rate": "lr", "per_device_train_batch_size": "batch_size", "num_train_epochs": "epochs",
             "gradient_accumulation_steps": "grad_accum", "model_name_or_path": "model", "dataset_name": "data",
             "output_dir": "out", "max_seq_length": "max_length", "warmup_steps": "warmup_ratio"}


def near_key(name: str, known: Iterable[str]) -> str:
    """`; did you mean 'batch_size'?` for a misspelt or transformers-style key, else ""."""
    known = list(known)
    guess = _HF_NAMES.get(name) if _HF_NAMES.get(name) in known else None
    guess = guess or next(iter(difflib.get_close_matches(name, known, n=1, cutoff=0.7)), None)
    return f"; did you mean {guess!r}?" if guess else ""


def resolve(cls: type, config: str | Path | None = None, flags: dict[str, Any] | None = None) -> Any:
    """Build `cls` from its defaults, then the YAML file, then the flags that were given (not None)."""
    known = {f.name: (f, tp) for f, tp in fields_of(cls)}
    values = mapping_values(cls, load_yaml(config), str(config)) if config is not None else {}
    came_from = {name: f"--config {Path(config).name}" for name in values}
    for name, value in (flags or {}).items():
        if value is not None:
            flag = known[name][0].metadata.get("flag") or flag_of(name)
            values[name] = _coerce(value, known[name][1], flag)
            came_from[name] = "flag " + flag
    args = cls(**values)
    validate(args)
    args._origins = came_from  # not a field: --dry-run shows it, nothing else reads it
    return args


def mapping_values(cls: type, mapping: dict[str, Any], where: str) -> dict[str, Any]:
    """The settings of a YAML mapping as `cls` field values: keys checked (unknown -> one error with "did you
    mean"), values coerced to the field types; `where` names the mapping in errors (a file, a recipe section)."""
    known = {f.name: (f, tp) for f, tp in fields_of(cls)}
    values: dict[str, Any] = {}
    for key, value in mapping.items():
        name = str(key).replace("-", "_")
        if name not in known:
            raise ConfigError(f"{where}: unknown key {key!r}; expected one of: {', '.join(sorted(known))}"
                              + near_key(name, known))
        if isinstance(value, list) and known[name][0].metadata.get("joins_list"):
            value = ",".join(str(v) for v in value)
        values[name] = _coerce(value, known[name][1], f"{where}: key {key!r}")
    return values


def origins(args: Any) -> dict[str, str]:
    """Where each value not taken from the defaults came from: "flag --lr", "--config FILE" (from `resolve`),
    "parent stage DIR" (from `note_origin`); None for args that `resolve` did not build."""
    found = getattr(args, "_origins", None)
    return None if found is None else dict(found)


def note_origin(args: Any, name: str, source: str) -> None:
    """Record where a stage took a value it filled in (the parent stage, its own default), for --dry-run."""
    if getattr(args, "_origins", None) is not None:
        args._origins[name] = source


def flag_of(name: str) -> str:
    return "--" + name.replace("_", "-")


def _expected(tp: type, bounds: tuple) -> str:
    lo, hi, above, below = bounds
    if tp is int and lo is not None and hi is None and above is None and below is None:
        return f"a whole number >= {lo}"
    if above == 0 and lo is None and hi is None and below is None:
        return "a positive number"
    if lo is not None and hi is None and above is None and below is None:
        return f"a number >= {lo:g}"
    low = f"{lo:g} <= " if lo is not None else f"{above:g} < " if above is not None else ""
    high = f" <= {hi:g}" if hi is not None else f" < {below:g}" if below is not None else ""
    return f"{low}x{high}"


def _in_bounds(value: float, bounds: tuple) -> bool:
    lo, hi, above, below = bounds
    return ((lo is None or value >= lo) and (hi is None or value <= hi) and (above is None or value > above)
            and (below is None or value < below))


def validate(args: Any) -> None:
    """Every field's declared choices and bounds; the first value out of them is one ConfigError naming its flag.
    Rules that involve several fields stay with the command that has them."""
    for f, tp in fields_of(type(args)):
        value = getattr(args, f.name)
        if value is None:
            continue
        flag = f.metadata.get("flag") or flag_of(f.name)  # a field may be renamed on the command line
        choices = f.metadata.get("choices")
        if choices and value not in choices:
            raise ConfigError(f"{flag}: {value!r} is not one of: {', '.join(choices)}")
        bounds = f.metadata.get("bounds", (None,) * 4)
        if any(b is not None for b in bounds) and not _in_bounds(value, bounds):
            expect = f.metadata.get("expect") or _expected(tp, bounds)
            raise ConfigError(f"{flag} {value}: expected {expect}")


def to_dict(args: Any) -> dict[str, Any]:
    return {f.name: getattr(args, f.name) for f, _ in fields_of(type(args))}


def dump_yaml(args: Any, path: Path, header: str = "") -> None:
    """The settings as YAML for `--config`; under several processes rank 0 writes."""
    import yaml

    from rlhf_cli.core import launch

    if not launch.is_main():
        return

    text = yaml.safe_dump(to_dict(args), sort_keys=False, allow_unicode=True)
    from rlhf_cli.core.files import atomic_write_text

    atomic_write_text(path, header + text)
