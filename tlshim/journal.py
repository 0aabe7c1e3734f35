"""The journal: every change tlshim makes to a model, replayed last-in-first-out on uninstall."""

from __future__ import annotations

from .errors import ConflictError
from .subclass import patched_class


class DictEntry:
    """A new entry in an object's ``__dict__`` (a hook point, an alias, tlshim's state); undone with del."""

    def __init__(self, obj, key, value, where: str):
        self.obj, self.key, self.value, self.where = obj, key, value, where

    def check(self):
        if self.key in vars(self.obj):
            raise ConflictError(f"{self.where} already has an attribute {self.key!r}; tlshim will not shadow it")

    def apply(self):
        vars(self.obj)[self.key] = self.value

    def undo(self):
        entries = vars(self.obj)
        if entries.get(self.key) is not self.value:
            raise ConflictError(
                f"{self.where}.{self.key} was changed by something else after tlshim.install; "
                "undo that change first, then uninstall"
            )
        del entries[self.key]


class ClassSwap:
    """A per-instance subclass carrying TransformerLens properties; undone by restoring the class."""

    def __init__(self, obj, mixin, spec, where: str):
        self.obj, self.mixin, self.spec, self.where = obj, mixin, spec, where
        self.old_cls = type(obj)

    def check(self):
        pass

    def apply(self):
        self.obj.__class__ = patched_class(self.old_cls, self.mixin, self.spec)

    def undo(self):
        current = type(self.obj)
        if current.__dict__.get("_tlshim_base") is not self.old_cls:
            raise ConflictError(
                f"the class of {self.where} was changed to {current.__qualname__} after tlshim.install "
                f"(expected tlshim's subclass of {self.old_cls.__qualname__}); undo that first"
            )
        self.obj.__class__ = self.old_cls


class Call:
    """A change made by an architecture's own install step, with the function that reverts it."""

    def __init__(self, apply, undo):
        self.apply, self.undo = apply, undo

    def check(self):
        pass


def apply_all(records):
    """Check every record, then apply them in order; on any failure revert what was applied and re-raise."""
    for record in records:
        record.check()
    done = []
    try:
        for record in records:
            record.apply()
            done.append(record)
    except BaseException:
        for record in reversed(done):
            record.undo()
        raise
    return done


def undo_all(records):
    for record in reversed(records):
        record.undo()
