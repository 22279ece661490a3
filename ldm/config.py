"""The one loader that turns YAML files + overrides into a validated config (schemas: ldm.schema).

A config is ``OmegaConf.merge(structured(Config), *yaml_files, dotlist_overrides)``. The schema is
strict: an unknown key, a value of the wrong type or a value outside a key's choices fails at load
time with a one-line :class:`ConfigError` that names the key and the fix (the closest valid keys,
the expected type or the valid choices).

The schemas themselves are in :mod:`ldm.schema`; every field carries a ``help`` text, and
``python -m ldm.config --markdown`` renders the reference table that the README embeds (a test
checks the README is current; ``--update-readme`` rewrites it in place).
"""

from __future__ import annotations

import difflib
import sys
from collections.abc import Iterator, Sequence
from dataclasses import MISSING, dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from ldm.ranges import out_of_range
from ldm.schema import Config


class ConfigError(ValueError):
    """A config problem, with a one-line message that names the key and the fix."""


# ---------------------------------------------------------------------------------------------
# Schema introspection
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyInfo:
    """One leaf key of the schema."""

    key: str
    type: str
    default: Any
    help: str
    choices: tuple[str, ...] | None


def _type_name(tp: Any) -> str:
    name = tp if isinstance(tp, str) else getattr(tp, "__name__", str(tp))
    return str(name).replace("typing.", "")


def iter_keys(schema: type = Config, prefix: str = "") -> Iterator[KeyInfo]:
    """Yield every leaf key of a schema with its type, default, help and choices."""
    for f in fields(schema):
        key = f"{prefix}{f.name}"
        default = f.default_factory() if f.default is MISSING else f.default  # type: ignore[misc]
        if is_dataclass(default):
            yield from iter_keys(type(default), key + ".")
            continue
        yield KeyInfo(
            key, _type_name(f.type), default, f.metadata.get("help", ""), f.metadata.get("choices")
        )


def all_keys(schema: type = Config) -> list[str]:
    """All dotted leaf and section keys of a schema."""
    keys: list[str] = []
    for info in iter_keys(schema):
        parts = info.key.split(".")
        keys.extend(".".join(parts[: i + 1]) for i in range(len(parts) - 1))
        keys.append(info.key)
    return sorted(set(keys))


def closest_keys(key: str, n: int = 3) -> list[str]:
    """The valid keys closest to a (misspelt) dotted key, best first."""
    valid = all_keys()
    parent, _, leaf = key.rpartition(".")
    siblings = [k for k in valid if k.rpartition(".")[0] == parent]
    by_leaf = difflib.get_close_matches(
        leaf, [k.rpartition(".")[2] for k in siblings], n=n, cutoff=0.5
    )
    matches = [f"{parent}.{m}" if parent else m for m in by_leaf]
    leaves = [info.key for info in iter_keys()]
    for m in difflib.get_close_matches(key, leaves, n=n, cutoff=0.6):
        if m not in matches:
            matches.append(m)
    return matches[:n]


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def _full_key(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None) or getattr(err, "key", None) or "?"
    return str(key)


def _explain(err: OmegaConfBaseException, source: str) -> ConfigError:
    key = _full_key(err)
    if isinstance(err, ConfigKeyError) or "not in" in str(err):
        hint = closest_keys(key)
        did_you_mean = f"; did you mean {' or '.join(hint)}?" if hint else ""
        return ConfigError(f"unknown config key '{key}' in {source}{did_you_mean}")
    if isinstance(err, ValidationError):
        value = getattr(err, "value", None)
        expected = "?"
        for info in iter_keys():
            if info.key == key:
                expected = info.type
        shown = f"'{value}' ({type(value).__name__})" if value is not None else "this value"
        return ConfigError(f"config key '{key}' in {source} got {shown}; expected {expected}")
    first_line = str(err).splitlines()[0] if str(err) else type(err).__name__
    return ConfigError(f"config error at '{key}' in {source}: {first_line}")


def _check_choices(cfg: DictConfig) -> None:
    for info in iter_keys():
        if not info.choices:
            continue
        value = OmegaConf.select(cfg, info.key)
        if value is not None and value not in info.choices:
            close = difflib.get_close_matches(str(value), info.choices, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(
                f"config key '{info.key}' got '{value}'; valid choices: "
                f"{', '.join(info.choices)}{hint}"
            )


def _validate_structure(node: Any, schema: type, source: str, prefix: str = "") -> None:
    """Reject unknown keys with the closest valid ones (before OmegaConf's own messages)."""
    if not isinstance(node, DictConfig):
        return
    known = {f.name: f for f in fields(schema)}
    for key in node.keys():
        full = f"{prefix}{key}"
        if key not in known:
            hint = closest_keys(full)
            did_you_mean = f"; did you mean {' or '.join(hint)}?" if hint else ""
            raise ConfigError(f"unknown config key '{full}' in {source}{did_you_mean}")
        f = known[key]
        default = f.default_factory() if f.default is MISSING else f.default  # type: ignore[misc]
        if is_dataclass(default):
            child = node._get_node(key)  # keep interpolations unresolved
            _validate_structure(child, type(default), source, full + ".")


_LIST_KEYS = {info.key for info in iter_keys() if info.type.startswith("list")}


def _listify(item: str) -> str:
    """``key=value`` for a list-typed key with a bare value becomes ``key=['value']``."""
    if "=" not in item:
        raise ConfigError(f"override '{item}' is not of the form key=value")
    key, value = item.split("=", 1)
    if key in _LIST_KEYS and value and not value.lstrip().startswith("["):
        return f"{key}=['{value}']"
    return item


def load(
    files: Sequence[str | Path] = (),
    overrides: Sequence[str] = (),
    base: Any | None = None,
    consistency: bool = True,
) -> DictConfig:
    """Load a config: schema defaults, then each YAML file in order, then dotlist overrides.

    Args:
        files: YAML files merged left to right.
        overrides: ``key=value`` strings (OmegaConf dotlist), applied last. A leading ``--`` (the
            wandb agent's style, ``--optim.lr=1e-4``) is accepted.
        base: An optional config (e.g. one read from a checkpoint) merged before the files.

    Returns:
        The merged, validated, read-only-in-spirit ``DictConfig``.

    Raises:
        ConfigError: With a one-line message for a missing file, an unknown key, a wrong type,
            a value outside a key's choices, or sections that contradict each other
            (:mod:`ldm.consistency`).
    """
    cfg = OmegaConf.structured(Config)
    sources: list[tuple[Any, str]] = []
    if base is not None:
        sources.append((OmegaConf.create(base), "the checkpoint config"))
    for path in files:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            sources.append((OmegaConf.load(path), str(path)))
        except Exception as e:  # YAML syntax errors carry multi-line messages
            raise ConfigError(f"cannot parse {path}: {str(e).splitlines()[0]}") from e
    dotlist = [_listify(o[2:] if o.startswith("--") else o) for o in overrides]
    if dotlist:
        try:
            sources.append((OmegaConf.from_dotlist(dotlist), "command-line overrides"))
        except Exception as e:  # YAML parse errors of values are not OmegaConf exceptions
            raise ConfigError(
                f"cannot parse overrides {' '.join(dotlist)}: {str(e).splitlines()[0]} "
                "(quote list items that contain braces or commas: key=['a{0..9}.tar'])"
            ) from None
    for node, source in sources:
        if isinstance(node, ListConfig):
            raise ConfigError(f"{source} must be a mapping of config sections, not a list")
        _validate_structure(node, Config, source)
        try:
            cfg = OmegaConf.merge(cfg, node)
        except OmegaConfBaseException as e:
            raise _explain(e, source) from None
    _check_choices(cfg)
    problem = out_of_range(cfg)
    if problem:
        raise ConfigError(problem)
    from ldm.consistency import check_consistency  # it imports ConfigError from here

    if consistency:  # off only where a section is known to be unused (an SDXL folder's encoder)
        check_consistency(cfg)
    return cfg


def to_yaml(cfg: DictConfig) -> str:
    """The resolved config as YAML text."""
    return OmegaConf.to_yaml(cfg, resolve=True)


def to_container(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as plain Python containers."""
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def markdown_reference() -> str:
    """The config reference as a Markdown table (embedded in the README)."""
    lines = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    for info in iter_keys():
        default = "null" if info.default is None else repr(info.default).replace("'", "")
        meaning = info.help
        if info.choices:
            meaning += f" One of: {', '.join(f'`{c}`' for c in info.choices)}."
        meaning = meaning.replace("|", "\\|")
        kind = info.type.replace(" | ", " or ")  # a bare | would split the table's columns
        default = default.replace("|", "\\|")
        lines.append(f"| `{info.key}` | {kind} | `{default}` | {meaning} |")
    return "\n".join(lines) + "\n"


README_MARKERS = ("<!-- config-reference:begin -->", "<!-- config-reference:end -->")


def update_readme(path: str = "README.md") -> None:
    """Replace the README's config reference (between :data:`README_MARKERS`) with the current."""
    begin, end = README_MARKERS
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if begin not in text or end not in text:
        raise SystemExit(f"{path} lacks the config reference markers {begin} / {end}")
    head, rest = text.split(begin, 1)
    tail = rest.split(end, 1)[1]
    with open(path, "w", encoding="utf-8") as f:
        f.write(f"{head}{begin}\n{markdown_reference()}{end}{tail}")


if __name__ == "__main__":
    if "--update-readme" in sys.argv[1:]:
        update_readme()
    elif "--markdown" in sys.argv[1:]:
        sys.stdout.write(markdown_reference())
    else:
        sys.stdout.write(to_yaml(load()))
