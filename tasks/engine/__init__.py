"""The training engine: everything the probe (stage 3) and the training stage (stage 4) share.

    dist.py       where this process stands among torchrun's ranks; max-reduce and barrier (no-ops in one process)
    launch.py     run a stage on N ranks under torchrun and supervise them (`python -m tasks.engine.launch worker`)
    build.py      engine choice, base model + LoRA, TrainingArguments
    collate.py    dataset view and collator per engine (padded batches or padding-free packs)
    fastpath.py   padding-free packing, varlen flash attention, Liger kernels (the `fast` engine)
    recompute.py  which layers gradient checkpointing recomputes, how many memory lets skip it, offloading their inputs
    lora.py       the fused LoRA path on 4-bit linears (the `fused` engine)
    lora_kernels.py  its Triton kernels for dropout inside the LoRA-A matmuls (`fuse_lora(model, dropout="inmatmul")`)
    noise.py      NEFTune noise on the input embeddings, each token's sample length from the forward's inputs (training.neftune_noise_alpha)
    unlikelihood.py  token-level unlikelihood on the tokens already written (or on their continuations: training.unlikelihood_candidates), one chunked pass over the LM head (training.unlikelihood_alpha)
    compile.py    regional compilation: torch.compile on each decoder layer, compiled before training (training.compile)

Imports run one way: tasks.train and tasks.probe import tasks.engine; the engine imports neither (the launcher
calls a stage's entry by the name the stage gives it), so there is no import cycle and no private name crosses
a module boundary (tests/test_imports.py checks both).
"""
