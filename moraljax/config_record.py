"""What a workdir records of its config, and the check that a rerun matches it.

A run writes its validated config to `<workdir>/config.json` (a suite its
suite.json, a sweep its plan); running again in the same workdir resumes
only with the same config. Fields added to the config since a workdir was
written count as equal there when the new config holds them at their
defaults (the behaviour the old run had).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

from moraljax import config_lib


def resolved_config(cfg: config_lib.ExperimentConfig) -> dict[str, Any]:
    """The validated config as plain JSON-able data (written to config.json).

    `conditions` is left out when empty (one condition, from reward and
    opponent), and `population` without a composition, so such workdirs read
    the same as before they existed.
    """
    resolved = json.loads(json.dumps(dataclasses.asdict(cfg), default=str))
    if not resolved["conditions"]:
        del resolved["conditions"]
    if not resolved["population"]["composition"]:
        del resolved["population"]
    return resolved


def config_defaults(cfg: Any) -> dict[str, Any]:
    """The default of every config field that has one, nested like `resolved_config`."""
    defaults = {}
    for field in dataclasses.fields(cfg):
        value = getattr(cfg, field.name)
        if dataclasses.is_dataclass(value):
            defaults[field.name] = config_defaults(value)
        elif field.default is not dataclasses.MISSING:
            defaults[field.name] = json.loads(json.dumps(field.default, default=str))
        elif field.default_factory is not dataclasses.MISSING:
            defaults[field.name] = json.loads(json.dumps(field.default_factory(), default=str))
    return defaults


def _with_new_defaults(existing: Any, resolved: Any, defaults: Any) -> Any:
    """`existing` plus every field it lacks that `resolved` holds at its default value.

    A field added to the config after a workdir was written (at its default,
    which is the behaviour the workdir's run had) does not make the workdir
    "another config".
    """
    if not (isinstance(existing, dict) and isinstance(resolved, dict) and isinstance(defaults, dict)):
        return existing
    filled = dict(existing)
    for key, value in resolved.items():
        if key not in existing:
            if key in defaults and defaults[key] == value:
                filled[key] = value
        else:
            filled[key] = _with_new_defaults(existing[key], value, defaults.get(key))
    return filled


def check_workdir(workdir: pathlib.Path, resolved: dict[str, Any], *, filename: str = "config.json",
                  holder: str = "a run", defaults: dict[str, Any] | None = None) -> None:
    """Refuses a workdir whose `filename` records another config.

    Fields missing from the recorded config count as equal when the new
    config holds them at their `defaults` (fields added since the workdir was
    written); the file is then rewritten with them by the run.

    Used for a run's config.json, a suite's suite.json and a sweep's plan.

    Raises:
        ValueError: naming the first differing fields, before anything is
            loaded, compiled or written.
    """
    existing_path = workdir / filename
    if not existing_path.is_file():
        return
    try:
        existing = json.loads(existing_path.read_text())
    except (ValueError, OSError) as error:
        raise ValueError(
            f"{existing_path} cannot be read ({error}); expected the JSON that {holder} writes there."
            f" Nothing was changed: if this workdir is yours and {holder} of this config, delete"
            f" {existing_path.name} to resume it, or use another --workdir.") from None
    existing = _with_new_defaults(existing, resolved, defaults or {})
    if existing == resolved:
        return

    def diff(a, b, prefix=""):
        keys = sorted(set(a) | set(b)) if isinstance(a, dict) and isinstance(b, dict) else None
        if keys is None:
            return [] if a == b else [f"{prefix[:-1]}: {a!r} there, {b!r} now"]
        return [d for k in keys for d in diff(a.get(k), b.get(k), f"{prefix}{k}.")]

    changes = diff(existing, resolved)
    raise ValueError(
        f"workdir {workdir} holds {holder} with a different config ({'; '.join(changes[:5])});"
        " nothing was changed. Use another --workdir, or the same config to resume."
    )
