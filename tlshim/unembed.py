"""model.unembed: the output embedding as TransformerLens calls it, d_model -> logits.

The alias wraps the model's own module without changing it (HF's forward calls its lm_head as
before). Calling it unembeds as the model's logits do: through the embedding matrix where it is
tied with no lm_head module (OpenELM), then the final soft-cap where the config has one (Gemma2).
Every other attribute (W_U, b_U, weight, ...) is the module's own.
"""

from __future__ import annotations

import torch


class Unembed:
    def __init__(self, module, soft_cap=None):
        vars(self).update(module=module, soft_cap=soft_cap or None)

    def __call__(self, residual):
        module = vars(self)["module"]
        if isinstance(module, torch.nn.Embedding):  # tied, no lm_head: x @ W_E^T
            logits = torch.nn.functional.linear(residual, module.weight)
        else:
            logits = module(residual)
        cap = vars(self)["soft_cap"]
        if cap is not None:  # in the order Gemma2's forward applies it, so the values are the model's
            logits = torch.tanh(logits / cap) * cap
        return logits

    forward = __call__

    def __getattr__(self, name):
        if "module" not in vars(self):  # while unpickling
            raise AttributeError(name)
        return getattr(vars(self)["module"], name)

    def __setattr__(self, name, value):
        setattr(vars(self)["module"], name, value)

    def __repr__(self):
        cap = vars(self)["soft_cap"]
        return f"Unembed({vars(self)['module']!r}{f', soft_cap={cap}' if cap else ''})"


def unembed_alias(model, module):
    return Unembed(module, getattr(getattr(model, "config", None), "final_logit_softcapping", None))
