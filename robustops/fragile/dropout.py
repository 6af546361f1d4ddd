"""Batched one-kernel-at-a-time dropout of a conv layer (Pravin et al. 2021, Sec. 3.3).

The paper removes each of the C kernels of a layer L in turn and re-evaluates the network, C full
evaluations. Here it is one batched computation, exact up to floating-point rounding:

1. The model is traced with ``torch.fx``. The part of the network that does not depend on L
   (everything up to L) runs once per data batch, together with the unablated ("base") forward.
2. Removing kernel c (its weights and bias zeroed) makes channel c of L's output zero and leaves
   the other channels alone. Channel-wise steps after L (activations, eval-mode BatchNorm,
   pooling, Identity, Dropout in eval) keep that property: channel c of their output becomes
   ``z_c`` = the same steps applied to a zero map, the rest is unchanged.
3. The first consumer of that value is usually a convolution (``groups=1``): linear, so its
   output for variant c is ``base_out - conv(h[:, c] - z_c, w[:, c])``, a single-input-channel
   convolution costing 1/C_in of the full one. The compiled op ``kernel_dropout_eval`` computes
   all requested contributions and fuses "base - contribution -> BatchNorm (eval, folded) ->
   ReLU -> max-pool" for the steps that follow the consumer, writing only the pooled result.
4. Everything after that runs on the variants stacked along the batch dimension, in chunks
   sized by ``memory_budget``. Other users of the masked value (a residual identity shortcut)
   get ``h`` with channel c replaced by ``z_c``.

Fallbacks, still exact and batched: when a consumer is not a plain convolution the masked value
is used directly ("masked" method); when the model cannot be traced by ``torch.fx`` (or L is
called more than once) the input is repeated per variant and a forward hook zeroes channel c of
L's output in the v-th block ("hook" method, no saving on the prefix).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from .. import _ops
from .._checks import as_logits, check_images, check_labels, check_nonneg
from .._gradients import input_gradient
from .._guard import frozen_model, model_device
from ._common import (LayerLike, bounds, check_batch_size, checked_batches, checked_pair, conv_layer_names,
                      normal_tensor, public_entry, resolve_layer, spearman, split_indices)
from .errors import EmptyDatasetError, MemoryBudgetError

__all__ = ["KernelDropoutResult", "kernel_dropout", "kernel_dropout_naive", "variant_logits",
           "DEFAULT_MEMORY_BUDGET"]

#: Default memory budget for the stacked variants' activations (bytes).
DEFAULT_MEMORY_BUDGET = 512 * 2**20
#: Examples per micro-batch of the variant pass, and the most stacked images (variants x
#: examples) per forward of the rest of the network. Measured on CPU: stacks of ~1k small images
#: keep the activations cache-resident; much larger stacks are memory-bound and slower.
MICRO_BATCH = 64
MAX_STACK = 1024

_ELEMENTWISE_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh,
                        nn.Hardtanh, nn.Identity, nn.Dropout, nn.Dropout2d, nn.Softplus, nn.Mish,
                        nn.Hardswish, nn.Hardsigmoid, nn.PReLU)
_CHANNELWISE_MODULES = _ELEMENTWISE_MODULES + (nn.BatchNorm2d, nn.MaxPool2d, nn.AvgPool2d)
_ELEMENTWISE_FUNCTIONS = {F.relu, torch.relu, F.relu6, F.leaky_relu, F.gelu, F.silu, torch.sigmoid, torch.tanh,
                          F.elu, F.hardtanh}
_ELEMENTWISE_METHODS = {"relu", "sigmoid", "tanh"}


# ---------------------------------------------------------------------------------------------
# result
# ---------------------------------------------------------------------------------------------
@dataclass
class KernelDropoutResult:
    """Per-kernel evaluation of a conv layer with each kernel removed in turn.

    Attributes:
        layer: the layer's name in the model.
        clean_accuracy: ``Tensor[C]``, accuracy with kernel c removed.
        clean_loss: ``Tensor[C]``, mean cross-entropy with kernel c removed.
        baseline_accuracy, baseline_loss: nothing removed.
        adversarial_accuracy / adversarial_loss: ``Tensor[C]`` on the fixed adversarial set
            (None unless ``adversarial`` was given); ``baseline_adversarial_accuracy`` likewise.
        num_examples: examples evaluated.
        method: "fused" (compiled consumer op), "masked" or "hook" (see the module docstring).
        taylor: first-order importance ``|mean(a * dL/da)|`` per kernel (when ``taylor=True``).
        taylor_spearman: Spearman correlation of ``taylor`` with the exact accuracy drop.
        taylor_spearman_loss: ... with the exact loss increase.
    """

    layer: str
    clean_accuracy: torch.Tensor
    clean_loss: torch.Tensor
    baseline_accuracy: float
    baseline_loss: float
    num_examples: int
    method: str
    adversarial_accuracy: Optional[torch.Tensor] = None
    adversarial_loss: Optional[torch.Tensor] = None
    baseline_adversarial_accuracy: Optional[float] = None
    adversarial_eps: Optional[float] = None
    taylor: Optional[torch.Tensor] = None
    taylor_spearman: Optional[float] = None
    taylor_spearman_loss: Optional[float] = None
    extra: Dict[str, object] = field(default_factory=dict)

    @property
    def num_kernels(self) -> int:
        return int(self.clean_accuracy.numel())

    @property
    def accuracy_drop(self) -> torch.Tensor:
        """``baseline_accuracy - clean_accuracy`` (positive: removing the kernel hurts)."""
        return self.baseline_accuracy - self.clean_accuracy


# ---------------------------------------------------------------------------------------------
# plan: how to evaluate the variants of one layer
# ---------------------------------------------------------------------------------------------
@dataclass
class _Fused:
    conv_node: torch.fx.Node
    last_node: torch.fx.Node          # the node whose variant value the op produces
    conv: nn.Conv2d
    scale: Optional[torch.Tensor]
    shift: Optional[torch.Tensor]
    relu: bool
    pool_kernel: Tuple[int, int]
    pool_stride: Tuple[int, int]


@dataclass
class _Plan:
    method: str
    gm: Optional[torch.fx.GraphModule]
    layer_node: Optional[torch.fx.Node] = None
    chain: List[torch.fx.Node] = field(default_factory=list)   # L .. h (h = chain[-1])
    fused: List[_Fused] = field(default_factory=list)
    need_masked_h: bool = False
    variant_nodes: List[torch.fx.Node] = field(default_factory=list)  # generic, in graph order
    skip: set = field(default_factory=set)                      # descendants not evaluated generically


def _is_channelwise(node: torch.fx.Node, modules: Dict[str, nn.Module], src: torch.fx.Node) -> bool:
    tensor_args = [a for a in node.all_input_nodes]
    if tensor_args != [src] or (node.args and node.args[0] is not src):
        return False
    if node.op == "call_module":
        m = modules[node.target]
        if isinstance(m, nn.BatchNorm2d):
            return m.running_mean is not None and m.running_var is not None  # eval uses running stats
        if isinstance(m, nn.PReLU):
            return True
        return isinstance(m, _CHANNELWISE_MODULES)
    if node.op == "call_function":
        return node.target in _ELEMENTWISE_FUNCTIONS
    if node.op == "call_method":
        return node.target in _ELEMENTWISE_METHODS
    return False


def _single_user(node: torch.fx.Node) -> Optional[torch.fx.Node]:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _fuse_consumer(conv_node: torch.fx.Node, modules) -> _Fused:
    conv = modules[conv_node.target]
    scale = shift = None
    relu = False
    pk = ps = (0, 0)
    cur = conv_node
    nxt = _single_user(cur)
    if nxt is not None and nxt.op == "call_module" and isinstance(modules[nxt.target], nn.BatchNorm2d) \
            and list(nxt.all_input_nodes) == [cur]:
        bn = modules[nxt.target]
        if bn.running_mean is not None and bn.running_var is not None:
            w = bn.weight if bn.weight is not None else torch.ones_like(bn.running_var)
            b = bn.bias if bn.bias is not None else torch.zeros_like(bn.running_mean)
            inv = torch.rsqrt(bn.running_var + bn.eps)
            scale = (w * inv).detach()
            shift = (b - bn.running_mean * w * inv).detach()
            cur = nxt
            nxt = _single_user(cur)
    if nxt is not None and list(nxt.all_input_nodes) == [cur] and (
            (nxt.op == "call_module" and type(modules[nxt.target]) is nn.ReLU)
            or (nxt.op == "call_function" and nxt.target in (F.relu, torch.relu) and len(nxt.args) == 1
                and not nxt.kwargs.get("inplace", False))
            or (nxt.op == "call_method" and nxt.target == "relu")):
        relu = True
        cur = nxt
        nxt = _single_user(cur)
    if nxt is not None and nxt.op == "call_module" and list(nxt.all_input_nodes) == [cur]:
        mp = modules[nxt.target]
        if isinstance(mp, nn.MaxPool2d) and not mp.ceil_mode and not mp.return_indices \
                and _pair_int(mp.padding) == (0, 0) and _pair_int(mp.dilation) == (1, 1):
            pk = _pair_int(mp.kernel_size)
            ps = _pair_int(mp.stride if mp.stride is not None else mp.kernel_size)
            cur = nxt
    return _Fused(conv_node, cur, conv, scale, shift, relu, pk, ps)


def _pair_int(v) -> Tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    return (int(v[0]), int(v[1]))


def _descendants(node: torch.fx.Node) -> set:
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        for u in n.users:
            if u not in seen:
                seen.add(u)
                stack.append(u)
    return seen


def _build_plan(model: nn.Module, layer_name: str, fuse: bool = True) -> _Plan:
    try:
        gm = torch.fx.symbolic_trace(model)
    except Exception:  # noqa: BLE001 - any tracing failure means: use the hook fallback
        return _Plan("hook", None)
    modules = dict(gm.named_modules())
    hits = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == layer_name]
    if len(hits) != 1:
        return _Plan("hook", None)
    lnode = hits[0]
    chain = [lnode]
    while True:
        nxt = _single_user(chain[-1])
        if nxt is None or not _is_channelwise(nxt, modules, chain[-1]):
            break
        chain.append(nxt)
    h = chain[-1]
    plan = _Plan("masked", gm, lnode, chain)
    desc = _descendants(lnode)
    skip = set(chain)
    for u in h.users:
        ok = (fuse and u.op == "call_module" and isinstance(modules[u.target], nn.Conv2d)
              and u.args and u.args[0] is h and len(u.all_input_nodes) == 1)
        if ok:
            conv = modules[u.target]
            ok = conv.groups == 1 and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)
        if ok:
            fz = _fuse_consumer(u, modules)
            plan.fused.append(fz)
            n = u
            while True:  # the conv and its fused followers are produced by the op
                skip.add(n)
                if n is fz.last_node:
                    break
                n = _single_user(n)
        else:
            plan.need_masked_h = True
    if plan.fused:
        plan.method = "fused"
    else:
        plan.need_masked_h = True
    plan.skip = skip
    plan.variant_nodes = [n for n in gm.graph.nodes if n in desc and n not in skip]
    return plan


# ---------------------------------------------------------------------------------------------
# graph execution
# ---------------------------------------------------------------------------------------------
def _fetch_attr(gm: torch.fx.GraphModule, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _run_node(gm, modules, node: torch.fx.Node, args, kwargs):
    if node.op == "call_module":
        return modules[node.target](*args, **kwargs)
    if node.op == "call_function":
        return node.target(*args, **kwargs)
    if node.op == "call_method":
        obj, *rest = args
        return getattr(obj, node.target)(*rest, **kwargs)
    if node.op == "get_attr":
        return _fetch_attr(gm, node.target)
    raise RuntimeError(f"unexpected node {node.op}")


def _last_uses(nodes: Sequence[torch.fx.Node]) -> Dict[torch.fx.Node, List[torch.fx.Node]]:
    """For each node, the values that can be freed right after it ran."""
    last: Dict[torch.fx.Node, torch.fx.Node] = {}
    for n in nodes:
        for a in n.all_input_nodes:
            last[a] = n
    frees: Dict[torch.fx.Node, List[torch.fx.Node]] = {}
    for value, user in last.items():
        frees.setdefault(user, []).append(value)
    return frees


class _MutatedInput(Exception):
    """A node evaluated per variant reads a value that an in-place op changed before it ran."""


def _base_forward(plan: _Plan, x: torch.Tensor, keep: set, shapes: Optional[Dict] = None,
                  clone: Optional[set] = None) -> Tuple[Dict[object, object], set]:
    """Run the whole graph on x; return ``(values, mutated)``.

    ``values`` holds the value of every node in ``keep`` *as it was produced* (plus the output
    under key ``'output'``); ``mutated`` the kept nodes whose tensor was later modified in place
    (their version counter moved) although they were not in ``clone``: the caller adds them to
    ``clone`` (stored as copies at production time) and runs again. A node that is re-evaluated
    per variant and reads a kept value that was already modified in place when it ran raises
    :class:`_MutatedInput` (the replay could not reproduce what it saw).

    ``shapes`` (when given) receives the output bytes of each variant node: the size of one
    variant's activation at that node."""
    clone = clone or set()
    vset = set(plan.variant_nodes)
    replayed = vset | plan.skip
    gm = plan.gm
    modules = dict(gm.named_modules())
    env: Dict[torch.fx.Node, object] = {}
    nodes = list(gm.graph.nodes)
    frees = _last_uses(nodes)
    out: Dict[object, object] = {}
    versions: Dict[torch.fx.Node, int] = {}
    used_x = False
    for node in nodes:
        if node.op == "placeholder":
            if node.target.startswith("*"):
                raise TypeError("models with *args are not supported by the fused path")
            if used_x:
                raise TypeError("kernel_dropout supports models taking one input tensor")
            env[node] = x
            used_x = True
        elif node.op == "output":
            out["output"] = torch.fx.node.map_arg(node.args[0], lambda n: env[n])
        else:
            if node in replayed and node not in plan.chain:
                for a in node.all_input_nodes:
                    if a in versions and env[a]._version != versions[a]:
                        raise _MutatedInput(a.name)
            args = torch.fx.node.map_arg(node.args, lambda n: env[n])
            kwargs = torch.fx.node.map_arg(node.kwargs, lambda n: env[n])
            env[node] = _run_node(gm, modules, node, args, kwargs)
            if shapes is not None and node in vset and isinstance(env[node], torch.Tensor):
                shapes[node] = env[node].numel() * env[node].element_size()
            if node in keep:
                v = env[node]
                if isinstance(v, torch.Tensor):
                    if node in clone:
                        v = v.clone()
                    else:
                        versions[node] = v._version
                out[node] = v
        for dead in frees.get(node, ()):
            if dead is not node and dead not in keep:
                env.pop(dead, None)
    mutated = {n for n, ver in versions.items() if out[n]._version != ver}
    return out, mutated


# ---------------------------------------------------------------------------------------------
# batch-mixing probe: which nodes make one sample's output depend on the other samples?
# ---------------------------------------------------------------------------------------------
def _perturb_tail(t, n: int, k: int):
    """Copy of ``t`` with the batch rows ``k:`` changed (scaled and shifted, so batch statistics
    move) when ``t`` is a floating batch tensor of ``n`` rows; a plain copy otherwise."""
    if isinstance(t, torch.Tensor):
        c = t.clone()
        if t.is_floating_point() and t.dim() >= 1 and t.shape[0] == n:
            c[k:] = c[k:] * 1.75 + 0.5
        return c
    return t


def _is_batch_tensor(t, n: int) -> bool:
    return isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() >= 1 and t.shape[0] == n


def _rows_differ(a, b, n: int, k: int) -> bool:
    """Whether outputs ``a`` and ``b`` (pytrees) differ in the batch rows ``:k`` (batch tensors)
    or anywhere (other tensors: a reduction over the batch)."""
    from torch.utils._pytree import tree_leaves

    la, lb = tree_leaves(a), tree_leaves(b)
    if len(la) != len(lb):
        return True
    for ta, tb in zip(la, lb):
        if not isinstance(ta, torch.Tensor) or not isinstance(tb, torch.Tensor):
            continue
        if ta.shape != tb.shape:
            return True
        if not ta.is_floating_point():
            if not torch.equal(ta, tb):
                return True
            continue
        if ta.dim() >= 1 and ta.shape[0] == n:
            ta, tb = ta[:k], tb[:k]
        ta, tb = ta.double(), tb.double()
        scale = float(ta.abs().max()) if ta.numel() else 0.0
        tol = (1e-6 if ta.dtype == torch.float64 else 1e-4) * max(1.0, scale)
        diff = (ta - tb).abs()
        diff = torch.where(torch.isnan(ta) & torch.isnan(tb), torch.zeros_like(diff), diff)
        if ta.numel() and not bool((diff <= tol).all()):
            return True
    return False


def _node_label(node: torch.fx.Node) -> str:
    if node.op == "call_module":
        return str(node.target)
    target = getattr(node.target, "__name__", str(node.target))
    return f"{node.name} ({target})"


@torch.no_grad()
def _probe_graph(gm: torch.fx.GraphModule, x: torch.Tensor) -> List[torch.fx.Node]:
    """Nodes whose output for one sample depends on other samples of the batch.

    Each computing node runs twice on copies of its inputs: as they are, and with the batch rows
    ``k = n // 2`` onwards scaled and shifted. A per-sample node gives the same rows ``:k``; a
    batch-statistics norm, a "subtract the batch mean" module, a reduction over the batch does
    not. Found from the graph and the values, not from a list of classes."""
    modules = dict(gm.named_modules())
    n = x.shape[0]
    k = n // 2
    env: Dict[torch.fx.Node, object] = {}
    found = []
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            env[node] = x
            continue
        if node.op == "output":
            break
        args = torch.fx.node.map_arg(node.args, lambda a: env[a])
        kwargs = torch.fx.node.map_arg(node.kwargs, lambda a: env[a])
        if node.op != "get_attr":
            from torch.utils._pytree import tree_leaves, tree_map

            if any(_is_batch_tensor(t, n) for t in tree_leaves((args, kwargs))):
                a_args, a_kwargs = tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, (args, kwargs))
                b_args, b_kwargs = tree_map(lambda t: _perturb_tail(t, n, k), (args, kwargs))
                out_a = _run_node(gm, modules, node, a_args, a_kwargs)
                out_b = _run_node(gm, modules, node, b_args, b_kwargs)
                if _rows_differ(out_a, out_b, n, k):
                    found.append(node)
                env[node] = out_a
                continue
        env[node] = _run_node(gm, modules, node, args, kwargs)
    return found


@torch.no_grad()
def _probe_model(model: nn.Module, x: torch.Tensor) -> bool:
    """Whole-model version of :func:`_probe_graph` (for models fx cannot trace)."""
    n = x.shape[0]
    k = n // 2
    out_a = model(x.clone())
    out_b = model(_perturb_tail(x, n, k))
    return _rows_differ(out_a, out_b, n, k)


def _zero_chain(gm, modules, chain, lnode, lout_like):
    """z: the chain after L applied to an all-zero output of L, shape [1, C, H, W] of h."""
    v = torch.zeros_like(lout_like[:1])
    for node in chain[1:]:
        args = torch.fx.node.map_arg(node.args, lambda n: v)
        kwargs = torch.fx.node.map_arg(node.kwargs, lambda n: v)
        v = _run_node(gm, modules, node, args, kwargs)
    return v


#: Most examples used by the batch-mixing probe.
PROBE_BATCH = 16


class _Evaluator:
    """Evaluates the C ablated variants of one layer on batches, in variant chunks."""

    def __init__(self, model: nn.Module, layer_name: str, layer: nn.Conv2d, memory_budget: int, fuse: bool = True):
        self.model = model
        self.layer_name = layer_name
        self.layer = layer
        self.C = layer.out_channels
        self.memory_budget = memory_budget
        self.plan = _build_plan(model, layer_name, fuse=fuse)
        self._shapes: Dict[torch.fx.Node, int] = {}
        self._chunks: Dict[int, int] = {}
        self._clone: set = set()
        self.prepared = False
        #: names of the layers/nodes found to mix samples of a batch (see :meth:`prepare`)
        self.batch_mixing: List[str] = []
        #: evaluate one variant at a time (a node after L mixes samples)
        self.per_variant = False
        #: evaluate each data batch whole, never in micro-batches (some node mixes samples)
        self.whole_batch = False
        self.num_classes: Optional[int] = None

    @property
    def method(self) -> str:
        return self.plan.method

    def _to_hook(self) -> None:
        self.plan = _Plan("hook", None)
        self._chunks.clear()

    def prepare(self, x: torch.Tensor) -> None:
        """Probe the model once, on the first batch, for layers that mix the samples of a batch.

        Stacking the C variants along the batch dimension is exact only when every layer after L
        treats samples independently; micro-batching the data is exact only when every layer
        does. A mixing node after L -> one variant at a time (in the chain right after L, which
        the graph path evaluates on a single zero sample: the hook path); a mixing node anywhere
        -> each data batch is evaluated whole, as the naive loop does."""
        if self.prepared:
            return
        self.prepared = True
        xp = x[:PROBE_BATCH] if x.shape[0] >= 2 else torch.cat([x, x])
        if self.plan.method == "hook":
            if _probe_model(self.model, xp):
                self.batch_mixing = ["<model>"]
                self.per_variant = self.whole_batch = True
            return
        p = self.plan
        found = _probe_graph(p.gm, xp)
        if not found:
            return
        self.batch_mixing = [_node_label(nd) for nd in found]
        self.whole_batch = True
        desc = _descendants(p.layer_node)
        if any(nd in p.chain[1:] for nd in found):
            self._to_hook()
            self.per_variant = True
        elif any(nd in desc for nd in found):
            self.per_variant = True

    # -- generic pieces ------------------------------------------------------------------------
    def _keep_set(self) -> set:
        p = self.plan
        keep = {p.chain[-1], p.chain[0]}
        for fz in p.fused:
            keep.add(fz.conv_node)
        vset = set(p.variant_nodes) | p.skip
        for n in p.variant_nodes:
            for a in n.all_input_nodes:
                if a not in vset:
                    keep.add(a)
        return keep

    def _base(self, x: torch.Tensor) -> Optional[Dict]:
        """Values of the kept nodes for x (None when the plan switched to the hook path)."""
        keep = self._keep_set()
        for _ in range(3):
            try:
                base, mutated = _base_forward(self.plan, x, keep, self._shapes, self._clone)
            except _MutatedInput:
                self._to_hook()
                return None
            if not mutated:
                return base
            self._clone |= mutated  # an in-place op overwrote a kept value: keep a copy instead
        self._to_hook()
        return None

    def _bytes_per_variant(self, base: Dict, n: int) -> int:
        """Peak bytes of live stacked activations for one variant (liveness simulated in order)."""
        p = self.plan
        sizes: Dict[torch.fx.Node, int] = {}
        live = 0
        h = base[p.chain[-1]]
        if p.need_masked_h:
            sizes[p.chain[-1]] = h.numel() * h.element_size()
            live += sizes[p.chain[-1]]
        for fz in p.fused:
            b = base[fz.conv_node]
            hp, wp = _ops._kernel_dropout_out_hw(b.shape[2], b.shape[3], fz.pool_kernel, fz.pool_stride)
            sizes[fz.last_node] = b.shape[0] * b.shape[1] * hp * wp * b.element_size()
            live += sizes[fz.last_node]
        peak = live
        frees = _last_uses(p.variant_nodes)
        for node in p.variant_nodes:
            s = self._shapes.get(node, 0)
            sizes[node] = s
            live += s
            peak = max(peak, live)
            for dead in frees.get(node, ()):
                live -= sizes.get(dead, 0)
        return max(peak, 1)

    def chunk_size(self, x: torch.Tensor, base: Optional[Dict] = None) -> int:
        n = x.shape[0]
        if n in self._chunks:
            return self._chunks[n]
        if self.plan.method == "hook":
            per = self._hook_per_variant(x)
        else:
            per = self._bytes_per_variant(base, n)
        if per > self.memory_budget:
            raise MemoryBudgetError(
                f"memory_budget={self.memory_budget} bytes is too small for one ablated variant of "
                f"layer {self.layer_name!r} on a batch of {n} examples (needs about {per} bytes); "
                f"raise memory_budget or lower batch_size")
        cap = max(1, MAX_STACK // n) if x.device.type == "cpu" else self.C
        chunk = max(1, min(self.C, self.memory_budget // per, cap))
        self._chunks[n] = 1 if self.per_variant else chunk
        return self._chunks[n]

    def _hook_per_variant(self, x: torch.Tensor) -> int:
        total = 0
        handles = []

        def hook(_m, _i, out):
            nonlocal total
            if isinstance(out, torch.Tensor):
                total += out.numel() * out.element_size()

        for m in self.model.modules():
            if len(list(m.children())) == 0:
                handles.append(m.register_forward_hook(hook))
        try:
            with torch.no_grad():
                self.model(x)
        finally:
            for hd in handles:
                hd.remove()
        return max(total, 1)

    # -- evaluation ----------------------------------------------------------------------------
    @torch.no_grad()
    def logits(self, x: torch.Tensor, chunk: Optional[int] = None):
        """Yield ``(channels, logits[V, N, K], base_logits[N, K])`` for all variants of x."""
        self.prepare(x)
        n = x.shape[0]
        base = None
        if self.plan.method != "hook":
            base = self._base(x)
        if base is None:  # hook path (possibly switched to just now)
            chunk = chunk or self.chunk_size(x)
            base_logits = as_logits(self.model(x), n)
            self.num_classes = base_logits.shape[1]
            for start in range(0, self.C, chunk):
                chs = torch.arange(start, min(self.C, start + chunk))
                yield chs, self._hook_logits(x, chs), base_logits
            return
        p = self.plan
        chunk = chunk or self.chunk_size(x, base)
        base_logits = as_logits(base["output"], n)
        self.num_classes = base_logits.shape[1]
        h = base[p.chain[-1]]
        z = _zero_chain(p.gm, dict(p.gm.named_modules()), p.chain, p.layer_node, base[p.chain[0]])
        delta = h - z if p.fused else None
        for start in range(0, self.C, chunk):
            chs = torch.arange(start, min(self.C, start + chunk))
            yield chs, self._variant_logits(base, h, z, delta, chs), base_logits

    def _variant_logits(self, base, h, z, delta, chs: torch.Tensor) -> torch.Tensor:
        p = self.plan
        gm = p.gm
        modules = dict(gm.named_modules())
        V = chs.numel()
        n = h.shape[0]
        env: Dict[torch.fx.Node, object] = {}
        if p.need_masked_h:
            hv = h.unsqueeze(0).repeat(V, *([1] * h.dim()))
            idx = torch.arange(V)
            hv[idx, :, chs] = z[0, chs].unsqueeze(1).to(hv.dtype)
            env[p.chain[-1]] = hv.reshape(V * n, *h.shape[1:])
        chs_dev = chs.to(h.device)
        for fz in p.fused:
            conv = fz.conv
            out = _ops.kernel_dropout_eval(
                base[fz.conv_node], delta, conv.weight.detach(), chs_dev, conv.stride, conv.padding, conv.dilation,
                fz.scale, fz.shift, fz.relu, fz.pool_kernel, fz.pool_stride)
            env[fz.last_node] = out.reshape(V * n, *out.shape[2:])
        frees = _last_uses(p.variant_nodes)
        result = None

        def value(a: torch.fx.Node):
            if a in env:
                return env[a]
            v = base[a]
            if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == n:
                return v.repeat(V, *([1] * (v.dim() - 1)))
            return v

        for node in p.variant_nodes:
            if node.op == "output":
                result = torch.fx.node.map_arg(node.args[0], value)
                break
            args = torch.fx.node.map_arg(node.args, value)
            kwargs = torch.fx.node.map_arg(node.kwargs, value)
            env[node] = _run_node(gm, modules, node, args, kwargs)
            for dead in frees.get(node, ()):
                if dead is not node and dead in env:
                    del env[dead]
        logits = as_logits(result, V * n)
        return logits.reshape(V, n, *logits.shape[1:])

    def _hook_logits(self, x: torch.Tensor, chs: torch.Tensor) -> torch.Tensor:
        V = chs.numel()
        n = x.shape[0]

        def hook(_m, _i, out):
            o = out.reshape(V, n, *out.shape[1:]).clone()
            o[torch.arange(V), :, chs.to(o.device)] = 0
            return o.reshape(V * n, *out.shape[1:])

        handle = self.layer.register_forward_hook(hook)
        try:
            logits = as_logits(self.model(x.repeat(V, *([1] * (x.dim() - 1)))), V * n)
        finally:
            handle.remove()
        return logits.reshape(V, n, *logits.shape[1:])


# ---------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------
def _check_budget(memory_budget) -> int:
    if memory_budget is None:
        return DEFAULT_MEMORY_BUDGET
    if isinstance(memory_budget, bool) or not isinstance(memory_budget, (int, float)) or not memory_budget > 0 \
            or not math.isfinite(memory_budget):
        raise MemoryBudgetError(f"memory_budget must be a positive number of bytes, got {memory_budget!r}")
    return int(memory_budget)


def _accumulate(evaluator: _Evaluator, batches, C: int, device):
    correct = torch.zeros(C, dtype=torch.int64, device=device)
    loss = torch.zeros(C, dtype=torch.float64, device=device)
    base_correct = torch.zeros((), dtype=torch.int64, device=device)
    base_loss = torch.zeros((), dtype=torch.float64, device=device)
    seen = 0
    cpu = torch.device(device).type == "cpu"
    for xb, yb in batches:
        xb, yb = xb.to(device), yb.to(device)
        evaluator.prepare(xb)
        step = MICRO_BATCH if cpu and not evaluator.whole_batch else max(1, xb.shape[0])
        for i in range(0, xb.shape[0], step):
            x, y = xb[i:i + step], yb[i:i + step]
            n = x.shape[0]
            first = True
            for chs, logits, base_logits in evaluator.logits(x):
                if first:  # labels checked against the model's classes before any loss is taken
                    y = check_labels(y, n, name="y", num_classes=base_logits.shape[1])
                    base_correct += (base_logits.argmax(-1) == y).sum()
                    base_loss += F.cross_entropy(base_logits, y, reduction="sum").double()
                    first = False
                chs = chs.to(device)
                V = chs.numel()
                correct[chs] += (logits.argmax(-1) == y).sum(1)
                loss[chs] += F.cross_entropy(logits.reshape(V * n, -1), y.repeat(V), reduction="none") \
                    .reshape(V, n).double().sum(1)
            seen += n
    if seen == 0:
        raise EmptyDatasetError("data yielded no examples")
    return (correct.double() / seen).cpu(), (loss / seen).cpu(), base_correct.item() / seen, \
        base_loss.item() / seen, seen


@public_entry
def kernel_dropout(
    model: nn.Module,
    layer: Union[LayerLike, Sequence[LayerLike], None] = None,
    data=None,
    *,
    adversarial=None,
    batch_size: int = 256,
    memory_budget: Optional[int] = None,
    taylor: bool = False,
    fused: bool = True,
    lo: float = 0.0,
    hi: float = 1.0,
) -> Union[KernelDropoutResult, Dict[str, KernelDropoutResult]]:
    """Evaluate ``model`` with each kernel of conv layer ``layer`` removed in turn (batched, exact).

    Exact for any model, equal to :func:`kernel_dropout_naive` up to float rounding: values
    overwritten by in-place ops (``Conv2d -> ReLU(inplace=True)``) are detected by their version
    counters and kept as copies; layers whose output for one sample depends on the other samples
    of the batch (batch-statistics norms, "subtract the batch mean" modules) are found by a probe
    of the traced graph on the first batch, and then the variants are evaluated one at a time on
    whole data batches (``result.extra["batch_mixing"]`` names those layers).

    Args:
        model: a classifier returning ``(N, C)`` logits (the shared output rule,
            :func:`robustops._checks.as_logits`: a tuple output is refused with a ``ValueError``
            suggesting ``robustops.SelectOutput``); it is never modified (eval mode is used inside
            and every flag is restored).
        layer: a module name (``"conv1"``, ``"layer1.0.conv1"``), the module itself, None (the
            first ``nn.Conv2d``), a list of those, or ``"all"`` (every ``nn.Conv2d``). With a list
            or ``"all"`` the result is a dict ``{name: KernelDropoutResult}``.
        data: a DataLoader (or iterable of ``(x, y, ...)`` batches) or an ``(x, y)`` pair; x
            ``[N, ...]`` finite in ``[lo, hi]``, y class indices of any integer dtype.
        adversarial: None; a float FGSM eps in pixel units (examples crafted once per batch on the
            *unablated* model with the fused ``fgsm_step``, clamped to ``[lo, hi]``, then kept
            fixed for every ablation, as a fixed FGSM set); an ``x_adv`` tensor aligned with an
            ``(x, y)`` pair ``data``; or an ``(x_adv, y_adv)`` pair / DataLoader.
        batch_size: examples per batch for the ``(x, y)`` form (a DataLoader keeps its batches).
        memory_budget: bytes for the stacked variants' activations per chunk (default 512 MiB);
            the variants of a batch are evaluated in chunks that fit.
            ``MemoryBudgetError`` when even one variant does not fit.
        taylor: also compute the first-order Taylor screen and its Spearman correlation.
        fused: use the compiled consumer op (True) or only the masked generic path (False).
        lo, hi: the input range (default ``[0, 1]``; e.g. ``[-1, 1]`` for normalised inputs).

    Returns:
        :class:`KernelDropoutResult` (``clean_accuracy[c]`` = accuracy with kernel c removed).

    Raises:
        ``ValueError``/``TypeError`` naming the bad argument (x outside ``[lo, hi]`` or not
        finite, float/bool/out-of-range labels, tuple outputs), ``EmptyDatasetError``,
        ``LayerNotFoundError``, ``NotAConvLayerError``, ``MemoryBudgetError``.

    Works under ``torch.inference_mode()`` (the FGSM set included) with the plain call's result.
    """
    batch_size = check_batch_size(batch_size)
    budget = _check_budget(memory_budget)
    lo, hi = bounds(lo, hi)
    if data is None:
        raise EmptyDatasetError("data is required: a DataLoader or an (x, y) pair")
    kw = dict(adversarial=adversarial, batch_size=batch_size, memory_budget=budget, taylor=taylor, fused=fused,
              lo=lo, hi=hi)
    if isinstance(layer, str) and layer == "all":
        names = conv_layer_names(model)
        return {n: kernel_dropout(model, n, data, **kw) for n in names}
    if isinstance(layer, (list, tuple)):
        out = {}
        for item in layer:
            name, _ = resolve_layer(model, item)
            out[name] = kernel_dropout(model, name, data, **kw)
        return out
    name, conv = resolve_layer(model, layer)
    device = model_device(model)
    if adversarial is not None:
        _check_adversarial_arg(adversarial)
    with frozen_model(model):
        ev = _Evaluator(model, name, conv, budget, fuse=fused)
        acc, loss, bacc, bloss, seen = _accumulate(ev, checked_batches(data, batch_size, lo, hi), ev.C, device)
        result = KernelDropoutResult(name, acc, loss, bacc, bloss, seen, ev.method)
        if adversarial is not None:
            adv_batches, eps = _adversarial_source(model, data, adversarial, batch_size, device, lo, hi,
                                                   ev.num_classes)
            aacc, aloss, baacc, _, _ = _accumulate(ev, adv_batches, ev.C, device)
            result.adversarial_accuracy = aacc
            result.adversarial_loss = aloss
            result.baseline_adversarial_accuracy = baacc
            result.adversarial_eps = eps
        result.method = ev.method
        result.extra["batch_mixing"] = list(ev.batch_mixing)
        result.extra["per_variant"] = ev.per_variant
    if taylor:
        from .taylor import taylor_importance

        result.taylor = taylor_importance(model, name, data, batch_size=batch_size, lo=lo, hi=hi)
        result.taylor_spearman = spearman(result.taylor, result.accuracy_drop)
        result.taylor_spearman_loss = spearman(result.taylor, result.clean_loss - result.baseline_loss)
    return result


def _check_adversarial_arg(adversarial) -> None:
    if isinstance(adversarial, bool):
        raise TypeError("adversarial must be an FGSM eps, an x_adv tensor or an (x_adv, y) pair, got bool")
    if isinstance(adversarial, (int, float)):
        check_nonneg(adversarial, "adversarial (FGSM eps)")


def _adversarial_source(model, data, adversarial, batch_size, device, lo, hi, num_classes):
    if isinstance(adversarial, (int, float)):
        eps = check_nonneg(adversarial, "adversarial (FGSM eps)")

        def gen():
            for x, y in checked_batches(data, batch_size, lo, hi, num_classes=num_classes):
                x, y = x.to(device), y.to(device)
                grad, _ = input_gradient(model, x, y)
                yield _ops.fgsm_step(x, grad, [eps], lo, hi)[0], y

        return gen(), eps
    if isinstance(adversarial, torch.Tensor):
        x, y = checked_pair(data, batch_size, lo, hi)
        if adversarial.shape != x.shape:
            raise ValueError(f"adversarial tensor must have the shape of x {tuple(x.shape)}, "
                             f"got {tuple(adversarial.shape)}")
        return checked_batches((adversarial, y), batch_size, lo, hi, "adversarial"), None
    return checked_batches(adversarial, batch_size, lo, hi, "adversarial"), None


@public_entry
@torch.no_grad()
def variant_logits(model: nn.Module, layer: LayerLike, x: torch.Tensor, *, memory_budget: Optional[int] = None,
                   fused: bool = True, lo: float = 0.0, hi: float = 1.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(logits[C, N, K], base_logits[N, K])``: the model's logits with each kernel removed.

    ``x``: ``[N, ...]``, N >= 1, finite, in ``[lo, hi]`` (``ValueError``/``TypeError`` otherwise).
    All N examples form one batch (as for ``kernel_dropout`` with ``batch_size >= N``)."""
    lo, hi = bounds(lo, hi)
    x = check_images(normal_tensor(x), lo, hi, name="x")
    name, conv = resolve_layer(model, layer)
    with frozen_model(model):
        ev = _Evaluator(model, name, conv, _check_budget(memory_budget), fuse=fused)
        x = x.to(model_device(model))
        ev.prepare(x)
        parts = []
        base_logits = None
        for _chs, logits, base_logits in ev.logits(x):
            parts.append(logits)
        return torch.cat(parts), base_logits


# ---------------------------------------------------------------------------------------------
# the naive reference: C model copies, one at a time
# ---------------------------------------------------------------------------------------------
def ablated_copy(model: nn.Module, layer_name: str, kernels) -> nn.Module:
    """A deep copy of ``model`` with the given kernels (weights and bias) of ``layer_name`` zeroed.

    ``kernels``: integer indices in ``[0, C)`` (``SplitIndexError`` otherwise: ``-1`` does not
    wrap to the last kernel)."""
    name, conv = resolve_layer(model, layer_name)
    kernels, _ = split_indices((kernels, []), conv.out_channels, name, require_fragile=False, require_null=False,
                              labels=("kernels", "-"))
    layer_name = name
    with torch.inference_mode(False):
        m = copy.deepcopy(model)
        conv = m.get_submodule(layer_name)
        with torch.no_grad():
            conv.weight[kernels] = 0
            if conv.bias is not None:
                conv.bias[kernels] = 0
    return m


@public_entry
@torch.no_grad()
def kernel_dropout_naive(model: nn.Module, layer: LayerLike, data, *, batch_size: int = 256,
                         return_logits: bool = False, lo: float = 0.0, hi: float = 1.0):
    """Reference: for each kernel c, copy the model, zero kernel c, evaluate in batches.

    Returns ``(clean_accuracy[C], clean_loss[C], baseline_accuracy)``, plus the stacked logits
    ``[C, N, K]`` when ``return_logits``. Slow by design (the paper's procedure). Same input
    rules and errors as :func:`kernel_dropout`.
    """
    batch_size = check_batch_size(batch_size)
    lo, hi = bounds(lo, hi)
    name, conv = resolve_layer(model, layer)
    x, y = checked_pair(data, batch_size, lo, hi)
    device = model_device(model)
    C = conv.out_channels
    accs, losses, all_logits = [], [], []

    def evaluate(m):
        correct, loss, outs = 0, 0.0, []
        for i in range(0, x.shape[0], batch_size):
            xb, yb = x[i:i + batch_size].to(device), y[i:i + batch_size].to(device)
            lo_ = as_logits(m(xb), xb.shape[0])
            yb = check_labels(yb, xb.shape[0], num_classes=lo_.shape[1])
            correct += int((lo_.argmax(1) == yb).sum())
            loss += float(F.cross_entropy(lo_, yb, reduction="sum"))
            if return_logits:
                outs.append(lo_)
        return correct / x.shape[0], loss / x.shape[0], (torch.cat(outs) if return_logits else None)

    with frozen_model(model):
        base_acc, _, _ = evaluate(model)
        for c in range(C):
            m = ablated_copy(model, name, [c])
            m.eval()
            a, l, lo_ = evaluate(m)
            accs.append(a)
            losses.append(l)
            if return_logits:
                all_logits.append(lo_)
    out = (torch.tensor(accs, dtype=torch.float64), torch.tensor(losses, dtype=torch.float64), base_acc)
    if return_logits:
        out = out + (torch.stack(all_logits),)
    return out
