"""``train.compile``: the training step through ``torch.compile`` (TorchDynamo + Inductor).

The ``forward`` of each model the adapters sit in (the denoiser, and the text encoders when they are trained) is
replaced by its compiled version on that module: the module objects, their parameters and state-dict keys stay what
they were, so the adapters' hooks, saving (no ``_orig_mod.`` keys), resuming and the EMA see no difference. Dynamo
traces the forward with the adapters' hooks on its layers inlined, so each frozen layer and its adapter become one
graph, fused by Inductor — forward and backward. The hooks on the model itself stay outside the graph and run
eagerly: OFT/BOFT's shared Cayley solve (:meth:`methods.oft.OrthogonalModule.before_forward`), whose series stops
on a data-dependent test, runs there once per model call and hands the compiled graph its rotations as inputs —
one bounded break instead of one per layer.

- Shapes: every batch is one bucket of ``batch_size`` samples (:class:`trainer.dataset.BucketBatchSampler`), so
  graphs are compiled static, one per bucket shape (``dynamic=False``; CUDA graphs need static shapes), and the
  number of recompiles a run may make is bounded by its buckets (:func:`recompile_limit`). Each new graph is
  reported (the ``compiled`` event: shape, graphs, seconds).
- Mode: ``auto`` is ``default`` on the CPU; on CUDA ``reduce-overhead`` (CUDA graphs, which remove the launch cost
  that dominates an adapted step there) when the run has few bucket shapes, else ``max-autotune-no-cudagraphs``.
- Failure: if compiling fails on a step (an unsupported operation, a missing compiler), the models are put back
  to eager, the step is redone eagerly and a warning says why; the run goes on.
- Gradient checkpointing: the checkpointed blocks fall back to eager (graph breaks, counted in the ``compiled``
  event): the adapters' hooks keep per-call state, which Dynamo does not allow a checkpoint region to change.
- Previews and validation run eagerly (``torch.compiler.set_stance("force_eager")``): they are no-grad calls of
  other shapes and would only add graphs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Iterator

import torch
from torch import nn

COMPILE_MODES = ("auto", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
BACKEND = "inductor"  # the tests swap in "aot_eager" (Dynamo and AOTAutograd without code generation: seconds)
CUDA_GRAPH_SHAPES = 4  # auto mode on CUDA: CUDA graphs (one recorded graph per shape) up to this many bucket shapes
EXTRA_GRAPHS = 2  # per model, beyond one per bucket shape: a guard failing once (e.g. the first step's state)


def resolve_mode(mode: str, device: torch.device, shapes: int) -> str:
    """The ``torch.compile`` mode ``train.compile_mode`` stands for on this device with this many bucket shapes."""
    if mode != "auto":
        return mode
    if device.type != "cuda":
        return "default"
    return "reduce-overhead" if shapes <= CUDA_GRAPH_SHAPES else "max-autotune-no-cudagraphs"


def recompile_limit(shapes: int, models: int) -> int:
    """Dynamo's cache limit per code object (a model class's ``forward``; two models of one class share it): one
    graph per bucket shape and model, plus a little slack."""
    return max(8, models * (shapes + EXTRA_GRAPHS))


def graphs_compiled() -> int:
    """Graphs Dynamo has compiled in this process (a graph break splits a call into several)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def graph_breaks() -> int:
    from torch._dynamo.utils import counters

    return int(sum(counters["graph_break"].values()))


@contextlib.contextmanager
def compile_settings(limit: int) -> Iterator[None]:
    """The compiler settings of our graphs, for the calls that may compile (forward and backward of a step)."""
    import torch._dynamo.config as dynamo_config
    import torch._inductor.config as inductor_config

    # Inductor's layout optimisation (it switches convolutions inside the graph to channels-last) gives wrong
    # gradients for adapters in the conv blocks on the CPU with torch 2.13 (tiny UNet, LoRA on every layer: the
    # worst adapter gradient off by 100% with it, 2e-6 without); the loss can match while gradients do not. Patched
    # off for the compiling calls of our graphs only (bench/NOTES.md).
    with inductor_config.patch(layout_optimization=False), dynamo_config.patch(recompile_limit=limit):
        yield


@contextlib.contextmanager
def eager() -> Iterator[None]:
    """Calls of compiled models inside run eagerly and compile nothing (previews, validation)."""
    with torch.compiler.set_stance("force_eager"):
        yield


@dataclasses.dataclass
class Compiled:
    """What one step compiled: new graphs for a new input shape."""

    shape: tuple[int, ...]
    graphs: int
    breaks: int
    seconds: float


class StepCompiler:
    """The run's compiled models: compile them, watch each step for new graphs, fall back to eager on failure."""

    def __init__(self, models: dict[str, nn.Module], mode: str, shapes: int):
        self.models = models
        self.mode = mode
        self.limit = recompile_limit(shapes, len(models))
        self.active = False
        self.graphs = 0  # compiled by this run
        self.steps = 0  # compiled calls made

    def start(self) -> str | None:
        """Compile the models in place; the error's text if ``torch.compile`` refused (the models stay eager)."""
        try:
            for model in self.models.values():
                # An instance attribute: nn.Module.__call__ runs the model's own hooks, then this.
                model.forward = torch.compile(model.forward, backend=BACKEND,
                                              mode=self.mode if BACKEND == "inductor" else None, dynamic=False)
        except Exception as error:  # any failure of the compiler's setup: the run trains eagerly
            self.restore_eager()
            return f"{type(error).__name__}: {error}"
        self.active = True
        return None

    def restore_eager(self) -> None:
        for model in self.models.values():
            model.__dict__.pop("forward", None)  # the class's eager forward again
        self.active = False

    @contextlib.contextmanager
    def step(self, shape: tuple[int, ...]) -> Iterator[list[Compiled]]:
        """Around one forward + backward: yields a list that holds a :class:`Compiled` afterwards if it compiled."""
        report: list[Compiled] = []
        before, breaks, started = graphs_compiled(), graph_breaks(), time.perf_counter()
        with compile_settings(self.limit):
            yield report
        self.steps += 1
        new = graphs_compiled() - before
        if new:
            self.graphs += new
            report.append(Compiled(tuple(shape), new, graph_breaks() - breaks, time.perf_counter() - started))

    def may_fall_back(self, error: BaseException, backward_done: bool) -> bool:
        """Whether a step that raised ``error`` can be redone eagerly: any failure of the first compiled step
        (no gradient of the run exists yet), and later a compiler error raised before the backward pass."""
        if not self.active:
            return False
        if self.steps == 0:
            return True
        return not backward_done and _is_compiler_error(error)


def _is_compiler_error(error: BaseException) -> bool:
    from torch._dynamo import exc

    return isinstance(error, exc.TorchDynamoException) or type(error).__module__.startswith(("torch._dynamo",
                                                                                           "torch._inductor"))
