"""Edits are exact: editing a name through tlshim equals the same edit built by hand on a plain twin."""

import warnings

import pytest
import torch

import tlshim

from models import ALL_ARCHS, ATTN_IMPLS, LAYOUT, TF_VERSION, build, tokens
from packaging.version import Version

ARCHS = list(ALL_ARCHS)
SDPA = "sdpa"  # Gemma2 on transformers >= 5.21 has eager only
LAYER, HEAD = 1, 2
LAYER_RETURNS_TUPLE = TF_VERSION < Version("4.54")


def pair(arch, attn="eager"):
    """An installed model and its plain twin (Gemma2's twin runs eager attention, which install switches to)."""
    attn = attn if attn in ATTN_IMPLS[arch] else "eager"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "tlshim switched")
        model = tlshim.install(build(arch, attn))
    return model, build(arch, "eager" if arch == "gemma2" else attn)


def clip(arch, y):
    """What OLMo's in-place clamp makes of a q/k/v projection output."""
    return y.clamp(-8.0, 8.0) if arch == "olmo" else y


def part(layer, arch, role):
    return getattr(layer, LAYOUT[arch][role])


def vector(seed=3):
    return torch.randn(64, generator=torch.Generator().manual_seed(seed))


def out_hook(fn):
    """A plain torch forward hook replacing a module's (first) output with fn(output)."""

    def hook(module, args, output):
        if isinstance(output, tuple):
            return (fn(output[0]), *output[1:])
        return fn(output)

    return hook


def first_input_hook(fn):
    """A plain torch forward pre-hook (with kwargs) replacing a module's hidden_states with fn(it)."""

    def hook(module, args, kwargs):
        if args:
            return (fn(args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": fn(kwargs["hidden_states"])}

    return hook


def run_ref(model, ids, handles):
    try:
        return model(ids).logits
    finally:
        for handle in handles:
            handle.remove()


def head_fn(n_heads, head, fn):
    """Apply fn to one head's slice of a (..., heads * d_head) projection output."""

    def edit(y):
        y = y.view(*y.shape[:-1], n_heads, -1).clone()
        y[..., head, :] = fn(y[..., head, :])
        return y.flatten(-2)

    return edit


def add(v):
    return lambda t, hook: t + v


def output_edits(arch, twin, v):
    """hook name -> (the module of the plain twin whose output that name is, the edit)."""
    layers = twin.model.layers
    plus, double = (lambda y: y + v), (lambda y: y * 2)
    return {
        "hook_embed": (twin.model.embed_tokens, plus),
        f"blocks.{LAYER}.hook_resid_pre": (layers[LAYER - 1], plus),
        f"blocks.{LAYER}.hook_resid_post": (layers[LAYER], plus),
        f"blocks.{LAYER}.hook_attn_out": (part(layers[LAYER], arch, "attn_out"), plus),
        f"blocks.{LAYER}.hook_mlp_out": (part(layers[LAYER], arch, "mlp_out"), plus),
        f"blocks.{LAYER}.ln1.hook_normalized": (layers[LAYER].input_layernorm, double),
        f"blocks.{LAYER}.ln2.hook_normalized": (part(layers[LAYER], arch, "ln2"), double),
        "ln_final.hook_normalized": (twin.model.norm, double),
    }


@pytest.mark.parametrize("arch", ARCHS)
def test_residual_and_sublayer_edits(arch):
    model, twin = pair(arch)
    ids, v = tokens(), vector()
    for name, (module, edit) in output_edits(arch, twin, v).items():
        got = model.run_with_hooks(ids, fwd_hooks=[(name, lambda t, hook, edit=edit: edit(t))])
        if name == "hook_embed" and arch == "gemma2":
            # Gemma2 scales the embedding after the embedding module before 5.4: the embedding
            # entering the residual stream is the first layer's input
            handle = twin.model.layers[0].register_forward_pre_hook(first_input_hook(edit), with_kwargs=True)
        else:
            handle = module.register_forward_hook(out_hook(edit))
        want = run_ref(twin, ids, [handle])
        assert torch.equal(got, want), name
        assert not torch.equal(got, model(ids).logits), name


@pytest.mark.parametrize("arch", ARCHS)
def test_resid_mid_edit_reaches_both_branches(arch):
    model, twin = pair(arch)
    ids, v = tokens(), vector()
    layer = twin.model.layers[LAYER]
    def by_hand(hidden_states, *args, **kwargs):
        # the decoder layer written out, with v added to the residual stream between attention and MLP
        attn_out = layer.self_attn(hidden_states=layer.input_layernorm(hidden_states), **kwargs)[0]
        if arch == "gemma2":
            attn_out = layer.post_attention_layernorm(attn_out)
        mid = hidden_states + attn_out + v
        mlp_out = layer.mlp(part(layer, arch, "ln2")(mid))
        if arch == "gemma2":
            mlp_out = layer.post_feedforward_layernorm(mlp_out)
        out = mid + mlp_out
        returns_tuple = LAYER_RETURNS_TUPLE or (arch == "gemma2" and TF_VERSION < Version("5.0"))
        return (out,) if returns_tuple else out

    layer.forward = by_hand
    want = twin(ids).logits
    got = model.run_with_hooks(ids, fwd_hooks=[(f"blocks.{LAYER}.hook_resid_mid", add(v))])
    assert torch.equal(got, want)


@pytest.mark.parametrize("arch", ARCHS)
def test_projection_and_mlp_edits(arch):
    model, twin = pair(arch)
    ids = tokens()
    cfg = model.cfg
    attn, mlp = twin.model.layers[LAYER].self_attn, twin.model.layers[LAYER].mlp
    zero = lambda t: t * 0  # noqa: E731
    cases = [
        ("attn.hook_q", attn.q_proj, out_hook(head_fn(cfg.n_heads, HEAD, zero))),
        ("attn.hook_k", attn.k_proj, out_hook(head_fn(cfg.n_key_value_heads, 1, zero))),
        ("attn.hook_v", attn.v_proj, out_hook(head_fn(cfg.n_key_value_heads, 1, zero))),
        ("mlp.hook_pre", mlp.gate_proj, out_hook(lambda y: y * 3)),
        ("mlp.hook_pre_linear", mlp.up_proj, out_hook(lambda y: y * 3)),
    ]
    if hasattr(attn, "q_norm"):
        cases.append(("attn.hook_q_normed", attn.q_norm, out_hook(lambda y: torch.cat([y[..., :HEAD, :], y[..., HEAD:, :] * 0], -2))))
        cases.append(("attn.hook_k_normed", attn.k_norm, out_hook(lambda y: torch.cat([y[..., :1, :], y[..., 1:, :] * 0], -2))))
    for name, module, hook in cases:
        if name.startswith("attn.hook_") and name != "attn.hook_q_normed":
            heads = cfg.n_heads if name == "attn.hook_q" else cfg.n_key_value_heads
            head = HEAD if name == "attn.hook_q" else 1

            def edit(t, hook, head=head):
                t = t.clone()
                t[:, :, head] = 0
                return t
        elif name == "attn.hook_q_normed":
            def edit(t, hook):
                return torch.cat([t[..., :HEAD, :], t[..., HEAD:, :] * 0], -2)
        else:
            def edit(t, hook):
                return t * 3
        got = model.run_with_hooks(ids, fwd_hooks=[(f"blocks.{LAYER}.{name}", edit)])
        want = run_ref(twin, ids, [module.register_forward_hook(hook)])
        assert torch.equal(got, want), name

    def post_pre_hook(module, args):
        return (args[0] * 0.5,)

    got = model.run_with_hooks(ids, fwd_hooks=[(f"blocks.{LAYER}.mlp.hook_post", lambda t, hook: t * 0.5)])
    want = run_ref(twin, ids, [mlp.down_proj.register_forward_pre_hook(post_pre_hook)])
    assert torch.equal(got, want)


@pytest.mark.parametrize("attn_impl", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", ARCHS)
def test_zeroing_a_head_in_z_equals_zeroing_its_output_weights(arch, attn_impl):
    model, twin = pair(arch, attn_impl)
    ids = tokens()
    d_head = model.cfg.d_head

    def ablate(z, hook):
        z = z.clone()
        z[:, :, HEAD] = 0
        return z

    got = model.run_with_hooks(ids, fwd_hooks=[(f"blocks.{LAYER}.attn.hook_z", ablate)])
    with torch.no_grad():
        twin.model.layers[LAYER].self_attn.o_proj.weight[:, HEAD * d_head:(HEAD + 1) * d_head] = 0
    assert torch.equal(got, twin(ids).logits)

    def drop_result(result, hook):
        result = result.clone()
        result[:, :, HEAD] = 0
        return result

    got = model.run_with_hooks(ids, fwd_hooks=[(f"blocks.{LAYER}.attn.hook_result", drop_result)])
    torch.testing.assert_close(got, twin(ids).logits, rtol=1e-4, atol=1e-4)  # a different summation order


@pytest.mark.parametrize("arch", ARCHS)
def test_scale_edit_equals_norm_by_hand(arch):
    model, twin = pair(arch)
    ids = tokens()
    def by_hand(module, args, output):
        x = args[0].float()
        if arch == "olmo":  # parameter-free LayerNorm
            x = x - x.mean(-1, keepdim=True)
            return (x / ((x.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt() * 2)).to(args[0].dtype)
        if arch == "gemma2":  # (1 + w), applied in float32
            scale = (x.pow(2).mean(-1, keepdim=True) + module.eps).sqrt() * 2
            return ((x / scale) * (1.0 + module.weight.float())).to(args[0].dtype)
        scale = (x.pow(2).mean(-1, keepdim=True) + module.variance_epsilon).sqrt() * 2
        return module.weight * (x / scale).to(args[0].dtype)

    layer = twin.model.layers[LAYER]
    for name, norm in ((f"blocks.{LAYER}.ln1.hook_scale", layer.input_layernorm),
                       (f"blocks.{LAYER}.ln2.hook_scale", part(layer, arch, "ln2")),
                       ("ln_final.hook_scale", twin.model.norm)):
        got = model.run_with_hooks(ids, fwd_hooks=[(name, lambda s, hook: s * 2)])
        want = run_ref(twin, ids, [norm.register_forward_hook(by_hand)])
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)  # the divisor's rounding differs
        assert not torch.allclose(got, model(ids).logits, atol=1e-2), name


@pytest.mark.parametrize("arch", ARCHS)
def test_normalized_edit_goes_through_the_weight(arch):
    """hook_normalized is before the norm's weight: adding v there adds w * v to the norm's output."""
    model, twin = pair(arch)
    ids, v = tokens(), vector(5)

    def by_hand(module, args, output):
        if arch == "olmo":  # parameter-free LayerNorm: its output is hook_normalized
            return output + v
        x = args[0].float()
        eps = module.eps if arch == "gemma2" else module.variance_epsilon
        normalized = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) + v
        if arch == "gemma2":  # (1 + w), applied in float32
            return (normalized * (1.0 + module.weight.float())).to(args[0].dtype)
        return module.weight * normalized.to(args[0].dtype)

    layer = twin.model.layers[LAYER]
    for name, norm in ((f"blocks.{LAYER}.ln1.hook_normalized", layer.input_layernorm),
                       (f"blocks.{LAYER}.ln2.hook_normalized", part(layer, arch, "ln2")),
                       ("ln_final.hook_normalized", twin.model.norm)):
        got = model.run_with_hooks(ids, fwd_hooks=[(name, add(v))])
        want = run_ref(twin, ids, [norm.register_forward_hook(by_hand)])
        assert torch.equal(got, want), name
        assert not torch.allclose(got, model(ids).logits, atol=1e-2), name


def uniform_causal(shape):
    pos = shape[-1]
    pattern = torch.ones(pos, pos).tril()
    return (pattern / pattern.sum(-1, keepdim=True)).expand(shape)


@pytest.mark.parametrize("attn_impl", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", ARCHS)
def test_uniform_pattern_and_scores_equal_the_computation_by_hand(arch, attn_impl):
    model, twin = pair(arch, attn_impl)
    ids = tokens()
    cfg = model.cfg
    attn = twin.model.layers[LAYER].self_attn
    seen = {}
    handle = attn.v_proj.register_forward_hook(lambda m, a, out: seen.__setitem__("v", out))
    twin(ids)
    handle.remove()
    v = clip(arch, seen["v"]).view(2, 12, cfg.n_key_value_heads, cfg.d_head)
    v = v.repeat_interleave(cfg.n_heads // cfg.n_key_value_heads, dim=2)
    z_by_hand = torch.einsum("qk,bkhe->bqhe", uniform_causal((12, 12)), v)

    def replace_z(module, args):
        return (z_by_hand.flatten(-2),)

    want = run_ref(twin, ids, [attn.o_proj.register_forward_pre_hook(replace_z)])

    def uniform(pattern, hook):
        return uniform_causal(pattern.shape).to(pattern.dtype)

    got = model.run_with_hooks(ids, fwd_hooks=[(f"blocks.{LAYER}.attn.hook_pattern", uniform)])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    def flat_scores(scores, hook):
        causal = torch.ones(12, 12, dtype=torch.bool).tril()
        return torch.zeros_like(scores).masked_fill(~causal, torch.finfo(scores.dtype).min)

    got = model.run_with_hooks(ids, fwd_hooks=[(f"blocks.{LAYER}.attn.hook_attn_scores", flat_scores)])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_rotated_query_and_key_edits(arch):
    """Rotary is linear, so scaling a head after rotary equals scaling it before (up to rounding).

    On a NoPE layer (SmolLM3) there is no rotary and the two are the same edit."""
    model, twin = pair(arch, "sdpa")
    ids = tokens()
    cfg = model.cfg
    attn = twin.model.layers[LAYER].self_attn
    after_norm = hasattr(attn, "q_norm")
    for name, module, heads, head in (("rot_q", attn.q_norm if after_norm else attn.q_proj, cfg.n_heads, HEAD),
                                      ("rot_k", attn.k_norm if after_norm else attn.k_proj, cfg.n_key_value_heads, 1)):
        def edit(t, hook, head=head):
            t = t.clone()
            t[:, :, head] *= 0.5
            return t

        got = model.run_with_hooks(ids, fwd_hooks=[(f"blocks.{LAYER}.attn.hook_{name}", edit)])
        if after_norm:
            def by_hand(y, head=head):
                y = y.clone()
                y[..., head, :] *= 0.5
                return y
        else:
            scaled = head_fn(heads, head, lambda t: t * 0.5)

            def by_hand(y):
                return scaled(clip(arch, y))
        want = run_ref(twin, ids, [module.register_forward_hook(out_hook(by_hand))])
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(got, model(ids).logits, atol=1e-3)


@pytest.mark.parametrize("arch", ARCHS)
def test_read_only_attention_hooks_keep_logits(arch):
    model, twin = pair(arch, "sdpa")
    ids = tokens()
    native = twin(ids).logits
    for name in ("attn.hook_pattern", "attn.hook_attn_scores", "attn.hook_rot_q", "attn.hook_rot_k"):
        got = model.run_with_hooks(ids, fwd_hooks=[(lambda n, name=name: n.endswith(name), lambda t, hook: None)])
        assert ((got - native).abs().max() / native.abs().max()) <= 1e-5, name
    assert torch.equal(model(ids).logits, native)
