"""After a forward that raises inside TRL's activation-offloading manager, are its saved-tensor hooks still on torch's
stack? Real CUDA, no fakes (tests/test_offload.py::test_a_forward_that_raises_leaves_no_saved_tensor_hooks_behind fakes the
accelerator as the CPU and failed on the GPU image on 2026-12-05; this tells the fake from a real defect). One line per case:

    PYTHONPATH=/tmp/site python3 bench/offload_hooks_check.py
"""
import torch, trl
from torch.utils.checkpoint import checkpoint
from trl.models import get_act_offloading_ctx_manager
print("torch", torch.__version__, "trl", trl.__version__, flush=True)
top = lambda: torch._C._autograd._top_saved_tensors_default_hooks(False)

class L(torch.nn.Module):
    def __init__(s):
        super().__init__(); s.l = torch.nn.Linear(256, 256)
    def forward(s, x):
        return checkpoint(s.l, x, use_reentrant=False)

class Stack(torch.nn.Module):
    def __init__(s):
        super().__init__(); s.layers = torch.nn.ModuleList([L() for _ in range(3)]); s.fail = None
    def forward(s, x):
        for i, l in enumerate(s.layers):
            if i == 1 and s.fail is not None:
                raise s.fail
            x = l(x)
        return x

for dev in (["cuda"] if torch.cuda.is_available() else []) + ["cpu"]:
    for streams in [True, False]:
        if dev == "cpu" and streams:
            continue
        for exc in [RuntimeError("boom"), KeyboardInterrupt()]:
            m = Stack().to(dev)
            try:
                mgr = get_act_offloading_ctx_manager(m, warn_if_no_head=False, use_streams=streams, use_pin_memory=dev == "cuda")
            except Exception as e:
                print(dev, streams, "manager:", type(e).__name__, e); continue
            x = torch.randn(64, 256, device=dev, requires_grad=True)
            m.fail = exc
            try:
                with mgr:
                    m(x)
            except BaseException as e:
                got = type(e).__name__
            print(dev, "streams", streams, type(exc).__name__, "->", got, "hooks left:", top() is not None, flush=True)
            m.fail = None
            with mgr:
                y = m(x).sum()
            y.backward()
            print("   next fwd/bwd ok; hooks left after:", top() is not None, flush=True)
