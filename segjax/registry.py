"""Name -> constructor registries (models, datasets, tasks, preprocessing ops, losses,
converters).

Configs refer to components by name; a registry turns that name into code and,
for a name it does not know, says which names it does know.
"""
from typing import Callable, Dict, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
  """A named table of constructors with a clear error for unknown names."""

  def __init__(self, kind: str):
    self.kind = kind
    self._entries: Dict[str, T] = {}

  def register(self, name: str) -> Callable[[T], T]:
    def decorator(obj: T) -> T:
      if name in self._entries:
        raise ValueError(f"{self.kind} {name!r} is registered twice.")
      self._entries[name] = obj
      return obj
    return decorator

  def get(self, name: str) -> T:
    if name not in self._entries:
      known = ", ".join(sorted(self._entries)) or "none"
      raise KeyError(f"Unknown {self.kind} {name!r}; known {self.kind}s: {known}.")
    return self._entries[name]

  def __contains__(self, name: str) -> bool:
    return name in self._entries

  def names(self):
    return sorted(self._entries)
