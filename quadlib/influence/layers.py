"""Which weight matrices influence is computed over, for every supported decoder layout.

A *tracked layer* is one weight matrix W [out, in] (plus its bias as an extra input column) whose
K-FAC block is estimated: the Quad paper approximates the Hessian block-diagonally over the MLP
linears and the attention projections, with Q, K and V as ONE joint layer (their outputs
concatenated, their shared input x once) and the output projection separately (Quad, method section).
A layer may be assembled from several modules (Llama's separate q/k/v) or be a slice of one
module's outputs (GPT-2's fused c_attn split into Q, K, V for the "independent" variant).

Gradients are always laid out as [out, in(+1)], also for GPT-2's Conv1D whose weight is [in, out].

Grouped-query attention needs nothing special: the joint layer is Q, K and V stacked by output, so
SmolLM2-135M's block is 576 + 192 + 192 = 960 outputs over the shared 576-wide input (9 query heads,
3 key/value heads of 64), and its K-FAC G factor is 960 x 960.

Not tracked: the token embedding and the output head (tied in SmolLM2 and GPT-2, one [V, d] matrix).
The head's K-FAC G factor would be V x V (49,152^2 float64 = 19 GB), and the embedding is a lookup
whose A factor is a diagonal of token frequencies, so neither fits the Kronecker blocks on a CPU; the
Quad paper's Hessian is block-diagonal over the MLP and attention projections only, which is what
`discover_layers` returns (a tied head shares one tensor with the embedding, so tracking it would also
mix the two roles in one gradient). The reference direction therefore moves only those projections.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

GROUPS = ("mlp", "attn_qkv_joint", "attn_qkv_independent", "attn_out")

MLP_PARENTS = ("mlp", "feed_forward")
ATTENTION_PARENTS = ("self_attn", "attn", "attention")
SEPARATE_QKV = ("q_proj", "k_proj", "v_proj")
FUSED_QKV = ("c_attn", "query_key_value")
ATTENTION_OUT = ("o_proj", "c_proj", "dense", "out_proj")
SUPPORTED_LAYOUTS = ("Llama/Mistral/Qwen-style (q_proj, k_proj, v_proj, o_proj; gate/up/down_proj), "
                     "GPT-2 (Conv1D c_attn, c_proj; c_fc, c_proj), GPT-NeoX/Pythia (query_key_value, dense; "
                     "dense_h_to_4h, dense_4h_to_h)")


@dataclass(frozen=True, eq=False)
class LayerPart:
    """Output features `rows` (None = all) of module `module_name` that belong to a tracked layer."""

    module_name: str
    rows: torch.Tensor | None = None


@dataclass(frozen=True, eq=False)
class TrackedLayer:
    """One K-FAC block: a weight matrix [out_features, in_features (+1 for the bias)]."""

    name: str
    group: str
    block: int
    parts: tuple[LayerPart, ...]
    in_features: int
    out_features: int
    has_bias: bool

    @property
    def in_augmented(self) -> int:
        """Input width including the constant-1 column that carries the bias gradient."""
        return self.in_features + int(self.has_bias)


def is_projection(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D))


def module_dims(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a Linear or a Conv1D (whose weight is stored [in, out])."""
    if isinstance(module, Conv1D):
        n_in, n_out = module.weight.shape
        return int(n_in), int(n_out)
    return int(module.in_features), int(module.out_features)


def weight_gradient(module: nn.Module) -> torch.Tensor:
    """The module's accumulated parameter gradient as [out, in(+1)] (bias last), from `.grad`."""
    grad = module.weight.grad
    if grad is None:
        raise ValueError("module has no weight gradient; run backward with weights requiring grad first")
    grad = grad.T if isinstance(module, Conv1D) else grad  # [out, in]
    if module.bias is not None:
        grad = torch.cat([grad, module.bias.grad[:, None]], dim=1)
    return grad


def layer_gradient(model: nn.Module, layer: TrackedLayer) -> torch.Tensor:
    """A tracked layer's gradient [out, in(+1)] assembled from its modules' `.grad` (for brute-force checks)."""
    modules = dict(model.named_modules())
    pieces = []
    for part in layer.parts:
        grad = weight_gradient(modules[part.module_name])
        pieces.append(grad if part.rows is None else grad[part.rows])
    return torch.cat(pieces, dim=0)


def _block_index(name: str) -> int:
    found = re.findall(r"\.(\d+)\.", name)
    if not found:
        raise ValueError(f"cannot find the transformer block index in module name {name!r}")
    return int(found[-1])


def _qkv_rows(model: nn.Module, module_name: str, n_out: int) -> list[torch.Tensor]:
    """Output rows of Q, K and V inside a fused projection (contiguous thirds, or per-head for NeoX)."""
    if module_name.endswith("query_key_value"):
        heads = int(model.config.num_attention_heads)
        head_dim = n_out // (3 * heads)
        per_head = torch.arange(n_out).view(heads, 3, head_dim)  # NeoX: view(heads, 3*hd).chunk(3)
        return [per_head[:, i].reshape(-1) for i in range(3)]
    third = n_out // 3
    return [torch.arange(i * third, (i + 1) * third) for i in range(3)]


def discover_layers(model: nn.Module, groups: tuple[str, ...], name_filter: str = "") -> list[TrackedLayer]:
    """The tracked layers of `model` in the requested groups, in module order.

    `name_filter` is a regular expression over layer names (empty = all), e.g. r"layers\\.(0|1)\\.".
    Raises a ValueError naming the model class when its layout is not one of SUPPORTED_LAYOUTS.
    """
    unknown = sorted(set(groups) - set(GROUPS))
    if unknown:
        raise ValueError(f"unknown layer group(s) {unknown}; known: {list(GROUPS)}")
    if "attn_qkv_joint" in groups and "attn_qkv_independent" in groups:
        raise ValueError("choose either 'attn_qkv_joint' or 'attn_qkv_independent', not both")
    layers: list[TrackedLayer] = []
    separate: dict[str, dict[str, nn.Module]] = {}
    for name, module in model.named_modules():
        if not is_projection(module) or "." not in name:
            continue
        parent, leaf = name.rsplit(".", 1)
        parent_leaf = parent.rsplit(".", 1)[-1]
        n_in, n_out = module_dims(module)
        bias = module.bias is not None
        if parent_leaf in MLP_PARENTS:
            layers.append(TrackedLayer(name, "mlp", _block_index(name), (LayerPart(name),), n_in, n_out, bias))
        elif parent_leaf in ATTENTION_PARENTS and leaf in SEPARATE_QKV:
            separate.setdefault(parent, {})[leaf] = module
        elif parent_leaf in ATTENTION_PARENTS and leaf in FUSED_QKV:
            block = _block_index(name)
            layers.append(TrackedLayer(name, "attn_qkv_joint", block, (LayerPart(name),), n_in, n_out, bias))
            for tag, rows in zip("qkv", _qkv_rows(model, name, n_out), strict=True):
                layers.append(TrackedLayer(f"{name}[{tag}]", "attn_qkv_independent", block,
                                           (LayerPart(name, rows),), n_in, len(rows), bias))
        elif parent_leaf in ATTENTION_PARENTS and leaf in ATTENTION_OUT:
            layers.append(TrackedLayer(name, "attn_out", _block_index(name), (LayerPart(name),), n_in, n_out, bias))
        elif parent_leaf in ATTENTION_PARENTS:
            raise ValueError(f"{type(model).__name__}: unrecognised attention projection {name!r}; "
                             f"supported layouts: {SUPPORTED_LAYOUTS}")
    for parent, found in separate.items():
        if set(found) != set(SEPARATE_QKV):
            raise ValueError(f"{type(model).__name__}: {parent} has {sorted(found)}, expected {SEPARATE_QKV}")
        mods = [found[leaf] for leaf in SEPARATE_QKV]
        n_in = module_dims(mods[0])[0]
        biases = {m.bias is not None for m in mods}
        if len(biases) != 1:
            raise ValueError(f"{parent}: q/k/v disagree on having a bias; a joint layer needs one input layout")
        bias = biases.pop()
        block = _block_index(parent + ".")
        outs = [module_dims(m)[1] for m in mods]
        layers.append(TrackedLayer(f"{parent}.qkv", "attn_qkv_joint", block,
                                   tuple(LayerPart(f"{parent}.{leaf}") for leaf in SEPARATE_QKV), n_in, sum(outs), bias))
        for leaf, n_out in zip(SEPARATE_QKV, outs, strict=True):
            layers.append(TrackedLayer(f"{parent}.{leaf}", "attn_qkv_independent", block,
                                       (LayerPart(f"{parent}.{leaf}"),), n_in, n_out, bias))
    if not any(layer.group == "mlp" for layer in layers) or not any(layer.group == "attn_out" for layer in layers):
        raise ValueError(f"{type(model).__name__} is not a supported decoder layout (no MLP/attention projections "
                         f"found); supported: {SUPPORTED_LAYOUTS}")
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    selected = [layer for layer in layers if layer.group in groups and re.search(name_filter, layer.name)]
    if not selected:
        raise ValueError(f"no tracked layer matches groups={groups} and name_filter={name_filter!r}")
    return sorted(selected, key=lambda layer: (order[layer.parts[0].module_name], layer.name))
