"""A take's sampling passes: where each starts, its schedule and weights, what it produced, and which step a model
evaluation is."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from .steps import step_of


@dataclass
class Attachments:
    """The models one recorder is attached to.

    Args:
        weights: an identity of each model's weights, in the order they were attached (a few kept).
        expected: how many models the graph attaches (two Attach nodes sharing one recorder: Wan 2.2 A14B's experts),
            known before the second one runs, so a take of the first expert only is still that expert's.
    """

    weights: List[int] = field(default_factory=list)
    expected: int = 1

    def add(self, weights: Optional[int]) -> None:
        if weights is not None and weights not in self.weights:
            self.weights.append(weights)
            del self.weights[:-8]  # a reloaded model gets a new identity: keep a few


@dataclass
class PassLog:
    """The passes of one take, in order.

    Args:
        passes: ``(first global step, the pass's sigmas)`` of each pass (``[0.0]`` for a pass without a schedule).
        weights: an identity of each pass's model weights (passes of different weights are experts, Wan 2.2 A14B).
        outputs: the fingerprint of the latent each finished pass produced (None when it failed).
        sampling: seed, cfg... of the first pass, as the sampler reported them.
        step_sigmas: the sigma of each recorded step; ``step_timesteps`` the model's timestep.
        dynamic: steps are numbered by the order their sigmas first appear (a pipeline without a known schedule).
        input_fingerprint: the latent the first pass started from; ``output_fingerprint`` the last one's output.
        aliases: fingerprints of the last output as users pass it on (VACE: after TrimVideoLatent), and what each is.
        attached: the models the recorder is attached to (the recorder's own record, shared).
    """

    passes: List[Tuple[int, List[float]]] = field(default_factory=list)
    weights: List[Optional[int]] = field(default_factory=list)
    outputs: List[Optional[str]] = field(default_factory=list)
    sampling: dict = field(default_factory=dict)
    step_sigmas: Dict[int, float] = field(default_factory=dict)
    step_timesteps: Dict[int, Optional[float]] = field(default_factory=dict)
    dynamic: bool = False
    dynamic_steps: Dict[float, int] = field(default_factory=dict)
    input_fingerprint: Optional[str] = None
    output_fingerprint: Optional[str] = None
    aliases: Dict[str, str] = field(default_factory=dict)  # other LATENTs of the same output -> what they are
    attached: Attachments = field(default_factory=Attachments)

    @property
    def total_steps(self) -> int:
        return sum(len(s) - 1 for _, s in self.passes) + len(self.dynamic_steps)

    def begin(self, sigmas: Optional[List[float]], weights: Optional[int]) -> None:
        """A pass starts where the take stands (``sigmas`` None: steps numbered as they come)."""
        self.passes.append((self.total_steps, [0.0] if sigmas is None else list(sigmas)))
        self.weights.append(weights)

    def restart_dynamic(self) -> None:
        """The last pass numbers its steps as its sigmas first appear (a causal sampler runs the schedule once per
        chunk, and a clean-context pass at sigma 0), instead of by the schedule; only before it recorded a step."""
        offset, _ = self.passes[-1]
        if any(step >= offset for step in self.step_sigmas):
            raise RuntimeError("a pass can number its steps dynamically only before it records one")
        self.passes[-1] = (offset, [0.0])
        self.dynamic = True

    def locate(self, sigma: float) -> Tuple[Optional[int], bool]:
        """Global step of an evaluation at ``sigma`` in the last pass, and whether it is the step's own sigma."""
        offset, sigmas = self.passes[-1]
        if self.dynamic:
            return offset + self.dynamic_steps.setdefault(float(sigma), len(self.dynamic_steps)), True
        step, exact = step_of(sigma, sigmas)
        return (None, False) if step is None else (offset + step, exact)

    def boundary(self, passes: int) -> int:
        """The first step after the first ``passes`` passes."""
        return self.passes[passes][0] if passes < len(self.passes) else self.total_steps

    def truncated(self, passes: int) -> "PassLog":
        """The first ``passes`` passes (a later pass sampled again from a cached earlier one's output)."""
        end = self.boundary(passes)
        return PassLog([(o, list(s)) for o, s in self.passes[:passes]], list(self.weights[:passes]),
                       list(self.outputs[:passes]), dict(self.sampling),
                       {k: v for k, v in self.step_sigmas.items() if k < end},
                       {k: v for k, v in self.step_timesteps.items() if k < end},
                       input_fingerprint=self.input_fingerprint, output_fingerprint=self.outputs[passes - 1],
                       attached=self.attached)

    def experts(self, model_type: Optional[str] = None) -> List[dict]:
        """The experts of passes that ran different weights (Wan 2.2 A14B: high noise, then low noise), each with
        its steps; empty for one model."""
        groups: List[dict] = []
        for (first, sigmas), weights in zip(self.passes, self.weights):
            last = first + max(1, len(sigmas) - 1) - 1
            if groups and groups[-1]["weights"] == weights:
                groups[-1]["steps"][1] = last
            else:
                groups.append({"weights": weights, "steps": [first, last]})
        experts = self.attached.weights
        pair = len(experts) == 2 or (self.attached.expected == 2 and experts[:1] == [groups[0]["weights"]]
                                     if groups else False)
        if len({g["weights"] for g in groups}) < 2 and not (pair and groups and groups[0]["weights"] in experts):
            return []
        if pair and all(g["weights"] in experts for g in groups):  # named by the Attach nodes' order
            names = [("high_noise", "low_noise")[experts.index(g["weights"])] for g in groups]
        else:
            names = ["high_noise", "low_noise"] if len(groups) == 2 else [f"expert_{i}" for i in range(len(groups))]
        return [{"expert": name, "steps": g["steps"]} for name, g in zip(names, groups)]
