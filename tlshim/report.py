"""The real-model report: an HTML page with matplotlib figures, one section per analysis (tlshim.analyses)."""

from __future__ import annotations

import html
from pathlib import Path


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ImportError("the report draws with matplotlib: pip install 'tlshim[real]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(figure, path):
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    _pyplot().close(figure)
    return path.name


def _heat_map(axis, values, title, xlabel, ylabel, diverging=False):
    plt = _pyplot()
    limit = float(abs(values).max()) or 1.0
    kwargs = dict(cmap="RdBu", vmin=-limit, vmax=limit) if diverging else dict(cmap="viridis")
    image = axis.imshow(values.numpy(), aspect="auto", interpolation="nearest", **kwargs)
    axis.set_title(title)
    axis.set_xlabel(xlabel)
    axis.set_ylabel(ylabel)
    plt.colorbar(image, ax=axis)


def induction_figures(ind, folder):
    plt = _pyplot()
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 5.5), gridspec_kw={"width_ratios": [1.2, 1]})
    _heat_map(left, ind.scores, "induction score per head", "head", "layer")
    for layer, head in ind.top:
        left.add_patch(plt.Rectangle((head - 0.5, layer - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.5))
    labels = ["first copy", "repeats", f"repeats, top {len(ind.top)}\nheads ablated", f"repeats, {len(ind.top)} random\nheads ablated ({ind.controls}x)"]
    values = [ind.loss_first, ind.loss_repeat, ind.loss_repeat_ablated, ind.loss_repeat_control]
    right.bar(range(4), values, color=["grey", "tab:blue", "tab:red", "tab:green"])
    right.set_xticks(range(4), labels, fontsize=8)
    right.set_ylabel("mean next-token loss (nats)")
    right.set_title("loss on the text and its repeats")
    for x, value in enumerate(values):
        right.text(x, value, f"{value:.2f}", ha="center", va="bottom")
    return _save(figure, folder / "induction.png")


def lens_figure(lens, answer, folder):
    plt = _pyplot()
    layers = range(len(lens.rank))
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    top.semilogy(layers, (lens.rank + 1).numpy(), marker="o")
    top.set_ylabel(f"rank of {answer!r} + 1 (log)")
    top.set_title(f"logit lens: {answer!r} read from each blocks.i.hook_resid_post")
    bottom.plot(layers, lens.prob.numpy(), marker="o", color="tab:orange")
    bottom.set_ylabel("probability")
    bottom.set_xlabel("layer")
    return _save(figure, folder / "logit_lens.png")


def patching_figures(pt, folder):
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(10, 7))
    _heat_map(axis, pt.resid_pre, "logit difference restored by patching blocks.i.hook_resid_pre", "position", "layer", diverging=True)
    axis.set_xticks(range(len(pt.str_tokens)), [repr(t)[1:-1] for t in pt.str_tokens], rotation=60, fontsize=8)
    resid = _save(figure, folder / "patching_resid_pre.png")
    figure, axis = plt.subplots(figsize=(6, 7))
    _heat_map(axis, pt.heads, "restored by patching one head's hook_z\n(every position)", "head", "layer", diverging=True)
    return resid, _save(figure, folder / "patching_heads.png")


PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>tlshim on {model}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;line-height:1.4}}
img{{max-width:100%;border:1px solid #ddd}} td,th{{vertical-align:top;padding:.4em;border:1px solid #ccc}}
table{{border-collapse:collapse}} code{{background:#f3f3f3}}</style></head><body>
<h1>tlshim on {model}</h1>
<p>Every number below comes from hook points tlshim installed in the HuggingFace model itself; the
model's own forward computes.</p>
{sections}
</body></html>
"""


def section(title, body):
    return f"<h2>{html.escape(title)}</h2>\n{body}\n"


def write(folder, model_name, parts) -> Path:
    """``parts``: [(title, html body)], the bodies already escaped. Returns the page's path."""
    folder = Path(folder)
    page = folder / "index.html"
    page.write_text(PAGE.format(model=html.escape(model_name), sections="".join(section(t, b) for t, b in parts)))
    return page
