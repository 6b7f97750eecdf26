"""A name -> class registry filled by a class decorator: methods, AP's samplers and the surrogates use one."""

from __future__ import annotations

from typing import Callable

from attnprune.errors import UserError


class Registry:
    """Classes by name, in registration order; an unknown name is refused with the choices."""

    def __init__(self, kind: str):
        self.kind = kind
        self.classes: dict[str, type] = {}

    def register(self, name: str) -> Callable[[type], type]:
        """Class decorator: make the class available as ``name`` (also set as its ``name`` attribute)."""

        def deco(cls):
            cls.name = name
            self.classes[name] = cls
            return cls

        return deco

    def names(self) -> list[str]:
        """Registered names, in registration order."""
        return list(self.classes)

    def __getitem__(self, name: str) -> type:
        if name not in self.classes:
            raise UserError(f"Unknown {self.kind} '{name}'; choose from {', '.join(self.classes)}.")
        return self.classes[name]

    def __contains__(self, name: str) -> bool:
        return name in self.classes
