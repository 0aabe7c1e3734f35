"""Errors tlshim raises: each says what was found, what would work and what to do."""

import difflib


class TlshimError(Exception):
    """Base class of tlshim's errors."""


class UnsupportedModelError(TlshimError, ValueError):
    pass


class UnsupportedVersionError(TlshimError, RuntimeError):
    pass


class HookNameError(TlshimError, KeyError):
    def __str__(self):  # KeyError would repr() the message
        return str(self.args[0])


class HookOutputError(TlshimError, ValueError):
    """A hook returned something that cannot replace the activation (not a tensor, another dtype or device)."""


class HookShapeError(HookOutputError):
    pass


class ConflictError(TlshimError, RuntimeError):
    pass


def unknown_hook_name(name, valid_names) -> HookNameError:
    close = difflib.get_close_matches(name, list(valid_names), n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return HookNameError(
        f"No hook point named {name!r} on this model.{hint} "
        f"model.hook_dict lists all {len(valid_names)} names."
    )
