"""Chat templates whose rendering of a conversation's start is not the start of the whole: Qwen3's "thinking" template
renders the last answer after `<think>\n\n</think>\n\n` and past answers without it. Such a template passed the one-exchange
template check, then stage 1 died on the first multi-turn row (ShareGPT, OASST) with a line naming neither the source
nor the row. Each answer now trains in the context the model writes it in; a template that cannot be trained on is one
line naming the key before stage 1.

The template is Qwen3's own (tests/fixtures/qwen3_chat_template.jinja: `Qwen/Qwen3-8B`'s tokenizer_config.json chat
template, as TRL keeps it in trl/chat_templates/qwen3.jinja), on the tiny byte-level tokenizer given Qwen3's
`<|im_start|>`/`<|im_end|>` (EOS) special tokens and its `<think>`/`</think>` added tokens.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest

from tasks.common import StageError

QWEN3_TEMPLATE = (Path(__file__).parent / "fixtures" / "qwen3_chat_template.jinja").read_text()
EMPTY_THINK = "<think>\n\n</think>\n\n"

# ShareGPT-shaped multi-turn rows: two or three exchanges each.
SHAREGPT = [
    {"conversations": [{"from": "human", "value": f"What is {i} plus {i}?"}, {"from": "gpt", "value": f"{i} plus {i} is {2 * i}."},
                       {"from": "human", "value": "And doubled again?"}, {"from": "gpt", "value": f"That makes {4 * i}."},
                       *([{"from": "human", "value": "Once more?"}, {"from": "gpt", "value": f"Now {8 * i}."}] if i % 3 == 0 else [])]}
    for i in range(30)
]


def _qwen3_folder(tiny_cfg, shared_artifacts, folder: Path, template: str = QWEN3_TEMPLATE) -> Path:
    """The tiny model's folder with a Qwen3-shaped tokenizer (its chat template its own, as a hub Qwen3's is)."""
    from transformers import AddedToken

    from tasks.models import build_byte_tokenizer, resolve_model

    src = Path(resolve_model(tiny_cfg.model, shared_artifacts).path)
    folder.mkdir()
    for f in src.iterdir():
        if f.name.endswith((".json", ".safetensors")) and "token" not in f.name:
            shutil.copy(f, folder / f.name)
    tok = build_byte_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]}, replace_extra_special_tokens=False)
    tok.eos_token = "<|im_end|>"
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in ("<think>", "</think>")])
    tok.chat_template = template
    tok.save_pretrained(str(folder))
    return folder


def _model(tiny_cfg, folder: Path, **update):
    return tiny_cfg.model.model_copy(update={"name": str(folder), "chat_template": None, **update})


def _labeled(tok, ex) -> tuple[str, str]:
    """(the example's text before its first labeled token, the labeled text); the labels are one run to the end."""
    first = next(i for i, l in enumerate(ex["labels"]) if l != -100)
    assert all(l == t for l, t in zip(ex["labels"][first:], ex["input_ids"][first:])), "labels are not one run to the end"
    return tok.decode(ex["input_ids"][:first]), tok.decode(ex["input_ids"][first:])


def test_qwen3_thinking_template_trains_each_answer_of_a_multi_turn_row_in_the_context_it_is_written_in(
        tmp_path, tiny_cfg, shared_artifacts):
    """Every answer of every training conversation is labeled exactly once, in the text the model is prompted with when it
    writes that answer (the conversation before it, rendered by the template with the generation prompt: past answers
    without their <think> block), the labels starting where that prompt ends and closing on <|im_end|>. A held-out row
    stays one example (its line in heldout.jsonl), its last answer labeled."""
    from transformers import AutoTokenizer

    from tasks.data import load_dataset_records, load_heldout_meta, load_split, to_messages

    folder = _qwen3_folder(tiny_cfg, shared_artifacts, tmp_path / "qwen3")
    src = tmp_path / "sharegpt.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in SHAREGPT))
    data = tiny_cfg.data.model_copy(update={"source": str(src), "heldout_size": 3})
    rec = load_dataset_records(data, _model(tiny_cfg, folder), shared_artifacts)
    tok = AutoTokenizer.from_pretrained(str(folder))

    held = [m["messages"] for m in load_heldout_meta(rec)]
    convs = [to_messages(r, "messages")[0] for r in SHAREGPT]
    trained = [c for c in convs if c not in held]
    assert len(held) == rec.n_heldout == 3 and len(trained) == 27
    # One example per answer: 2 or 3 per conversation; the record says how many conversations were split
    answers = [(c[:i], m["content"]) for c in trained for i, m in enumerate(c) if m["role"] == "assistant"]
    assert rec.n_train == len(answers) == sum(len(c) // 2 for c in trained) and rec.split == 27
    expected = Counter(tok.apply_chat_template(before, tokenize=False, add_generation_prompt=True) + EMPTY_THINK + answer + "<|im_end|>\n"
                       for before, answer in answers)
    seen = Counter()
    for ex in load_split(rec, "train"):
        prompt, label = _labeled(tok, ex)
        assert label.startswith(EMPTY_THINK) and label.endswith("<|im_end|>\n"), label
        assert "<think>" not in prompt, prompt  # past answers as Qwen3 renders a chat's history: without their thinking
        seen[prompt + label] += 1
    assert seen == expected
    for ex, msgs in zip(load_split(rec, "heldout"), held):
        prompt, label = _labeled(tok, ex)
        assert prompt == tok.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True)
        assert label == EMPTY_THINK + msgs[-1]["content"] + "<|im_end|>\n"


def test_qwen3_thinking_template_is_said_before_stage_1(tmp_path, tiny_cfg, shared_artifacts):
    """The model check before stage 1 says that such a template trains a multi-turn row as one example per answer; a
    template whose conversations render as prefixes of each other (the tiny model's) says nothing of it."""
    from tasks.preflight import check_model

    folder = _qwen3_folder(tiny_cfg, shared_artifacts, tmp_path / "qwen3")
    lines = check_model(_model(tiny_cfg, folder), tiny_cfg.lora, tiny_cfg.quant, "cpu", shared_artifacts)
    said = [line for line in lines if line.startswith("data: ")]
    assert said == [f"data: the chat template of {str(folder)!r} (its tokenizer's) renders a past answer otherwise once a later turn "
                    "follows (as Qwen3's drops its <think> block), so stage 1 trains each answer of a multi-turn row in the conversation cut "
                    "after it, as the model will be prompted: one example per answer, the earlier turns repeated in each"], lines
    plain = check_model(tiny_cfg.model, tiny_cfg.lora, tiny_cfg.quant, "cpu", shared_artifacts)
    assert not [line for line in plain if line.startswith("data: ")], plain


# A template whose second answer does not start where its generation prompt ends (a numbered header from the second
# exchange on, the prompt always unnumbered): one exchange renders fine, so the old check let it through.
NUMBERED = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ '### User:\n' + m['content'] + '\n' }}"
            "{% else %}{{ '### Assistant' + (' ' ~ loop.index if loop.index > 2 else '') + ':\n' + m['content'] + eos_token + '\n' }}"
            "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '### Assistant:\n' }}{% endif %}")


def test_a_template_that_does_not_open_a_later_answer_with_its_generation_prompt_is_one_line_before_stage_1(
        tmp_path, tiny_cfg, shared_artifacts):
    """Training labels an answer from where the generation prompt before it ends; a template that renders a later
    answer otherwise could never be trained on right. Loading its tokenizer (the model check before stage 1, every
    stage) says so in one line naming the key, the cause and the fix; stage 1 on its own says the same."""
    from tasks.data import load_dataset_records
    from tasks.models import load_tokenizer, resolve_model

    model = tiny_cfg.model.model_copy(update={"chat_template": NUMBERED})
    with pytest.raises(StageError) as e:
        load_tokenizer(resolve_model(model, shared_artifacts), model)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("model.chat_template: does not open an assistant turn the way its generation prompt does: "
                                              "its generation prompt ends "), msg
    assert "### Assistant:\\n' where it renders the answer as '" in msg and "### Assistant 4:\\nOkapi again." in msg, msg
    assert msg.endswith("set model.chat_template to a template whose generation prompt is the start of its assistant turns"), msg
    src = tmp_path / "sharegpt.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in SHAREGPT))
    with pytest.raises(StageError, match=r"^model.chat_template: does not open an assistant turn the way its generation prompt does"):
        load_dataset_records(tiny_cfg.data.model_copy(update={"source": str(src)}), model, shared_artifacts)


def test_a_row_whose_answer_the_template_does_not_open_with_its_generation_prompt_is_named_in_one_line(tmp_path, tiny_cfg, shared_artifacts):
    """A template that passes the check but renders some answer otherwise (here by its content: an answer with a '*' gets
    its own header) is one line naming the source and quoting the row, the template's two renderings, and the fix —
    not the bare "does not render conversations as prefixes of each other" that named neither."""
    from tasks.data import load_dataset_records

    template = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ 'U: ' + m['content'] + '\\n' }}{% else %}"
                "{{ ('A*: ' if '*' in m['content'] else 'A: ') + m['content'] + eos_token + '\\n' }}{% endif %}{% endfor %}"
                "{% if add_generation_prompt %}{{ 'A: ' }}{% endif %}")
    rows = [{"messages": [{"role": "user", "content": f"What is {i} times {i}?"}, {"role": "assistant", "content": f"{i}*{i} is {i * i}."}
                          if i == 7 else {"role": "assistant", "content": f"It is {i * i}."}]} for i in range(20)]
    src = tmp_path / "stars.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = tiny_cfg.model.model_copy(update={"chat_template": template})
    with pytest.raises(StageError) as e:
        load_dataset_records(tiny_cfg.data.model_copy(update={"source": str(src)}), model, shared_artifacts)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"data.source {str(src)!r}: the chat template cannot mark the answers of the conversation "
                                              "(roles: user, assistant) whose first user turn is 'What is 7 times 7?': its generation "
                                              "prompt ends 'U: What is 7 times 7?\\nA: ' where it renders the answer as "), msg
    assert msg.endswith("set model.chat_template to a template whose generation prompt is the start of its assistant turns"), msg


def test_qwen3_trains_a_sharegpt_row_with_two_answers_in_a_row_as_one_merged_answer(tmp_path, tiny_cfg, shared_artifacts):
    """A ShareGPT row whose answer came in two "gpt" turns in a row: Qwen3's template renders the first of them without
    its <think> block once the second follows, so no rendering of the row opened that answer with its generation prompt.
    The two turns are one answer (joined by a blank line), trained in the context it is written in, as any other."""
    from transformers import AutoTokenizer

    from tasks.data import load_dataset_records, load_heldout_meta, load_split

    row = {"conversations": [{"from": "human", "value": "Name a fruit."}, {"from": "gpt", "value": "Apple."},
                             {"from": "gpt", "value": "Or a pear."}, {"from": "human", "value": "And a vegetable?"},
                             {"from": "gpt", "value": "A leek."}]}
    folder = _qwen3_folder(tiny_cfg, shared_artifacts, tmp_path / "qwen3")
    src = tmp_path / "sharegpt.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in [row, *SHAREGPT[:29]]))
    data = tiny_cfg.data.model_copy(update={"source": str(src), "heldout_size": 3})
    rec = load_dataset_records(data, _model(tiny_cfg, folder), shared_artifacts)
    tok = AutoTokenizer.from_pretrained(str(folder))

    merged = [{"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": "Apple.\n\nOr a pear."},
              {"role": "user", "content": "And a vegetable?"}, {"role": "assistant", "content": "A leek."}]
    assert rec.dropped == {} and rec.merged == 1 and merged not in [m["messages"] for m in load_heldout_meta(rec)]
    trained = Counter(prompt + label for prompt, label in (_labeled(tok, ex) for ex in load_split(rec, "train")))
    for before, answer in ((merged[:1], "Apple.\n\nOr a pear."), (merged[:3], "A leek.")):
        prompt = tok.apply_chat_template(before, tokenize=False, add_generation_prompt=True)
        assert trained[prompt + EMPTY_THINK + answer + "<|im_end|>\n"] == 1, (prompt, list(trained)[:3])
