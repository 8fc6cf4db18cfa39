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
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

COMPILE_MODES = ("auto", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# "aot_eager" (Dynamo and AOTAutograd without code generation: seconds, not minutes) tells a compiler bug from a
# tracing one, and lets the tests' training subprocesses compile quickly.
BACKEND = os.environ.get("RANKWRIGHT_COMPILE_BACKEND", "inductor")
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

    @classmethod
    def for_run(cls, train: Any, device: torch.device, shapes: int, models: dict[str, nn.Module],
                emit: Callable[[Any], Any]) -> StepCompiler | None:
        """train.compile: ``models`` (the denoiser, and the text encoders when they run with adapters each step)
        compiled in place for ``shapes`` bucket shapes; None when off or when torch.compile refuses (a warning;
        the run trains eagerly)."""
        from .events import RunWarning

        if not train.compile:
            return None
        compiler = cls(models, resolve_mode(train.compile_mode, device, shapes), shapes)
        refused = compiler.start()
        if refused:
            emit(RunWarning(message=f"train.compile: torch.compile failed ({refused}); training eagerly (set "
                                    "train.compile = false to silence this)"))
            return None
        return compiler

    def start(self) -> str | None:
        """Compile the models in place; the error's text if ``torch.compile`` refused (the models stay eager)."""
        # Dynamo keeps compiled code per code object for the whole process, and a model class's forward is one code
        # object for every instance: without a reset, a second run in one process (compare's methods, a test
        # suite) counts the first run's graphs against its recompile limit, and past it trains eagerly unawares.
        torch._dynamo.reset()
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

    def forward_backward(self, shape: tuple[int, ...], loss: Callable[[], torch.Tensor],
                         backward: Callable[[torch.Tensor], None], emit: Callable[[Any], Any], step: int,
                         zero_grad: Callable[[], None]) -> torch.Tensor:
        """One micro-batch: ``loss()`` then ``backward(loss)``, compiled; redone eagerly (with a warning, and eager
        from then on) when compiling fails and :meth:`may_fall_back` allows. Each new graph is a ``compiled`` event."""
        from .events import Compiled as CompiledEvent
        from .events import RunWarning

        if not self.active:
            value = loss()
            backward(value)
            return value
        backward_done = False
        try:
            with self.step(shape) as report:
                value = loss()
                backward_done = True  # from here gradients may be partly accumulated
                backward(value)
        except Exception as error:
            if not self.may_fall_back(error, backward_done):
                raise
            first_step = self.steps == 0
            self.restore_eager()
            if first_step:  # the failed first step may have left partial gradients
                zero_grad()
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
            emit(RunWarning(message=f"train.compile: compiling the training step failed ({type(error).__name__}: "
                                    f"{first_line[:300]}); training eagerly from here (set train.compile = false "
                                    "to skip compiling)"))
            return self.forward_backward(shape, loss, backward, emit, step, zero_grad)
        for compiled in report:
            emit(CompiledEvent(step=step, shape=list(compiled.shape), graphs=compiled.graphs,
                               graph_breaks=compiled.breaks, seconds=round(compiled.seconds, 2),
                               total_graphs=self.graphs, limit=self.limit, mode=self.mode))
        return value

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


def batch_shape(batch: dict[str, Any]) -> tuple[int, ...]:
    """The shape that decides which compiled graph a batch runs: its latents' (or pixels')."""
    images = batch["latents"] if batch.get("latents") is not None else batch["pixels"]
    return tuple(images.shape)


def eager_calls(compiler: StepCompiler | None):
    """Previews, validation and the prior loss call the models eagerly even when the training step is compiled."""
    return eager() if compiler is not None and compiler.active else contextlib.nullcontext()
