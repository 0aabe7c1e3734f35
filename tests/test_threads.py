"""Issue 11, section 1: threads and asyncio tasks on one installed model.

Hooks given to run_with_cache / run_with_hooks / hooks() belong to the calling thread (and asyncio
task); add_hook is model-wide. Every concurrent call must equal its single-threaded twin bit for bit,
and the model must be native afterwards.
"""

import asyncio
import threading

import pytest
import torch

import tlshim
from models import D_MODEL, build, tokens
from test_roundtrip import assert_same, snapshot

THREADS, CALLS = 4, 50


def _vector(seed):
    return torch.randn(D_MODEL, generator=torch.Generator().manual_seed(seed))


def _calls(model):
    """Mixed calls, each returning a tuple of tensors: caches with different filters, steering and
    resid_mid edits, pattern and rot_k hooks (tlshim's kernel on an sdpa model), generate, a plain forward."""
    ids = [tokens(batch=2, seq=10, seed=seed) for seed in range(8)]
    steer, mid = _vector(1), _vector(2)

    def cached(names_filter, x):
        def run():
            logits, cache = model.run_with_cache(x, names_filter=names_filter)
            return (logits, *(cache[name] for name in sorted(cache.keys())))

        return run

    def hooked(hooks, x):
        return lambda: (model.run_with_hooks(x, fwd_hooks=hooks),)

    def generated(x):
        def run():
            with model.hooks(fwd_hooks=[("blocks.2.hook_resid_post", lambda t, hook: t + steer)]):
                out = model.generate(x[:1], attention_mask=torch.ones_like(x[:1]), max_new_tokens=4,
                                     min_new_tokens=4, do_sample=False, pad_token_id=0)
            return (out,)

        return run

    def ablate_head(t, hook):
        t = t.clone()
        t[:, 1] = 0
        return t

    return {
        "cache_resid": cached(lambda n: n.endswith("hook_resid_post"), ids[0]),
        "cache_attn": cached(lambda n: n.endswith(("hook_pattern", "hook_rot_k", "hook_attn_scores")), ids[1]),
        "cache_all": cached(None, ids[2]),
        "cache_result": cached(["blocks.1.attn.hook_result", "blocks.3.ln2.hook_scale"], ids[3]),
        "steer": hooked([("blocks.1.hook_resid_post", lambda t, hook: t + steer)], ids[4]),
        "mid_edit": hooked([("blocks.2.hook_resid_mid", lambda t, hook: t + mid)], ids[5]),
        "pattern_edit": hooked([("blocks.0.attn.hook_pattern", ablate_head)], ids[6]),
        "rot_k_edit": hooked([("blocks.1.attn.hook_rot_k", lambda t, hook: t * 0.5)], ids[7]),
        "plain": lambda: (model(ids[0]).logits,),
        "generate": generated(ids[1]),
    }


def _run_threads(target, n):
    errors = []
    barrier = threading.Barrier(n)

    def run(i):
        try:
            barrier.wait()
            target(i)
        except BaseException as err:  # noqa: BLE001 - reported below with its thread
            errors.append((i, err))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0][1]


def _assert_native(model, plain, ids):
    """No wrapped forward, no config proxy, logits of the plain twin, and a clean uninstall."""
    for name, module in model.named_modules():
        assert "forward" not in vars(module), name
        if "config" in vars(module):
            assert type(vars(module)["config"]) is type(plain.config), name
    assert not any(point.active for point in model.hook_dict.values())
    assert torch.equal(model(ids).logits, plain(ids).logits)
    tlshim.uninstall(model)
    after, reference = snapshot(model, ids), snapshot(plain, ids)
    after["params"] = reference["params"] = None  # two objects: their parameters live at different addresses
    assert_same(reference, after)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_threads_each_get_their_single_threaded_result(attn):
    model, plain = tlshim.install(build("llama", attn)), build("llama", attn)
    calls = _calls(model)
    kinds = sorted(calls)
    with torch.no_grad():
        expected = {kind: calls[kind]() for kind in kinds}
        for kind, seed in (("steer", 4), ("mid_edit", 5), ("pattern_edit", 6), ("rot_k_edit", 7)):  # the edits do something
            assert not torch.equal(expected[kind][0], plain(tokens(batch=2, seq=10, seed=seed)).logits), kind
        results = [[] for _ in range(THREADS)]

        def work(i):
            for j in range(CALLS):
                kind = kinds[(i * 3 + j) % len(kinds)]
                results[i].append((kind, calls[kind]()))

        _run_threads(work, THREADS)
    wrong = [(i, kind) for i in range(THREADS) for kind, got in results[i]
             if len(got) != len(expected[kind]) or not all(torch.equal(a, b) for a, b in zip(got, expected[kind]))]
    assert sum(map(len, results)) == THREADS * CALLS
    assert not wrong, f"{len(wrong)} of {THREADS * CALLS} calls differ from their single-threaded result: {wrong[:5]}"
    _assert_native(model, plain, tokens())


def test_a_thread_without_hooks_runs_native_while_another_holds_hooks():
    model, plain = tlshim.install(build("llama", "sdpa")), build("llama", "sdpa")
    ids = tokens()
    entered, release = threading.Event(), threading.Event()

    def holder(i):
        if i == 0:
            with model.hooks(fwd_hooks=[("blocks.0.attn.hook_pattern", lambda t, hook: t * 0),
                                        ("blocks.1.hook_resid_mid", lambda t, hook: t * 0)]):
                entered.set()
                release.wait(30)
        else:
            entered.wait(30)
            try:
                with torch.no_grad():
                    got.append(model(ids).logits)
            finally:
                release.set()

    got = []
    _run_threads(holder, 2)
    assert torch.equal(got[0], plain(ids).logits)
    _assert_native(model, plain, ids)


def test_add_hook_is_model_wide_and_fires_in_other_threads():
    model = tlshim.install(build("llama"))
    ids = tokens()
    seen = []
    model.add_hook("blocks.0.hook_resid_post", lambda t, hook: seen.append(threading.current_thread().name))
    thread = threading.Thread(target=lambda: model(ids), name="other")
    thread.start()
    thread.join()
    assert seen == ["other"]
    model.reset_hooks()
    assert not model.hook_dict["blocks.0.hook_resid_post"].active


def test_uninstall_refuses_while_another_thread_holds_hooks():
    model = tlshim.install(build("llama"))
    entered, release = threading.Event(), threading.Event()

    def holder():
        with model.hooks(fwd_hooks=[("blocks.0.hook_resid_post", lambda t, hook: None)]):
            entered.set()
            release.wait(30)

    thread = threading.Thread(target=holder)
    thread.start()
    entered.wait(30)
    try:
        with pytest.raises(tlshim.ConflictError, match="another thread"):
            tlshim.uninstall(model)
        assert tlshim.is_installed(model)
    finally:
        release.set()
        thread.join()
    tlshim.uninstall(model)
    assert not tlshim.is_installed(model)


def test_asyncio_tasks_own_their_hooks():
    model, plain = tlshim.install(build("llama", "sdpa")), build("llama", "sdpa")
    ids = tokens()
    vector = _vector(3)
    with torch.no_grad():
        native = plain(ids).logits
        steered = model.run_with_hooks(ids, fwd_hooks=[("blocks.1.hook_resid_post", lambda t, hook: t + vector)])

    async def steering():
        with model.hooks(fwd_hooks=[("blocks.1.hook_resid_post", lambda t, hook: t + vector)]):
            await asyncio.sleep(0.01)  # the other task runs its forward while these hooks are held
            with torch.no_grad():
                return model(ids).logits

    async def bare():
        await asyncio.sleep(0)
        with torch.no_grad():
            return model(ids).logits

    async def both():
        return await asyncio.gather(steering(), bare())

    got_steered, got_native = asyncio.run(both())
    assert not torch.equal(steered, native)
    assert torch.equal(got_steered, steered) and torch.equal(got_native, native)
    _assert_native(model, plain, ids)


def test_a_thread_started_with_a_copy_of_the_context_sees_the_block_hooks():
    import contextvars

    model = tlshim.install(build("llama"))
    ids = tokens()
    seen = []
    with model.hooks(fwd_hooks=[("blocks.0.hook_resid_post", lambda t, hook: seen.append(threading.current_thread().name))]):
        fresh = threading.Thread(target=lambda: model(ids), name="fresh")
        copied = threading.Thread(target=contextvars.copy_context().run, args=(lambda: model(ids),), name="copied")
        for thread in (fresh, copied):
            thread.start()
            thread.join()
    assert seen == ["copied"]
    assert not any(point.active for point in model.hook_dict.values())
