"""``python -m tlshim demo``: the induction head of the model tlshim ships, found and ablated.

Loads the small Llama in tlshim/assets/llama (trained by scripts/train_induction.py on random
sequences repeated twice) with from_pretrained, installs tlshim, prints every head's induction score,
names the induction head, shows that ablating it through hook_z breaks the copying, and draws its
attention pattern.
"""

from __future__ import annotations

import argparse
from importlib import resources

ASSETS = resources.files("tlshim") / "assets"


def load(arch="llama"):
    """The shipped model of ``arch``, installed, and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import tlshim

    folder = str(ASSETS / arch)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    return tlshim.install(model, tokenizer=tokenizer), tokenizer


def score_table(scores) -> str:
    n_layers, n_heads = scores.shape
    lines = ["layer  " + "  ".join(f"head {h}" for h in range(n_heads))]
    for layer in range(n_layers):
        lines.append(f"{layer:>5}  " + "  ".join(f"{float(s):>6.3f}" for s in scores[layer]))
    return "\n".join(lines)


def draw(model, tokens, layer, head, out):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: pip install 'tlshim[plot]' to get the picture of the pattern"
    _, cache = model.run_with_cache(tokens[:1], names_filter=f"blocks.{layer}.attn.hook_pattern")
    pattern = cache["pattern", layer][0, head].float().numpy()
    figure, axis = plt.subplots(figsize=(6, 5))
    image = axis.imshow(pattern, cmap="viridis")
    axis.set_title(f"blocks.{layer}.attn.hook_pattern, head {head}\n[bos] + x + x: a repeated token attends to the one after its first copy")
    axis.set_xlabel("key position")
    axis.set_ylabel("query position")
    figure.colorbar(image, ax=axis)
    figure.tight_layout()
    figure.savefig(out, dpi=100)
    plt.close(figure)
    return f"wrote the pattern of L{layer}H{head} to {out}"


def main(argv=None) -> int:
    from .induction import find_induction_head, repeated_tokens

    parser = argparse.ArgumentParser(prog="tlshim demo", description=__doc__)
    parser.add_argument("--out", default="induction_pattern.png")
    args = parser.parse_args(argv)
    model, tokenizer = load()
    tokens = repeated_tokens(tokenizer)
    words = model.to_str_tokens(tokens[0])
    print(f"input: {len(tokens)} sequences like {' '.join(words[:8])} ... (24 random words, then the same 24 again)\n")
    report = find_induction_head(model, tokens)
    print("induction score (attention from a repeated word to the word after its first occurrence):")
    print(score_table(report.scores))
    print(f"\ninduction head: blocks.{report.layer}.attn head {report.head} (score {report.score:.3f})")
    print(f"next-word accuracy on the repeated half: {report.accuracy:.3f}")
    print(f"with that head ablated through blocks.{report.layer}.attn.hook_z: {report.ablated_accuracy:.3f}")
    print(draw(model, tokens, report.layer, report.head, args.out))
    return 0
