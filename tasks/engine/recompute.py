"""Recompute placement: which decoder layers gradient checkpointing recomputes, how many memory lets skip it, and
whether the checkpointed layers' inputs wait for the backward on the GPU or in host memory.

Each layer freed from recompute saves about a third of its step time (forward, recompute, backward -> forward,
backward); the probe (tasks/probe.py) measures two peaks and `recompute_free_layers` turns them into a count.
Offloading (`offload_checkpoints`) goes the other way: it spends some speed to take the inputs that full recompute
keeps (one per layer) off the GPU. The two exclude each other: a layer without recompute would be offloaded whole.
"""

from __future__ import annotations

import functools
import os

import torch

OFFLOAD_NOTE = "checkpointed activations offloaded to host memory"  # how the probe's and stage 4's logs say it
OFFLOAD_FIX = ("set training.offload_activations=on (the checkpointed layers' inputs wait in host memory; with "
               "training.gradient_checkpointing=true)")  # the out-of-memory errors' suggestion, where offload was not tried


def checkpointed_layers(model) -> list[torch.nn.Module]:
    """The decoder layers that gradient checkpointing can toggle (transformers' GradientCheckpointingLayer) in the
    language model (`text_decoder`): what the probe counts and frees from recompute, what stage 4 frees, compiles and
    offloads around. A multimodal model's vision encoder layers are GradientCheckpointingLayers too, but a text-only
    fine-tune never runs them (Gemma-3 4B: 34 decoder layers, not 34 + SigLIP's 27). A model whose `get_decoder()`
    holds none: every such layer of the model, as before. Still counted (no regression): a model whose `get_decoder()`
    holds its image encoder too (GitForCausalLM)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    from ..models import text_decoder

    layers = [m for m in text_decoder(model).modules() if isinstance(m, GradientCheckpointingLayer)]
    return layers or [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def set_recompute_free_layers(model, n_free: int) -> int:
    """Keep the activations of the last `n_free` decoder layers (no recompute); checkpoint the rest.

    Call after gradient checkpointing is enabled (Trainer enables it at the start of `train`; use
    PartialRecomputeCallback). Returns how many layers run without recompute.
    """
    layers = checkpointed_layers(model)
    n_free = max(0, min(n_free, len(layers)))
    if n_free and getattr(model, "activation_offload", None) is not None:
        raise ValueError(f"{n_free} layers without recompute on a model whose activations are offloaded: every saved tensor of "
                         "those layers would be copied to host memory and back; choose one (the probe never picks both)")
    for i, layer in enumerate(layers):
        layer.gradient_checkpointing = i < len(layers) - n_free
    return n_free


def recompute_free_layers(peak_full_gb: float, per_layer_gb: float, budget_gb: float, n_layers: int,
                          margin_gb: float = 0.5) -> int:
    """How many layers can skip recompute within `budget_gb`, from two measured numbers.

    `peak_full_gb` is a measured peak with some layers (possibly none) freed; `per_layer_gb` what each further
    freed layer adds. Measure the latter as the difference between two runs that both free a few layers (4 and
    8 in bench/gpu_bench.py): against the fully checkpointed peak, part of the kept activations hides under the
    transient of recomputing a layer, and the estimate comes out about half the real cost. Each layer freed
    from recompute saves about a third of its step time (forward, recompute, backward -> forward, backward).
    """
    if per_layer_gb <= 0:
        return n_layers
    room = budget_gb - margin_gb - peak_full_gb
    return max(0, min(n_layers, int(room // per_layer_gb)))


def decoder_stack(model) -> torch.nn.Module:
    """The module whose forward runs the checkpointed decoder layers: the nearest common owner of
    `checkpointed_layers(model)` that is not a bare container (the ModuleList holding them has no forward of its own).
    For a causal LM that is `model.get_base_model().model` (MistralModel, LlamaModel, ...): embeddings, layers, final
    norm; the LM head and the loss sit outside it."""
    layers = checkpointed_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no decoder layers that gradient checkpointing toggles (transformers' "
                         "GradientCheckpointingLayer): there are no checkpointed activations to offload")
    name_of = {id(m): name for name, m in model.named_modules()}
    common = os.path.commonprefix([name_of[id(layer)].split(".") for layer in layers])
    if len(layers) == 1:
        common = common[:-1]  # one layer: its owner, not the layer itself
    owner = model.get_submodule(".".join(common))
    while common and isinstance(owner, (torch.nn.ModuleList, torch.nn.ModuleDict)):
        common = common[:-1]
        owner = model.get_submodule(".".join(common))
    return owner


SECOND_FORWARD = ("a second forward with gradients on, before the backward of the previous one, on a model whose checkpointed "
                  "activations are offloaded (training.offload_activations): TRL's manager holds one forward's saved tensors at "
                  "a time, so the first forward's backward would fail or get wrong gradients. Call backward after each forward "
                  "(as the Trainer does), or run the extra forward under torch.no_grad()")


class OffloadedForward:
    """TRL's manager entered around each forward of the decoder stack (`decoder_stack`): installed on the stack as its
    instance `forward`, so `with manager: return original(...)` leaves the manager on every exit, a KeyboardInterrupt
    included. `remove()` puts the stack's own forward back.

    The manager keeps one forward's saved tensors at a time (its `__enter__` drops whatever the previous forward left),
    so the contract is the Trainer's: each forward with gradients is followed by its backward before the next one.
    Forwards without gradients (`torch.no_grad`, inference mode) save nothing and skip the manager altogether, which
    leaves a pending backward intact. A second forward with gradients while the previous one's saved tensors wait for a
    backward that has not started is an error (`SECOND_FORWARD`): the manager's pack and unpack hooks are wrapped to
    note "saved, not yet given back"; a forward that raises clears it (its graph is never backwarded)."""

    def __init__(self, model: torch.nn.Module, module: torch.nn.Module, manager):
        self.model, self.module, self.manager = model, module, manager
        self.prefetch = None  # offload_checkpoints(prefetch=...) sets its BackwardPrefetch
        self.manager_kwargs: dict = {}  # what offload_checkpoints gave TRL's manager (a second call must ask the same)
        self.awaiting_backward = False
        self._own_forward = module.__dict__.get("forward")  # an instance-level forward already there (a patch): remove() keeps it
        pack, unpack = manager.pack_hook, manager.unpack_hook

        def packed(tensor):
            self.awaiting_backward = True
            return pack(tensor)

        def unpacked(ref):
            self.awaiting_backward = False  # the backward has started giving the saved tensors back
            return unpack(ref)

        manager.pack_hook, manager.unpack_hook = packed, unpacked  # saved_tensors_hooks pushes these when entered
        original = module.forward

        @functools.wraps(original)
        def forward(*args, **kwargs):
            if not torch.is_grad_enabled():  # torch.no_grad, inference mode
                return original(*args, **kwargs)  # nothing is saved; entering would drop the pending forward's tensors
            if self.awaiting_backward:
                raise RuntimeError(SECOND_FORWARD)
            try:
                with manager:
                    return original(*args, **kwargs)
            except BaseException:
                self.awaiting_backward = False  # the failed forward's graph is never backwarded
                raise

        module.forward = forward
        model.activation_offload = self

    def remove(self) -> None:
        if self._own_forward is not None:
            self.module.forward = self._own_forward
        else:
            self.module.__dict__.pop("forward", None)
        if self.model.__dict__.get("activation_offload") is self:
            del self.model.__dict__["activation_offload"]


class _SideStreamCopies:
    """The device half of `BackwardPrefetch`, on TRL's own streams: `launch` starts one host-to-device copy on the side
    stream (s1), restoring the strides TRL recorded as its own unpack does, and records an event after it; `consume`
    makes the compute stream (s0, the current one) wait for that event and marks the copy as used there, so the allocator
    keeps its block until s0 is done with it (the copy was allocated on s1). No wait of s1 on s0 is needed: the source is
    the pinned host tensor that s1 itself filled in the forward, the destination a fresh block of s1's pool."""

    def __init__(self, manager):
        self.manager = manager

    def launch(self, tensor_id, host, stride, offset, shape):
        m = self.manager
        with m.device_module.stream(m.s1):
            device = host.to(m.accelerator_type, non_blocking=True)
            if stride is not None:
                device = torch.as_strided(device, size=shape, stride=stride, storage_offset=offset)
            return device, m.s1.record_event()

    def consume(self, tensor_id, device, event):
        s0 = self.manager.s0
        s0.wait_event(event)
        device.record_stream(s0)


class BackwardPrefetch:
    """Opt-in (`offload_checkpoints(model, prefetch=True)`): TRL's manager starts each host-to-device copy only when autograd
    unpacks the tensor and makes the compute stream wait for it there, so every checkpointed layer's input crosses PCIe
    while the GPU waits (~2 ms for a 64 MiB Mistral-7B layer input at 8,192 tokens). This wraps its unpack hook: after
    each unpack it keeps `depth` x the largest offloaded tensor's bytes in flight by starting, on TRL's side stream, the
    copies of the tensors the backward will ask for next, i.e. the offloaded ids below in descending order (the backward
    unpacks the checkpointed layers' inputs last layer first). A tensor whose copy is in flight is handed to TRL's unpack
    as one it kept on the GPU (its tracker entry swapped for the copy), after the compute stream waits for the copy's
    event: TRL's bookkeeping (tracker, dedup keys, end of the forward) runs unchanged. The first tensor of each backward
    (nothing predicted it) and any one asked out of order go through TRL's own copy. A copy the backward skipped past (a
    saved tensor whose node never runs: a dead branch, MoE routing) is dropped as soon as a lower id is asked, so it does
    not hold the budget. Costs at most `depth` + 1 extra largest tensors of GPU memory in the backward (the last copy
    started may overshoot the budget); a backward that raises keeps its copies until the next forward's first pack."""

    def __init__(self, manager, depth: int = 1, ops=None):
        self.manager, self.depth = manager, prefetch_depth(depth)
        if self.depth is None:  # off is offload_checkpoints' choice, not a prefetcher's
            raise ValueError(f"prefetch depth {depth!r}: needs at least 1 (True, or a whole number)")
        self.ops = ops if ops is not None else _SideStreamCopies(manager)
        self.in_flight: dict[int, tuple] = {}  # tensor id -> (device tensor, event, bytes)
        self.order: list[int] | None = None  # this backward's offloaded ids, highest first (None: no backward yet)
        self.next = 0  # position in `order` of the next id to consider
        self.budget = 0
        self.hits = self.misses = 0
        pack, unpack = manager.pack_hook, manager.unpack_hook

        def packed(tensor):
            if self.order is not None:  # a new forward: whatever the last backward left is dropped (used on s1 only)
                self.in_flight.clear()
                self.order = None
            return pack(tensor)

        def unpacked(tensor_id):
            tracker = manager.tracker
            if self.order is None and not self._start_backward(tracker):
                return unpack(tensor_id)  # not in a backward (a saved tensor read directly): TRL's own path, no prefetch
            hit = self.in_flight.pop(tensor_id, None)
            for skipped in [i for i in self.in_flight if i > tensor_id]:  # passed by: the backward will not ask for them
                del self.in_flight[skipped]
            while self.next < len(self.order) and self.order[self.next] >= tensor_id:
                self.next += 1  # the copies to start next are of the ids below this one
            if hit is not None and tensor_id in tracker:
                device, event, _ = hit
                self.ops.consume(tensor_id, device, event)
                tracker[tensor_id] = (device, False, None, None, None)  # TRL's entry for a tensor it kept on the GPU
                self.hits += 1
            elif tracker.get(tensor_id, (None, False))[1]:
                self.misses += 1
            out = unpack(tensor_id)
            self._top_up(tracker)
            return out

        manager.pack_hook, manager.unpack_hook = packed, unpacked

    def _start_backward(self, tracker) -> bool:
        """Plan this backward's copies; False (nothing planned) when no backward is running."""
        try:
            # the end of this backward drops copies nobody asked for (used on s1 only), as TRL drops its own stash there
            torch.autograd.Variable._execution_engine.queue_callback(self.in_flight.clear)
        except RuntimeError:  # "Final callbacks can only be installed during backward pass"
            return False
        offloaded = {i: e[0].numel() * e[0].element_size() for i, e in tracker.items() if e[1]}
        self.order, self.next = sorted(offloaded, reverse=True), 0
        self.budget = self.depth * max(offloaded.values(), default=0)
        return True

    def _top_up(self, tracker) -> None:
        flying = sum(b for _, _, b in self.in_flight.values())
        while flying < self.budget and self.next < len(self.order):
            tensor_id = self.order[self.next]
            self.next += 1
            entry = tracker.get(tensor_id)
            if entry is None or not entry[1] or tensor_id in self.in_flight:
                continue  # already unpacked (out of order) or no longer on the host
            host, _, stride, offset, shape = entry
            device, event = self.ops.launch(tensor_id, host, stride, offset, shape)
            nbytes = host.numel() * host.element_size()
            self.in_flight[tensor_id] = (device, event, nbytes)
            flying += nbytes


def prefetch_depth(prefetch: bool | int) -> int | None:
    """`offload_checkpoints(prefetch=...)` as a depth: True is 1, False/0/None no prefetch, a whole number k >= 1 itself."""
    if prefetch is None or prefetch is False or (prefetch == 0 and type(prefetch) is int):
        return None
    if prefetch is True:
        return 1
    if not isinstance(prefetch, int) or prefetch < 1:
        raise ValueError(f"prefetch={prefetch!r}: needs at least 1 (True, or a whole number)")
    return prefetch


def _accelerator_present() -> bool:
    """What TRL's manager reads the device type of: torch.accelerator's device (torch.cuda before torch 2.6). A CPU-only
    torch has none, and TRL's manager would raise AttributeError on it."""
    if hasattr(torch, "accelerator"):
        return torch.accelerator.current_accelerator() is not None
    return torch.cuda.is_available()


def offload_checkpoints(model, prefetch: bool | int = False, **manager_kwargs) -> OffloadedForward:
    """Hold the checkpointed layers' saved inputs in pinned host memory instead of on the GPU: TRL's maintained activation
    offloading (`trl.models.get_act_offloading_ctx_manager`, torchtune's design: each copy to the host runs on a side
    stream; in the backward, a copy back starts when autograd asks for the tensor, and the compute stream waits for it).

    The manager is entered around the decoder stack's forward only (`decoder_stack`), so what the LM head and the loss
    save (tokens x vocab: 1 GiB at Mistral-7B's 8,192 tokens, 7.8 GiB with a 256k vocabulary) stays on the GPU, where it
    is needed right after the forward. Under non-reentrant checkpointing (build_model's) the manager sees each
    checkpointed layer's input (the layer's internals are saved by checkpoint's own hooks, which nest inside) and what the
    stack saves after them (the final norm's tokens x hidden tensors). Whatever calls the model, the
    probe's Trainer or stage 4's, runs offloaded; the backward unpacks on its own. Idempotent: a second call returns the
    first handle; `model.activation_offload.remove()` undoes it.

    `prefetch` (off by default; stage 4 never sets it): True or a depth k >= 1 starts the backward's copies ahead of
    autograd's unpacks (`BackwardPrefetch`, k x the largest offloaded tensor in flight; the handle's `prefetch`). Needs
    TRL's side stream (use_streams, its default). `manager_kwargs` go to TRL (use_pin_memory, use_streams,
    min_offload_size, max_fwd_stash_size).

    Needs an accelerator (CUDA): TRL reads its type, and a CPU-only torch has none (there, activations already live in
    host memory). Returns the handle (also `model.activation_offload`; its `manager` is TRL's)."""
    depth = prefetch_depth(prefetch)
    installed = getattr(model, "activation_offload", None)
    if installed is not None:  # idempotent; a call that asks for other settings than the installed ones is refused
        if (depth is not None and (installed.prefetch.depth if installed.prefetch else None) != depth) or \
                (manager_kwargs and installed.manager_kwargs != manager_kwargs):
            raise ValueError(f"this model is already offloaded with other settings (prefetch={installed.prefetch.depth if installed.prefetch else None}, "
                             f"{installed.manager_kwargs}); call model.activation_offload.remove() first")
        return installed
    if not _accelerator_present():
        raise RuntimeError(f"activation offloading needs a GPU and this torch ({torch.__version__}) sees none; on the CPU "
                           "activations already live in host memory: set training.offload_activations=auto or off")
    from trl.models import get_act_offloading_ctx_manager

    stack = decoder_stack(model)
    # The stack, not `model`: parameter storages it skips are the stack's own; no LM head inside it to exempt.
    if depth and not manager_kwargs.get("use_streams", True):
        raise ValueError("prefetch=True copies on TRL's side stream: it needs use_streams=True (TRL's default)")
    manager = get_act_offloading_ctx_manager(stack, warn_if_no_head=False, **manager_kwargs)
    prefetcher = BackwardPrefetch(manager, depth=depth) if depth else None  # wraps TRL's hooks first
    handle = OffloadedForward(model, stack, manager)
    handle.prefetch, handle.manager_kwargs = prefetcher, dict(manager_kwargs)
    return handle


try:
    from transformers import TrainerCallback as _TrainerCallback
except Exception:  # transformers missing: the callback is unusable, the rest of the module still imports
    _TrainerCallback = object


class PartialRecomputeCallback(_TrainerCallback):
    """Trainer callback: after Trainer turns checkpointing on, free the last `n_free` layers from recompute."""

    def __init__(self, n_free: int):
        self.n_free = n_free

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None and args.gradient_checkpointing:
            set_recompute_free_layers(model, self.n_free)
