"""scripts/compare_coverage.py: the types the TransformerBridge passes and tlshim does not verify."""

import importlib.util
import pathlib

SCRIPT = pathlib.Path(__file__).resolve().parent.parent / "scripts" / "compare_coverage.py"
spec = importlib.util.spec_from_file_location("compare_coverage", SCRIPT)
compare_coverage = importlib.util.module_from_spec(spec)
spec.loader.exec_module(compare_coverage)

OURS = {
    "llama": {"status": "verified", "how": "spec"},
    "gpt2": {"status": "verified", "how": "structural"},
    "mamba": {"status": "failed", "how": "structural", "reason": "blocks.0.hook_resid_post: does not fire"},
    "bert": {"status": "unsupported", "reason": "no decoder-layer list"},
}
BRIDGE = {
    "llama": {"status": "passes but the resid_mid edit"},
    "mamba": {"status": "passes"},
    "bert": {"status": "passes but the resid_mid edit"},
    "gpt2": {"status": "failed", "reason": "logits differ"},
    "rwkv": {"status": "passes"},
}


def test_lists_what_the_bridge_passes_and_tlshim_does_not():
    assert compare_coverage.compare("5.23", OURS, BRIDGE).splitlines() == [
        "transformers 5.23: the bridge passes 4; tlshim verifies 2; both 1; tlshim only 1",
        "  the bridge passes and tlshim does not verify (3):",
        "    bert: unsupported: no decoder-layer list",
        "    mamba: failed: blocks.0.hook_resid_post: does not fire",
        "    rwkv: not in tlshim's sweep",
    ]


def test_strict_counts_only_the_full_passes():
    assert compare_coverage.compare("5.23", OURS, BRIDGE, strict=True).splitlines() == [
        "transformers 5.23: the bridge passes 2 (strict); tlshim verifies 2; both 0; tlshim only 2",
        "  the bridge passes and tlshim does not verify (2):",
        "    mamba: failed: blocks.0.hook_resid_post: does not fire",
        "    rwkv: not in tlshim's sweep",
    ]


def test_the_shipped_tables_compare(capsys):
    """The committed tables share a version, and the script runs on them (no torch needed)."""
    assert compare_coverage.main([]) == 0
    assert "the bridge passes" in capsys.readouterr().out
