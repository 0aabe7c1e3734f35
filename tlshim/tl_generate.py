"""TransformerLens's ``generate`` on an installed model, run by HF's own generate loop.

HF's generate does the KV cache, padding and stopping; a logits processor chooses each token the
way TransformerLens samples (temperature, top-k or top-p, frequency penalty, one categorical draw)
and leaves HF's greedy step nothing else to pick.
"""

from __future__ import annotations

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from .tl_calls import encode, is_text


class _TLSampler(LogitsProcessor):
    def __init__(self, do_sample, top_k, top_p, temperature, freq_penalty, progress):
        self.do_sample, self.top_k, self.top_p = do_sample, top_k, top_p
        self.temperature, self.freq_penalty, self.progress = temperature, freq_penalty, progress

    def __call__(self, input_ids, scores):
        chosen = sample(scores, input_ids, self.top_k, self.top_p, self.temperature, self.freq_penalty) \
            if self.do_sample else scores.argmax(-1)
        if self.progress is not None:
            self.progress.update(1)
        only = torch.full_like(scores, -float("inf"))
        return only.scatter_(-1, chosen[:, None], 0.0)


def sample(logits, tokens, top_k=None, top_p=None, temperature=1.0, freq_penalty=0.0):
    """One token per row as TransformerLens samples: temperature 0 is argmax; else logits / temperature,
    minus freq_penalty times each token's count so far, top-k or top-p filtering, a categorical draw."""
    if temperature == 0.0:
        return logits.argmax(-1)
    logits = logits / temperature
    if freq_penalty:
        if freq_penalty < 0:
            raise ValueError(f"freq_penalty must be non-negative, got {freq_penalty}")
        counts = torch.stack([torch.bincount(row, minlength=logits.shape[-1]) for row in tokens])
        logits = logits - freq_penalty * counts
    if top_k is not None:
        if top_k <= 0:
            raise ValueError(f"top_k must be positive, got {top_k}")
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -float("inf"))
    elif top_p is not None:
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        ordered, order = logits.sort(descending=True)
        beyond = ordered.softmax(-1).cumsum(-1) > top_p
        beyond[..., 1:] = beyond[..., :-1].clone()  # keep the token that crosses top_p
        beyond[..., 0] = False
        logits = logits.masked_fill(beyond.scatter(-1, order, beyond), -float("inf"))
    return torch.distributions.Categorical(logits=logits.float()).sample()


def _stop_ids(model, stop_at_eos, eos_token_id):
    """(the EOS id or ids that stop a row, or None; the id a finished row is padded with)."""
    tokenizer = model._tlshim.tokenizer
    if stop_at_eos and eos_token_id is None:
        eos_token_id = getattr(tokenizer, "eos_token_id", None)
        if eos_token_id is None:
            eos_token_id = model.generation_config.eos_token_id
        if eos_token_id is None:
            raise ValueError("stop_at_eos needs an EOS id and neither the tokenizer nor the model has one: "
                             "pass eos_token_id=... or stop_at_eos=False")
    eos = eos_token_id if stop_at_eos else None
    pad = (eos if isinstance(eos, int) else eos[0]) if eos is not None else (getattr(tokenizer, "pad_token_id", None) or 0)
    return eos, pad


def generate(model, input="", max_new_tokens=10, stop_at_eos=True, eos_token_id=None, do_sample=True, top_k=None,
             top_p=None, temperature=1.0, freq_penalty=0.0, use_past_kv_cache=True, prepend_bos=None,
             padding_side=None, return_type="input", verbose=True, attention_mask=None):
    """TransformerLens's generate: text in, text out (return_type "input": as the input came, "str",
    "tokens"); ids in, ids out (prompt and continuation). Sampling by default, as in TransformerLens."""
    if return_type not in ("input", "str", "tokens"):
        raise ValueError(f"return_type must be 'input', 'str' or 'tokens', got {return_type!r}")
    text = is_text(input)
    if text:
        side = "left" if isinstance(input, list) and len(input) > 1 else padding_side
        tokens, mask = encode(model, input, prepend_bos, side, truncate=False)
    elif torch.is_tensor(input) and not input.is_floating_point():
        tokens = (input if input.dim() == 2 else input[None]).to(model.device)
        mask = attention_mask
    else:
        raise TypeError(f"generate takes text, a list of texts or token ids, got {type(input).__name__} {input!r:.80}")
    if return_type == "input":
        return_type = "str" if text else "tokens"
    eos, pad = _stop_ids(model, stop_at_eos, eos_token_id)
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=pad,
                              use_cache=use_past_kv_cache)
    progress = None
    if verbose:
        from tqdm.auto import tqdm

        progress = tqdm(total=max_new_tokens)
    sampler = _TLSampler(do_sample, top_k, top_p, temperature, freq_penalty, progress)
    try:
        out = model.generate(input_ids=tokens, attention_mask=mask if mask is not None else torch.ones_like(tokens),
                             generation_config=config, logits_processor=LogitsProcessorList([sampler]))
    finally:
        if progress is not None:
            progress.close()
    if return_type == "tokens":
        return out
    texts = model._tokenizer_or_raise().batch_decode(out, skip_special_tokens=True)
    return texts[0] if isinstance(input, str) else texts


def stream(model, input="", max_new_tokens=10, max_tokens_per_yield=25, stop_at_eos=True, eos_token_id=None,
           do_sample=True, top_k=None, top_p=None, temperature=1.0, freq_penalty=0.0, use_past_kv_cache=True,
           prepend_bos=None, padding_side=None):
    """TransformerLens's generate_stream: token batches (batch, <= max_tokens_per_yield), the first one
    with the prompt, as they are generated; a finished row is padded with EOS until every row is."""
    if is_text(input):
        tokens = encode(model, input, prepend_bos, padding_side, truncate=False)[0]
    elif torch.is_tensor(input) and not input.is_floating_point():
        tokens = (input if input.dim() == 2 else input[None]).to(model.device)
    else:
        raise TypeError(f"generate_stream takes text or token ids, got {type(input).__name__} {input!r:.80}")
    eos, pad = _stop_ids(model, stop_at_eos, eos_token_id)
    stops = torch.tensor([eos] if isinstance(eos, int) else list(eos or ()), device=tokens.device)
    finished = torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
    pending, past, step_input = tokens, None, tokens
    for _ in range(max_new_tokens):
        with torch.no_grad():
            kwargs = {"use_cache": use_past_kv_cache}
            if past is not None:
                kwargs[past[0]] = past[1]
            out = model(input_ids=step_input, **kwargs)
        if use_past_kv_cache:
            key = "cache" if "cache" in type(out).__dataclass_fields__ else "past_key_values"
            past = (key, getattr(out, key))
        logits = out.logits[:, -1, :]
        chosen = sample(logits, tokens, top_k, top_p, temperature, freq_penalty) if do_sample else logits.argmax(-1)
        if eos is not None:
            chosen[finished] = pad
            finished |= torch.isin(chosen, stops)
        tokens = torch.cat([tokens, chosen[:, None]], dim=-1)
        pending = torch.cat([pending, chosen[:, None]], dim=-1) if pending is not None else chosen[:, None]
        step_input = chosen[:, None] if use_past_kv_cache else tokens
        if pending.shape[1] >= max_tokens_per_yield:
            yield pending
            pending = None
        if eos is not None and finished.all():
            break
    if pending is not None:
        yield pending
