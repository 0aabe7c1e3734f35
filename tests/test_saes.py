"""SAEs spliced in at a hook point (tlshim/saes.py): SAELens's HookedSAETransformer calls on an
installed model, checked against hand-written references with no SAELens installed.

The references: an identity SAE leaves the logits bit-identical; a zero SAE equals zero-ablating the
hook; a linear SAE equals running its encode/decode in a plain run_with_hooks hook; with the error
term the model computes exactly what it computes without the SAE.
"""

import threading

import pytest
import torch
from torch import nn

import tlshim
from dropin import ARCHS, fixture
from models import build, tokens
from test_roundtrip import assert_same, snapshot

NAME = "blocks.1.hook_resid_post"
STAGES = ("hook_sae_input", "hook_sae_acts_pre", "hook_sae_acts_post", "hook_sae_recons", "hook_sae_error", "hook_sae_output")


class LinearSAE(nn.Module):
    """A ReLU SAE with SAELens's hook points (plain identity modules) and its encode/decode split."""

    def __init__(self, d_model, d_sae=32, hook_name=NAME, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.W_enc = nn.Parameter(torch.randn(d_model, d_sae, generator=g) / d_model**0.5)
        self.b_enc = nn.Parameter(torch.randn(d_sae, generator=g) * 0.1)
        self.W_dec = nn.Parameter(torch.randn(d_sae, d_model, generator=g) / d_sae**0.5)
        self.b_dec = nn.Parameter(torch.randn(d_model, generator=g) * 0.1)
        self.hook_dict = {}
        for name in STAGES:
            setattr(self, name, nn.Identity())
            self.hook_dict[name] = getattr(self, name)
        self.cfg = type("Cfg", (), {"metadata": type("Meta", (), {"hook_name": hook_name})()})()
        self.use_error_term = False

    def encode(self, x):
        pre = self.hook_sae_acts_pre(self.hook_sae_input(x) @ self.W_enc + self.b_enc)
        return self.hook_sae_acts_post(torch.relu(pre))

    def decode(self, acts):
        return self.hook_sae_recons(acts @ self.W_dec + self.b_dec)

    def forward(self, x):
        return self.decode(self.encode(x))


def _zero(x):
    return torch.zeros_like(x)


@pytest.fixture
def pair():
    return tlshim.install(build("llama")), build("llama")


def _apply(fn):
    return lambda t, hook: fn(t)


@pytest.mark.parametrize("arch", ARCHS)
def test_identity_zero_and_error_term_on_every_architecture(arch):
    model, plain = tlshim.install(fixture(arch)), fixture(arch)
    ids = tokens(seq=10) % model.cfg.d_vocab
    native = plain(ids).logits
    assert torch.equal(_run(model, ids, nn.Identity(), NAME), native)
    assert torch.equal(_run(model, ids, _zero, NAME), model.run_with_hooks(ids, fwd_hooks=[(NAME, _apply(_zero))]))
    assert not torch.equal(_run(model, ids, _zero, NAME), native)
    sae = LinearSAE(model.cfg.d_model)
    assert torch.equal(_run(model, ids, sae, NAME, use_error_term=True), native)
    assert torch.equal(model(ids).logits, native)
    assert not any(n.startswith(NAME + ".") for n in model.hook_dict)


def _run(model, ids, sae, name, use_error_term=None):
    """One forward with ``sae`` attached model-wide at ``name``, then detached."""
    model.add_sae(sae, hook_name=name, use_error_term=use_error_term)
    try:
        return model(ids).logits
    finally:
        model.reset_saes()


def test_linear_sae_equals_a_hook_running_it_and_caches_its_stages(pair):
    model, plain = pair
    ids = tokens()
    sae = LinearSAE(model.cfg.d_model)
    reference = model.run_with_hooks(ids, fwd_hooks=[(NAME, _apply(sae))])
    logits, cache = model.run_with_cache_with_saes(ids, saes=[sae])
    assert torch.equal(logits, reference)
    assert not torch.equal(logits, plain(ids).logits)
    x = cache[NAME + ".hook_sae_input"]
    _, clean = model.run_with_cache(ids, names_filter=NAME)
    assert torch.equal(x, clean[NAME])  # what the SAE reads is the model's own activation
    assert torch.equal(cache[NAME + ".hook_sae_acts_post"], sae.encode(x))
    assert torch.equal(cache[NAME + ".hook_sae_acts_pre"], x @ sae.W_enc + sae.b_enc)
    assert torch.equal(cache[NAME + ".hook_sae_recons"], sae(x))
    assert torch.equal(cache[NAME + ".hook_sae_output"], sae(x))
    assert torch.equal(cache[NAME], sae(x))  # other hooks at the name see what flows on
    assert NAME + ".hook_sae_error" not in cache  # fired with the error term only
    assert set(model.hook_dict) == set(clean.model.hook_dict)  # detached again
    assert not any(n.startswith(NAME + ".") for n in model.hook_dict)


def test_error_term_keeps_the_output_and_edits_go_through(pair):
    model, plain = pair
    ids = tokens()
    sae = LinearSAE(model.cfg.d_model)
    native = plain(ids).logits
    logits, cache = model.run_with_cache_with_saes(ids, saes=[sae], use_error_term=True)
    assert torch.equal(logits, native)
    x = cache[NAME + ".hook_sae_input"]
    assert torch.equal(cache[NAME + ".hook_sae_error"], x - sae(x))
    assert torch.equal(cache[NAME + ".hook_sae_output"], x)

    def kill(acts, hook):
        acts = acts.clone()
        acts[..., :8] = 0
        return acts

    def by_hand(t):  # SAELens's definition: edited reconstruction plus the clean error
        acts = sae.encode(t).clone()
        acts[..., :8] = 0
        return t + (sae.decode(acts) - sae(t))

    sae.use_error_term = True  # run_with_hooks_with_saes takes the SAE's own setting, as SAELens's
    edited = model.run_with_hooks_with_saes(ids, saes=[sae], fwd_hooks=[(NAME + ".hook_sae_acts_post", kill)])
    assert torch.equal(edited, model.run_with_hooks(ids, fwd_hooks=[(NAME, _apply(by_hand))]))
    assert not torch.equal(edited, native)


def test_error_term_gradient_flows_through_the_sae_only(pair):
    """SAELens's error term is a constant: the gradient reaches the features (attribution patching)."""
    model, _ = pair
    ids = tokens()
    sae = LinearSAE(model.cfg.d_model)
    grads = {}

    def keep(grad, hook):
        grads[hook.name] = grad

    with model.saes([sae], use_error_term=True), model.hooks(bwd_hooks=[(NAME + ".hook_sae_acts_post", keep), (NAME + ".hook_sae_input", keep)]):
        model(ids).logits.sum().backward()
    assert grads[NAME + ".hook_sae_acts_post"].abs().sum() > 0
    # the input's gradient is the one through the SAE: W_enc applied to the features' (ReLU-masked) gradient
    acts_grad = grads[NAME + ".hook_sae_acts_post"]
    _, cache = model.run_with_cache_with_saes(ids, saes=[sae])
    mask = (cache[NAME + ".hook_sae_acts_pre"] > 0).float()
    torch.testing.assert_close(grads[NAME + ".hook_sae_input"], (acts_grad * mask) @ sae.W_enc.T.detach())


def test_add_sae_is_model_wide_replaces_and_resets(pair):
    model, plain = pair
    ids = tokens()
    before = snapshot(plain, ids)
    a, b = LinearSAE(model.cfg.d_model, seed=1), LinearSAE(model.cfg.d_model, seed=2)
    model.add_sae(a)
    assert model.acts_to_saes == {NAME: a}
    model.add_sae(b)  # the same hook name: replaces
    assert model.acts_to_saes == {NAME: b}
    assert not torch.equal(model(ids).logits, plain(ids).logits)
    model.reset_hooks()  # hooks come and go; the SAE stays, as in SAELens
    with_b = model(ids).logits
    model.reset_saes()
    assert torch.equal(model.run_with_hooks(ids, fwd_hooks=[(NAME, _apply(b))]), with_b)
    model.reset_saes(NAME, prev_saes=[a])
    assert model.acts_to_saes == {NAME: a}
    model.reset_saes()
    assert model.acts_to_saes == {}
    tlshim.uninstall(model)
    after = snapshot(model, ids)
    after["params"] = before["params"] = None
    assert_same(before, after)


def test_scoped_saes_belong_to_the_calling_thread(pair):
    model, plain = pair
    ids = tokens()
    sae = LinearSAE(model.cfg.d_model)
    native = plain(ids).logits
    spliced = model.run_with_hooks(ids, fwd_hooks=[(NAME, _apply(sae))])
    results, errors = {}, []
    barrier = threading.Barrier(2)

    def run(kind):
        try:
            barrier.wait()
            for i in range(20):
                if kind == "sae":
                    results[kind, i] = model.run_with_saes(ids, saes=[sae])
                else:
                    results[kind, i] = model(ids).logits
        except BaseException as err:  # noqa: BLE001 - raised below
            errors.append(err)

    threads = [threading.Thread(target=run, args=(kind,)) for kind in ("sae", "plain")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for (kind, _), logits in results.items():
        assert torch.equal(logits, spliced if kind == "sae" else native), kind
    assert torch.equal(model(ids).logits, native)


def test_scoped_sae_stands_in_front_of_a_model_wide_one(pair):
    model, _ = pair
    ids = tokens()
    a, b = LinearSAE(model.cfg.d_model, seed=1), LinearSAE(model.cfg.d_model, seed=2)
    model.add_sae(a)
    with model.saes(b):
        assert model.acts_to_saes == {NAME: b}
        inside = model(ids).logits
    assert model.acts_to_saes == {NAME: a}
    outside = model(ids).logits
    model.reset_saes()
    assert torch.equal(inside, model.run_with_hooks(ids, fwd_hooks=[(NAME, _apply(b))]))
    assert torch.equal(outside, model.run_with_hooks(ids, fwd_hooks=[(NAME, _apply(a))]))


def test_bad_saes_say_what_would_work(pair):
    model, _ = pair
    with pytest.raises(ValueError, match="hook_name="):
        model.add_sae(nn.Identity())
    with pytest.raises(tlshim.HookNameError, match="blocks.1.hook_resid_post"):
        model.add_sae(nn.Identity(), hook_name="blocks.1.hook_resid_pots")
    model.add_sae(lambda x: x[..., :3], hook_name=NAME)
    with pytest.raises(ValueError, match="same shape"):
        model(tokens())
    model.reset_saes()
    with pytest.raises(ValueError, match="one SAE per hook name"):
        model.run_with_saes(tokens(), saes=[LinearSAE(64), LinearSAE(64, seed=1)])
    with pytest.raises(ValueError, match="exclude_special_tokens is not supported"):
        model.run_with_saes(tokens(), saes=[LinearSAE(64)], exclude_special_tokens=True)
    assert not any(n.startswith(NAME + ".") for n in model.hook_dict)


def test_generate_and_uninstall_with_an_sae_attached(pair):
    model, plain = pair
    ids = tokens(batch=1)
    before = snapshot(plain, ids)
    model.add_sae(LinearSAE(model.cfg.d_model), use_error_term=True)
    kwargs = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids, **kwargs), plain.generate(ids, **kwargs))
    tlshim.uninstall(model)  # takes the SAE's hook with it
    after = snapshot(model, ids)
    after["params"] = before["params"] = None
    assert_same(before, after)
