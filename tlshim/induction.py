"""Induction heads on a model trained on repeated random sequences: find one through hook_pattern,
and measure how much of the copying breaks when it is ablated through hook_z."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class InductionReport:
    scores: torch.Tensor  # (n_layers, n_heads): mean attention from each repeated token to the one after its first occurrence
    layer: int
    head: int
    accuracy: float  # next-token accuracy on the repeated half
    ablated_accuracy: float  # the same with that head's hook_z zeroed

    @property
    def score(self) -> float:
        return float(self.scores[self.layer, self.head])


def repeated_tokens(tokenizer, half=24, batch=32, seed=0):
    """[bos] + x + x, with x ``half`` distinct random non-special tokens of the tokenizer's vocabulary."""
    special = set(tokenizer.all_special_ids)
    content = torch.tensor([i for i in range(len(tokenizer)) if i not in special])
    generator = torch.Generator().manual_seed(seed)
    x = content[torch.rand(batch, len(content), generator=generator).argsort(dim=1)[:, :half]]
    bos = torch.full((batch, 1), tokenizer.bos_token_id)
    return torch.cat([bos, x, x], dim=1)


def repeated_half_accuracy(logits, tokens, half):
    """Accuracy of predicting tokens[i + 1] at each position i of the repeated half."""
    positions = torch.arange(half + 1, 2 * half)
    predicted = logits[:, positions].argmax(-1)
    return (predicted == tokens[:, positions + 1]).float().mean().item()


def find_induction_head(model, tokens, half=24) -> InductionReport:
    """Score every head through hook_pattern and ablate the best one through hook_z.

    >>> report = find_induction_head(tlshim.install(model), repeated_tokens(tok))
    >>> report.layer, report.head, report.score
    """
    query = torch.arange(half + 1, 2 * half + 1)
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens, names_filter=lambda name: name.endswith("hook_pattern"))
        rows = []
        for layer in range(model.cfg.n_layers):
            pattern = cache["pattern", layer]  # (batch, heads, query, key)
            rows.append(pattern[:, :, query, query - half + 1].mean(dim=(0, 2)))
        scores = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)  # OpenELM: heads per layer vary
        layer, head = divmod(int(scores.argmax()), scores.shape[1])

        def ablate(z, hook):
            z = z.clone()
            z[:, :, head] = 0
            return z

        ablated = model.run_with_hooks(tokens, fwd_hooks=[(f"blocks.{layer}.attn.hook_z", ablate)])
    return InductionReport(
        scores=scores,
        layer=layer,
        head=head,
        accuracy=repeated_half_accuracy(logits, tokens, half),
        ablated_accuracy=repeated_half_accuracy(ablated, tokens, half),
    )
