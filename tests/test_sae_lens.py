"""SAELens's own calls on an installed model (the `sae` tox env: SAELens 6.x with TransformerLens 3.x).

SAEs are built from a config with random weights (nothing is downloaded). The reference for the
``*_with_saes`` calls is SAELens's HookedSAETransformer itself, on a TransformerLens 3 twin that holds
the same Llama weights: the same SAE stage names in the cache, the same values (to float rounding,
the two models multiply in different orders). The exact checks are against the SAE's own methods.
"""

import pytest

sae_lens = pytest.importorskip("sae_lens", reason="SAELens is installed in the `sae` tox env only")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from sae_lens import ActivationsStore, HookedSAETransformer, JumpReLUSAE, JumpReLUSAEConfig  # noqa: E402
from sae_lens import StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig  # noqa: E402
from sae_lens.evals import get_recons_loss, get_sparsity_and_variance_metrics  # noqa: E402
from sae_lens.saes.sae import SAEMetadata  # noqa: E402
from sae_lens.training.activation_scaler import ActivationScaler  # noqa: E402
from transformer_lens import HookedTransformerConfig  # noqa: E402
from transformer_lens.pretrained.weight_conversions.llama import convert_llama_weights  # noqa: E402

import tlshim  # noqa: E402
from dropin import fixture, tokenizer  # noqa: E402

NAME = "blocks.1.hook_resid_post"
KINDS = {"standard": (StandardSAE, StandardSAEConfig, {}), "topk": (TopKSAE, TopKSAEConfig, {"k": 8}),
         "jumprelu": (JumpReLUSAE, JumpReLUSAEConfig, {})}
def make_sae(kind, d_in, hook_name=NAME, seed=0):
    cls, config, extra = KINDS[kind]
    if hook_name.endswith("hook_z"):  # an attention SAE reads the heads flattened, as SAELens's hook_z SAEs do
        extra = {**extra, "reshape_activations": "hook_z"}
    sae = cls(config(d_in=d_in, d_sae=96, metadata=SAEMetadata(hook_name=hook_name, context_size=8, prepend_bos=False), **extra))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in sae.parameters():  # random biases and thresholds too, so no stage is trivially zero
            param.copy_(torch.randn(param.shape, generator=g) * (0.05 if param.dim() == 1 else 0.3))
    return sae


@pytest.fixture(scope="module")
def models():
    plain = fixture("llama")
    return tlshim.install(fixture("llama"), tokenizer=tokenizer("llama")), plain


def ids_for(model, seed=0):
    return torch.randint(4, model.cfg.d_vocab, (2, 12), generator=torch.Generator().manual_seed(seed))


def hooked_sae_transformer(plain):
    """SAELens's HookedSAETransformer (TransformerLens 3) holding ``plain``'s Llama weights, unprocessed."""
    c = plain.config
    cfg = HookedTransformerConfig(
        d_model=c.hidden_size, d_head=c.hidden_size // c.num_attention_heads, n_heads=c.num_attention_heads,
        d_mlp=c.intermediate_size, n_layers=c.num_hidden_layers, n_ctx=64, eps=c.rms_norm_eps, d_vocab=c.vocab_size,
        act_fn=c.hidden_act, n_key_value_heads=c.num_key_value_heads, normalization_type="RMS",
        positional_embedding_type="rotary", rotary_adjacent_pairs=False, rotary_dim=c.hidden_size // c.num_attention_heads,
        rotary_base=c.rope_parameters["rope_theta"], final_rms=True, gated_mlp=True, original_architecture="LlamaForCausalLM",
    )
    model = HookedSAETransformer(cfg)
    model.load_and_process_state_dict(convert_llama_weights(plain, cfg), fold_ln=False, center_writing_weights=False,
                                      center_unembed=False, fold_value_biases=False)
    return model


@pytest.mark.parametrize("use_error_term", [False, True])
@pytest.mark.parametrize("kind, hook_name", [*((kind, NAME) for kind in KINDS), ("standard", "blocks.0.attn.hook_z")])
def test_run_with_cache_with_saes_as_hooked_sae_transformer(models, kind, hook_name, use_error_term):
    model, plain = models
    reference = hooked_sae_transformer(plain)
    ids = ids_for(model)
    d_in = model.cfg.n_heads * model.cfg.d_head if hook_name.endswith("hook_z") else model.cfg.d_model
    sae = make_sae(kind, d_in, hook_name)
    ref_logits, ref_cache = reference.run_with_cache_with_saes(ids, saes=[sae], use_error_term=use_error_term)
    logits, cache = model.run_with_cache_with_saes(ids, saes=[sae], use_error_term=use_error_term)
    ref_names = sorted(k for k in ref_cache.keys() if ".hook_sae_" in k)
    assert sorted(k for k in cache.keys() if ".hook_sae_" in k) == ref_names
    assert (hook_name + ".hook_sae_error" in ref_names) == use_error_term
    for name in ref_names:
        torch.testing.assert_close(cache[name], ref_cache[name], rtol=1e-4, atol=1e-4, msg=name)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
    assert not torch.equal(logits, plain(ids).logits) or use_error_term


@pytest.mark.parametrize("kind", KINDS)
def test_sae_lens_sae_exact_answers(models, kind):
    model, plain = models
    ids = ids_for(model, seed=1)
    sae = make_sae(kind, model.cfg.d_model, seed=1)
    logits, cache = model.run_with_cache_with_saes(ids, saes=[sae])
    x = cache[NAME + ".hook_sae_input"]
    assert torch.equal(cache[NAME + ".hook_sae_acts_post"], sae.encode(x))
    assert torch.equal(cache[NAME + ".hook_sae_output"], sae(x))
    assert torch.equal(logits, model.run_with_hooks(ids, fwd_hooks=[(NAME, lambda t, hook: sae(t))]))
    assert (cache[NAME + ".hook_sae_acts_post"] != 0).any()
    # with the error term the model computes exactly what it computes without the SAE
    model.add_sae(sae, use_error_term=True)
    assert model.acts_to_saes == {NAME: sae}
    assert torch.equal(model(ids).logits, plain(ids).logits)
    model.reset_saes()
    assert model.acts_to_saes == {} and NAME + ".hook_sae_acts_post" not in model.hook_dict
    assert torch.equal(model(ids).logits, plain(ids).logits)
    assert not sae.use_error_term  # the SAE's own setting is left alone


def _pretokenized(model, rows=16):
    g = torch.Generator().manual_seed(3)
    return Dataset.from_dict({"input_ids": torch.randint(4, model.cfg.d_vocab, (rows, 8), generator=g).tolist()})


def _store(model, sae, dataset):
    return ActivationsStore.from_sae(model, sae, dataset=dataset, context_size=8, streaming=False, store_batch_size_prompts=2,
                                     n_batches_in_buffer=2, train_batch_size_tokens=8, device="cpu")


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_activations_store_on_a_pretokenized_dataset(models):
    model, _ = models
    sae = make_sae("standard", model.cfg.d_model)
    dataset = _pretokenized(model)
    store = _store(model, sae, dataset)
    batch = store.get_batch_tokens()
    assert torch.equal(batch, torch.tensor(dataset["input_ids"][:2]))
    acts = store.get_activations(batch)
    _, cache = model.run_with_cache(batch, names_filter=NAME)
    assert torch.equal(acts, cache[NAME])


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_activations_store_on_a_text_dataset(models):
    model, _ = models
    sae = make_sae("standard", model.cfg.d_model)
    words = " ".join(f"w{i}" for i in range(4, 40))
    store = _store(model, sae, Dataset.from_dict({"text": [words] * 8}))
    batch = store.get_batch_tokens()
    assert torch.equal(batch[0], model.to_tokens(words, prepend_bos=False)[0, :8])


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_sparsity_and_variance_evals(models):
    model, _ = models
    sae = make_sae("standard", model.cfg.d_model)
    dataset = _pretokenized(model)
    metrics, _ = get_sparsity_and_variance_metrics(
        sae, model, _store(model, sae, dataset), ActivationScaler(), n_batches=1, compute_l2_norms=True,
        compute_sparsity_metrics=True, compute_variance_metrics=True, compute_featurewise_density_statistics=False,
        eval_batch_size_prompts=2, model_kwargs={},
    )
    batch = torch.tensor(dataset["input_ids"][:2])
    _, cache = model.run_with_cache_with_saes(batch, saes=[sae])
    acts = cache[NAME + ".hook_sae_acts_post"]
    assert metrics["l0"] == pytest.approx((acts > 0).float().sum(-1).mean().item())
    x, out = cache[NAME + ".hook_sae_input"], cache[NAME + ".hook_sae_output"]
    assert metrics["mse"] == pytest.approx((out - x).pow(2).sum(-1).mean().item(), rel=1e-5)


def test_kl_and_cross_entropy_evals(models):
    model, plain = models
    sae = make_sae("standard", model.cfg.d_model)
    ids = ids_for(model)
    metrics = get_recons_loss(sae, model, ActivationScaler(), ids, compute_kl=True, compute_ce_loss=True)
    native = plain(ids, labels=ids).loss
    assert metrics["ce_loss_without_sae"].mean().item() == pytest.approx(native.item(), rel=1e-5)
    assert metrics["kl_div_with_sae"].mean().item() > 0
