"""Mixture-of-experts MLPs (Mixtral, Qwen2/3-MoE, OLMoE, gpt-oss, ...): router and per-expert hooks.

Layouts, told apart on a probe of one MoE block (``detect``), never by version number:
- a router module returning (logits, weights, indices) and one experts module of 3-D parameters fed
  (hidden, indices, weights) (transformers 5.x): the router hooks fire on the router's output
  (where its first output is not the logits, as in 5.0's probabilities, see the next layout);
- a router returning (dense scores over all experts, indices) (gpt-oss on 4.x): the same, the
  weights gathered out of (and an edit scattered back into) the dense scores, the logits computed
  from the router's own weight while hooked;
- "scores": (dense scores, logits) (Llama 4): the weights gathered at the top k of the logits;
- "routing": (indices, weights) (DeepSeek-V3-like blocks on 4.x: dots1, GLM-4-MoE), or (weights,
  indices) (AFMoE on 5.0): hooked as they are;
- "logits": the logits alone, the block routing them itself and feeding its experts module (hidden,
  indices, weights) (GLM-4-MoE on 5.0-5.12, DBRX): the weights and indices hooked on the experts'
  arguments, an edit of the logits routed by the block's own code;
- "internal": the logits alone, routed where tlshim cannot see the routing (Aria before 5.23: in
  its experts module, or in the block around grouped experts): hook_router_logits only (an edit is
  routed by the model's own code);
- "sorted": (slots sorted by expert, their tokens, their gates, tokens per expert, logits) (GraniteMoE
  before 5.23): the weights and indices read back per token, an edit sorted again as the router does;
- an ``nn.Linear`` gate whose output is the logits, the routing done inline in the block and the
  experts a ModuleList of MLPs (4.x): while hook_expert_weights / hook_expert_indices hold a hook,
  tlshim runs the block's mixture itself in the block's own ops (bit for bit when unedited).
Experts in a ModuleList have per-expert hook_pre / hook_post.
An edited hook_router_logits is routed again by the routing function the probe matched (data below).
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UnsupportedModelError
from .family_parallel import CopyOutSite
from .family_post import MidInputSite
from .sites import MlpOutSite, Site, first_input

#: names of the router and experts children of an MoE block, and of its shared expert and that gate
ROUTERS = ("gate", "router")
EXPERTS = ("experts", "input_linear")  # input_linear: GraniteMoE's stacked first layer before 5.23
#: fields holding the experts per token, looked up on the router, the block, then the config
TOP_K = ("top_k", "moe_top_k", "num_experts_per_tok", "moe_topk")
SHARED = (("shared_expert", "shared_expert_gate"), ("shared_experts", None), ("shared_mlp", None))


def softmax_topk(logits, k, renorm):
    """Mixtral, Qwen-MoE, OLMoE: softmax over all experts, top k, renormalised where the model does."""
    weights, indices = torch.topk(F.softmax(logits, dim=-1, dtype=torch.float), k, dim=-1)
    if renorm:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(logits.dtype), indices


def topk_softmax(logits, k, renorm):
    """gpt-oss, GraniteMoE: top k of the logits, softmax over those k."""
    values, indices = torch.topk(logits, k, dim=-1)
    return F.softmax(values, dim=-1, dtype=values.dtype), indices


def topk_sigmoid(logits, k, renorm):
    """Llama 4: top k of the logits, a sigmoid of each (no renormalisation)."""
    values, indices = torch.topk(logits, k, dim=-1)
    return torch.sigmoid(values.float()).to(values.dtype), indices


#: routing functions a probe tries, in order
ROUTES = (softmax_topk, topk_softmax, topk_sigmoid)


@dataclass(frozen=True)
class MoeSpec:
    """Where an MoE block keeps its parts and how it routes (``route`` None: no function matched)."""

    router: str
    experts: str
    layout: str  # "triple", "pair", "scores", "routing", "sorted", "logits", "internal" or "inline" (see the module doc)
    route: object = None
    renorm: bool = True
    top_k: int = 2
    n_experts: int = 0
    shared: str | None = None
    shared_gate: str | None = None
    #: the block returns (output, router_logits) (4.x)
    returns_logits: bool = False
    #: the router's (first) output is its logits; else they are computed from its weight while hooked
    logits_out: bool = True
    #: (gate, up, down) projection names of one expert module (experts in a ModuleList)
    expert_projections: tuple = ()
    #: the block feeds its router (tokens, d) rows, else its own (batch, pos, d) input (Hunyuan on 4.x)
    router_rows: bool = True
    #: positions of (indices, weights) among the experts module's arguments ("logits" layout)
    expert_args: tuple = ()
    #: where the weights sit in a (logits, weights, indices) router output (2: ERNIE-4.5's (logits, indices,
    #: weights)), or in an (indices, weights) one (0: AFMoE's (weights, indices) on 5.0)
    weights_at: int = 1

    def is_moe(self, mlp) -> bool:
        return isinstance(getattr(mlp, self.router, None), nn.Module) and isinstance(getattr(mlp, self.experts, None), nn.Module)


def _child(module, names):
    return next((n for n in names if isinstance(getattr(module, n, None), nn.Module)), None)


def detect(blocks, config, projections):
    """An MoeSpec for the MLP modules ``blocks`` (one per layer), or None where none is a mixture.

    ``projections(module, where)`` gives the (gate, up, down) names of a dense MLP (an expert)."""
    found = [b for b in blocks if _child(b, ROUTERS) and _child(b, EXPERTS)]
    if not found:
        return None
    try:
        return _spec(found[0], config, projections)
    except UnsupportedModelError:
        raise
    except Exception as err:  # a router or experts of another shape: say so, do not crash the install
        raise UnsupportedModelError(
            f"the mixture-of-experts block {type(found[0]).__name__} fits none of tlshim's layouts ({type(err).__name__}: {err})"
        ) from err


def _spec(block, config, projections):
    router, experts = _child(block, ROUTERS), _child(block, EXPERTS)
    shared = next(((s, g) for s, g in SHARED if _child(block, (s,))), (None, None))
    if shared[1] is not None and not _child(block, (shared[1],)):
        shared = (shared[0], None)
    router_module = getattr(block, router)
    top_k = next(getattr(owner, n) for owner in (router_module, block, config) for n in TOP_K if isinstance(getattr(owner, n, None), int))
    renorm = getattr(router_module, "norm_topk_prob", getattr(block, "norm_topk_prob", True))
    expert_modules = getattr(block, experts)
    inline = isinstance(expert_modules, nn.ModuleList)
    spec = MoeSpec(
        router=router,
        experts=experts,
        layout="inline" if inline else "triple",
        renorm=bool(renorm),
        top_k=int(top_k),
        n_experts=router_linear(router_module).weight.shape[0],
        shared=shared[0],
        shared_gate=shared[1],
        expert_projections=projections(expert_modules[0], f"{type(block).__name__}.{experts}.0") if inline else (),
    )
    return _probe(block, spec)


def describe(moe) -> str:
    route = moe.route.__name__ if moe.route else "no known routing function"
    return f"a mixture of {moe.n_experts} experts, top {moe.top_k} ({moe.router} -> {moe.experts}, {moe.layout}, {route})"


def _probe(block, spec):
    """Run ``block`` once on a fixed random input: which layout it has and which routing it does."""
    router = getattr(block, spec.router)
    weight = router_linear(router).weight
    dtype = next(getattr(block, spec.experts).parameters()).dtype  # the hidden states' (a router may keep float32)
    seen = {}
    handles = (
        router.register_forward_hook(lambda m, args, out: seen.update(out=out, rows=args[0].dim() == 2)),
        getattr(block, spec.experts).register_forward_hook(lambda m, args, out: seen.update(expert_args=args)),
    )
    x = torch.randn(1, 6, weight.shape[1], generator=torch.Generator().manual_seed(0)).to(weight.device, dtype)
    try:
        with torch.no_grad():
            native = block(x)
    finally:
        for handle in handles:
            handle.remove()
    out = seen.get("out")
    spec = _replace(spec, router_rows=seen.get("rows", True))
    computed = router_logits(router, x.reshape(-1, x.shape[-1]))
    if isinstance(out, tuple) and len(out) == 2 and _same(out[1], computed):  # (dense scores, logits)
        spec = _replace(spec, layout="scores")
        logits, want = computed, _gathered(out[0], computed, spec.top_k)
    elif isinstance(out, tuple) and len(out) == 5 and _same(out[4], computed):  # GraniteMoE's sorted slots
        spec = _replace(spec, layout="sorted")
        logits, want = computed, _unsort(out, spec.top_k)
    elif isinstance(out, tuple) and len(out) == 2 and out[0].shape == out[1].shape and _is_index(out[0]) != _is_index(out[1]):
        w = 1 if _is_index(out[0]) else 0  # (indices, weights) or (weights, indices)
        spec = _replace(spec, layout="routing", logits_out=False, weights_at=w)
        logits, want = computed, (out[w], out[1 - w])
    elif _indices(out) is None:
        raise UnsupportedModelError(f"the router of {type(block).__name__} returns no expert indices where tlshim looks for them")
    elif isinstance(out, tuple) and len(out) == 2:
        spec = _replace(spec, layout="pair", logits_out=False)
        logits, want = computed, (out[0].gather(-1, out[1]), out[1])
    elif isinstance(out, tuple):  # (logits, weights, indices); transformers 5.0 gives probabilities first
        w = 1 if _is_index(out[2]) else 2
        spec = _replace(spec, logits_out=_same(out[0], computed), weights_at=w)
        logits, want = computed, (out[w], out[3 - w])
    elif spec.layout == "inline":
        logits, want = out, None
    elif _routing_args(seen.get("expert_args", ())):
        positions = _routing_args(seen["expert_args"])
        spec = _replace(spec, layout="logits", expert_args=positions)
        logits, want = computed, (seen["expert_args"][positions[1]], seen["expert_args"][positions[0]])
    elif isinstance(out, torch.Tensor) and _same(out, computed):
        return _replace(spec, layout="internal")
    else:
        raise UnsupportedModelError(f"the router of {type(block).__name__} returns {type(out).__name__}, not (logits, weights, indices)")
    spec = _replace(spec, returns_logits=isinstance(native, tuple))
    tries = [(route, renorm) for route in ROUTES for renorm in (spec.renorm, not spec.renorm)]
    for same in (torch.equal, torch.allclose):  # a function giving the very bits first
        for route, renorm in tries:
            candidate = _replace(spec, route=route, renorm=renorm)
            with torch.no_grad():
                weights, indices = route(logits, spec.top_k, renorm)
                if want is None:
                    got, want_out = _first(mixture(block, candidate, x, weights, indices)), _first(native)
                    ok = same(got, want_out)
                else:
                    ok = torch.equal(indices, want[1]) and same(weights.to(want[0].dtype), want[0])
            if ok:
                return candidate
    return spec


def _indices(out):
    """The expert indices of a router's output ((.., indices) or (logits, weights, indices)); the
    logits themselves for a gate whose output is a tensor."""
    if not isinstance(out, tuple):
        return out
    found = [out[1]] if len(out) == 2 else out[2:0:-1] if len(out) >= 3 else []
    return next((each for each in found if _is_index(each)), None)


def _is_index(value) -> bool:
    return isinstance(value, torch.Tensor) and not value.is_floating_point()


def _pair(weights, indices, weights_at):
    """A router's (indices, weights) output, the weights at ``weights_at`` (0 or 1)."""
    return (weights, indices) if weights_at == 0 else (indices, weights)


def _triple(logits, weights, indices, weights_at):
    """A router's (logits, weights, indices) output, the weights at ``weights_at`` (1 or 2)."""
    return (logits, weights, indices) if weights_at == 1 else (logits, indices, weights)


def _routing_args(args):
    """Positions of (indices, weights) among an experts module's arguments: a (tokens, k) integer
    tensor and a floating one of the same shape; () where there are none."""
    tensors = [(i, a) for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.dim() == 2]
    ints = [i for i, a in tensors if not a.is_floating_point()]
    floats = [i for i, a in tensors if a.is_floating_point() and ints and a.shape == args[ints[0]].shape]
    return (ints[0], floats[0]) if len(ints) == 1 and len(floats) == 1 else ()


def _gathered(scores, logits, k):
    """(weights, indices) of Llama 4's router output: the scores at the top k of the logits."""
    indices = torch.topk(logits, k, dim=-1).indices
    return scores.gather(-1, indices), indices


def _unsort(out, k):
    """(weights, indices), (tokens, k) each, of GraniteMoE's router output sorted by expert."""
    order, _, gates, sizes = out[:4]
    experts = torch.repeat_interleave(torch.arange(len(sizes), device=order.device), torch.tensor(sizes, device=order.device))
    weights, indices = torch.empty_like(gates), torch.empty_like(order)
    weights[order], indices[order] = gates, experts
    return weights.view(-1, k), indices.view(-1, k)


def _sort(weights, indices, n_experts, logits):
    """GraniteMoE's router output for the given routing, in its router's own ops."""
    flat = indices.flatten()
    _, order = flat.sort(0)
    sizes = torch.bincount(flat, minlength=n_experts).tolist()
    return order, order.div(indices.shape[-1], rounding_mode="trunc"), weights.flatten()[order], sizes, logits


def _same(a, b) -> bool:
    return a.shape == b.shape and torch.equal(a, b)


def _replace(spec, **fields):
    return MoeSpec(**{**vars(spec), **fields})


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def router_linear(router):
    """The module holding the router's weight: the router itself, or its one linear child (AFMoE's
    ``gate``, Hunyuan's ``wg``)."""
    if isinstance(getattr(router, "weight", None), torch.Tensor):
        return router
    linears = [m for m in router.children() if isinstance(m, nn.Linear)]
    if len(linears) != 1:
        raise UnsupportedModelError(f"the router {type(router).__name__} has no weight of its own and not one linear child holding it")
    return linears[0]


def router_logits(router, flat):
    """The router's logits, as its own forward computes them (``F.linear`` with its weight and bias)."""
    linear = router_linear(router)
    return F.linear(flat, linear.weight, getattr(linear, "bias", None))


def mixture(block, moe, x, weights, indices):
    """The block's output from the given routing, in the ops of the 4.x blocks (expert by expert,
    ``index_add_`` into zeros, then the shared expert added): bit for bit the block's own result."""
    flat = x.reshape(-1, x.shape[-1])
    out = torch.zeros_like(flat)
    experts = getattr(block, moe.experts)
    mask = F.one_hot(indices, num_classes=len(experts)).permute(2, 1, 0)
    for j, expert in enumerate(experts):
        slot, rows = torch.where(mask[j])
        y = expert(flat[None, rows].reshape(-1, flat.shape[-1])) * weights[rows, slot, None]
        out.index_add_(0, rows, y.to(flat.dtype))
    if moe.shared:
        shared = getattr(block, moe.shared)(flat)
        if moe.shared_gate:
            shared = torch.sigmoid(getattr(block, moe.shared_gate)(flat)) * shared
        out = out + shared
    return out.reshape(x.shape)


# ------------------------------------------------------------------------------------ sites

#: {MoeBlockSite: (batch, pos)} of the MoE block calls in progress in this thread / task
_LEADS: contextvars.ContextVar = contextvars.ContextVar("tlshim_moe_leads", default={})


def _fire(point, tensor, lead):
    """(what flows on, whether a hook edited it): ``point`` fired on a (tokens, n) tensor viewed as
    (batch, pos, n); the fired view flows on where it carries backward hooks."""
    if point is None or not point.active:
        return tensor, False
    view = tensor.reshape(*lead, tensor.shape[-1]) if lead is not None else tensor
    out = point.fire(view)
    if out is view and not point.bwd_hooks:
        return tensor, False
    return out.reshape(tensor.shape), out is not view


class MoeBlockSite(MlpOutSite):
    """The MoE block: hook_mlp_out on its output; keeps the (batch, pos) of the call in progress for
    the router hooks; in the inline layout, runs the mixture itself while the routing is hooked."""

    def __init__(self, module, path, layer_site, moe):
        super().__init__(module, path, layer_site)
        self.moe = moe
        self.router_site = None

    @property
    def lead(self):
        """(batch, pos) of this block's call in progress in this thread / task, else None."""
        return _LEADS.get().get(self)

    def __call__(self, wrapped, instance, args, kwargs):
        token = _LEADS.set({**_LEADS.get(), self: first_input(args, kwargs).shape[:-1]})
        try:
            return super().__call__(wrapped, instance, args, kwargs)
        finally:
            _LEADS.reset(token)

    def call(self, wrapped, args, kwargs):
        if self.moe.layout == "inline" and self.router_site.routing_hooked():
            return self._mixture(first_input(args, kwargs))
        return wrapped(*args, **kwargs)

    def on_output(self, y):
        """hook_mlp_out as (batch, pos, d_model) where the block returns its tokens flat (Llama 4)."""
        lead = self.lead
        if lead is None or y.shape[:-1] == lead:
            return super().on_output(y)
        return super().on_output(y.reshape(*lead, y.shape[-1])).reshape(y.shape)

    def _mixture(self, x):
        moe, block = self.moe, self.module
        logits = getattr(block, moe.router)(x.reshape(-1, x.shape[-1]) if moe.router_rows else x).reshape(-1, moe.n_experts)
        weights, indices = moe.route(logits, moe.top_k, moe.renorm)
        weights = _fire(self.router_site.weights, weights, self.lead)[0]
        indices = _fire(self.router_site.indices, indices, self.lead)[0]
        out = mixture(block, moe, x, weights, indices)
        return (out, logits) if moe.returns_logits else out


class MoeMidSite(MoeBlockSite, MidInputSite):
    """The MoE block of a post-norm-only block (FlexOlmo): hook_resid_mid fires on its input."""

    def __init__(self, module, path, layer_site, moe):
        Site.__init__(self, module, path)  # (MlpOutSite's and MidInputSite's inits both want layer_site)
        self.layer_site, self.moe, self.router_site = layer_site, moe, None


class MoeCopySite(MoeBlockSite, CopyOutSite):
    """The MoE block of a parallel block (Cohere2-MoE): its output handed on as a copy (CopyOutSite)."""


class RouterSite(Site):
    """The router: hook_router_logits, hook_expert_weights, hook_expert_indices (b p E / b p k)."""

    def __init__(self, module, path, block_site):
        super().__init__(module, path)
        self.block = block_site
        self.logits = self.weights = self.indices = None

    def routing_hooked(self) -> bool:
        return any(point is not None and point.active for point in (self.weights, self.indices))

    def call(self, wrapped, args, kwargs):
        moe, lead = self.block.moe, self.block.lead
        if not moe.logits_out and self.logits.active:  # the logits are no output: computed and routed here
            flat = first_input(args, kwargs)
            logits = router_logits(self.module, flat.reshape(-1, flat.shape[-1]))
            routed = self._fired_logits(logits, lead)
            if routed is None:
                out = wrapped(*args, **kwargs)
            else:
                out = self._routed(routed)
        else:
            out = wrapped(*args, **kwargs)
        if not isinstance(out, tuple):  # inline: the gate's output is the logits
            return _fire(self.logits, out, lead)[0]
        if moe.layout == "scores":  # (dense scores, logits) (Llama 4): the weights at the top k of the logits
            return self._rebuilt(out, out[1], lambda: _gathered(*out, moe.top_k), lambda w, i, l: (self._dense((w, i))[0], l), lead)
        if moe.layout == "sorted":
            return self._rebuilt(out, out[4], lambda: _unsort(out, moe.top_k), lambda w, i, l: _sort(w, i, moe.n_experts, l), lead)
        if moe.layout == "routing":
            w = moe.weights_at
            new = (_fire(self.weights, out[w], lead)[0], _fire(self.indices, out[1 - w], lead)[0])
            return out if new[0] is out[w] and new[1] is out[1 - w] else _pair(*new, w)
        if moe.layout == "pair":
            weights, indices = out[0].gather(-1, out[1]), out[1]
            new = (_fire(self.weights, weights, lead)[0], _fire(self.indices, indices, lead)[0])
            return out if new[0] is weights and new[1] is indices else self._dense(new)
        w = moe.weights_at
        logits, weights, indices = out[0], out[w], out[3 - w]
        routed = self._fired_logits(logits, lead) if moe.logits_out else None
        if routed is not None:
            weights, indices = self._route(routed)
            logits, weights = routed, weights.to(out[w].dtype)
        return (*_triple(logits, _fire(self.weights, weights, lead)[0], _fire(self.indices, indices, lead)[0], w), *out[3:])

    def _routed(self, logits):
        """The router's output for (edited) ``logits`` the router does not return, in its layout."""
        weights, indices = self._route(logits)
        layout = self.block.moe.layout
        if layout in ("pair", "routing"):
            return self._dense((weights, indices)) if layout == "pair" else _pair(weights, indices, self.block.moe.weights_at)
        return _triple(logits, weights, indices, self.block.moe.weights_at)

    def _rebuilt(self, out, logits, read, build, lead):
        """A router whose output holds the routing in another form: ``read()`` gives (weights,
        indices); where a hook edited the logits or the routing, ``build(weights, indices, logits)``
        gives the router's output again."""
        routed = self._fired_logits(logits, lead)
        if routed is None:
            weights, indices = read()
        else:
            (weights, indices), logits = self._route(routed), routed
        new = (_fire(self.weights, weights, lead)[0], _fire(self.indices, indices, lead)[0])
        if routed is None and new[0] is weights and new[1] is indices:
            return out
        return build(*new, logits)

    def _fired_logits(self, logits, lead):
        """hook_router_logits fired on ``logits``: the logits to route by where a hook edited them (or
        where backward hooks need the routing in the graph and the routing is known), else None."""
        value, edited = _fire(self.logits, logits, lead)
        return value if edited or (value is not logits and self.block.moe.route is not None) else None

    def _route(self, logits):
        moe = self.block.moe
        if moe.route is None:
            raise UnsupportedModelError(
                f"{self.path}: an edit of hook_router_logits needs the model's routing, and none of tlshim's "
                "routing functions reproduces it; edit hook_expert_weights / hook_expert_indices instead"
            )
        return moe.route(logits, moe.top_k, moe.renorm)

    def _dense(self, routing):
        weights, indices = routing
        dense = torch.zeros(*indices.shape[:-1], self.block.moe.n_experts, dtype=weights.dtype, device=weights.device)
        return dense.scatter_(-1, indices, weights), indices


class ExpertsSite(Site):
    """The experts module of a block that routes its logits itself ("logits" layout):
    hook_expert_indices / hook_expert_weights fire on the routing it is given."""

    def __init__(self, module, path, block_site):
        super().__init__(module, path)
        self.block = block_site
        self.weights = self.indices = None

    def call(self, wrapped, args, kwargs):
        (i, w), lead, args = self.block.moe.expert_args, self.block.lead, list(args)
        args[i] = _fire(self.indices, args[i], lead)[0]
        args[w] = _fire(self.weights, args[w], lead)[0]
        return wrapped(*args, **kwargs)


class MoeWeights:
    """An MoE block's weights: per expert, never one matrix; the error names the per-expert form."""

    def _tl_moe_error(self, name):
        experts = getattr(self, type(self)._tlshim_spec.moe.experts)
        form = (
            f"blocks[i].mlp.experts[j].{name} (expert j of {len(experts)})"
            if isinstance(experts, nn.ModuleList)
            else "the experts' stacked parameters "
            + ", ".join(f"blocks[i].mlp.{type(self)._tlshim_spec.moe.experts}.{n}" for n, _ in experts.named_parameters())
        )
        return UnsupportedModelError(
            f"blocks[i].mlp.{name} does not exist on a mixture-of-experts block: each expert has its own; use {form}"
        )

    @property
    def W_in(self):
        raise self._tl_moe_error("W_in")

    @property
    def W_gate(self):
        raise self._tl_moe_error("W_gate")

    @property
    def W_out(self):
        raise self._tl_moe_error("W_out")

    @property
    def b_in(self):
        raise self._tl_moe_error("b_in")

    @property
    def b_out(self):
        raise self._tl_moe_error("b_out")


def plan_block(plan, moe, base, block, mlp_path, layer_site):
    """Plan the MoE hooks of the block at ``base``.``mlp_path`` (before its hook_mlp_out is planned)."""
    from .layout import _plan_projections
    from .weights import MlpWeights

    path = f"{base}.{mlp_path}"
    kind = MoeCopySite if plan.spec.parallel else MoeBlockSite if plan.spec.ln2 else MoeMidSite
    site = plan.site(path, kind, layer_site, moe)
    mlp = site.module
    router = plan.site(f"{path}.{moe.router}", RouterSite, site)
    site.router_site = router
    # inline routing that no known function reproduces, or routing inside the experts module (Aria):
    # the weights and indices are nowhere to be seen
    served = ("router_logits",) if moe.layout in ("inline", "internal") and moe.route is None else ("router_logits", "expert_weights", "expert_indices")
    routing = plan.site(f"{path}.{moe.experts}", ExpertsSite, site) if moe.layout == "logits" else router
    for attr in served:
        owner = router if attr == "router_logits" else routing
        point = plan.point(f"{block}.mlp.hook_{attr}", mlp, f"hook_{attr}", owner, site)
        setattr(owner, attr.split("_")[-1], point)
    plan.swap(mlp, MoeWeights, f"{block}.mlp")
    if not moe.expert_projections:
        return
    gate, up, down = moe.expert_projections
    for j, expert in enumerate(getattr(mlp, moe.experts)):
        rel = f"{mlp_path}.{moe.experts}.{j}"
        names = (("hook_pre", gate), ("hook_pre_linear", up)) if gate else (("hook_pre", up),)
        _plan_projections(plan, [(attr, f"{rel}.{name}", None) for attr, name in names], base, block, expert, f"mlp.experts.{j}")
        down_site = plan.site(f"{base}.{rel}.{down}")
        down_site.in_points.append((plan.point(f"{block}.mlp.experts.{j}.hook_post", expert, "hook_post", down_site), None))
        plan.swap(expert, MlpWeights, f"{block}.mlp.experts.{j}")
