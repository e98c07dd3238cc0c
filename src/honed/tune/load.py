"""Loading the recipe to tune: the recipe itself, and its optional `tune: {space: ...}` section."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from ..errors import RecipeError
from ..recipe import Recipe, apply_overrides, load_recipe, read_yaml, resolve_paths, validation_message


def load_base(source, overrides: list[str] | None = None) -> tuple[Recipe, Any]:
    """The recipe without its `tune` section, and that section's `space` (or None)."""
    overrides = list(overrides or [])
    if isinstance(source, Recipe):
        recipe = load_recipe(source, overrides)
        return _split_tune(recipe)
    if "tune" in Recipe.model_fields:  # the recipe schema knows the section
        return _split_tune(load_recipe(source, overrides))
    if isinstance(source, dict):
        raw, base = copy.deepcopy(source), Path(".").resolve()
    else:
        path = Path(source).expanduser()
        raw, base = read_yaml(path), path.resolve().parent
    section = raw.pop("tune", None)
    if section is not None and (not isinstance(section, dict) or set(section) - {"space"}):
        raise RecipeError(f"tune: should be a section with one key, space; got {section!r}")
    raw = apply_overrides(raw, overrides)
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as exc:
        raise RecipeError(validation_message(exc)) from None
    return resolve_paths(recipe, base), (section or {}).get("space")


def _split_tune(recipe: Recipe) -> tuple[Recipe, Any]:
    section = getattr(recipe, "tune", None)
    if section is None:
        return recipe, None
    space = section.get("space") if isinstance(section, dict) else getattr(section, "space", None)
    if hasattr(space, "items"):
        space = {k: (v.model_dump(exclude_unset=True) if hasattr(v, "model_dump") else v) for k, v in space.items()}
    return recipe, space
