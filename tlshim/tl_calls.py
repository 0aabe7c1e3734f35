"""TransformerLens's calling conventions on an installed model, beside HuggingFace's.

The rule (README "TransformerLens calls"): a call of the model, ``generate``, ``run_with_cache`` or
``run_with_hooks`` follows TransformerLens when its input is text (a str or a list of str), when it
passes an argument only TransformerLens has (``return_type``, ``prepend_bos``, ``stop_at_layer``...),
or when TL calls are on (``install(model, tl_calls=True)``, ``with model.tl_calls():``) and the input
is positional. Every other call (``model(input_ids=...)``, everything transformers itself does) is
HuggingFace's, untouched: forward's signature and the output type stay HF's.
"""

from __future__ import annotations

import contextlib
import contextvars

import torch

#: TransformerLens's forward arguments that HF's forward does not take
FORWARD_ONLY = frozenset({"input", "return_type", "loss_per_token", "prepend_bos", "padding_side", "start_at_layer",
                          "stop_at_layer", "tokens", "shortformer_pos_embed", "past_kv_cache"})
#: TransformerLens's generate arguments that HF's generate does not take
GENERATE_ONLY = frozenset({"input", "stop_at_eos", "freq_penalty", "use_past_kv_cache", "prepend_bos", "padding_side",
                           "return_type", "verbose"})
RETURN_TYPES = ("logits", "loss", "both", None)

#: ``with model.tl_calls():`` per thread / asyncio task: {id(model): on}
_SWITCH: contextvars.ContextVar = contextvars.ContextVar("tlshim_tl_calls", default={})


def is_text(value) -> bool:
    return isinstance(value, str) or (isinstance(value, list) and bool(value) and all(isinstance(v, str) for v in value))


def tl_calls_on(model) -> bool:
    return _SWITCH.get().get(id(model), getattr(model._tlshim, "tl_calls", False))


def wants_tl(model, args, kwargs, only) -> bool:
    """Whether a call is TransformerLens's: text input, a TL-only keyword, a str second positional
    (TL's return_type; HF's is attention_mask), or TL calls on and a positional input."""
    if kwargs and not only.isdisjoint(kwargs):
        return True
    if not args:
        return False
    if len(args) > 1:
        return isinstance(args[1], str) or is_text(args[0])
    return is_text(args[0]) or tl_calls_on(model)


def overrides(base) -> dict:
    """``__call__`` and ``generate`` for the per-instance class, where they must sit before ``base``'s."""
    base_call, base_generate = base.__call__, getattr(base, "generate", None)

    def __call__(self, *args, **kwargs):
        if wants_tl(self, args, kwargs, FORWARD_ONLY):
            return run(self, args, kwargs)[0]
        return base_call(self, *args, **kwargs)

    out = {"__call__": __call__}
    if base_generate is not None:
        def generate(self, *args, **kwargs):
            if wants_tl(self, args, kwargs, GENERATE_ONLY):
                from .tl_generate import generate as tl_generate

                return tl_generate(self, *args, **kwargs)
            return base_generate(self, *args, **kwargs)

        generate.__doc__, generate.__wrapped__ = base_generate.__doc__, base_generate
        out["generate"] = generate
    return out


class _Stopped(Exception):
    def __init__(self, value):
        self.value = value


def _forward_args(input=None, return_type="logits", loss_per_token=False, prepend_bos=None, padding_side=None,
                  start_at_layer=None, tokens=None, shortformer_pos_embed=None, attention_mask=None,
                  stop_at_layer=None, past_kv_cache=None, **hf_kwargs):
    """TransformerLens's forward signature (HookedTransformer's positional order); the rest goes to HF."""
    for name, value, instead in (("shortformer_pos_embed", shortformer_pos_embed, "no model here has shortformer positions"),
                                 ("past_kv_cache", past_kv_cache, "pass HF's past_key_values=... (a transformers Cache)")):
        if value is not None:
            raise ValueError(f"{name} (a HookedTransformer argument) is not supported on an installed HF model: {instead}")
    if return_type not in RETURN_TYPES:
        raise ValueError(f"return_type must be one of {RETURN_TYPES}, got {return_type!r}")
    if input is None:
        input = hf_kwargs.pop("input_ids", None)
    if input is None:
        raise TypeError("a TransformerLens call needs an input: text, a list of texts or token ids (batch, pos)")
    return dict(input=input, return_type=return_type, loss_per_token=loss_per_token, prepend_bos=prepend_bos,
                padding_side=padding_side, start_at_layer=start_at_layer, tokens=tokens,
                attention_mask=attention_mask, stop_at_layer=stop_at_layer), hf_kwargs


def run(model, args, kwargs):
    """One forward with TransformerLens's arguments: (what return_type asks for, HF's output or None
    when stop_at_layer cut it short)."""
    tl, hf_kwargs = _forward_args(*args, **kwargs)
    ids, mask = tl["input"], tl["attention_mask"]
    if is_text(ids):
        ids, encoded_mask = encode(model, ids, tl["prepend_bos"], tl["padding_side"])
        side = tl["padding_side"] or model.cfg.default_padding_side
        if mask is None and side == "left" and not bool(encoded_mask.all()):
            mask = encoded_mask  # right padding stays unmasked, as in TransformerLens (causal: real tokens unaffected)
    elif torch.is_tensor(ids) and ids.dim() == 1 and not ids.is_floating_point():
        ids = ids.unsqueeze(0)
    if mask is not None:
        hf_kwargs["attention_mask"] = mask.to(model.device)
    hf_kwargs.setdefault("use_cache", False)
    points, n = [], model.cfg.n_layers
    start, stop = tl["start_at_layer"], tl["stop_at_layer"]
    if start is not None:
        ids, point = _start_at(model, ids, start, n)
        points.append(point)
    if stop is not None:
        points.append(_stop_at(stop, n))
    try:
        with model.hooks(fwd_hooks=points) if points else contextlib.nullcontext():
            out = model._forward(ids, hf_kwargs)
    except _Stopped as stopped:
        if tl["return_type"] in ("loss", "both"):
            raise ValueError("stop_at_layer returns the residual stream: it has no loss (use return_type='logits')") from None
        return stopped.value, None
    logits = out.logits
    rt = tl["return_type"]
    if rt in ("loss", "both"):
        targets = tl["tokens"] if start is not None else ids
        if targets is None or not torch.is_tensor(targets) or targets.is_floating_point():
            raise ValueError("return_type='loss' with start_at_layer needs the token ids: pass tokens=...")
        loss = loss_fn(logits, targets, mask, tl["loss_per_token"])
        return (loss if rt == "loss" else (logits, loss)), out
    return (logits if rt == "logits" else None), out


def _start_at(model, residual, start, n):
    """HF's forward runs on ``residual`` as inputs_embeds (for shapes, positions and masks); block
    ``start`` then takes ``residual`` itself as its input, so blocks before it change nothing."""
    if not (torch.is_tensor(residual) and residual.is_floating_point()):
        raise ValueError(f"start_at_layer takes the residual stream (batch, pos, d_model) entering that block, "
                         f"got {type(residual).__name__}: e.g. cache['blocks.{start}.hook_resid_pre']")
    start = start + n if start < 0 else start
    if not 0 <= start < n:
        raise ValueError(f"start_at_layer={start} is out of range: the model has {n} blocks")
    residual = residual if residual.dim() == 3 else residual.unsqueeze(0)
    return residual, (f"blocks.{start}.hook_resid_pre", lambda value, hook: residual.to(value.dtype))


def _stop_at(stop, n):
    """A hook that ends the forward with the residual stream entering block ``stop`` (TL's stop_at_layer)."""
    stop = stop + n if stop < 0 else stop
    if not 0 <= stop <= n:
        raise ValueError(f"stop_at_layer={stop} is out of range: the model has {n} blocks (0 to {n}, or negative)")
    name = f"blocks.{stop}.hook_resid_pre" if stop < n else f"blocks.{n - 1}.hook_resid_post"

    def stop_here(value, hook):
        raise _Stopped(value)

    return name, stop_here


def outside_run(name, start, stop, n):
    """Whether hook ``name`` lies outside the blocks a start_at_layer / stop_at_layer forward runs
    (left out of its cache, as TransformerLens never reaches them)."""
    start = 0 if start is None else start + n if start < 0 else start
    stop = n if stop is None else stop + n if stop < 0 else stop
    if name == "hook_embed":
        return start > 0
    if not name.startswith("blocks."):
        return stop < n
    return not start <= int(name.split(".")[1]) < stop


def loss_fn(logits, tokens, attention_mask=None, per_token=False):
    """TransformerLens's next-token cross-entropy: mean over predicted positions, or (batch, pos - 1)
    with ``per_token``; positions whose token or next token is masked out count zero."""
    tokens = tokens.to(logits.device)
    logprobs = logits[..., :-1, :].log_softmax(-1).gather(-1, tokens[..., 1:, None])[..., 0]
    if attention_mask is None:
        return -logprobs if per_token else -logprobs.sum() / logprobs.numel()
    mask = attention_mask.to(logits.device).bool()
    if mask.shape != tokens.shape:
        raise ValueError(f"attention_mask must have the tokens' shape {tuple(tokens.shape)}, got {tuple(mask.shape)}")
    both = mask[:, :-1] & mask[:, 1:]
    logprobs = logprobs.masked_fill(~both, 0.0)
    return -logprobs if per_token else -logprobs.sum() / both.sum()


# -- tokens -----------------------------------------------------------------------------------------


#: model types TransformerLens 4.3 tokenizes without a BOS by default (its adapters' default_prepend_bos)
NO_BOS_TYPES = frozenset({
    "bloom", "ernie4_5", "ernie4_5_moe", "exaone", "exaone4", "glm", "glm4_moe", "glm4v", "granite", "llada",
    "minimax_m2", "mpt", "gpt_neox", "phi", "phimoe", "qwen2", "qwen2_5_vl", "qwen3", "qwen3_moe", "qwen3_vl",
    "recurrent_gemma", "seed_oss", "smollm3", "starcoder2",
})


def tokenizer_fields(tokenizer, model_type) -> dict:
    """cfg's tokenizer fields: TransformerLens's BOS default for the model type; read off the tokenizer,
    whether it adds BOS / EOS itself and its padding side."""
    fields = {"default_prepend_bos": model_type not in NO_BOS_TYPES}
    if tokenizer is None:
        return fields
    ids = tokenizer("a")["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return dict(fields, tokenizer_prepends_bos=bos is not None and len(ids) > 1 and ids[0] == bos,
                tokenizer_appends_eos=eos is not None and len(ids) > 1 and ids[-1] == eos,
                default_padding_side=getattr(tokenizer, "padding_side", "right") or "right")


def encode(model, input, prepend_bos=None, padding_side=None, truncate=True):
    """(ids, attention mask) of a str or list of str, as TransformerLens's to_tokens makes them:
    BOS per ``prepend_bos`` (default cfg.default_prepend_bos) whatever the tokenizer does, no EOS the
    tokenizer appends, padded on ``padding_side`` (default cfg.default_padding_side)."""
    tokenizer, cfg = model._tokenizer_or_raise(), model.cfg
    if not is_text(input):
        raise TypeError(f"to_tokens takes a str or a list of str, got {type(input).__name__} {input!r:.80}")
    prepend = cfg.default_prepend_bos if prepend_bos is None else prepend_bos
    side = padding_side or cfg.default_padding_side
    if side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
    texts = [input] if isinstance(input, str) else list(input)
    if len(texts) > 1 and tokenizer.pad_token is None:
        raise ValueError("several texts need padding and the tokenizer has no pad token: set "
                         "tokenizer.pad_token = tokenizer.eos_token (as TransformerLens does), or pass one text")
    bos = tokenizer.bos_token
    if prepend and not cfg.tokenizer_prepends_bos and bos is not None:
        texts = [bos + text for text in texts]
    limit = dict(truncation=True, max_length=cfg.n_ctx) if truncate else {}
    enc = tokenizer(texts, return_tensors="pt", padding=True, padding_side=side, **limit)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    eos = tokenizer.eos_token_id
    if cfg.tokenizer_appends_eos and eos is not None:
        while ids.shape[1] > 1 and bool(((ids[:, -1] == eos) | (mask[:, -1] == 0)).all()) and bool((ids[:, -1] == eos).any()):
            ids, mask = _drop(ids, mask, _last_real(mask))
    if not prepend and cfg.tokenizer_prepends_bos:
        ids, mask = _drop(ids, mask, mask.argmax(-1))  # each row's first real token: the BOS the tokenizer added
    return ids.to(model.device), mask.to(model.device)


def _last_real(mask):
    return mask.shape[1] - 1 - mask.flip(-1).argmax(-1)


def _drop(ids, mask, positions):
    """Remove one position per row (keeps the batch rectangular)."""
    keep = torch.ones_like(mask, dtype=torch.bool)
    keep[torch.arange(len(positions)), positions] = False
    shape = (ids.shape[0], ids.shape[1] - 1)
    return ids[keep].view(shape), mask[keep].view(shape)


class TokenError(ValueError, AssertionError):
    """Not one token, or not found (an AssertionError too: TransformerLens asserts)."""


class TLCalls:
    """TransformerLens's token helpers, loss and the ``tl_calls`` switch (mixin of ModelAPI)."""

    @contextlib.contextmanager
    def tl_calls(self, on=True):
        """Inside the block (this thread or asyncio task), ``model(tokens)`` and ``model.generate(tokens)``
        with a positional input follow TransformerLens (logits / TL's generate); keyword calls stay HF's.

        >>> with model.tl_calls():
        ...     logits = model(tokens)
        """
        token = _SWITCH.set({**_SWITCH.get(), id(self): bool(on)})
        try:
            yield self
        finally:
            _SWITCH.reset(token)

    def loss_fn(self, logits, tokens, attention_mask=None, per_token=False):
        """TransformerLens's next-token cross-entropy (see ``tlshim.tl_calls.loss_fn``)."""
        return loss_fn(logits, tokens, attention_mask, per_token)

    def to_tokens(self, input, prepend_bos=None, padding_side=None, move_to_device=True, truncate=True):
        """Token ids (batch, pos) of a str or list of str, as TransformerLens makes them (see ``encode``)."""
        ids, _ = encode(self, input, prepend_bos, padding_side, truncate)
        return ids if move_to_device else ids.cpu()

    def to_string(self, tokens):
        """Text of token ids: a str for one sequence, a list of str for a batch (batch, pos)."""
        tokenizer = self._tokenizer_or_raise()
        tokens = torch.as_tensor(tokens)
        if tokens.dim() > 2:
            raise ValueError(f"to_string takes ids (pos) or (batch, pos), got shape {tuple(tokens.shape)}")
        if tokens.dim() == 2:
            return tokenizer.batch_decode(tokens, clean_up_tokenization_spaces=False)
        return tokenizer.decode(tokens, clean_up_tokenization_spaces=False)

    def to_str_tokens(self, input, prepend_bos=None, padding_side=None):
        """Each token as a string: of a str (tokenized as ``to_tokens``), of ids (a tensor, array or list
        of int, a batch axis of 1 allowed), or a list of str / id sequences (a list per item)."""
        tokenizer = self._tokenizer_or_raise()
        if isinstance(input, (list, tuple)) and input and not all(isinstance(t, int) for t in input):
            return [self.to_str_tokens(item, prepend_bos, padding_side) for item in input]
        if isinstance(input, str):
            input = self.to_tokens(input, prepend_bos, padding_side)[0]
        ids = torch.as_tensor(input).squeeze()
        if ids.dim() > 1:
            raise ValueError(f"to_str_tokens takes one sequence, got ids of shape {tuple(ids.shape)}: "
                             "pass a list of sequences for a batch")
        ids = ids.reshape(-1).tolist()
        return tokenizer.batch_decode([[t] for t in ids], clean_up_tokenization_spaces=False)

    def to_single_token(self, string):
        """The id of a string that is exactly one token (no BOS)."""
        ids = self.to_tokens(string, prepend_bos=False).squeeze()
        if ids.numel() != 1:
            raise TokenError(f"{string!r} is not a single token: it is {ids.numel()} tokens "
                                  f"{self.to_str_tokens(ids.reshape(-1))}")
        return int(ids.item())

    def to_single_str_token(self, int_token):
        """The string of one token id."""
        if isinstance(int_token, bool) or not isinstance(int_token, int):
            raise TypeError(f"to_single_str_token takes an int token id, got {type(int_token).__name__}")
        return self.to_str_tokens(torch.tensor([int_token]))[0]

    def to_sentence_pair_tokens(self, sentence_a, sentence_b, move_to_device=True, truncate=True):
        """``input_ids``, ``token_type_ids`` and ``attention_mask`` of a sentence pair as the tokenizer joins
        two segments (BERT: [CLS] a [SEP] b [SEP], segment ids 0 then 1), for ``model(**pair)``."""
        tokenizer = self._tokenizer_or_raise()
        n_ctx = self.cfg.n_ctx if truncate else None
        encoded = tokenizer(sentence_a, sentence_b, return_tensors="pt", padding=True, truncation=truncate, max_length=n_ctx)
        if "token_type_ids" not in encoded or not encoded["token_type_ids"].any():  # none, or all of segment 0
            raise ValueError(
                f"{type(tokenizer).__name__} gives no token_type_ids marking the second sentence, so it cannot mark two segments: "
                "to_sentence_pair_tokens needs a segment-aware tokenizer (BERT's); use to_tokens for one text"
            )
        pair = {key: encoded[key] for key in ("input_ids", "token_type_ids", "attention_mask") if key in encoded}
        return {key: value.to(self.cfg.device) for key, value in pair.items()} if move_to_device else pair

    def get_token_position(self, single_token, input, mode="first", prepend_bos=None, padding_side=None):
        """Position of ``single_token`` (a str of one token, or an id) in ``input`` (a str, or ids (pos) /
        (1, pos)); ``mode`` "first" or "last" occurrence."""
        if mode not in ("first", "last"):
            raise ValueError(f"mode must be 'first' or 'last', got {mode!r}")
        tokens = self.to_tokens(input, prepend_bos, padding_side) if isinstance(input, str) else torch.as_tensor(input)
        if tokens.dim() == 2:
            if tokens.shape[0] != 1:
                raise ValueError(f"get_token_position takes one sequence: ids (pos) or (1, pos), got {tuple(tokens.shape)}")
            tokens = tokens[0]
        token = self.to_single_token(single_token) if isinstance(single_token, str) else int(single_token)
        found = (tokens == token).nonzero().flatten()
        if len(found) == 0:
            raise TokenError(f"token {token} ({self.to_single_str_token(token)!r}) does not occur in the input")
        return int(found[0 if mode == "first" else -1])
