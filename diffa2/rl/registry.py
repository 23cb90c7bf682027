"""Name registries for RL objectives, in the shape of verl's `register_policy_loss` / `get_policy_loss_fn`.

A `Registry` maps names to values. Registering a name again with an equal value is a no-op (importing a module
twice must not fail); binding it to a different value raises, and looking up an unknown name raises a
`ValueError` that lists the valid names. A name may carry a provenance note (`note(name)`), e.g. `RECONSTRUCTED`
for an objective rebuilt from a paper's abstract; `describe(names)` lists names with their notes for `--help`.

A `FunctionRegistry` holds `RegisteredFn` entries: a function together with its typed config dataclass. Calling an
entry fills in the config's defaults (the reference implementations' values) when no config is given and rejects
a config of the wrong type, so a trainer resolves an objective by name in one line::

    loss_mat, metrics = get_policy_loss("dapo")(log_prob, old_log_prob, advantages, response_mask)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])


def reconstructed(source: str) -> str:
    """The provenance note of an objective rebuilt from the abstract of `source` (no equation or code was read)."""
    return f"reconstructed from the abstract of {source}: not the paper's equation, defaults guessed"


class Registry(Generic[T]):
    """Names to values with duplicate detection; `kind` names the registry in error messages."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}
        self._notes: dict[str, str] = {}

    def add(self, name: str, value: T, *, note: str = "") -> None:
        """Bind `name` to `value` with a provenance `note`; re-binding it to another value or note: ValueError."""
        if name in self._items and self._items[name] != value:
            raise ValueError(f"{self.kind} {name!r} is already registered to {self._items[name]!r}")
        if name in self._items and self._notes.get(name, "") != note:
            raise ValueError(f"{self.kind} {name!r} is already registered with the note {self.note(name)!r}")
        self._items[name] = value
        if note:
            self._notes[name] = note

    def get(self, name: str) -> T:
        """The value bound to `name`; an unknown name raises `ValueError` listing the valid ones."""
        if name not in self._items:
            raise ValueError(f"unknown {self.kind} {name!r}; valid names: {', '.join(self.names())}")
        return self._items[name]

    def names(self) -> tuple[str, ...]:
        """The registered names, sorted."""
        return tuple(sorted(self._items))

    def note(self, name: str) -> str:
        """The provenance note of `name`: '' when it follows its source's code or README (unknown name: ValueError)."""
        self.get(name)
        return self._notes.get(name, "")

    def describe(self, names: Iterable[str] | None = None) -> str:
        """`names` (default: all) comma-separated, each followed by its provenance note in brackets when it has one."""
        chosen = self.names() if names is None else tuple(names)
        return ", ".join(f"{name} [{self.note(name)}]" if self.note(name) else name for name in chosen)


@dataclass(frozen=True)
class RegisteredFn:
    """A registered function and its config dataclass (`None` for functions without hyper-parameters)."""

    name: str
    fn: Callable[..., Any]
    config_cls: type | None

    def default_config(self, **overrides: Any) -> Any:
        """The config with the reference defaults, updated by `overrides`."""
        if self.config_cls is None:
            raise TypeError(f"{self.name!r} takes no config")
        return self.config_cls(**overrides)

    def __call__(self, *args: Any, config: Any = None, **kwargs: Any) -> Any:
        """Call the function, passing `config` (default: `default_config()`) as a keyword argument."""
        if self.config_cls is None:
            if config is not None:
                raise TypeError(f"{self.name!r} takes no config")
            return self.fn(*args, **kwargs)
        config = self.config_cls() if config is None else config
        if not isinstance(config, self.config_cls):
            raise TypeError(f"{self.name!r} needs a {self.config_cls.__name__}, got {type(config).__name__}")
        return self.fn(*args, config=config, **kwargs)


class FunctionRegistry(Registry[RegisteredFn]):
    """A registry of functions with a written, uniform signature (documented where the registry is defined)."""

    def register(self, name: str, config_cls: type | None = None, *, note: str = "") -> Callable[[F], F]:
        """Decorator registering a function under `name` with its config class (and provenance `note`)."""

        def decorate(fn: F) -> F:
            self.add(name, RegisteredFn(name, fn, config_cls), note=note)
            return fn

        return decorate
