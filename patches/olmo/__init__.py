"""OLMo v1: parameter-free LayerNorms and, with clip_qkv, an in-place clamp of q/k/v.

The model clamps the q/k/v projection outputs with ``clamp_``. While hook_q/k/v are hooked, the
projection's output is clamped out of place first (the same values), the hooks see that (what the
model uses), and the model gets a fresh copy to clamp in place, so no tensor a hook saw or a cache
holds is changed afterwards and backward hooks meet no in-place-modified view. Idle, nothing is wrapped.
"""

from tlshim.sites import Site, fire_points


class ClampedProjectionSite(Site):
    def __init__(self, module, path, config):
        super().__init__(module, path)
        self.clip = config.clip_qkv

    def on_output(self, y):
        if self.clip is None:
            return fire_points(self.out_points, y)
        seen = fire_points(self.out_points, y.clamp(min=-self.clip, max=self.clip))
        return seen.clone()


def olmo_cfg(model):
    from tlshim.spec import llama_family_cfg

    fields = llama_family_cfg(model)
    fields.update(eps=1e-5, normalization_type="LN", final_rms=False)
    return fields
