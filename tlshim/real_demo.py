"""``tlshim demo`` on the real model: SmolLM2-135M-Instruct, four everyday analyses, one report folder."""

from __future__ import annotations

import html
import time
from pathlib import Path

from . import analyses, report

REPEATED_TEXT = ("The old lighthouse keeper climbed the narrow stairs every evening to light the lamp "
                 "that guided fishing boats home through the fog.")
FACT, FACT_ANSWER = "The capital of France is", " Paris"
IOI_CLEAN = "When Mary and John went to the store, John gave a drink to"
IOI_CORRUPT = "When John and Mary went to the store, Mary gave a drink to"
IOI_ANSWER, IOI_OTHER = " Mary", " John"
STEER_PROMPT = "I think you are"
STEER_LAYER, STEER_PLUS, STEER_MINUS, STEER_SCALE = 6, "I hate you", "I love you", 2.0
NEW_TOKENS = 30


def _table(rows):
    cells = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
    return f"<table>{cells}</table>"


def run(model, out, say=print) -> dict:
    """Run the four analyses on an installed ``model``, write ``out``/index.html and its PNGs, and
    return the headline numbers (also printed through ``say``)."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    parts, numbers = [], {}

    def step(title):
        say(f"{title} ...")
        return time.perf_counter()

    start = step("induction heads on a sentence repeated 3 times")
    ind = analyses.induction(model, REPEATED_TEXT, repeats=3)
    top = ", ".join(f"L{layer}H{head} {float(ind.scores[layer, head]):.2f}" for layer, head in ind.top)
    numbers["induction"] = ind
    say(f"  top heads: {top}")
    say(f"  loss on the repeats {ind.loss_repeat:.2f} (first copy {ind.loss_first:.2f}); top {len(ind.top)} heads ablated "
        f"through hook_z: {ind.loss_repeat_ablated:.2f} (first copy {ind.loss_first_ablated:.2f}); {len(ind.top)} random heads: "
        f"{ind.loss_repeat_control:.2f}  [{time.perf_counter() - start:.0f} s]")
    parts.append(("1. Induction heads", (
        f"<p>Text repeated 3 times: <code>{html.escape(REPEATED_TEXT)}</code>. Score: mean attention (blocks.i.attn.hook_pattern) "
        "from each token of a repeat to the token after its previous copy. Ablation: the heads' slices of "
        "blocks.i.attn.hook_z set to zero.</p>"
        f'<img src="{report.induction_figures(ind, folder)}" alt="induction heads">'
        + _table([("top heads (score)", top),
                  ("loss, first copy / repeats", f"{ind.loss_first:.3f} / {ind.loss_repeat:.3f}"),
                  (f"loss, first copy / repeats, top {len(ind.top)} ablated", f"{ind.loss_first_ablated:.3f} / {ind.loss_repeat_ablated:.3f}"),
                  (f"loss on repeats, {len(ind.top)} random other heads ablated (mean of {ind.controls} draws)",
                   f"{ind.loss_repeat_control:.3f}")]))))

    start = step(f"logit lens on {FACT!r}")
    lens = analyses.logit_lens(model, FACT, FACT_ANSWER)
    first = next((layer for layer, rank in enumerate(lens.rank.tolist()) if rank == 0), None)
    numbers["lens"] = lens
    say(f"  {FACT_ANSWER!r} is top-1 from layer {first} on, p = {float(lens.prob[-1]):.3f} at the last  [{time.perf_counter() - start:.0f} s]")
    parts.append(("2. Logit lens", (
        f"<p>Prompt <code>{html.escape(FACT)}</code>: every blocks.i.hook_resid_post at the last position through the "
        f"model's final norm and unembedding; the rank and probability of <code>{html.escape(FACT_ANSWER)}</code>. "
        "The last layer's reading is the model's output bit for bit.</p>"
        f'<img src="{report.lens_figure(lens, FACT_ANSWER, folder)}" alt="logit lens">'
        + _table([("first layer where it is top-1", str(first)), ("probability at the last layer", f"{float(lens.prob[-1]):.3f}")]))))

    start = step("activation patching, indirect object identification")
    pt = analyses.patching(model, IOI_CLEAN, IOI_CORRUPT, IOI_ANSWER, IOI_OTHER)
    best = divmod(int(pt.heads.argmax()), pt.heads.shape[1])
    numbers["patching"] = pt
    say(f"  logit diff {IOI_ANSWER!r} - {IOI_OTHER!r}: clean {pt.clean_diff:.2f}, corrupted {pt.corrupt_diff:.2f}; "
        f"best head L{best[0]}H{best[1]} restores {float(pt.heads[best]):.2f}  [{time.perf_counter() - start:.0f} s]")
    resid_png, heads_png = report.patching_figures(pt, folder)
    parts.append(("3. Activation patching (IOI)", (
        f"<p>Clean <code>{html.escape(IOI_CLEAN)}</code>, corrupted <code>{html.escape(IOI_CORRUPT)}</code>. Metric: "
        f"logit({html.escape(IOI_ANSWER)}) - logit({html.escape(IOI_OTHER)}) at the last position, as the fraction restored "
        "(0 = corrupted run, 1 = clean run) when one clean activation is patched into the corrupted run.</p>"
        f'<img src="{resid_png}" alt="patching resid_pre"> <img src="{heads_png}" alt="patching heads">'
        + _table([("logit difference, clean / corrupted", f"{pt.clean_diff:.3f} / {pt.corrupt_diff:.3f}"),
                  ("best head (hook_z)", f"L{best[0]}H{best[1]}: {float(pt.heads[best]):.3f}")]))))

    start = step(f"steering at blocks.{STEER_LAYER}.hook_resid_post")
    vector = analyses.steering_vector(model, STEER_LAYER, STEER_PLUS, STEER_MINUS)
    plain, steered = analyses.steer(model, STEER_PROMPT, STEER_LAYER, vector, STEER_SCALE, NEW_TOKENS)
    numbers["steering"] = (plain, steered)
    say(f"  plain:   {STEER_PROMPT + plain!r}\n  steered: {STEER_PROMPT + steered!r}  [{time.perf_counter() - start:.0f} s]")
    parts.append(("4. Steering", (
        f"<p>Vector: blocks.{STEER_LAYER}.hook_resid_post of <code>{html.escape(STEER_PLUS)}</code> minus that of "
        f"<code>{html.escape(STEER_MINUS)}</code> (last position), times {STEER_SCALE}, added at every position during "
        f"greedy generation of {NEW_TOKENS} tokens.</p><table><tr><th>without</th><th>with the vector</th></tr>"
        f"<tr><td>{html.escape(STEER_PROMPT + plain)}</td><td>{html.escape(STEER_PROMPT + steered)}</td></tr></table>")))

    numbers["page"] = report.write(folder, "SmolLM2-135M-Instruct", parts)
    return numbers
