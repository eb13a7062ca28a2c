"""Prompt templates: `str.format` syntax with named `{field}` placeholders, `{{`/`}}` for braces."""

from __future__ import annotations

import string
from collections.abc import Mapping
from typing import Any


class TemplateError(ValueError):
    pass


class Template:
    """A template filled from one row's fields; only plain field names are allowed."""

    def __init__(self, text: str) -> None:
        self.text = text
        try:
            parsed = list(string.Formatter().parse(text))
        except ValueError as exc:
            raise TemplateError(f"not a valid template: {exc}") from None
        self.fields: list[str] = []
        # Placeholders in order, repeats included, and the fixed text's length around them.
        self.slots: list[str] = [name for _, name, _, _ in parsed if name is not None]
        self.fixed_chars = sum(len(literal) for literal, _, _, _ in parsed)
        for _literal, name, spec, conversion in parsed:
            if name is None:
                continue
            if not name.isidentifier():
                raise TemplateError(
                    f"placeholder '{{{name}}}' must name a field, like {{text}}"
                    " (write {{ and }} for literal braces)"
                )
            if spec or conversion:
                raise TemplateError(f"placeholder '{{{name}}}' may not carry a format spec")
            if name not in self.fields:
                self.fields.append(name)
        if not self.fields:
            raise TemplateError("the template names no field, e.g. {text}")

    def missing(self, row: Mapping[str, Any]) -> list[str]:
        return [name for name in self.fields if name not in row]

    def rendered_length(self, row: Mapping[str, Any]) -> int:
        """How long the row's prompt would be, known without making it (a long template that
        repeats a big field could otherwise fill memory before any length check)."""
        return self.fixed_chars + sum(len(_text(row[name])) for name in self.slots)

    def render(self, row: Mapping[str, Any]) -> str:
        return self.text.format_map({name: _text(row[name]) for name in self.fields})


def _text(value: Any) -> str:
    return "" if value is None else str(value)
