"""Loading the OpenELM stand-in through transformers' remote-code path with tlshim.loading / from_pretrained.

On every transformers version of the matrix: the loaded weights are the saved ones bit for bit, the
logits equal those of the same model built in memory (no meta device), greedy ``generate`` equals a
step-by-step greedy loop without cache, ``loading()`` puts back every object it patched, and a plain
load of the same folder afterwards still shows the v5 pitfalls (the fixes are scoped). Pitfall
numbers (P1...) are those of OPENELM.md section 4.
"""

import contextlib
import copy
import dataclasses
import json
import pickle
import sys

import pytest
import torch
import transformers
import transformers.dynamic_module_utils as dynamic_module_utils
from packaging.version import Version
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache

import tlshim
from tlshim.legacy_cache import LegacyDynamicCache
from tlshim.loading import ReinitializedWeightsError, check_loaded_weights, finish_loading, repair_buffers

try:
    from tests.fixtures.openelm_fixture import build_openelm_in_memory, save_openelm
except ImportError:  # tests/ itself on sys.path (pytest's default rootdir-less import mode)
    from fixtures.openelm_fixture import build_openelm_in_memory, save_openelm

TF = Version(transformers.__version__)
IS_V5 = TF >= Version("5.0.0")
STRICT_CONFIG = dataclasses.is_dataclass(transformers.PretrainedConfig)  # 5.4+: P1
REINIT_ON_LOAD = Version("5.0.0") <= TF < Version("5.3.0")  # P5 for remote code
CONFIG_BASE = getattr(transformers, "PreTrainedConfig", transformers.PretrainedConfig)
HEAD_DIM, VOCAB, CONTEXT, ROPE_LEN = 16, 256, 64, 128
NO_WARN = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_openelm(tmp_path_factory.mktemp("ckpt") / "openelm", seed=0)


@pytest.fixture(scope="module")
def reference():
    return build_openelm_in_memory(seed=0)


@pytest.fixture(scope="module")
def loaded(folder):
    return tlshim.from_pretrained(folder, install=False).eval()


@pytest.fixture(scope="module")
def input_ids():
    return torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))


def _inv_freq():
    return 1.0 / (10000 ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float32) / HEAD_DIM))


def _ropes(model):
    return [layer.attn.pos_embedding for layer in model.transformer.layers]


# --------------------------------------------------------------------------- the three checks


@torch.no_grad()
def test_loaded_weights_are_the_saved_ones_bit_for_bit(folder, loaded):
    saved = load_file(str(folder / "model.safetensors"))
    state = loaded.state_dict()
    assert sorted(state) == sorted(saved)  # no lm_head.weight, no buffers
    for key, value in saved.items():
        assert state[key].dtype == value.dtype and torch.equal(state[key], value), key


@torch.no_grad()
def test_buffers_and_logits_equal_the_in_memory_model(loaded, reference, input_ids):
    assert type(loaded).__module__.startswith("transformers_modules.")
    mask = loaded.transformer.causal_mask
    assert mask.dtype == torch.bool and torch.equal(mask, reference.transformer.causal_mask)
    for rope, ref in zip(_ropes(loaded), _ropes(reference)):
        assert torch.equal(rope.inv_freq, _inv_freq())
        assert torch.equal(rope._cached_cos, ref._cached_cos) and torch.equal(rope._cached_sin, ref._cached_sin)
    assert loaded.config.use_cache is True  # P2

    expected = reference(input_ids, use_cache=False).logits
    assert torch.equal(loaded(input_ids, use_cache=False).logits, expected)
    assert torch.equal(loaded(input_ids).logits, expected)  # config.use_cache (P2) with no cache object (P7)
    pad = torch.ones_like(input_ids)
    pad[0, :3] = 0
    assert torch.equal(
        loaded(input_ids, attention_mask=pad, use_cache=False).logits,
        reference(input_ids, attention_mask=pad, use_cache=False).logits,
    )


@torch.no_grad()
def test_greedy_generate_20_tokens_equals_a_greedy_loop_without_cache(loaded, reference, input_ids):
    prompt = input_ids[:, :5]
    greedy = prompt
    for _ in range(20):
        step = reference(greedy, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        greedy = torch.cat([greedy, step], dim=1)
    assert (greedy[:, 5:] != loaded.config.eos_token_id).all()  # no early stop: the comparison is exact

    out = loaded.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20, do_sample=False)
    assert torch.equal(out, greedy)


@torch.no_grad()
def test_kv_cache_steps_match_the_full_forward(loaded, input_ids):
    # P7: on v5 the v4 code path from None / a legacy tuple to a cache object is gone; tlshim's
    # pre-hook hands the forward a DynamicCache (v4 returns its legacy tuple, accepted back as is).
    full = loaded(input_ids, use_cache=False).logits
    first = loaded(input_ids[:, :10], use_cache=True)
    cache = first.past_key_values
    if IS_V5:
        assert isinstance(cache, Cache)
    second = loaded(input_ids[:, 10:], past_key_values=cache)
    torch.testing.assert_close(second.logits, full[:, 10:], atol=1e-4, rtol=1e-4)
    if IS_V5:  # a legacy tuple is taken too
        legacy = tuple((layer_k, layer_v) for layer_k, layer_v in _legacy(loaded, input_ids[:, :10]))
        third = loaded(input_ids[:, 10:], past_key_values=legacy, use_cache=True)
        torch.testing.assert_close(third.logits, full[:, 10:], atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_installed_model_runs_with_cache_and_generates_on_its_kv_cache(folder, reference, input_ids):
    """The real file's cache calls (from_legacy_cache on every cache, to_legacy_cache, seen_tokens,
    get_max_length) on every version: run_with_cache continuing from a cache sees the new positions
    only, and greedy generate uses the cache (one position a step) with the no-cache loop's tokens."""
    model = tlshim.from_pretrained(folder)
    full = reference(input_ids, use_cache=False).logits
    past = model(input_ids[:, :10], use_cache=True).past_key_values
    logits, cache = model.run_with_cache(input_ids[:, 10:], past_key_values=past, use_cache=True)
    torch.testing.assert_close(logits, full[:, 10:], atol=1e-4, rtol=1e-4)
    n_heads, n_kv = model.cfg.n_heads[1], model.cfg.n_key_value_heads[1]
    assert cache["blocks.1.attn.hook_pattern"].shape == (2, n_heads, 6, 16)
    assert cache["blocks.1.attn.hook_rot_k"].shape == (2, 6, n_kv, HEAD_DIM)

    prompt = input_ids[:, :5]
    greedy = prompt
    for _ in range(6):
        greedy = torch.cat([greedy, reference(greedy, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
    positions = []
    with model.hooks(fwd_hooks=[("blocks.0.hook_resid_pre", lambda x, hook: positions.append(x.shape[1]))]):
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False)
    assert torch.equal(out, greedy)
    assert positions == [5, 1, 1, 1, 1, 1]
    tlshim.uninstall(model)


def _legacy(model, ids):
    cache = model(ids, use_cache=True).past_key_values
    return [(layer.keys, layer.values) for layer in cache.layers]


# --------------------------------------------------------------------------- scoping


def _snapshot(classes):
    return {(klass, name): value for klass in classes for name, value in vars(klass).items()}


def _remote_classes():
    return [
        obj
        for name, module in list(sys.modules.items())
        if name.startswith("transformers_modules.") and "openelm" in name
        for obj in vars(module).values()
        if isinstance(obj, type) and obj.__module__ == name
    ]


@NO_WARN
def test_loading_restores_every_patched_object(folder, loaded):
    # The remote classes exist already (the `loaded` fixture); snapshot every class attribute.
    fixed = [CONFIG_BASE, PreTrainedModel, nn.Module, DynamicCache]
    before = _snapshot(fixed + _remote_classes())
    with tlshim.loading() as patched:
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
        seen = list(patched)
    finish_loading(model)
    assert patched == []
    for owner, name, original in seen:
        assert vars(owner)[name] is original, (owner, name)
    after = _snapshot(fixed + _remote_classes())
    assert all(after[key] is before[key] for key in before)
    added = {key: value for key, value in after.items() if key not in before}  # transformers' own caches
    assert not any(tlshim._wrapt.is_wrapper(value) for value in added.values()), added

    where = {(owner.__name__, name) for owner, name, _ in seen}
    if not IS_V5:
        assert where == set()  # transformers 4.x needs no load-time fix
        return
    assert {("PreTrainedModel", "get_init_context"), ("OpenELMRotaryEmbedding", "__init__")} <= where  # P3
    assert ("OpenELMPreTrainedModel", "_init_weights") in where  # P5
    assert (("OpenELMConfig", "__post_init__") in where) == STRICT_CONFIG  # P1


def test_nested_scopes_and_errors_restore_too():
    init, context = vars(CONFIG_BASE)["__init__"], vars(PreTrainedModel).get("get_init_context")  # 4.48: none
    with pytest.raises(RuntimeError, match="boom"):
        with tlshim.loading() as outer:
            with tlshim.loading() as inner:
                assert inner == []  # what the outer scope wrapped is not wrapped twice
            assert len(outer) == (2 if IS_V5 else 0)
            raise RuntimeError("boom")
    assert vars(CONFIG_BASE)["__init__"] is init and vars(PreTrainedModel).get("get_init_context") is context


def _dynamic_config_class(folder):
    return dynamic_module_utils.get_class_from_dynamic_module("configuration_openelm.OpenELMConfig", str(folder))


@NO_WARN
@pytest.mark.skipif(not IS_V5, reason="transformers 4.x loads the remote code as it is")
def test_plain_load_after_tlshim_still_shows_the_pitfalls(folder, loaded):
    if STRICT_CONFIG:  # P1
        with pytest.raises(TypeError, match=r"__post_init__\(\) got an unexpected keyword argument"):
            AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
        with pytest.raises(TypeError, match="unexpected keyword argument"):
            _dynamic_config_class(folder)()
        type(loaded.config)()  # the loaded model's own config builds defaults (generate, save on 5.4-5.12)
        assert type(loaded.config).__name__ == "OpenELMConfig"
        assert isinstance(loaded.config, _dynamic_config_class(folder))
    else:  # P3
        with pytest.raises(NotImplementedError, match="meta tensor"):
            AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    assert not hasattr(DynamicCache, "from_legacy_cache")  # P7 is fixed on the model, not on the class


# --------------------------------------------------------------------------- repair / detection


@torch.no_grad()
def test_repair_buffers_finds_and_fixes_garbage(loaded, reference, input_ids):
    model = copy.deepcopy(loaded)
    assert repair_buffers(model) == []
    kept = model.transformer.causal_mask
    model.transformer.causal_mask = torch.empty_like(kept).random_(0, 2)
    rope = model.transformer.layers[1].attn.pos_embedding
    rope.inv_freq = torch.full_like(rope.inv_freq, -3e38)
    rope._cached_cos = torch.empty(rope._cached_cos.shape, device="meta")
    grown = model.transformer.layers[2].attn.pos_embedding
    grown._cached_seq_length = 2 * ROPE_LEN  # a table grown at run time, from a bad inv_freq
    grown.inv_freq = torch.zeros_like(grown.inv_freq)
    grown._cached_cos = torch.ones(1, 1, 2 * ROPE_LEN, HEAD_DIM)
    expected = reference(input_ids, use_cache=False).logits
    assert not torch.equal(model(input_ids, use_cache=False).logits, expected)  # rebuilds layer 1's tables

    repaired = repair_buffers(model)
    assert sorted(repaired) == sorted(
        [
            "transformer.causal_mask",
            "transformer.layers.1.attn.pos_embedding.inv_freq",
            "transformer.layers.1.attn.pos_embedding._cached_cos",
            "transformer.layers.1.attn.pos_embedding._cached_sin",
            "transformer.layers.2.attn.pos_embedding.inv_freq",
            "transformer.layers.2.attn.pos_embedding._cached_cos",
        ]
    )
    assert model.transformer.causal_mask is not kept and "causal_mask" in model.transformer._non_persistent_buffers_set
    assert "causal_mask" not in model.state_dict() and grown._cached_seq_length == ROPE_LEN
    assert torch.equal(model(input_ids, use_cache=False).logits, expected)
    assert repair_buffers(model) == []


@torch.no_grad()
def test_repair_keeps_state_grown_at_run_time_and_cast_models(loaded, input_ids):
    model = copy.deepcopy(loaded)
    long_ids = input_ids.repeat(1, 9)
    model(long_ids[:, :100], use_cache=False)  # the mask regrows to twice its side
    model(long_ids[:, : 2 * CONTEXT + 1], use_cache=False)  # and again; the rope table grows too
    assert model.transformer.causal_mask.shape[-1] == 4 * CONTEXT
    assert _ropes(model)[0]._cached_cos.shape[2] == 2 * CONTEXT + 1 > ROPE_LEN
    assert repair_buffers(model) == []
    model.to(torch.bfloat16)  # inv_freq becomes bf16: still what the model was built with
    assert repair_buffers(model) == []


@NO_WARN
@torch.no_grad()
def test_check_loaded_weights(loaded):
    check_loaded_weights(loaded, force=True)  # the checkpoint's weights
    model = copy.deepcopy(loaded)
    with torch.random.fork_rng(devices=[]):
        model.apply(model._init_weights)  # what 5.0-5.2 do to remote-code weights on load (P5)
    with pytest.raises(ReinitializedWeightsError, match=r"tlshim\.from_pretrained"):
        check_loaded_weights(model, force=True)
    check_loaded_weights(loaded)  # loaded by tlshim (or on a version that keeps weights): not checked


@contextlib.contextmanager
def _patched(owner, name, value):
    original = vars(owner)[name]
    setattr(owner, name, value)
    try:
        yield original
    finally:
        setattr(owner, name, original)


@contextlib.contextmanager
def _load_without_tlshim(folder):
    """The v5 load as a user without tlshim might force it: P1 and P3 worked around, nothing else."""
    config_cls = _dynamic_config_class(folder)
    get = dynamic_module_utils.get_class_from_dynamic_module
    modeling = sys.modules[get("modeling_openelm.OpenELMForCausalLM", str(folder)).__module__]
    post_init = vars(config_cls)["__post_init__"]

    def tolerant(self, **extras):
        if extras:
            CONFIG_BASE.__post_init__(self, **extras)
        post_init(self)

    compute = vars(modeling.OpenELMRotaryEmbedding)["_compute_sin_cos_embeddings"]

    def swallow(self, *args, **kwargs):
        with contextlib.suppress(NotImplementedError):
            compute(self, *args, **kwargs)

    with _patched(config_cls, "__post_init__", tolerant), _patched(
        modeling.OpenELMRotaryEmbedding, "_compute_sin_cos_embeddings", swallow
    ):
        yield AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()


@NO_WARN
@torch.no_grad()
@pytest.mark.skipif(not IS_V5, reason="transformers v5 behaviour")
def test_a_model_loaded_without_tlshim_is_repaired_or_refused(folder, reference, input_ids):
    with _load_without_tlshim(folder) as model:
        assert _ropes(model)[0]._cached_cos is None  # P3 swallowed; inv_freq and the mask are P4 garbage
        if REINIT_ON_LOAD:  # P5: the loaded weights are gone, nothing to repair from
            with pytest.raises(ReinitializedWeightsError, match=r"tlshim\.loading\(\)"):
                finish_loading(model)
            return
        repaired = finish_loading(model)
    # (which names: whatever the uninitialised memory got wrong, usually all of them)
    tables = ("inv_freq", "_cached_cos", "_cached_sin")
    rope_names = {f"transformer.layers.{i}.attn.pos_embedding.{n}" for i in range(4) for n in tables}
    assert set(repaired) <= {"transformer.causal_mask"} | rope_names
    assert torch.equal(model.transformer.causal_mask, reference.transformer.causal_mask)
    assert all(torch.equal(rope.inv_freq, _inv_freq()) for rope in _ropes(model))
    assert torch.equal(model(input_ids).logits, reference(input_ids, use_cache=False).logits)


# --------------------------------------------------------------------------- round trips


@NO_WARN
@torch.no_grad()
def test_from_pretrained_installs(folder, reference, input_ids):
    model = tlshim.from_pretrained(folder)
    assert tlshim.is_installed(model)
    native = reference(input_ids, use_cache=False).logits
    assert torch.equal(model(input_ids).logits, native)  # idle hooks: the model's own forward
    logits, cache = model.run_with_cache(input_ids, use_cache=False)  # explicit attention pattern
    assert ((logits - native).abs().max() / native.abs().max()) <= 1e-5
    assert cache["blocks.1.attn.hook_q"].shape == (2, 16, 4, HEAD_DIM)
    tlshim.uninstall(model)
    assert finish_loading(model) == []  # idempotent
    assert not [h for m in model.modules() for h in m._forward_pre_hooks.values()]
    remote = sys.modules[type(model).__module__]  # P7: the remote module's own DynamicCache has the v4 calls
    assert remote.DynamicCache is LegacyDynamicCache


@NO_WARN
@torch.no_grad()
def test_save_pretrained_round_trip(loaded, folder, tmp_path, input_ids):
    loaded.save_pretrained(tmp_path)  # P8 on v5; on 5.4-5.12 it also builds a default config (P1)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["auto_map"]["AutoModelForCausalLM"] == "modeling_openelm.OpenELMForCausalLM"
    assert not any("tlshim" in key for key in written)
    saved = load_file(str(folder / "model.safetensors"))
    assert all(torch.equal(v, saved[k]) for k, v in load_file(str(tmp_path / "model.safetensors")).items())
    if not (tmp_path / "modeling_openelm.py").exists():
        # transformers 4.48 registers no auto class on the remote model class, so its save copies
        # only the config's file: the folder cannot be loaded back, with or without tlshim
        assert TF < Version("4.57.0")
        return
    again = tlshim.from_pretrained(tmp_path, install=False)
    assert all(torch.equal(again.state_dict()[k], v) for k, v in saved.items())
    assert torch.equal(again(input_ids).logits, loaded(input_ids).logits)


@NO_WARN
def test_config_copies_and_pickles(loaded):
    config = copy.deepcopy(loaded.config)
    assert type(config) is type(loaded.config) and config.to_dict() == loaded.config.to_dict()
    restored = pickle.loads(pickle.dumps(loaded.config))
    assert type(restored).__name__ == "OpenELMConfig" and restored.num_query_heads == [2, 4, 4, 4]
    copy.deepcopy(loaded)


@NO_WARN
@torch.no_grad()
def test_bfloat16_checkpoint(tmp_path, input_ids):
    path = save_openelm(tmp_path / "openelm", seed=3, torch_dtype="bfloat16")
    dtype_arg = {"dtype": "auto"} if TF >= Version("4.56.0") else {"torch_dtype": "auto"}
    model = tlshim.from_pretrained(path, install=False, **dtype_arg)
    assert model.dtype == torch.bfloat16 and _ropes(model)[0].inv_freq.dtype == torch.float32
    saved = load_file(str(path / "model.safetensors"))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())
    expected = build_openelm_in_memory(seed=3, torch_dtype="bfloat16")(input_ids, use_cache=False).logits
    assert torch.equal(model(input_ids).logits, expected)


@NO_WARN
@torch.no_grad()
def test_a_second_load_can_generate_too(folder, loaded, input_ids, tmp_path):
    # From some 5.x after 5.0 on, the auto class registers the remote class without the GenerationMixin it
    # gives the first load's class, and loads that registered class the next time: no generate.
    second = tlshim.from_pretrained(folder, install=False)
    assert type(second).__name__ == type(loaded).__name__ and type(second).__module__ == type(loaded).__module__
    assert second.generation_config.to_dict() == loaded.generation_config.to_dict()
    prompt = input_ids[:, :5]
    kwargs = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False)
    assert torch.equal(second.generate(prompt, **kwargs), loaded.generate(prompt, **kwargs))
    loaded.save_pretrained(tmp_path / "first")
    second.save_pretrained(tmp_path / "second")  # the same files, config.json's architectures included
    names = sorted(p.name for p in (tmp_path / "first").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "second").iterdir())
    for name in names:
        assert (tmp_path / "first" / name).read_bytes() == (tmp_path / "second" / name).read_bytes(), name
    tlshim.install(second)
    assert torch.equal(second.generate(prompt, **kwargs), loaded.generate(prompt, **kwargs))
    tlshim.uninstall(second)
    assert type(second).__name__ == "OpenELMForCausalLM" and hasattr(second, "generate")


@NO_WARN
@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_trains_like_no_checkpointing(folder, reference, input_ids, reentrant):
    # use_cache stays on in the config: v4 code turns it off under checkpointing before making a cache,
    # and the cache P7 hands in must not appear there (the layers would be rerun against a filled cache)
    model = tlshim.from_pretrained(folder, install=False).train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model(input_ids, labels=input_ids).loss.backward()
    twin = copy.deepcopy(reference).train()
    twin(input_ids, labels=input_ids, use_cache=False).loss.backward()
    grads = dict(twin.named_parameters())
    for name, param in model.named_parameters():
        assert torch.equal(param.grad, grads[name].grad), name
