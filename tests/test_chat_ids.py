"""One chat, every path: training, stage 5, the published tokenizer (`chat`, `transformers serve`) and the
llama.cpp/Ollama export must start it with the same token ids — BOS included for tokenizers that add one.

A base tokenizer that puts BOS before every text and has no chat template (Mistral-7B-v0.1, Llama-2, Gemma) is
built from the tiny model's tokenizer; it gets the project's default template like the real ones do.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

CHAT = [{"role": "system", "content": "Follow the instruction exactly."}, {"role": "user", "content": "Say hi."},
        {"role": "assistant", "content": "Hi."}]


def _base_tokenizer_folder(tiny_tok, folder: Path, template: str | None = None) -> Path:
    """The tiny tokenizer, saved with a BOS-adding post-processor and the given (or no) chat template."""
    import copy

    from tokenizers import processors

    tok = copy.deepcopy(tiny_tok)
    bos = tok.bos_token_id
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    tok.chat_template = template
    tok.save_pretrained(str(folder))
    return folder


def _load(tiny_cfg, folder: Path, template: str | None = None):
    from tasks.models import ModelRef, load_tokenizer

    model = tiny_cfg.model.model_copy(update={"name": str(folder), "chat_template": template})
    return load_tokenizer(ModelRef(str(folder), None, "test", True), model)


class _Recorder(torch.nn.Module):
    """Stands in for the model in stage 5's generate: records the prompt ids, answers with EOS."""

    def __init__(self, eos: int):
        super().__init__()
        self.eos, self.prompts = eos, []

    def generate(self, input_ids, attention_mask, **kw):
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist()):
            self.prompts.append([t for t, m in zip(ids, mask) if m])
        return torch.cat([input_ids, torch.full((len(input_ids), 1), self.eos)], dim=1)


def _paths(tok, tmp_path: Path) -> dict[str, list[int]]:
    """The prompt ids (system + user, generation prompt) of CHAT along every path."""
    from transformers import AutoTokenizer

    from tasks import evaluate
    from tasks.data import encode
    from tasks.export import _render, render_with_parts, template_parts
    from tasks.models import adds_bos

    prompt = tok.apply_chat_template(CHAT[:2], tokenize=False, add_generation_prompt=True)
    n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
    paths = {"training": encode(tok, CHAT, 512, "drop")[0]["input_ids"][:n_prompt]}

    rec = _Recorder(tok.eos_token_id)
    evaluate.generate(rec, tok, [CHAT], [tok.eos_token_id], 1, 4, "cpu")
    paths["stage 5"] = rec.prompts[0]

    published = tmp_path / "published"
    tok.save_pretrained(str(published))
    reloaded = AutoTokenizer.from_pretrained(str(published))  # what `chat` and `transformers serve` load
    paths["chat / transformers serve"] = reloaded.apply_chat_template(CHAT[:2], add_generation_prompt=True, return_dict=True)["input_ids"]

    # llama.cpp and Ollama tokenize the template's text and add BOS themselves when the vocabulary says so.
    bos = [tok.bos_token_id] if adds_bos(tok) else []
    paths["llama.cpp (GGUF template)"] = bos + tok(_render(tok, CHAT[:2], gen=True), add_special_tokens=False)["input_ids"]
    modelfile_text = render_with_parts(template_parts(tok), CHAT[:2], True)
    paths["Ollama (Modelfile TEMPLATE)"] = bos + tok(modelfile_text, add_special_tokens=False)["input_ids"]
    return paths


def test_base_tokenizer_gets_a_bos_opened_default_template(tiny_cfg, tiny_tok, tmp_path):
    from tasks.models import adds_bos

    tok = _load(tiny_cfg, _base_tokenizer_folder(tiny_tok, tmp_path / "base"))
    assert adds_bos(tok)
    assert tok.apply_chat_template(CHAT, tokenize=False).startswith("<s>### System:")
    assert not adds_bos(tiny_tok)  # the plain tiny tokenizer adds none, and its template renders none
    assert not tiny_tok.apply_chat_template(CHAT, tokenize=False).startswith("<s>")


@pytest.mark.parametrize("template", ["default", "user-without-bos"])
def test_every_path_starts_a_chat_with_the_same_ids_and_one_bos(tiny_cfg, tiny_tok, tmp_path, template):
    chatml = ("{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] }}{% if m['role'] == 'assistant' %}{{ eos_token }}"
              "{% endif %}{{ '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")
    user_template = None if template == "default" else chatml
    tok = _load(tiny_cfg, _base_tokenizer_folder(tiny_tok, tmp_path / "base"), user_template)
    paths = _paths(tok, tmp_path)
    first = paths["training"]
    assert first[0] == tok.bos_token_id and first[1] != tok.bos_token_id  # the BOS pretraining saw, exactly once
    for name, ids in paths.items():
        assert ids == first, f"{name} starts the chat with {ids[:6]}..., training with {first[:6]}..."


def test_tokenizer_without_bos_gets_none_on_any_path(tiny_cfg, tiny_tok, tmp_path):
    paths = _paths(tiny_tok, tmp_path)
    assert all(ids == paths["training"] for ids in paths.values())
    assert tiny_tok.bos_token_id not in paths["training"]


# ---------------------------------------------------------------------------------------------------------
# Chat templates that cannot train: one line naming where the template comes from, before stage 1 (issue 20, a review)

ASKS = "{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + eos_token + '\n' }}{% endfor %}"
GEN = "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"


@pytest.mark.parametrize("template, said", [
    ("{{ (messages | length) // 0 }}" + ASKS, "ZeroDivisionError: integer division or modulo by zero (line 1)"),
    ("{{ '%(date)s' % {} }}" + ASKS, "KeyError: 'date' (line 1)"),
    ("{% for m in messages %}{{ m['content'] + 1 }}{% endfor %}", "TypeError: can only concatenate str"),
    # stage 5 and serving prompt with the generation prompt: a template that fails only there fails before stage 1 too
    (ASKS + "{% if add_generation_prompt %}{{ messages[0]['content'] * 'x' }}{% endif %}",
     "TypeError: can't multiply sequence by non-int"),
    # the line that failed, inside a macro (line 2), not the line that called it (line 4: a review)
    ("{% macro turn(m) %}\n{{ m['content'] ~ (1 // 0) }}\n{% endmacro %}\n{% for m in messages %}{{ turn(m) }}{% endfor %}",
     "ZeroDivisionError: integer division or modulo by zero (line 2)"),
], ids=["zero-division", "key-error", "type-error", "generation-prompt-only", "inside-a-macro"])
def test_a_template_that_fails_as_it_runs_is_one_line_naming_the_key(tiny_cfg, tiny_tok, tmp_path, template, said):
    """A template's own runtime error (ZeroDivisionError, KeyError, TypeError: not a jinja2.TemplateError) escaped
    load_tokenizer as a traceback; it is the one-line StageError naming model.chat_template, the error and its line."""
    from tasks.common import StageError

    folder = _base_tokenizer_folder(tiny_tok, tmp_path / "tok", template=None)
    with pytest.raises(StageError) as e:
        _load(tiny_cfg, folder, template)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("model.chat_template: cannot render a user + assistant exchange: "), msg
    assert said in msg and "set model.chat_template to a template" in msg, msg


def test_a_tokenizers_own_template_that_fails_names_the_tokenizer(tiny_cfg, tiny_tok, tmp_path):
    from tasks.common import StageError

    folder = _base_tokenizer_folder(tiny_tok, tmp_path / "tok", template="{{ (messages | length) // 0 }}")
    with pytest.raises(StageError) as e:
        _load(tiny_cfg, folder)
    assert str(e.value).startswith(f"the chat template of {str(folder)!r} (its tokenizer's): cannot render a user + assistant exchange: "
                                   "ZeroDivisionError"), str(e.value)


@pytest.mark.parametrize("template", [
    # drops the assistant's content but closes the turn with EOS: stop_token_ids passed it, training learned EOS alone
    ("{% for m in messages %}{% if m['role'] == 'assistant' %}<|assistant|>\n{{ eos_token }}{% else %}"
     "<|user|>\n{{ m['content'] }}\n{% endif %}{% endfor %}" + GEN),
    # renders only the header the generation prompt adds: blamed on EOS ("ends assistant turns with ''")
    ("{% for m in messages %}{% if m['role'] == 'user' %}<|user|>\n{{ m['content'] }}\n{% else %}<|assistant|>\n"
     "{% endif %}{% endfor %}" + GEN),
    ("{% for m in messages if m['role'] == 'user' %}<|user|>\n{{ m['content'] }}\n{% endfor %}" + GEN),
], ids=["header-and-eos", "header-only", "user-turns-only"])
def test_a_template_that_renders_no_assistant_text_says_so_not_eos(tiny_cfg, tiny_tok, tmp_path, template):
    """The assistant's text missing from the rendering is named as that, by the template check and by stop_token_ids
    (which alone blamed the tokenizer's EOS)."""
    import copy

    from tasks.common import StageError
    from tasks.data import stop_token_ids

    folder = _base_tokenizer_folder(tiny_tok, tmp_path / "tok", template=None)
    with pytest.raises(StageError) as e:
        _load(tiny_cfg, folder, template)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("model.chat_template: renders no assistant text"), msg
    assert "EOS" not in msg and "{{ message['content'] }}" in msg, msg
    tok = copy.deepcopy(tiny_tok)
    tok.chat_template = template
    with pytest.raises(StageError) as e:
        stop_token_ids(tok)
    assert str(e.value).startswith("the chat template renders no assistant text") and "EOS" not in str(e.value), str(e.value)
