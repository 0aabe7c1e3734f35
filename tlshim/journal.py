"""The journal: every change tlshim makes to a model, replayed last-in-first-out on uninstall.

Each record can say, before anything changes, whether its undo would meet something else in its place
(``conflict``), so uninstall checks every slot first and changes nothing when one was replaced.
"""

from __future__ import annotations

import weakref

from .errors import ConflictError, TlshimError
from .subclass import patched_class


def _occupied(obj, key) -> str | None:
    """What already holds ``key`` on ``obj`` in a way an instance entry would shadow or be shadowed by."""
    if key in vars(obj):
        return "an attribute"
    for kind, table in (("submodule", "_modules"), ("parameter", "_parameters"), ("buffer", "_buffers")):
        if key in (vars(obj).get(table) or ()):
            return f"a {kind}"
    if hasattr(getattr(type(obj), key, None), "__set__"):
        return f"a {type(obj).__name__} property"
    return None


class WeakObj:
    """Holds ``obj`` weakly, so the journal kept on a model makes no reference cycle through it and the
    model is freed as soon as its last reference goes; copies and pickles carry it as a plain reference."""

    @property
    def obj(self):
        return self._ref()

    @obj.setter
    def obj(self, value):
        self._ref = weakref.ref(value)

    def __getstate__(self):
        state = dict(vars(self))
        state["obj"] = state.pop("_ref")()
        return state

    def __setstate__(self, state):
        state = dict(state)
        obj = state.pop("obj")
        vars(self).update(state)
        self.obj = obj


class DictEntry(WeakObj):
    """A new entry in an object's ``__dict__`` (a hook point, an alias, tlshim's state); undone with del."""

    def __init__(self, obj, key, value, where: str):
        self.obj, self.key, self.value, self.where = obj, key, value, where

    def check(self):
        found = _occupied(self.obj, self.key)
        if found:
            raise ConflictError(
                f"{self.where} already has {found} named {self.key!r}; tlshim will not shadow it "
                "(rename it, or remove it before tlshim.install)"
            )

    def apply(self):
        vars(self.obj)[self.key] = self.value

    def conflict(self) -> str | None:
        if self.obj is None:  # gone with what held it: nothing left to undo
            return None
        found = vars(self.obj).get(self.key, "nothing")
        if found is self.value:
            return None
        return f"{self.where}.{self.key} (now {type(found).__name__}, not tlshim's {type(self.value).__name__})"

    def undo(self):
        if self.conflict():
            raise ConflictError(
                f"{self.where}.{self.key} was changed by something else after tlshim.install; "
                "undo that change first, then uninstall"
            )
        if self.obj is not None:
            del vars(self.obj)[self.key]


class ClassSwap(WeakObj):
    """A per-instance subclass carrying TransformerLens properties; undone by restoring the class."""

    def __init__(self, obj, mixin, spec, where: str):
        self.obj, self.mixin, self.spec, self.where = obj, mixin, spec, where
        self.old_cls = type(obj)

    def check(self):
        names = [name for name in vars(self.mixin) if not name.startswith("_")]
        taken = [(name, found) for name in names if (found := _occupied(self.obj, name)) and found != f"a {self.old_cls.__name__} property"]
        if taken:
            listed = ", ".join(f"{found} {name!r}" for name, found in taken)
            raise ConflictError(f"{self.where} already has {listed}; tlshim's TransformerLens attributes would shadow it")

    def apply(self):
        self.obj.__class__ = patched_class(self.old_cls, self.mixin, self.spec)

    def conflict(self) -> str | None:
        current = type(self.obj)
        if self.obj is None or current.__dict__.get("_tlshim_base") is self.old_cls:
            return None
        return f"the class of {self.where} (now {current.__qualname__}, not tlshim's subclass of {self.old_cls.__qualname__})"

    def undo(self):
        if self.conflict():
            raise ConflictError(
                f"the class of {self.where} was changed to {type(self.obj).__qualname__} after tlshim.install "
                f"(expected tlshim's subclass of {self.old_cls.__qualname__}); undo that first"
            )
        if self.obj is not None:
            self.obj.__class__ = self.old_cls


class Call:
    """A change made by an architecture's own install step, with the function that reverts it."""

    def __init__(self, apply, undo):
        self.apply, self.undo = apply, undo

    def check(self):
        pass

    def conflict(self):
        return None


def apply_all(records):
    """Check every record, then apply them in order; on any failure revert what was applied and re-raise.

    The rollback undoes every applied record even when one undo fails (retried once after the others);
    an undo that still fails is named in the error, with the original failure as its cause.
    """
    for record in records:
        record.check()
    done = []
    try:
        for record in records:
            record.apply()
            done.append(record)
    except BaseException as err:
        left = undo_all(done, retry=True)
        if left:
            raise TlshimError(
                f"tlshim.install failed ({type(err).__name__}: {err}) and its rollback could not undo "
                f"{', '.join(left)}; the model is partly changed there"
            ) from err
        raise
    return done


def undo_all(records, skip=(), retry=False) -> list:
    """Undo ``records`` last first, except those in ``skip``. With ``retry``, an undo that raises does
    not stop the others, is tried once more at the end, and what still failed is returned (by place);
    without it the first failure is raised."""
    failed = []
    for record in reversed(records):
        if record in skip:
            continue
        try:
            record.undo()
        except Exception:
            if not retry:
                raise
            failed.append(record)
    left = []
    for record in failed:
        try:
            record.undo()
        except Exception as err:  # noqa: PERF203
            left.append(f"{getattr(record, 'where', type(record).__name__)} ({err})")
    return left
