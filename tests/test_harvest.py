"""tlshim.harvest: read-back equal to run_with_cache bit for bit, packing, inputs, views, resume, torchrun, memory."""

import errno
import json
import os
import pickle
import socket
import subprocess
import sys

import pytest
import torch
from models import require

import tlshim
from tlshim import shards
from tlshim.demo import ASSETS, load
from tlshim.harvest import HarvestError, kept_positions
from tlshim.harvest_data import build_contexts

datasets = pytest.importorskip("datasets", reason="the harvest tests need the 'datasets' package (tlshim[harvest])")

NAMES = ["blocks.*.hook_resid_post", "blocks.1.attn.hook_pattern", "blocks.0.attn.hook_z", "blocks.0.mlp.hook_post"]
HERE = os.path.dirname(os.path.abspath(__file__))


def corpus(tokenizer, n_docs, seed=0):
    """Documents of 3 to 39 random words of the shipped vocabulary."""
    words = sorted(w for w in tokenizer.get_vocab() if not w.startswith("<"))
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 40, (n_docs,), generator=g)
    return [" ".join(words[i] for i in torch.randint(len(words), (int(n),), generator=g)) for n in lengths]


@pytest.fixture(scope="module")
def llama():
    return load("llama")


@pytest.fixture(scope="module")
def text_file(llama, tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text("\n".join(corpus(llama[1], 120)) + "\n")
    return path


def expected_rows(model, contexts, manifest, positions="all"):
    """run_with_cache over the contexts in the harvest's batches: a shard's contexts from its first, consecutive
    contexts of one length together, batch_size at most."""
    names, batch_size = manifest["names"], manifest["batch_size"]
    rows = {name: [] for name in names}
    for shard in manifest["shards"]:
        start, last = shard["contexts"]
        while start < last:
            stop = start + 1
            while stop < last and stop - start < batch_size and len(contexts[stop]) == len(contexts[start]):
                stop += 1
            ids = torch.stack(contexts[start:stop])
            _, cache = model.run_with_cache(ids, names_filter=names)
            picks = kept_positions(ids.shape[1], positions)
            for name in names:
                axis = 2 if name.endswith(("hook_pattern", "hook_attn_scores")) else 1
                rows[name].append(cache[name].index_select(axis, picks).movedim(axis, 1).flatten(0, 1))
            start = stop
    return {name: torch.cat(parts) for name, parts in rows.items()}


def assert_equal_to_run_with_cache(model, folder, contexts, positions="all"):
    h = tlshim.open_harvest(folder)
    want = expected_rows(model, contexts, h.manifest, positions)
    for name in h.names:
        assert h.column(name).dtype == want[name].dtype
        assert torch.equal(h.column(name), want[name]), name
    return h


def shard_bytes(folder):
    return {f: (folder / f).read_bytes() for f in sorted(os.listdir(folder)) if f.startswith("shard-")}


@pytest.mark.parametrize("arch", ["llama", "gemma2", "olmo", "smollm3", "openelm"])
def test_read_back_equals_run_with_cache(arch, tmp_path):
    require(arch)
    model, tokenizer = load(arch)
    texts = corpus(tokenizer, 30, seed=1)
    manifest = tlshim.harvest(model, texts, NAMES, tmp_path, context_size=16, batch_size=3, shard_rows=80, progress=False)
    contexts = list(build_contexts(texts, tokenizer, 16).tokens.view(-1, 16))
    h = assert_equal_to_run_with_cache(model, tmp_path, contexts)
    n = len(contexts)
    assert manifest["contexts"] == n and manifest["rows"] == len(h) == 16 * n and len(manifest["shards"]) == -(-n // 5)
    assert torch.equal(h.column("tokens"), torch.stack(contexts).reshape(-1).int())
    assert torch.equal(h.column("sequence"), torch.arange(n).repeat_interleave(16))
    assert torch.equal(h.column("position"), torch.arange(16).repeat(n).int())
    heads = model.cfg.n_heads[1] if isinstance(model.cfg.n_heads, list) else model.cfg.n_heads  # OpenELM: per layer
    assert manifest["shapes"]["blocks.1.attn.hook_pattern"] == [heads, 16]
    assert manifest["versions"]["tlshim"] == tlshim.__version__
    # the shards are plain safetensors files
    from safetensors import safe_open

    with safe_open(str(tmp_path / "shard-00001.safetensors"), "pt") as fh:
        assert torch.equal(fh.get_tensor("blocks.0.attn.hook_z"), h.shard(1)["blocks.0.attn.hook_z"])


def test_packing_follows_saelens():
    tok = type("Tok", (), {"bos_token_id": 0})()
    docs = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    packed = build_contexts(docs, tok, context_size=4)
    assert packed.tokens.view(-1, 4).tolist() == [[0, 5, 6, 7], [0, 8, 9, 0], [0, 10, 11, 12]]
    unpacked = build_contexts(docs, tok, context_size=4, pack=False)
    assert [unpacked[i].tolist() for i in range(len(unpacked))] == [[0, 5, 6, 7], [0, 8, 9], [0, 10, 11, 12]]
    assert build_contexts(docs, None, context_size=3, prepend_bos=False).tokens.view(-1, 3).tolist() == [[5, 6, 7], [8, 9, 10], [11, 12, 13]]
    assert len(build_contexts(docs, tok, context_size=4, max_contexts=2)) == 2


def test_inputs_give_the_same_contexts(llama, text_file, tmp_path):
    tokenizer = llama[1]
    texts = text_file.read_text().splitlines()
    want = build_contexts(texts, tokenizer, 16).sha256()
    jsonl = tmp_path / "corpus.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t, "meta": 1}) + "\n" for t in texts))
    dataset = datasets.Dataset.from_dict({"text": texts})
    dataset.save_to_disk(str(tmp_path / "saved"))
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    for data in (text_file, jsonl, dataset, tmp_path / "saved", datasets.DatasetDict(train=dataset), ids):
        assert build_contexts(data, tokenizer, 16, split="train").sha256() == want, type(data)
    tensor = build_contexts(texts, tokenizer, 16).tokens.view(-1, 16)
    assert build_contexts(tensor).sha256() == want
    with pytest.raises(ValueError, match="splits.*split="):
        build_contexts(datasets.DatasetDict(train=dataset), tokenizer, 16)
    with pytest.raises(ValueError, match="no 'body' column.*text_column"):
        build_contexts(dataset, tokenizer, 16, text_column="body")


def test_positions_and_unpacked(llama, text_file, tmp_path):
    model, tokenizer = llama
    names = ["blocks.0.hook_resid_pre", "blocks.1.mlp.hook_post"]
    texts = text_file.read_text().splitlines()[:40]
    contexts = list(build_contexts(texts, tokenizer, 16).tokens.view(-1, 16))
    for positions, count in (("drop_bos", 15), ("last", 1)):
        m = tlshim.harvest(model, texts, names, tmp_path / positions, context_size=16, positions=positions, shard_rows=50, progress=False)
        h = assert_equal_to_run_with_cache(model, tmp_path / positions, contexts, positions)
        assert m["rows"] == count * len(contexts) and h.column("position").unique().tolist() == kept_positions(16, positions).tolist()
    m = tlshim.harvest(model, texts, names, tmp_path / "half", context_size=16, dtype="float16", shard_rows=50, progress=False)
    want = expected_rows(model, contexts, m)
    h = tlshim.open_harvest(tmp_path / "half")
    assert m["dtypes"] == {name: "float16" for name in names} and all(torch.equal(h.column(n), want[n].half()) for n in names)
    unpacked = build_contexts(texts, tokenizer, 16, pack=False)
    m = tlshim.harvest(model, texts, names, tmp_path / "unpacked", context_size=16, pack=False, shard_rows=64, progress=False)
    assert m["contexts"] == len(texts) and len({unpacked.length(i) for i in range(len(unpacked))}) > 3
    assert_equal_to_run_with_cache(model, tmp_path / "unpacked", [unpacked[i] for i in range(len(unpacked))])
    with pytest.raises(HarvestError, match="contexts of one length"):
        tlshim.harvest(model, texts, ["blocks.0.attn.hook_pattern"], tmp_path / "bad", context_size=16, pack=False, progress=False)


def test_hf_and_saelens_views(llama, text_file, tmp_path):
    model, _ = llama
    m = tlshim.harvest(model, text_file, NAMES, tmp_path, context_size=16, shard_rows=100, max_contexts=20, saelens=True, progress=False)
    h = tlshim.open_harvest(tmp_path)
    hf = h.to_hf().with_format("torch")
    assert len(hf) == len(h) == 320
    rows = hf[:]
    for name in (*h.names, "tokens", "sequence", "position"):
        assert torch.equal(rows[name], h.column(name).reshape(len(h), -1).squeeze(-1)), name
    batch = next(iter(torch.utils.data.DataLoader(pickle.loads(pickle.dumps(h)), batch_size=64)))
    assert torch.equal(batch["blocks.0.attn.hook_z"], h.column("blocks.0.attn.hook_z")[:64])
    row = h[37]
    assert torch.equal(row["blocks.1.attn.hook_pattern"], h.column("blocks.1.attn.hook_pattern")[37]) and int(row["position"]) == 37 % 16
    saved = datasets.load_from_disk(str(tmp_path / "saelens"))
    cached = saved.with_format("torch")[:]
    assert saved.features["blocks.0.hook_resid_post"].shape == (16, 64) and len(saved) == m["contexts"]
    assert saved.features["blocks.0.attn.hook_z"].shape == (16, 64)  # (heads x d_head) flattened, as SAELens stacks it
    for name in h.names:
        assert torch.equal(cached[name], h.column(name).reshape(m["contexts"], 16, -1)), name
    assert torch.equal(cached["token_ids"], h.column("tokens").view(-1, 16))


def test_resume_refusal_and_errors(llama, text_file, tmp_path, monkeypatch):
    model, _ = llama
    args = dict(context_size=16, shard_rows=32, max_contexts=12, progress=False)
    ref = tmp_path / "ref"
    tlshim.harvest(model, text_file, NAMES, ref, **args)
    want = shard_bytes(ref)
    assert len(want) == 6
    # a full disk at the third shard: a clear error, the complete shards kept, no partial file
    out, real_fsync, calls = tmp_path / "out", os.fsync, []

    def fsync(fd):
        calls.append(fd)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(shards.os, "fsync", fsync)
    with pytest.raises(HarvestError, match="disk is full.*complete are kept.*same arguments"):
        tlshim.harvest(model, text_file, NAMES, out, **args)
    monkeypatch.undo()
    assert sorted(os.listdir(out)) == ["run.json", "shard-00000.safetensors", "shard-00001.safetensors"]
    kept = {f: os.stat(out / f).st_mtime_ns for f in ("shard-00000.safetensors", "shard-00001.safetensors")}
    tlshim.harvest(model, text_file, NAMES, out, **args)
    assert shard_bytes(out) == want and all(os.stat(out / f).st_mtime_ns == t for f, t in kept.items())
    # a finished folder: the same arguments return its manifest and write nothing
    stamps = {f: os.stat(out / f).st_mtime_ns for f in os.listdir(out)}
    manifest = json.loads((out / "manifest.json").read_text())
    assert tlshim.harvest(model, text_file, NAMES, out, **args) == manifest and manifest["last_run"]["tokens"] == 4 * 2 * 16  # the 4 shards of the resumed run
    assert {f: os.stat(out / f).st_mtime_ns for f in os.listdir(out)} == stamps
    # other arguments into the same folder: refused, naming what differs
    with pytest.raises(HarvestError, match=r"other arguments \(names: .* there, .* here\)"):
        tlshim.harvest(model, text_file, ["blocks.0.hook_resid_pre"], out, **args)
    with pytest.raises(HarvestError, match="data:"):
        tlshim.harvest(model, text_file, NAMES, out, **{**args, "max_contexts": 11})
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(HarvestError, match="not empty and holds no harvest"):
        tlshim.harvest(model, text_file, NAMES, tmp_path / "other", **args)
    with pytest.raises(HarvestError, match="cannot write the harvest folder"):
        tlshim.harvest(model, text_file, NAMES, tmp_path / "other" / "notes.txt" / "sub", **args)
    with pytest.raises(tlshim.HookNameError, match="resid_postt.*Did you mean"):
        tlshim.harvest(model, text_file, ["blocks.0.hook_resid_postt"], tmp_path / "x", **args)
    with pytest.raises(HarvestError, match="matches no hook name"):
        tlshim.harvest(model, text_file, ["blocks.9.*"], tmp_path / "x", **args)
    with pytest.raises(ValueError, match="positions='first'.*all, drop_bos, last"):
        tlshim.harvest(model, text_file, NAMES, tmp_path / "x", positions="first")
    # without the harvest extra: text, lists and tensors still harvest; what needs `datasets` names the extra
    monkeypatch.setitem(sys.modules, "datasets", None)
    assert tlshim.harvest(model, text_file, NAMES, tmp_path / "bare", **args)["shards"]
    with pytest.raises(ImportError, match=r"'datasets' package.*tlshim\[harvest\]"):
        tlshim.open_harvest(ref).to_hf()
    with pytest.raises(ImportError, match=r"reading a dataset folder needs the 'datasets' package.*tlshim\[harvest\]"):
        build_contexts(tmp_path, llama[1], 16)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args, env_extra):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
               "--master-port", str(free_port()), os.path.join(HERE, "harvest_worker.py"), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", **env_extra}
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)


def test_cli_then_torchrun_killed_and_resumed(text_file, tmp_path, capsys):
    from tlshim.__main__ import main

    args = ["--model", str(ASSETS / "llama"), "--data", str(text_file), "--names", "blocks.*.hook_resid_post",
            "blocks.0.attn.hook_pattern", "--context-size", "16", "--batch-size", "2", "--shard-rows", "64", "--max-contexts", "80"]
    ref = tmp_path / "one"
    assert main(["harvest", *args, "--out", str(ref), "--quiet"]) == 0
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert summary.startswith("harvested 1280 tokens (80 contexts, 1280 rows) at 3 names into") and "20 shards" in summary
    want = shard_bytes(ref)
    # two ranks; rank 1 dies by SIGKILL at its 7th forward: in shard 7, after writing its shards 1, 3 and 5
    # (the last one's sync and rename may still have been under way: then it is redone)
    out = tmp_path / "two"
    killed = torchrun([*args, "--out", str(out), "--quiet"], {"HARVEST_KILL_RANK": "1", "HARVEST_KILL_AFTER": "7"})
    assert killed.returncode != 0, killed.stderr[-3000:]
    written = {f for f in os.listdir(out) if f.startswith("shard-")}
    assert {"shard-00001.safetensors", "shard-00003.safetensors"} <= written and "shard-00007.safetensors" not in written
    assert "manifest.json" not in os.listdir(out) and len(written) < 20
    before = {f: os.stat(out / f).st_ino for f in written}
    (out / ".shard-00007.safetensors.tmp-99999").write_bytes(b"partial")
    resumed = torchrun([*args, "--out", str(out)], {"HARVEST_THEN_REFUSE": "1"})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "harvested 1280 tokens" in resumed.stdout and "2 processes" in resumed.stdout
    assert "harvest:" in resumed.stderr  # rank 0's progress bar
    assert shard_bytes(out) == want  # equal to one process, bit for bit; nothing missing, nothing twice
    assert all(os.stat(out / f).st_ino == ino for f, ino in before.items())  # complete shards were not redone
    assert not [f for f in os.listdir(out) if ".tmp-" in f]
    # then other arguments into that folder (in the same launch): rank 0 refuses, the other rank stops with it
    assert "rank 0 refused: " in resumed.stdout and "other arguments (contexts: 80 there, 40 here" in resumed.stdout
    assert "rank 1 refused: rank 0 stopped: " in resumed.stdout
    h = tlshim.open_harvest(out)
    assert h.manifest["last_run"]["world_size"] == 2 and h.manifest["last_run"]["tokens"] < 1280 and torch.equal(h.column("sequence"), torch.arange(80).repeat_interleave(16))


def status(key):
    with open("/proc/self/status") as fh:
        return int(next(line for line in fh if line.startswith(key)).split()[1]) * 1024


def test_memory_is_bounded_by_one_shard(llama, tmp_path):
    model, _ = llama
    names = ["blocks.*.hook_resid_pre", "blocks.*.hook_resid_mid", "blocks.*.hook_resid_post", "blocks.*.mlp.hook_post",
             "blocks.*.attn.hook_pattern", "blocks.*.hook_attn_out"]
    ids = torch.randint(4, 68, (400, 64))
    ids[:, 0] = 0
    args = dict(batch_size=8, shard_rows=1024, progress=False)
    tlshim.harvest(model, ids[:40], names, tmp_path / "warm", **args)
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # the peak-RSS count (VmHWM) starts again from here
    base = status("VmRSS:")
    m = tlshim.harvest(model, ids, names, tmp_path / "big", **args)
    growth = status("VmHWM:") - base
    stored = sum(m["rows"] * int(torch.tensor(shape).prod()) * 4 for shape in m["shapes"].values())
    shard_buffer = 1024 * stored // m["rows"]
    print(f"stored {stored / 1e6:.0f} MB, peak RSS growth {growth / 1e6:.1f} MB, one shard buffer {shard_buffer / 1e6:.1f} MB")
    # the model, one batch and one shard buffer (the growth measured is about one buffer): far below what is stored
    assert stored > 3 * (2 * shard_buffer + 30e6) and growth < 2 * shard_buffer + 30e6
