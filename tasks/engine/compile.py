"""Regional compilation (`training.compile: layers`, issue 19 item 2): torch.compile on each decoder layer's forward.

Why: a fused-engine step on an H200 launches ~35,000 kernels, and the GPU waits on Python for about a quarter of the
step (docs/PERF_NOTES.md, issue 19). Compiling a decoder layer turns its norms, RoPE, LoRA arithmetic, activation and
residual adds into a few generated kernels launched from one compiled function, forward and backward.

Regional, not the whole model: the 32 (or 18, 28, ...) layers of a model are one class and one forward, so one
compiled graph serves all of them (torch's inlined modules: the weights are graph inputs, not constants), and the
compile costs one layer's time, not the model's. The embedding, the final norm and the LM head (TRL's or Liger's fused
loss) stay eager. torch.compile of the *whole* model would also have to trace the loss and the Trainer's plumbing.

Where the compiled region ends. The region is the layer's own forward; transformers' non-reentrant gradient
checkpointing stays outside it, eager, as without compile, in both places transformers has put it (5.17: around
`__call__`; 5.2x: a wrapper around `forward`, which torch would otherwise trace as its checkpoint operator and
partition: it kept 5x the saved tensors of eager checkpointing on a tiny model, so the probe's memory model and the
layers it frees from recompute would no longer hold). So a recompute reruns the same compiled forward, the saved
tensors are the eager ones, and which layers recompute (`set_recompute_free_layers`) changes no graph.

What is inside a layer's graph: PEFT's LoRA linears (PEFT documents LoRA training under torch.compile);
bitsandbytes' Linear4bit (its `gemm_4bit` and dequantize are registered torch ops, traced without graph breaks on
torch >= 2.8: bitsandbytes #1616); the varlen attention (`torch.nn.attention.varlen` is a registered custom op with
its own backward); Liger's RMSNorm/SwiGLU/RoPE where the fast engines patched them in (Triton kernels that dynamo
traces as user kernels: measured next on the GPU, a graph break there costs speed, not correctness). The fused LoRA
path (tasks/engine/lora.py) hands over to PEFT's forward inside a compiled region: its seeds are host-side draws
(`.item()`, a graph break each) and its group cache a Python side effect, and the compiler fuses what it fused by hand
(the defensive clone, the scale and add, dropout in one pass); it stays what runs eagerly.

Shapes vary: a packed micro-batch is one row of T tokens with T, the sample count and the longest sample changing from
pack to pack (padded batches: the padded length). `dynamic=None` (torch's automatic dynamic): the first call compiles
for its exact shapes, a call with other sizes recompiles once with those sizes symbolic, and every later size reuses
it. Recompiles are bounded by torch's own limit per code object (`torch._dynamo.config.recompile_limit`, 8; past it a
new variant runs eagerly, with a warning): the expected count is 2 per layer kind (static, then dynamic; a model with
two kinds of layers, Gemma's sliding and global ones, has 4), each shared by every layer of that kind.

Before training (`compile_for_training`, called by build_model: the probe's trials and stage 4 alike): forward and
backward on two synthetic micro-batches of the run's shape (the engine's own collator, the run's autocast), so both
compiles happen inside the model's load time (the probe counts it as fixed cost: the steps a budget buys are right)
and a compiler that fails does so before any step. A failure there: one log line, every layer eager again, the run
goes on. A compile error later (a variant first met in training) sends that call and every later forward to eager
too, one log line; a recompute reruns a layer the way its forward ran (compiled or not), as checkpointing needs the
same saved tensors twice.
"""

from __future__ import annotations

import functools
import time
import types
from dataclasses import dataclass

import torch

from .recompute import checkpointed_layers

BACKEND = "inductor"  # tests set another (`aot_eager`, or one that raises) here: the seam for a broken compiler


@dataclass
class CompileState:
    """What `compile_layers` did to a model (`model.layer_compile`): the layers, the backend, whether the compiled
    forward is still used (`error` is the compile error that turned it off), and what the warm-up cost."""

    layers: list
    backend: object
    log_fn: object = None
    error: str | None = None
    warming: bool = False  # inside `warm_up`: a compile error propagates to `compile_for_training`
    seconds: float = 0.0
    graphs: int = 0

    @property
    def active(self) -> bool:
        return self.error is None

    def fail(self, e: BaseException, when: str) -> None:
        """Turn the compiled forward off, and say so once."""
        if self.error is not None:
            return
        inner = getattr(e, "inner_exception", None)  # BackendCompilerFailed: what the compiler itself raised
        self.error = f"{type(e).__name__}" + (f" from {_first_line(inner)}" if inner is not None else f": {_first_line(e, False)}")
        if self.log_fn is not None:
            self.log_fn(f"compile: training.compile=layers failed {when} ({self.error}); the decoder layers run eagerly "
                        "from here on (the run goes on, at the eager speed)")


def _first_line(e: BaseException, with_type: bool = True) -> str:
    text = str(e).strip()
    line = text.splitlines()[0][:300] if text else ""
    return f"{type(e).__name__}: {line}" if with_type else line


def _layer_forward(cls) -> tuple:
    """(the forward transformers' checkpointing wraps, whether that wrapper is on `forward`). transformers 5.2x wraps
    each GradientCheckpointingLayer subclass's `forward` in `forward_with_checkpointing` (functools.wraps: the original
    is `__wrapped__`; a subclass may be wrapped twice); 5.17 checkpoints in `__call__` and leaves `forward` alone."""
    fn = cls.forward
    wrapped = False
    while getattr(getattr(fn, "__code__", None), "co_name", "") == "forward_with_checkpointing" and hasattr(fn, "__wrapped__"):
        fn, wrapped = fn.__wrapped__, True
    return fn, wrapped


def _uses_cache(kwargs: dict) -> bool:
    """A call that reads or writes a KV cache (generation): transformers' own forward handles it, eagerly."""
    return bool(kwargs.get("use_cache")) or any(kwargs.get(k) is not None for k in ("past_key_values", "past_key_value", "cache", "layer_past"))


def _in_backward() -> bool:
    """Inside an autograd backward pass: a non-reentrant checkpoint recomputing a layer."""
    return torch._C._current_graph_task_id() != -1


def compile_layers(model, backend=None, log_fn=None) -> CompileState:
    """torch.compile each decoder layer's forward (checkpointing left outside, eager; see the module docstring).
    Compiles nothing yet: torch compiles on the first call (`warm_up`). Returns the state (also `model.layer_compile`)."""
    state = CompileState(layers=checkpointed_layers(model), backend=backend or BACKEND, log_fn=log_fn)
    compiled = {}  # one compiled callable per layer class: the code object's cache is shared anyway
    for layer in state.layers:
        cls = type(layer)
        if cls not in compiled:
            inner, wraps_forward = _layer_forward(cls)
            compiled[cls] = (inner, wraps_forward, torch.compile(inner, backend=state.backend, dynamic=None))
        layer.forward = types.MethodType(_compiled_forward(state, *compiled[cls]), layer)
    model.layer_compile = state
    return state


def _compiled_forward(state: CompileState, inner, wraps_forward: bool, compiled):
    """The instance forward of a compiled layer. transformers 5.2x: checkpointing was in the class's `forward`, which
    this replaces, so it checkpoints here the way transformers does (its `_gradient_checkpointing_func`, its flag)."""

    def run(self, *args, **kwargs):
        if _in_backward():
            use = getattr(self, "_compiled_last", False)  # a recompute: as the forward ran
        else:
            use = state.active
            self._compiled_last = use
        if not use:
            return inner(self, *args, **kwargs)
        try:
            return compiled(self, *args, **kwargs)
        except torch._dynamo.exc.TorchDynamoException as e:
            oom = _out_of_memory(e)
            if oom is not None:
                raise oom from None  # not the compiler's fault: the caller's out-of-memory handling applies
            if state.warming or _in_backward():
                raise  # the warm-up's own handling; or a recompute of a compiled forward (eager would save other tensors)
            state.fail(e, "while training")
            self._compiled_last = False
            return inner(self, *args, **kwargs)

    def forward(self, *args, **kwargs):
        if _uses_cache(kwargs):
            return type(self).forward(self, *args, **kwargs)  # transformers' own path, eager
        if wraps_forward and self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return self._gradient_checkpointing_func(functools.partial(run, self, **kwargs), *args)
        return run(self, *args, **kwargs)

    return forward


def uncompile_layers(model) -> None:
    """Every compiled layer back to its class's forward (eager, transformers' checkpointing)."""
    state = getattr(model, "layer_compile", None)
    for layer in state.layers if state else []:
        layer.__dict__.pop("forward", None)
        layer.__dict__.pop("_compiled_last", None)


def warmup_batches(collator, micro_batch: int, max_length: int, vocab_size: int, padded: bool) -> list[dict]:
    """Two synthetic micro-batches of the run's shape, made by the engine's own collator, whose sizes differ where the
    training batches' do, so that the second compile makes each size symbolic. Packed rows (fast, fused): the full
    token budget (`micro_batch` samples of `max_length`), then one sample more (the last two halve one) of one token
    less each: the token count, the sample count and the longest sample all change. Padded batches: `micro_batch` rows
    padded to `max_length`, then to 8 tokens less (the collator pads to a multiple of 8), a shorter row in each so both
    carry padding, as training batches do. Sizes near the real ones, so the kernels torch tunes on them fit the
    training batches. Token ids are arbitrary; every position is a label."""
    n = max(int(max_length), 24)
    if padded:
        shapes = [[n] * (micro_batch - 1) + [n // 2] if micro_batch > 1 else [n],
                  [n - 8] * (micro_batch - 1) + [n // 2 - 8] if micro_batch > 1 else [n - 8]]
    else:
        shapes = [[n] * micro_batch, [n - 1] * (micro_batch - 1) + [n // 2, n // 2 - 1]]
    g = torch.Generator().manual_seed(0)
    out = []
    for lengths in shapes:
        rows = []
        for length in lengths:
            ids = torch.randint(0, max(vocab_size, 2), (length,), generator=g).tolist()
            rows.append({"input_ids": ids, "labels": ids})
        out.append(collator(rows))
    return out


def _accepts_loss_kwargs(model) -> bool:
    """Whether Trainer passes `num_items_in_batch` into this model's forward (its own test: `accepts_loss_kwargs`, else a
    **kwargs in the unwrapped model's forward). Through a causal LM it reaches every decoder layer's kwargs, and a
    compiled layer's guards count them."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if hasattr(base, "accepts_loss_kwargs"):
        return bool(base.accepts_loss_kwargs)
    return any(p.kind == inspect.Parameter.VAR_KEYWORD for p in inspect.signature(base.forward).parameters.values())


def warm_up(model, batches: list[dict], device: str, autocast_dtype=None, loss_kwargs: bool | None = None) -> None:
    """Forward and backward on each batch, called as Trainer calls the model in a training step (train mode, the run's
    autocast, `num_items_in_batch` where Trainer passes it: anything else would make the first real step compile once
    more), then the gradients dropped; the random state is put back, so the run draws the same dropout masks as
    without it. `loss_kwargs`: whether the trainer passes `num_items_in_batch` into the model's forward (TRL's SFTTrainer
    never does, whatever its `model_accepts_loss_kwargs` says); None = Trainer's own rule for this model."""
    devices = [torch.cuda.current_device()] if device == "cuda" else []
    was_training = model.training
    loss_kwargs = _accepts_loss_kwargs(model) if loss_kwargs is None else loss_kwargs
    model.train()
    with torch.random.fork_rng(devices=devices):
        for batch in batches:
            inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            if loss_kwargs:
                inputs["num_items_in_batch"] = (inputs["labels"][..., 1:] != -100).sum()
            with torch.autocast(device_type=device, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                loss = model(**inputs).loss
            loss.backward()
            del loss, inputs
    model.zero_grad(set_to_none=True)
    model.train(was_training)


def _out_of_memory(e: BaseException | None) -> BaseException | None:
    """The out-of-memory behind `e` (itself, or one a compiler error wraps: inductor benchmarking kernels), else None."""
    seen = 0
    while e is not None and seen < 8:
        if isinstance(e, torch.OutOfMemoryError):
            return e
        e = getattr(e, "inner_exception", None) or e.__cause__ or e.__context__
        seen += 1
    return None


def compiled_graphs() -> int:
    """Graphs torch.compile has compiled in this process so far (torch's own counter): the difference over a stretch of
    training says whether it met a variant the warm-up did not foresee."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def compile_for_training(model, batches: list[dict], device: str, autocast_dtype=None, log_fn=None, backend=None,
                         loss_kwargs: bool | None = None) -> CompileState:
    """`compile_layers`, then `warm_up` on `batches`: both compiles happen here. A failure (the compiler raising, a
    graph that does not run) is one log line and the eager layers; an out-of-memory is not a compile failure and
    propagates (the probe's "does not fit")."""
    state = compile_layers(model, backend=backend, log_fn=log_fn)
    graphs = compiled_graphs()
    t0 = time.monotonic()
    state.warming = True
    try:
        warm_up(model, batches, device, autocast_dtype, loss_kwargs)
    except Exception as e:  # noqa: BLE001 - any failure of the compiled warm-up: eager is the fallback
        oom = _out_of_memory(e)
        if oom is not None:
            raise oom from None
        state.fail(e, "in its warm-up step")
        uncompile_layers(model)
        model.zero_grad(set_to_none=True)
    finally:
        state.warming = False
    state.seconds = time.monotonic() - t0
    state.graphs = compiled_graphs() - graphs
    return state
