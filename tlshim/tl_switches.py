"""TransformerLens's four switches: ``set_use_attn_result``, ``set_use_split_qkv_input``, ``set_use_attn_in``,
``set_use_hook_mlp_in``, and which hook names each one gates.

The hooks are served lazily whatever the switches say (nothing is computed until something is hooked); the
switches decide what a TransformerLens user sees, as TransformerBridge 4.3 does: adding a hook by name to a
switched-off input hook raises naming the switch, a filter skips those names, and ``run_with_cache``'s
default set follows them. ``hook_result`` stays hookable by name or filter with the switch off (as
tlshim always served it); ``use_attn_result`` adds it to ``run_with_cache``'s default set.
"""

from __future__ import annotations

import contextlib
import re

#: switch -> the hook-name endings it gates
GATED = {
    "use_split_qkv_input": ("hook_q_input", "hook_k_input", "hook_v_input"),
    "use_attn_in": ("hook_attn_in",),
    "use_hook_mlp_in": ("hook_mlp_in",),
}
_ENDINGS = tuple(ending for endings in GATED.values() for ending in endings)
_ATTN_ALIAS = re.compile(r"^(blocks\.\d+)\.attn\.(hook_attn_in|hook_[qkv]_input)$")


def canonical(name: str) -> str:
    """TransformerBridge's ``blocks.i.attn.hook_q_input`` (and attn_in, k/v input) is ``blocks.i.hook_q_input``."""
    return _ATTN_ALIAS.sub(r"\1.\2", name) if name.endswith(_ENDINGS) else name


def gated_by(cfg, name: str) -> str | None:
    """The switch that is off and gates ``name``, or None."""
    if not name.endswith(_ENDINGS):  # most names: one check (run_with_cache asks for every name)
        return None
    for switch, endings in GATED.items():
        if name.endswith(endings) and not getattr(cfg, switch, False):
            return switch
    return None


def switched_off(cfg) -> tuple:
    """The hook-name endings whose switch is off (for ``str.endswith``)."""
    return tuple(ending for switch, endings in GATED.items() if not getattr(cfg, switch, False) for ending in endings)


def check_named(cfg, name: str):
    """A hook added by name to a switched-off hook would never fire in TransformerLens: say which switch."""
    switch = gated_by(cfg, name)
    if switch is not None:
        raise ValueError(f"Cannot add hook {name} because {switch} is False. Call model.set_{switch}(True) first.")


def default_cache_filter(cfg):
    """run_with_cache's default names: every served name, hook_result only with use_attn_result."""
    return lambda name: cfg.use_attn_result or not name.endswith(".hook_result")


@contextlib.contextmanager
def all_switched_on(cfg):
    """Every switch on for a block (attn_in and split q/k/v together, which the setters refuse), then as before:
    for checks that want every name to fire."""
    switches = ("use_attn_result", *GATED)
    before = {name: getattr(cfg, name) for name in switches}
    vars(cfg).update(dict.fromkeys(switches, True))
    try:
        yield cfg
    finally:
        vars(cfg).update(before)


class SwitchAPI:
    """The set_use_* methods of TransformerLens (mixed into ModelAPI)."""

    def set_use_attn_result(self, use_attn_result: bool):
        """With it on, run_with_cache keeps blocks.i.attn.hook_result by default (it is hookable either way)."""
        self.cfg.use_attn_result = bool(use_attn_result)

    def set_use_split_qkv_input(self, use_split_qkv_input: bool):
        """Per-head copies of the residual for q, k and v: blocks.i.hook_q_input / hook_k_input / hook_v_input."""
        _set_exclusive(self.cfg, "use_split_qkv_input", use_split_qkv_input, "use_attn_in")

    def set_use_attn_in(self, use_attn_in: bool):
        """One per-head copy of the residual feeding q, k and v: blocks.i.hook_attn_in."""
        _set_exclusive(self.cfg, "use_attn_in", use_attn_in, "use_split_qkv_input")

    def set_use_hook_mlp_in(self, use_hook_mlp_in: bool):
        """blocks.i.hook_mlp_in: a copy of the residual entering the MLP's norm."""
        self.cfg.use_hook_mlp_in = bool(use_hook_mlp_in)


def _set_exclusive(cfg, switch, value, other):
    """The two forks exclude each other, as in TransformerBridge."""
    if value and getattr(cfg, other):
        raise ValueError(f"{switch} and {other} are mutually exclusive. Call set_{other}(False) before enabling {switch}.")
    setattr(cfg, switch, bool(value))
