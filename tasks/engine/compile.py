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
pack to pack (padded batches: the padded length, and an epoch's last batch has fewer rows). Some batches also reach
the layers in another form: a pack of one sample, or a padded batch without padding, has no attention mask on sdpa.
`dynamic=None` (torch's automatic dynamic): the first call compiles for its exact shapes, a call with other sizes
recompiles once with those sizes symbolic, and every later size reuses it; a variant (no mask, fewer rows) seen after
that compiles once more, symbolic from the start, except in an input it brings that was never seen before (a mask
first met is compiled at its exact size, so the variant with a mask must come twice). Graphs a warm-up compiles, with
checkpointing, per layer kind, measured on the tiny model (sdpa, CPU): 3 for packed rows (exact, symbolic, one sample
without a mask; the GPU's varlen attention takes no mask, so the one-sample pack may reuse the symbolic graph: 2),
4 for padded batches (3 at micro-batch 1: no fewer rows). Without checkpointing each doubles (the first layer's input
needs no gradient, the others' do: two variants of every shape), and a model with two kinds of layers (Gemma's sliding
and global ones) doubles it again. torch's recompile limit (8 per code object, `torch._dynamo.config.recompile_limit`)
is raised for the warm-up alone, whose variants are a known few; the graphs of a kind serve every layer of it.

Before training (`compile_for_training`, called by build_model: the probe's trials and stage 4 alike): forward and
backward on synthetic micro-batches of the run's shape and of each variant (`warmup_batches`; the engine's own
collator, the run's autocast, the model called as the trainer calls it: the keyword arguments of that call reach every
layer, and its graphs are guarded on their number and values: `warm_up`, `trainer_loss`), so the compiles happen inside the model's load time (the probe counts it as fixed
cost: the steps a budget buys are right) and a compiler that fails does so before any step. Each build starts from
empty compile caches (`torch._dynamo.reset()`): the probe's trials in one process would otherwise share them, count
no compiles of their own and pile up variants to torch's limit. A failure there: one log line, every layer eager
again, the run goes on. After the warm-up nothing compiles: every call of a compiled layer runs under torch's
`eager_on_recompile` stance, so a variant the warm-up did not foresee runs eagerly (one log line; `eager_calls` counts
such calls and the probe records those in its steps) instead of compiling inside a training step, where a compiler
failure in the backward (compiled lazily, in `loss.backward()`) would have had nothing to fall back to. A recompute
meets the graph (or its absence) that its forward met, so it reruns the layer the way its forward ran, as
checkpointing needs the same saved tensors twice. On torch < 2.6 (no stances) a variant compiles as it comes, and a
forward compile error sends that call and every later forward to eager, one log line.
"""

from __future__ import annotations

import contextlib
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
    warming: bool = False  # inside `warm_up`: torch may compile, and a compile error propagates to `compile_for_training`
    seconds: float = 0.0
    graphs: int = 0
    eager_calls: int = 0  # calls of the compiled forward that found no graph for their variant and ran the layer eagerly
    said_eager: bool = False
    eager_reason: str | None = None  # after the warm-up, the first eager call's failed guard per graph (torch logs none then)

    def note_eager(self, reason=None) -> None:
        """A compiled layer's call ran its Python forward (no compiled graph fitted it): count it, and say so once, with
        the guard each graph failed on (`reason()`) where torch tells it."""
        self.eager_calls += 1
        if not self.warming and not self.said_eager:
            self.said_eager = True
            self.eager_reason = reason() if reason is not None else None
            if self.log_fn is not None:
                self.log_fn("compile: a decoder layer was called in a variant its warm-up did not compile (another shape, "
                            "mask, mode or keyword arguments); such calls run eagerly, nothing is compiled during training "
                            "(the probe counts them)" + (f"; failed guards: {self.eager_reason}" if self.eager_reason else ""))

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
    # torch keeps compiled graphs per code object, for the process: a second build (the probe's next trial) would
    # otherwise find the last one's graphs (and count 0 compiles) and pile its own variants on them until torch's
    # recompile limit sends the layers to eager. Every build starts from empty caches (inductor's disk cache stays).
    torch._dynamo.reset()
    state = CompileState(layers=checkpointed_layers(model), backend=backend or BACKEND, log_fn=log_fn)
    compiled = {}  # one compiled callable per layer class (one code object each: torch's graph cache and limit are per code)
    for layer in state.layers:
        cls = type(layer)
        if cls not in compiled:
            inner, wraps_forward = _layer_forward(cls)
            region = torch.compile(_counting_region(inner, state, cls.__name__), backend=state.backend, dynamic=None)
            compiled[cls] = (inner, wraps_forward, region)
        layer.forward = types.MethodType(_compiled_forward(state, *compiled[cls]), layer)
    model.layer_compile = state
    return state


def _counting_region(inner, state: CompileState, name: str):
    """The function torch compiles: the layer's forward, plus a count of the calls that run it eagerly. Traced, the
    `is_compiling()` branch is dropped (torch.compiler documents it as True there), so a compiled graph counts
    nothing; a call no graph fits (after the warm-up: torch's eager_on_recompile stance) runs this code and counts.
    Its own code object per layer class, as compiling `inner` itself would have."""

    def region(self, *args, **kwargs):
        if not torch.compiler.is_compiling():
            state.note_eager(lambda: _failed_guards(code, {"self": self, "args": args, "kwargs": kwargs, "inner": inner, "state": state}))
        return inner(self, *args, **kwargs)

    region.__code__ = region.__code__.replace(co_name=f"{name}_compiled_forward", co_qualname=f"{name}_compiled_forward")
    code = region.__code__
    return region


def _failed_guards(code, f_locals: dict) -> str | None:
    """Why no compiled graph of `code` fits a call with these locals: each graph's first failed guard (`len(kwargs) == 12`,
    a tensor's size), as torch's recompile log would say; under the eager_on_recompile stance torch checks the guards
    but says nothing. Reads torch's private guard API: None where it differs (a diagnosis only)."""
    try:
        from torch._dynamo.eval_frame import _debug_get_cache_entry_list

        failed = []
        for entry in _debug_get_cache_entry_list(code):
            info = entry.guard_manager.check_verbose(f_locals)
            if not info.result:
                failed.append(" / ".join(str(p).split("  #")[0].strip()[:160] for p in info.verbose_code_parts[:2]))
        return "; ".join(dict.fromkeys(failed)) or None
    except Exception:  # noqa: BLE001 - another torch's internals: no diagnosis, the count stands
        return None


def _no_compiles():
    """After the warm-up: torch runs the graphs it has and runs any other variant eagerly rather than compiling it
    inside a training step (`set_stance("eager_on_recompile")`, torch >= 2.6; scoped to the call, so the process's
    other compiled code keeps its stance). Older torch: compiles as before (a compile error then falls back below)."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    return set_stance("eager_on_recompile") if set_stance is not None else contextlib.nullcontext()


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
            with contextlib.nullcontext() if state.warming else _no_compiles():
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
            state.note_eager()  # not the compiled forward: counted as every other eager call
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
    """Synthetic micro-batches of the run's shape, made by the engine's own collator: one of each variant training
    batches come in, and sizes that differ where theirs do, so the second compile makes each size symbolic and every
    later variant is compiled with symbolic sizes. After the warm-up nothing compiles (a call no graph fits runs
    eagerly), so a variant left out here is a variant trained at the eager speed.

    Packed rows (fast, fused): the full token budget (`micro_batch` samples of `max_length`); one sample more (the last
    two halve one) of one token less each, so the token count, the sample count and the longest sample all change;
    then a pack of one sample, which the layers see without an attention mask on sdpa (transformers finds no packing
    to mask) and which a pack of one long sample is, often, at micro-batch 1; where the collator sends full packs as
    rows (`full_rows`), those rows too, last. Padded batches: `micro_batch` rows padded
    to `max_length`, then to 8 tokens less (the collator pads to a multiple of 8), a shorter row in each so both carry
    padding (a mask); then one row fewer (an epoch's last micro-batch; the row count becomes symbolic); then rows of
    one length, a multiple of 8, which carry no padding and so reach the layers without a mask (one row in 8 at
    micro-batch 1). Sizes near the real ones, so the kernels torch tunes on them fit the training batches. Token ids
    are arbitrary; every position is a label."""
    n = max(int(max_length), 24)
    if padded:
        def padding(length: int) -> int:  # a length the collator pads
            return length - 1 if length % 8 == 0 else length

        flat = 8 * ((n - 16) // 8)  # a multiple of 8: rows of it are not padded
        if micro_batch > 1:
            shapes = [[n] * (micro_batch - 1) + [n // 2], [n - 8] * (micro_batch - 1) + [n // 2 - 8],
                      [n - 16] * (micro_batch - 2) + [padding(n // 2)], [flat] * micro_batch]
        else:
            shapes = [[padding(n)], [padding(n - 8)], [flat]]
    else:
        if micro_batch > 1:
            shapes = [[n] * micro_batch, [n - 1] * (micro_batch - 1) + [n // 2, n // 2 - 1]]
        else:  # two packs of several samples first: the mask of a multi-sample pack is an input a first compile fixes
            shapes = [[n - n // 2, n // 2], [n // 2 - 1, n // 4, n // 4 - 1]]
        shapes.append([n - 3])
        if micro_batch > 1 and getattr(collator, "full_rows", None) == (micro_batch, int(max_length)):
            # full packs go as (micro_batch, max_length) rows (PaddingFreeCollator's full_rows): where the first shape
            # above is one, a packed row of the full budget less one token leads instead; the rows come last, at their
            # one size (max_length itself, which n exceeds below 24 tokens). At micro-batch 1 no pack goes as rows and
            # the warm-up keeps its two multi-sample packs first.
            if n == int(max_length):
                shapes[0] = [n] * (micro_batch - 1) + [n - 1]
            shapes.append([int(max_length)] * micro_batch)
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


def _trainers_model_call(model, inputs: dict, num_items_in_batch):
    """The loss of a transformers.Trainer step (its `compute_loss`): the model called with the batch, plus
    `num_items_in_batch` where Trainer passes it (`_accepts_loss_kwargs`). What build_model warms up with: the probe's
    and stage 4's Trainer does not exist yet when it compiles."""
    extra = {"num_items_in_batch": num_items_in_batch} if _accepts_loss_kwargs(model) else {}
    return model(**inputs, **extra).loss


# What a trainer's `compute_loss` adds to for its logs (TRL's SFTTrainer: the per-step entropy/accuracy lists and the
# running token count): put back after a warm-up step, so the first logged step counts its own batches only.
_LOGGED_BY_COMPUTE_LOSS = ("_metrics", "_total_train_tokens")


def trainer_loss(trainer):
    """The warm-up's loss function (`compile_for_training(loss_fn=...)`) for a model `trainer` will train: the trainer's
    own `compute_loss`, given `num_items_in_batch` as its training step gives it, so every decoder layer is called with
    exactly the keyword arguments of a training step. A compiled layer's guards check them (`len(kwargs) == 12`), and a
    trainer may call the model otherwise than `model(**batch)`: TRL's SFTTrainer calls `model(**batch, use_cache=False,
    fused_lm_head=True)`, whose fused LM head runs the backbone itself, past the causal LM's forward, which (Liger's on
    a GPU) adds `output_attentions`, `output_hidden_states` and `cache_position` to every layer's kwargs; warmed up
    through `model(**batch)`, every layer call of its steps ran eagerly (issue 19, gpu_bench's fused-compile)."""
    import copy

    def loss(model, inputs: dict, num_items_in_batch):
        logged = {k: copy.deepcopy(vars(trainer)[k]) for k in _LOGGED_BY_COMPUTE_LOSS if k in vars(trainer)}
        try:
            return trainer.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
        finally:
            for k, v in logged.items():
                setattr(trainer, k, v)

    return loss


def warm_up(model, batches: list[dict], device: str, autocast_dtype=None, loss_fn=None) -> None:
    """Forward and backward on each batch, the model called as the trainer calls it in a training step (train mode, the
    run's autocast, the trainer's own keyword arguments: anything else is a variant no compiled graph fits, and its
    steps run eagerly), then the gradients dropped; the random state is put back, so the run draws the same dropout
    masks as without it. `loss_fn(model, inputs, num_items_in_batch) -> loss`: how the trainer computes a step's loss
    (`trainer_loss(trainer)` where the trainer exists); None = transformers.Trainer's `compute_loss`, for the model
    build_model returns to the probe and stage 4."""
    devices = [torch.cuda.current_device()] if device == "cuda" else []
    was_training = model.training
    loss_fn = loss_fn or _trainers_model_call
    model.train()
    with torch.random.fork_rng(devices=devices):
        for batch in batches:
            inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            targets = inputs["shift_labels"] if "shift_labels" in inputs else inputs["labels"][..., 1:]  # as Trainer counts
            with torch.autocast(device_type=device, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                loss = loss_fn(model, inputs, (targets != -100).sum())
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
                         loss_fn=None) -> CompileState:
    """`compile_layers`, then `warm_up` on `batches` (`loss_fn`: the trainer's loss, see there): every compile happens
    here (later calls run under the eager_on_recompile stance). A failure (the compiler raising, in the forward or in the backward, a graph that does
    not run) is one log line and the eager layers; an out-of-memory is not a compile failure and propagates (the
    probe's "does not fit")."""
    state = compile_layers(model, backend=backend, log_fn=log_fn)
    graphs = compiled_graphs()
    t0 = time.monotonic()
    state.warming = True
    try:
        # torch's recompile limit (8 graphs per code object) is for a function that recompiles without end; the warm-up
        # compiles a known few (its batches' variants, twice without checkpointing, per layer kind), which can be more.
        with torch._dynamo.config.patch(recompile_limit=max(torch._dynamo.config.recompile_limit, 64)):
            warm_up(model, batches, device, autocast_dtype, loss_fn)
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
    if state.active and not state.graphs:
        # Nothing reached a compiled forward (no decoder layer found, or every call took another path, such as a KV
        # cache's): the records must not say compiled. The layers are eager already; say so, as for a failure.
        state.fail(RuntimeError(f"its warm-up compiled no graph ({len(state.layers)} decoder layers, {state.eager_calls} eager "
                                "calls)"), "in its warm-up step")
        uncompile_layers(model)
    return state
