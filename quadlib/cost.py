"""The one cost record: the passes a scorer ran (forward, backward, JVP), the tokens they read, FLOPs.

Every scorer fills a `Cost` with the passes it actually made (`quadlib.influence.scorer`,
`quadlib.selection.probes`, the selectors' forward-only raters) and every `Selection` carries one.
Passes are counted per document (a batch of B documents through one forward pass is B forward
passes), so counts do not depend on batch size. FLOPs follow the usual estimates (Kaplan et al.
2020), with N the model's parameter count and T the tokens of the pass:

- forward 2·N·T; backward 4·N·T (so forward + backward = 6·N·T);
- JVP (a forward pass carrying tangents, forward-mode AD) 6·N·T: the primal and the tangent
  computation, about three forwards (Griewank & Walther's bound for forward mode).

`tokens` counts the tokens fed through the model: each forward or JVP pass adds its tokens; a
backward pass re-uses its forward's tokens and adds none. `flops` is None once a pass ran on a
model of unknown size.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

FORWARD_FLOPS_PER_PARAM_TOKEN = 2
BACKWARD_FLOPS_PER_PARAM_TOKEN = 4
JVP_FLOPS_PER_PARAM_TOKEN = 6


@dataclass(frozen=True)
class Passes:
    """The passes one document costs a scorer (e.g. central difference: two forwards, nothing else)."""

    forward: int = 0
    backward: int = 0
    jvp: int = 0


@dataclass
class Cost:
    """Compute spent: documents scored, forward / backward / JVP passes, tokens and estimated FLOPs."""

    docs_scored: int = 0
    forward_passes: int = 0
    backward_passes: int = 0
    jvp_passes: int = 0
    tokens: int = 0
    flops: float | None = 0.0

    def add_forward(self, passes: int, tokens: int, n_params: int | None) -> None:
        """Account `passes` forward passes over `tokens` tokens in all."""
        self.forward_passes += passes
        self.tokens += tokens
        self._add_flops(FORWARD_FLOPS_PER_PARAM_TOKEN, tokens, n_params)

    def add_backward(self, passes: int, tokens: int, n_params: int | None) -> None:
        """Account `passes` backward passes over `tokens` tokens (their forward is counted apart)."""
        self.backward_passes += passes
        self._add_flops(BACKWARD_FLOPS_PER_PARAM_TOKEN, tokens, n_params)

    def add_jvp(self, passes: int, tokens: int, n_params: int | None) -> None:
        """Account `passes` forward passes with tangents (JVP) over `tokens` tokens in all."""
        self.jvp_passes += passes
        self.tokens += tokens
        self._add_flops(JVP_FLOPS_PER_PARAM_TOKEN, tokens, n_params)

    def add_documents(self, passes: Passes, n_docs: int, tokens: int, n_params: int | None,
                      scored: bool = True) -> None:
        """Account `n_docs` documents of `tokens` tokens in all, each costing `passes`."""
        if passes.forward:
            self.add_forward(passes.forward * n_docs, passes.forward * tokens, n_params)
        if passes.backward:
            self.add_backward(passes.backward * n_docs, passes.backward * tokens, n_params)
        if passes.jvp:
            self.add_jvp(passes.jvp * n_docs, passes.jvp * tokens, n_params)
        if scored:
            self.docs_scored += n_docs

    def _add_flops(self, per_param_token: int, tokens: int, n_params: int | None) -> None:
        if n_params is None or self.flops is None:
            self.flops = None
        else:
            self.flops += float(per_param_token * n_params * tokens)

    def _combine(self, other: Cost, sign: int) -> Cost:
        flops = None if self.flops is None or other.flops is None else self.flops + sign * other.flops
        return Cost(self.docs_scored + sign * other.docs_scored, self.forward_passes + sign * other.forward_passes,
                    self.backward_passes + sign * other.backward_passes, self.jvp_passes + sign * other.jvp_passes,
                    self.tokens + sign * other.tokens, flops)

    def __add__(self, other: Cost) -> Cost:
        return self._combine(other, 1)

    def __sub__(self, other: Cost) -> Cost:
        return self._combine(other, -1)

    def copy(self) -> Cost:
        return Cost(**asdict(self))
