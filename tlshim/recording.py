"""record_generation: the activations of every position ``generate`` runs, one tensor per name.

With a KV cache each step of ``generate`` runs only the new positions, so a hook sees a prompt-sized
tensor first and then one position per step; this module joins those pieces back into one tensor per
name over the whole sequence, the shape ``run_with_cache`` would give.
"""

from __future__ import annotations

import contextlib

import torch

from .api import default_filter
from .install import hf_model

_ATTN = ("hook_attn_scores", "hook_pattern")


class GenerationRecord:
    """What ``record_generation`` yields: ``record[name]`` is one tensor over all processed positions.

    Indexing joins the steps recorded so far; ``steps[name]`` holds the per-step tensors as the hooks saw them.
    """

    def __init__(self, names):
        self.names = list(names)
        self.steps: dict = {name: [] for name in self.names}

    def __getitem__(self, name):
        steps = self.steps[name]
        if not steps:
            raise KeyError(f"{name} recorded nothing: was generate run inside the record_generation block?")
        return join_steps(name, steps)

    def __contains__(self, name):
        return name in self.steps

    def __iter__(self):
        return iter(self.names)

    def keys(self):
        return list(self.names)

    def items(self):
        return [(name, self[name]) for name in self.names]

    def __repr__(self):
        return f"GenerationRecord({len(self.names)} names, {max(map(len, self.steps.values()), default=0)} steps)"


def join_steps(name, steps):
    """One tensor over positions 0 .. prompt + steps - 1 from the tensors of successive forward steps.

    Step t (0 = the prompt) ends at position ``prompt_len + t``; it covers its last ``p`` positions
    (all of them without a KV cache, where a later step overwrites an earlier one with the same
    values). Attention (b h p k) is placed by rows and columns: its k keys are positions 0 .. k - 1
    when they reach the step's last position (a static cache's slots past it are masked and dropped),
    else the last k positions up to it (a sliding-window cache keeps only those). Keys a step could
    not see get what the masks give a no-cache run: 0 in pattern, the dtype's minimum in scores.
    """
    attn = name.endswith(_ATTN)
    axis = 2 if attn else 1
    first = steps[0]
    prompt_len = first.shape[axis]
    total = prompt_len + len(steps) - 1
    shape = list(first.shape)
    shape[axis] = total
    fill = 0
    if attn:
        shape[3] = total
        if name.endswith("hook_attn_scores") and first.is_floating_point():
            fill = torch.finfo(first.dtype).min
    out = first.new_full(shape, fill)
    for t, step in enumerate(steps):
        end = prompt_len + t
        start = end - step.shape[axis]
        if attn:
            keys = step.shape[3]
            if keys >= end:  # every key from position 0 (a static cache: and unused slots after)
                width = min(keys, total)
                out[:, :, start:end, :width] = step[..., :width]
            else:  # a sliding-window cache: the last keys only
                out[:, :, start:end, end - keys : end] = step
        else:
            out[:, start:end] = step
    return out


@contextlib.contextmanager
def record_generation(model, names_filter=None, device=None):
    """Record the activations named by ``names_filter`` at every position ``generate`` runs.

    ``names_filter`` is a name, a list of names or a predicate, as in ``run_with_cache``; by default
    every name but ``hook_result`` (the names ``run_with_cache`` keeps by default) and ``hook_unembed``.

    For each name the record holds one tensor over the prompt and the generated tokens, as
    ``run_with_cache`` on the final sequence would give it (up to float rounding: the cached steps
    multiply smaller matrices). ``generate`` never runs the token it samples last, so the positions
    are those of ``out[:, :-1]``. Works with and without a KV cache (``use_cache=False``; dynamic,
    sliding-window and static caches), for greedy search and sampling, left-padded batches included;
    one ``generate`` call per block (beam search and assisted decoding reorder or batch steps and are
    not supported). Other hooks may be active too.

    >>> with tlshim.record_generation(model, ["blocks.0.hook_resid_post", "blocks.0.attn.hook_pattern"]) as rec:
    ...     out = model.generate(ids, max_new_tokens=8, do_sample=False)
    >>> rec["blocks.0.hook_resid_post"].shape   # (batch, out.shape[1] - 1, d_model)
    >>> rec["blocks.0.attn.hook_pattern"].shape  # (batch, n_heads, out.shape[1] - 1, out.shape[1] - 1)
    """
    model = hf_model(model)
    names = [point.name for point in model._points(default_filter if names_filter is None else names_filter)]
    if "hook_unembed" in names:  # generate computes the logits of the last position only (logits_to_keep)
        if names_filter is not None:
            raise ValueError("record_generation cannot record hook_unembed: generate computes logits for the last "
                             "position only; ask generate for them (output_logits=True, return_dict_in_generate=True)")
        names.remove("hook_unembed")
    record = GenerationRecord(names)

    def save(tensor, hook):
        value = tensor.detach()
        record.steps[hook.name].append(value if device is None else value.to(device))

    with model.hooks(fwd_hooks=[(name, save) for name in names]):
        yield record
