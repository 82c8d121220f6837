"""Moderation policies as files: a named, versioned set of categories for one model.

A category scores an item either by prompts (the scaled cosine margin between the item's
embedding and its positive and negative prompt sets, see `scoring`) or by one class of a
trained head (`heads`), and flags it at `threshold`. Files are YAML (`.yaml`, `.yml`) or
JSON, validated strictly: an unknown field is an error, not ignored, because a misspelt
`threshold` silently left at a default would flag the wrong things.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from ..errors import PolicyInvalid

# Names end up in metric labels and URLs: short, plain, and stable.
SLUG = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
SUFFIXES = (".yaml", ".yml", ".json")


class PromptSet(BaseModel):
    model_config = ConfigDict(extra="forbid")

    positive: list[str] = Field(min_length=1)
    negative: list[str] = Field(default_factory=list)
    templates: list[str] = Field(default_factory=lambda: ["{}"], min_length=1)

    @field_validator("positive", "negative")
    @classmethod
    def _non_empty(cls, v: list[str]) -> list[str]:
        if any(not p.strip() for p in v):
            raise ValueError("prompts must not be empty")
        return v

    @field_validator("templates")
    @classmethod
    def _one_slot(cls, v: list[str]) -> list[str]:
        for t in v:
            if t.count("{}") != 1:
                raise ValueError(f"template {t!r} must contain exactly one '{{}}'")
        return v


class HeadRef(BaseModel):
    """One class of a head file; `path` is relative to the policy file's folder."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    path: str = Field(min_length=1)
    class_: str = Field(alias="class", min_length=1)


class Category(BaseModel):
    model_config = ConfigDict(extra="forbid")

    threshold: float
    prompts: PromptSet | None = None
    head: HeadRef | None = None
    description: str = ""
    # Written by clip-calibrate: target, achieved precision/recall/FPR, data, date.
    calibration: dict[str, Any] | None = None

    @field_validator("threshold")
    @classmethod
    def _finite(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError("threshold must be a finite number")
        return v

    @model_validator(mode="after")
    def _one_scorer(self) -> Category:
        if (self.prompts is None) == (self.head is None):
            raise ValueError("a category needs exactly one of 'prompts' or 'head'")
        return self

    @property
    def kind(self) -> str:
        """"prompts" or "head"."""
        return "prompts" if self.prompts is not None else "head"


class Policy(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=SLUG)
    version: int = Field(ge=1)
    model: str = Field(min_length=1)  # the served model's name
    description: str = ""
    categories: dict[str, Category] = Field(min_length=1)
    # The file it was read from: head paths are relative to its folder.
    _source: Path | None = PrivateAttr(default=None)

    @field_validator("categories")
    @classmethod
    def _slug_names(cls, v: dict[str, Category]) -> dict[str, Category]:
        for name in v:
            if not re.match(SLUG, name):
                raise ValueError(f"category name {name!r} must match {SLUG}")
        return v

    @property
    def source(self) -> Path | None:
        return self._source

    def head_path(self, ref: HeadRef) -> Path:
        """The head file `ref` names: absolute, or relative to the policy's folder (the
        working directory for a policy built in code)."""
        p = Path(ref.path)
        if p.is_absolute() or self._source is None:
            return p
        return self._source.parent / p


def _field(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(p) for p in loc) or "(policy)"


def parse_policy(data: Any, path: str | Path) -> Policy:
    """A policy from already-parsed data; PolicyInvalid names `path` and the field."""
    if not isinstance(data, dict):
        raise PolicyInvalid(path, "(policy)", "the file must hold a mapping of fields")
    try:
        policy = Policy.model_validate(data)
    except ValidationError as e:
        errs = e.errors()
        first = errs[0]
        more = f" (and {len(errs) - 1} more)" if len(errs) > 1 else ""
        raise PolicyInvalid(path, _field(first["loc"]), f"{first['msg']}{more}") from None
    policy._source = Path(path)
    return policy


def load_policy(path: str | Path) -> Policy:
    """Reads one policy file (YAML or JSON, by suffix)."""
    path = Path(path)
    if path.suffix.lower() not in SUFFIXES:
        raise PolicyInvalid(path, "(file)", f"not a policy file; use one of {', '.join(SUFFIXES)}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise PolicyInvalid(path, "(file)", f"cannot be read: {e}") from None
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise PolicyInvalid(path, "(file)", f"does not parse: {e}") from None
    return parse_policy(data, path)


def load_policies(directory: str | Path) -> dict[str, Policy]:
    """Every policy file in `directory` (not its sub-folders), by policy name; two files
    with the same name are refused, since a request names a policy by name alone."""
    directory = Path(directory)
    if not directory.is_dir():
        raise PolicyInvalid(directory, "(file)", "is not a directory of policy files")
    policies: dict[str, Policy] = {}
    for path in sorted(p for p in directory.iterdir()
                       if p.is_file() and p.suffix.lower() in SUFFIXES):
        policy = load_policy(path)
        if policy.name in policies:
            raise PolicyInvalid(path, "name", f"policy {policy.name!r} is already defined "
                                f"in {policies[policy.name].source}")
        policies[policy.name] = policy
    return policies


def policy_dict(policy: Policy) -> dict[str, Any]:
    """The policy as a file holds it: aliases (`class`), defaults left out."""
    return policy.model_dump(mode="json", by_alias=True, exclude_defaults=True)


def dump_policy(policy: Policy, path: str | Path) -> None:
    """Writes `policy` as YAML (JSON for a `.json` path), in the field order of the model."""
    path = Path(path)
    data = policy_dict(policy)
    # `version`, `name`, `model` are required and so never left out as defaults.
    if path.suffix.lower() == ".json":
        path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    else:
        path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True),
                        encoding="utf-8")
