"""Dagster configs generated from the libraries' settings dataclasses, so a setting is declared once.

The library dataclass (e.g. :class:`agent.rollout.RolloutConfig`) is the source of truth for a setting's name,
type and help text, as TRL's ``GRPOConfig`` is for its trainer; a stage only says which fields it exposes and
its own defaults. :func:`rollout_settings` builds one nested ``dg.Config`` class per stage (Dagster fills the
fields a YAML file leaves out from the class's defaults, so each stage needs its own class for its own defaults),
and ``.build(**fixed)`` is the single conversion back to the dataclass.
"""

from __future__ import annotations

import dataclasses
import typing

import dagster as dg
from pydantic import Field

from agent.rollout import RolloutConfig

# set by the stage from its own data (the pool, the round, the method), never by a user
STAGE_FIXED = ("simulated", "tools", "seed", "cut_actions")


def _build(self, **fixed):
    """The library dataclass: this config's fields, plus the fields the stage fixes (tools, seed, ...)."""
    values = {name: getattr(self, name) for name in type(self).model_fields}
    clash = sorted(set(values) & set(fixed))
    if clash:
        raise ValueError(f"{type(self).__name__}: {clash} are configured; the stage cannot also fix them")
    return self.__settings_class__(**values, **fixed)


def dataclass_config(settings_class: type, name: str, doc: str, *, exclude: typing.Iterable[str] = (), **defaults):
    """A ``dg.Config`` subclass named ``name`` with one field per field of the dataclass ``settings_class``
    (type and help text taken from it), except ``exclude``; ``defaults`` override the dataclass's defaults."""
    exclude = set(exclude)
    fields = [f for f in dataclasses.fields(settings_class) if f.init and f.name not in exclude]
    unknown = sorted(set(defaults) - {f.name for f in fields})
    if unknown:
        raise ValueError(f"{name}: {unknown} are not fields of {settings_class.__name__} (or are excluded)")
    hints = typing.get_type_hints(settings_class)
    namespace: dict = {"__annotations__": {}, "__doc__": doc, "__module__": __name__}
    for f in fields:
        namespace["__annotations__"][f.name] = hints[f.name]
        namespace[f.name] = Field(defaults.get(f.name, f.default), description=f.metadata.get("help", ""))
    cls = type(name, (dg.Config,), namespace)
    cls.__settings_class__ = settings_class
    cls.build = _build
    return cls


def rollout_settings(name: str, doc: str, *, exclude: typing.Iterable[str] = STAGE_FIXED, **defaults):
    """The rollout settings of one stage (:class:`agent.rollout.RolloutConfig`'s fields and help, this stage's
    defaults); ``.build(seed=..., tools=...)`` gives the ``RolloutConfig``."""
    return dataclass_config(RolloutConfig, name, doc, exclude=exclude, **defaults)
