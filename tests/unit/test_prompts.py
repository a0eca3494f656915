"""Prompts for online RL: detection, normalisation with metadata, chat rendering with
the generation prompt, drops, and the demo task's reward."""

import json

import pytest

from rlhf.config import PromptDataConfig
from rlhf.data.pipeline import DROP_EMPTY, DataError
from rlhf.data.prompts import (DROP_PROMPT_TOO_LONG, detect_prompt_layout, normalise_prompt,
                              tokenize_prompt)


def test_prompts_with_metadata_and_drops():
    cfg = PromptDataConfig()
    lay = detect_prompt_layout({"prompt": "1+1=", "answer": "2"}, cfg, "x.jsonl")
    p, chat, meta, drop = normalise_prompt({"prompt": "1+1=", "answer": "2"}, lay)
    assert (p, chat, json.loads(meta), drop) == ("1+1=", False, {"answer": "2"}, "")
    assert normalise_prompt({"prompt": "  ", "answer": "2"}, lay)[3] == DROP_EMPTY
    msgs = [{"role": "user", "content": "hi"}]
    assert normalise_prompt({"prompt": msgs}, lay)[:2] == (json.dumps(msgs), True)
    with pytest.raises(DataError, match="Columns found: question.*data.prompt_column"):
        detect_prompt_layout({"question": "q"}, cfg, "x.jsonl")


def test_tokenize_prompts(tokenizer):
    ids, drop = tokenize_prompt(tokenizer, "\n\nHuman: hi\n\nAssistant:", False, 64)
    assert ids == tokenizer("\n\nHuman: hi\n\nAssistant:")["input_ids"] and drop == ""
    msgs = json.dumps([{"role": "user", "content": "hi"}])
    ids, _ = tokenize_prompt(tokenizer, msgs, True, 64)
    assert tokenizer.decode(ids) == "<|user|>\nhi<|end|>\n<|assistant|>\n"
    assert tokenize_prompt(tokenizer, "word " * 50, False, 10) == ([], DROP_PROMPT_TOO_LONG)


def test_demo_reward():
    from rlhf.core.rewards import call_function, load_function

    fn = load_function("rlhf.core.tasks:demo_opening")
    assert call_function(fn, "demo", ["p"] * 3,
                         [" Of course. Rivers...", "Sure! Rivers", ""], [{}] * 3) == [1.0, 0.0, 0.0]
