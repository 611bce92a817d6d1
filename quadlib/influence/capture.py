"""Hooks that hand every tracked layer its inputs x [B, T, in] and output gradients delta [B, T, out].

A layer's gradient for document b is M_b = sum_t delta_{b,t} x_{b,t}^T (the per-layer gradient in Quad's influence formula), so
x and delta are all that K-FAC fitting, reference gradients and scoring need: no parameter `.grad`
is ever formed. Passes therefore run with the weights frozen (`input_gradients_only`) and the
graph starts at the tracked layers' outputs, which the forward hook marks as requiring grad: the
backward computes activation gradients only (about half a training backward), and it stops at the
first tracked layer instead of running on to the embeddings.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.profiler import record_function

from quadlib.influence.layers import TrackedLayer

LayerConsumer = Callable[[TrackedLayer, torch.Tensor, torch.Tensor], None]


def augment_bias(x: torch.Tensor) -> torch.Tensor:
    """[..., in] -> [..., in + 1] with a constant-1 column, so the bias is the last weight column."""
    return torch.cat([x, x.new_ones(*x.shape[:-1], 1)], dim=-1)


class LayerCapture:
    """Registers hooks; calls `consumer(layer, x [B,T,in], delta [B,T,out])` once per layer per backward.

    Parts of a joint layer (Llama's q, k, v) arrive separately during backward; their deltas are
    concatenated in the layer's part order before the consumer sees them.
    """

    def __init__(self, model: nn.Module, layers: list[TrackedLayer], consumer: LayerConsumer) -> None:
        self.layers = layers
        self.consumer = consumer
        modules = dict(model.named_modules())
        self._uses: dict[str, list[tuple[TrackedLayer, int]]] = {}
        for layer in layers:
            for index, part in enumerate(layer.parts):
                self._uses.setdefault(part.module_name, []).append((layer, index))
        self._inputs: dict[str, torch.Tensor] = {}
        self._pending: dict[str, dict[int, torch.Tensor]] = {}
        self._handles = [modules[name].register_forward_hook(self._forward_hook(name)) for name in self._uses]

    def _forward_hook(self, module_name: str) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            with record_function("influence.hooks"):
                x = inputs[0].detach()  # [B, T, in]
                for layer, index in self._uses[module_name]:
                    if index == 0:
                        self._inputs[layer.name] = x
                    elif self._inputs.get(layer.name) is None or self._inputs[layer.name].data_ptr() != x.data_ptr():
                        raise ValueError(f"{module_name} does not share its input with {layer.parts[0].module_name}; "
                                         f"it cannot be part of the joint layer {layer.name}")
                if torch.is_grad_enabled() and not output.requires_grad:
                    output.requires_grad_(True)  # frozen weights, no grad upstream: the graph starts here
                if output.requires_grad:
                    output.register_hook(self._backward_hook(module_name))
        return hook

    def _backward_hook(self, module_name: str) -> Callable[[torch.Tensor], None]:
        def hook(grad: torch.Tensor) -> None:
            with record_function("influence.hooks"):
                for layer, index in self._uses[module_name]:
                    rows = layer.parts[index].rows
                    pending = self._pending.setdefault(layer.name, {})
                    pending[index] = grad if rows is None else grad[..., rows.to(grad.device)]
                    if len(pending) == len(layer.parts):
                        parts = [pending.pop(i) for i in range(len(layer.parts))]
                        delta = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)  # [B, T, out]
                        del self._pending[layer.name], parts
                        with record_function("influence.contraction"):
                            self.consumer(layer, self._inputs.pop(layer.name), delta)
        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._inputs.clear()
        self._pending.clear()


@contextmanager
def capture_layers(model: nn.Module, layers: list[TrackedLayer], consumer: LayerConsumer) -> Iterator[LayerCapture]:
    capture = LayerCapture(model, layers, consumer)
    try:
        yield capture
    finally:
        capture.remove()


@contextmanager
def input_gradients_only(model: nn.Module) -> Iterator[None]:
    """Freeze the weights and switch dropout off; restore after."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    for p, _ in flags:
        p.requires_grad_(False)
    model.eval()
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


def backward_pass(model: nn.Module, layers: list[TrackedLayer], consumer: LayerConsumer,
                  loss: Callable[[], torch.Tensor]) -> None:
    """One forward + activation-gradient backward of `loss()`, feeding every tracked layer to `consumer`."""
    with input_gradients_only(model), capture_layers(model, layers, consumer):
        with record_function("influence.forward"):
            total = loss()
        with record_function("influence.backward"):
            total.backward()
