"""What TransformerLens users do every day, on any installed model: induction heads, logit lens,
activation patching and steering. Each returns numbers (tensors); `tlshim.report` draws them.

Patching runs are batched: row r of one forward carries the patch of position (or head) r.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch


def _ids(model, text):
    # the tokenizer's own BOS convention (TransformerLens's default would add one where it adds none)
    return model.to_tokens(text, prepend_bos=model.cfg.tokenizer_prepends_bos) if isinstance(text, str) else text


def next_token_loss(logits, tokens):
    """Cross-entropy of predicting tokens[:, i + 1] at each position i: (batch, positions - 1)."""
    logprobs = logits[:, :-1].log_softmax(-1)
    return -logprobs.gather(-1, tokens[:, 1:, None])[..., 0]


# -- induction ------------------------------------------------------------------------------------


@dataclass
class Induction:
    scores: torch.Tensor  # (layers, heads): attention from a repeated token to the token after its previous copy
    top: list  # [(layer, head)], best first
    loss_first: float  # mean next-token loss on the first copy
    loss_repeat: float  # ... on the later copies
    loss_first_ablated: float  # ... on the first copy with the top heads' hook_z zeroed
    loss_repeat_ablated: float  # ... on the later copies, likewise
    loss_repeat_control: float  # ... with as many other heads, drawn at random, zeroed instead (mean of the draws)
    controls: int  # how many draws


def zero_heads(heads):
    """Forward hooks zeroing hook_z of each (layer, head)."""
    by_layer = {}
    for layer, head in heads:
        by_layer.setdefault(layer, []).append(head)

    def hook_for(chosen):
        def ablate(z, hook):
            z = z.clone()
            z[:, :, chosen] = 0
            return z

        return ablate

    return [(f"blocks.{layer}.attn.hook_z", hook_for(chosen)) for layer, chosen in by_layer.items()]


def induction(model, text, repeats=3, n_top=5, controls=8, seed=0) -> Induction:
    """Score every head on ``text`` repeated ``repeats`` times, then ablate the ``n_top`` best through
    hook_z; as a control, ``controls`` times ``n_top`` other heads drawn at random (``seed``)."""
    once = _ids(model, text)[0]
    span = len(once)
    tokens = once.repeat(repeats)[None]
    query = torch.arange(span, tokens.shape[1])  # every position of the later copies
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens, names_filter=lambda name: name.endswith("hook_pattern"))
        rows = [cache["pattern", layer][0][:, query, query - span + 1].mean(-1) for layer in range(model.cfg.n_layers)]
        scores = torch.stack(rows)
        order = scores.flatten().argsort(descending=True).tolist()
        heads = [divmod(i, scores.shape[1]) for i in order]
        loss = next_token_loss(logits, tokens)[0]

        def ablated(chosen):
            return next_token_loss(model.run_with_hooks(tokens, fwd_hooks=zero_heads(chosen)), tokens)[0]

        top = ablated(heads[:n_top])
        generator = torch.Generator().manual_seed(seed)
        draws = [torch.randperm(len(heads) - n_top, generator=generator)[:n_top].tolist() for _ in range(controls)]
        control = torch.stack([ablated([heads[n_top + i] for i in draw]) for draw in draws]).mean(0)
    first, later = slice(None, span - 1), slice(span - 1, None)  # predictions of the first copy's tokens, the others'
    return Induction(
        scores=scores,
        top=heads[:n_top],
        loss_first=loss[first].mean().item(),
        loss_repeat=loss[later].mean().item(),
        loss_first_ablated=top[first].mean().item(),
        loss_repeat_ablated=top[later].mean().item(),
        loss_repeat_control=control[later].mean().item(),
        controls=controls,
    )


# -- logit lens -----------------------------------------------------------------------------------


@dataclass
class LogitLens:
    logits: torch.Tensor  # (layers, vocab) at the last position: ln_final and unembed applied to each resid_post
    rank: torch.Tensor  # (layers,) rank of the answer token (0 = top-1)
    prob: torch.Tensor  # (layers,) its probability
    final_logits: torch.Tensor  # (vocab,) the model's own logits at the last position


def logit_lens(model, prompt, answer) -> LogitLens:
    """The answer token's rank and probability read from every block's hook_resid_post through the
    model's own final norm and unembedding (on the last block this is the model's output, bit for bit)."""
    tokens = _ids(model, prompt)
    target = model.tokenizer(answer, add_special_tokens=False)["input_ids"][0]
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens, names_filter=lambda name: name.endswith("hook_resid_post"))
        # the whole sequence, as in the forward: same shapes, same kernels, same bits
        lens = torch.stack([model.unembed(model.ln_final(cache[f"blocks.{layer}.hook_resid_post"]))[0, -1]
                            for layer in range(model.cfg.n_layers)])
    return LogitLens(
        logits=lens,
        rank=(lens > lens[:, target, None]).sum(-1),
        prob=lens.softmax(-1)[:, target],
        final_logits=logits[0, -1],
    )


# -- activation patching --------------------------------------------------------------------------


@dataclass
class Patching:
    clean_diff: float  # logit(answer) - logit(other) on the clean prompt, last position
    corrupt_diff: float  # the same on the corrupted prompt
    resid_pre: torch.Tensor  # (layers, positions): restored fraction, clean blocks.i.hook_resid_pre patched at one position
    heads: torch.Tensor  # (layers, heads): restored fraction, clean hook_z of one head patched at every position
    str_tokens: list


def patching(model, clean, corrupt, answer, other) -> Patching:
    """Activation patching from ``clean`` into ``corrupt`` (same token count): the fraction of the logit
    difference ``answer`` - ``other`` restored, 0 = corrupted, 1 = clean."""
    clean_ids, corrupt_ids = _ids(model, clean), _ids(model, corrupt)
    if clean_ids.shape != corrupt_ids.shape:
        raise ValueError(f"patching needs prompts of one token count: {clean_ids.shape[1]} and {corrupt_ids.shape[1]} tokens")
    a, b = (model.tokenizer(word, add_special_tokens=False)["input_ids"][0] for word in (answer, other))

    def diff(logits):
        return logits[:, -1, a] - logits[:, -1, b]

    n_layers, positions = model.cfg.n_layers, clean_ids.shape[1]
    with torch.no_grad():
        clean_logits, cache = model.run_with_cache(clean_ids, names_filter=lambda n: n.endswith(("hook_resid_pre", "hook_z")))
        clean_diff, corrupt_diff = float(diff(clean_logits)), float(diff(model(corrupt_ids).logits))

        # only the last position's logits are read: skip the unembedding of the others where the model can
        last_only = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}

        def restored(fwd_hooks, rows):
            batch = corrupt_ids.expand(rows, -1)
            patched = model.run_with_hooks(batch, fwd_hooks=fwd_hooks, **last_only)
            return (diff(patched) - corrupt_diff) / (clean_diff - corrupt_diff)

        def put_position(tensor, hook):
            rows = torch.arange(positions)
            tensor = tensor.clone()
            tensor[rows, rows] = cache[hook.name][0]
            return tensor

        def put_head(z, hook):
            rows = torch.arange(z.shape[2])
            z = z.clone()
            z[rows, :, rows] = cache[hook.name][0].transpose(0, 1)
            return z

        resid = torch.stack([restored([(f"blocks.{layer}.hook_resid_pre", put_position)], positions) for layer in range(n_layers)])
        heads = torch.stack([restored([(f"blocks.{layer}.attn.hook_z", put_head)], model.cfg.n_heads) for layer in range(n_layers)])
    return Patching(clean_diff, corrupt_diff, resid, heads, model.to_str_tokens(clean_ids[0]))


# -- steering -------------------------------------------------------------------------------------


def steering_vector(model, layer, plus, minus):
    """ActAdd: the difference of blocks.{layer}.hook_resid_post between two prompts, at their last position."""
    name = f"blocks.{layer}.hook_resid_post"
    with torch.no_grad():
        ends = [model.run_with_cache(_ids(model, text), names_filter=name)[1][name][0, -1] for text in (plus, minus)]
    return ends[0] - ends[1]


def generate(model, prompt, max_new_tokens, fwd_hooks=()):
    """Greedy continuation of ``prompt`` (text), with ``fwd_hooks`` firing at every step."""
    tokens = _ids(model, prompt)
    with torch.no_grad(), model.hooks(fwd_hooks=fwd_hooks):
        out = model.generate(tokens, max_new_tokens=max_new_tokens, do_sample=False)
    return model.to_string(out[0, tokens.shape[1]:])


def steer(model, prompt, layer, vector, scale, max_new_tokens=40):
    """(plain, steered) greedy continuations: ``scale * vector`` added to blocks.{layer}.hook_resid_post
    at every position."""

    def add(resid, hook):
        return resid + scale * vector

    return (generate(model, prompt, max_new_tokens),
            generate(model, prompt, max_new_tokens, [(f"blocks.{layer}.hook_resid_post", add)]))
