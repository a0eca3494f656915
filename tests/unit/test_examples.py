"""SFT examples: format detection, normalisation, the loss mask by hand, truncation,
drops, and TRL 1.16's SFTTrainer tokenisation on the same examples."""

import json

import pytest

from rlhf.config import SFTColumnsConfig, SFTDataConfig
from rlhf.data.pipeline import DROP_EMPTY, DROP_TOO_LONG, DataError
from rlhf.data.examples import (DROP_NO_ASSISTANT, DROP_NO_TARGET, detect_sft_layout,
                           normalise_example, tokenize_example)

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Goodbye."}]


def _layout(row, **kw):
    return detect_sft_layout(row, SFTDataConfig(**kw), "test.jsonl")


@pytest.mark.parametrize("row, fmt", [
    ({"messages": CHAT}, "conversational"),
    ({"prompt": "Q", "completion": "A"}, "prompt_completion"),
    ({"prompt": "Q", "chosen": "A", "rejected": "B"}, "preference"),
    ({"chosen": "\n\nHuman: Q\n\nAssistant: A", "rejected": "\n\nHuman: Q\n\nAssistant: B"},
     "preference"),
    ({"text": "plain"}, "text"),
])
def test_auto_detects_the_format(row, fmt):
    assert _layout(row).format == fmt


def test_unknown_columns_name_the_fix():
    with pytest.raises(DataError, match=r"Columns found: question, answer.*"
                                        r"data.columns.completion=<column>"):
        _layout({"question": "Q", "answer": "A"})
    with pytest.raises(DataError, match=r"'prompt'.*data.columns.prompt=<column>"):
        _layout({"completion": "A"})
    with pytest.raises(DataError, match="not a list of"):
        _layout({"messages": "hello"}, format="conversational")
    # renamed columns are found
    lay = _layout({"q": "Q", "a": "A"}, columns=SFTColumnsConfig(prompt="q", completion="a"))
    assert normalise_example({"q": "Q", "a": "A"}, lay) == ("Q", "A", False, "")


def test_normalisation_and_drops():
    conv = _layout({"messages": CHAT})
    p, c, chat, drop = normalise_example({"messages": CHAT}, conv)
    assert (json.loads(p), json.loads(c), chat, drop) == ([], CHAT, True, "")
    assert normalise_example({"messages": CHAT[:2]}, conv)[3] == DROP_NO_ASSISTANT
    empty_turn = CHAT[:2] + [{"role": "assistant", "content": "  "}]
    assert normalise_example({"messages": empty_turn}, conv)[3] == DROP_EMPTY
    pc = _layout({"prompt": "Q", "completion": "A"})
    assert normalise_example({"prompt": "", "completion": "A"}, pc) == ("", "A", False, "")
    assert normalise_example({"prompt": "Q", "completion": " "}, pc)[3] == DROP_EMPTY
    # a plain prompt before chat messages becomes one user turn
    p, c, chat, _ = normalise_example(
        {"prompt": "Q", "completion": [{"role": "assistant", "content": "A"}]}, pc)
    assert json.loads(p) == [{"role": "user", "content": "Q"}] and chat
    # preference: the chosen side, with the implicit prompt found as DPO finds it
    pref = _layout({"chosen": "x", "rejected": "y"})
    row = {"chosen": "\n\nHuman: Q\n\nAssistant: good", "rejected": "\n\nHuman: Q\n\nAssistant: bad"}
    assert normalise_example(row, pref) == ("\n\nHuman: Q\n\nAssistant:", " good", False, "")
    # hh-rlhf's pairs where the chosen answer is empty teach SFT nothing
    row = {"chosen": "\n\nHuman: Q\n\nAssistant:", "rejected": "\n\nHuman: Q\n\nAssistant: bad"}
    assert normalise_example(row, pref)[3] == DROP_EMPTY
    text = _layout({"text": "t"})
    assert normalise_example({"text": 3}, text)[3] == DROP_EMPTY


def test_plain_mask_by_hand(tokenizer):
    tok = tokenizer
    ids, mask, truncated, drop = tokenize_example(tok, "Q: sky?", " Blue.", False, 64,
                                                  "keep_start")
    p = tok("Q: sky?")["input_ids"]
    full = tok("Q: sky? Blue." + tok.eos_token)["input_ids"]
    assert ids == full and ids[-1] == tok.eos_token_id and not truncated and drop == ""
    assert mask == [0] * len(p) + [1] * (len(full) - len(p))
    # switch: every token
    _, mask_all, _, _ = tokenize_example(tok, "Q: sky?", " Blue.", False, 64, "keep_start",
                                         completion_only=False)
    assert mask_all == [1] * len(full)


def test_chat_mask_covers_assistant_turns_only(tokenizer):
    tok = tokenizer
    ids, mask, _, _ = tokenize_example(tok, "[]", json.dumps(CHAT), True, 256, "keep_start")
    assert ids == tok(tok.apply_chat_template(CHAT, tokenize=False))["input_ids"]
    trained = tok.decode([t for t, m in zip(ids, mask) if m])
    # each assistant message with its closing tokens, nothing of the other turns
    assert trained == "Hello!<|end|>\nGoodbye.<|end|>\n"
    # prompt/completion chat: earlier assistant turns in the prompt are context only
    ids2, mask2, _, _ = tokenize_example(tok, json.dumps(CHAT[:4]), json.dumps(CHAT[4:]),
                                         True, 256, "keep_start")
    assert ids2 == ids
    assert tok.decode([t for t, m in zip(ids2, mask2) if m]) == "Goodbye.<|end|>\n"


def test_truncation_and_drops(tokenizer):
    tok = tokenizer
    full, _, _, _ = tokenize_example(tok, "Q", " " + "word " * 40, False, 1000, "keep_start")
    ids, mask, truncated, drop = tokenize_example(tok, "Q", " " + "word " * 40, False, 10,
                                                  "keep_start")
    assert ids == full[:10] and len(mask) == 10 and truncated and drop == ""
    assert tokenize_example(tok, "Q", " " + "word " * 40, False, 10, "drop")[3] == DROP_TOO_LONG
    # a prompt that fills max_length leaves nothing to train on when the start is kept;
    # keeping the end keeps the completion (and its EOS)
    long_prompt = "word " * 40
    assert tokenize_example(tok, long_prompt, " A", False, 10, "keep_start")[3] == DROP_NO_TARGET
    whole, whole_mask, _, _ = tokenize_example(tok, long_prompt, " A", False, 1000, "keep_start")
    ids, mask, truncated, drop = tokenize_example(tok, long_prompt, " A", False, 10, "keep_end")
    assert (ids, mask, truncated, drop) == (whole[-10:], whole_mask[-10:], True, "")


def test_chat_text_gets_no_second_bos(tokenizer):
    """A template that writes BOS itself, with a tokenizer that also adds one (Llama 3):
    exactly one BOS, as TRL's apply_chat_template(tokenize=True) gives."""
    import copy

    from tokenizers.processors import TemplateProcessing

    tok = copy.deepcopy(tokenizer)
    bos = tok.bos_token_id
    tok._tokenizer.post_processor = TemplateProcessing(
        single="<|bos|> $A", special_tokens=[("<|bos|>", bos)])
    tok.chat_template = "{{ bos_token }}" + tok.chat_template
    assert tok("hi")["input_ids"][0] == bos  # the tokenizer adds BOS to plain text
    ids, _, _, _ = tokenize_example(tok, "[]", json.dumps(CHAT[1:3]), True, 256, "keep_start")
    assert ids.count(bos) == 1 and ids[0] == bos
    want = tok.apply_chat_template(CHAT[1:3], tokenize=True, return_dict=True)["input_ids"]
    assert ids == list(want)


@pytest.mark.parametrize("example", [
    {"prompt": "Q: why is the sky blue?", "completion": " Because light scatters."},
    {"prompt": [{"role": "user", "content": "Hi"}],
     "completion": [{"role": "assistant", "content": "Hello there."}]},
    {"text": "The quick brown fox."},
])
def test_tokens_and_labels_match_trl_sft(tmp_path, tiny_model_path, tokenizer, example):
    """Same input ids and trained positions as TRL 1.16's SFTTrainer dataset preparation
    (completion_only_loss on, no packing)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_model_path), processing_class=tokenizer,
        train_dataset=Dataset.from_list([example]),
        args=SFTConfig(output_dir=str(tmp_path), max_length=256, report_to=[],
                       completion_only_loss=True, use_cpu=True))
    trl_row = trainer.train_dataset[0]
    lay = _layout(example)
    p, c, chat, drop = normalise_example(example, lay)
    ids, mask, _, _ = tokenize_example(tokenizer, p, c, chat, 256, "keep_start")
    assert drop == "" and ids == trl_row["input_ids"]
    # TRL's labels are -100 where not trained; position 0 is never predicted either way
    trl_trained = [int(label != -100) for label in trl_row["labels"]]
    assert mask[1:] == trl_trained[1:]


def test_chat_template_option(tokenizer, tmp_path):
    from rlhf.data.examples import resolve_chat_template

    template = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                "{% if add_generation_prompt %}[assistant] {% endif %}")
    f = tmp_path / "t.jinja"
    f.write_text(template)
    assert resolve_chat_template(str(f)) == template == resolve_chat_template(template)
    with pytest.raises(DataError, match="no such file"):
        resolve_chat_template(str(tmp_path / "missing.jinja"))
    ids, mask, _, _ = tokenize_example(tokenizer, "[]", json.dumps(CHAT[1:3]), True, 256,
                                       "keep_start", chat_template=template)
    assert tokenizer.decode(ids) == "[user] Hi\n[assistant] Hello!\n"
    assert tokenizer.decode([t for t, m in zip(ids, mask) if m]).strip() == "Hello!"


def test_conversations_without_a_chat_template_stop_before_ray(tiny_model_path, tmp_path):
    """A base model without a template meets conversational data: a clear error on the
    driver, before Ray starts, naming the fix."""
    import shutil

    from rlhf.config import SFTConfig, parse_args
    from rlhf.sft import run

    base = tmp_path / "base"
    shutil.copytree(tiny_model_path, base)
    (base / "chat_template.jinja").unlink()
    data = tmp_path / "chats.jsonl"
    data.write_text(json.dumps({"messages": CHAT}) + "\n")
    cfg = parse_args(SFTConfig, [f"model.name_or_path={base}", f"data.path={data}",
                                 f"output.dir={tmp_path}"], "rlhf.sft")
    with pytest.raises(DataError, match="no chat template.*data.chat_template"):
        run(cfg)
