"""rlhf/data/tokenizer.py: the direct load gives what AutoTokenizer gives."""

import json
import shutil

from rlhf.data.tokenizer import auto_tokenizer, loads_directly


def test_direct_load_equals_auto_tokenizer(tiny_model_path, tmp_path):
    from transformers import AutoTokenizer
    from transformers.models.auto.tokenization_auto import (
        MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS)

    # the rule the direct load rests on: transformers keeps a generic hub class for
    # these model types (a transformers upgrade that changes it fails here)
    assert "llama" not in MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS
    assert loads_directly(tiny_model_path)
    mine, auto = auto_tokenizer(tiny_model_path), AutoTokenizer.from_pretrained(tiny_model_path)
    assert type(mine) is type(auto)
    assert mine.get_vocab() == auto.get_vocab()
    assert mine.special_tokens_map == auto.special_tokens_map
    assert (mine.bos_token_id, mine.eos_token_id, mine.pad_token_id) == \
        (auto.bos_token_id, auto.eos_token_id, auto.pad_token_id)
    assert mine.chat_template == auto.chat_template
    chat = [{"role": "user", "content": "Tell me about owls."},
            {"role": "assistant", "content": "Owls hunt at night."}]
    assert mine.apply_chat_template(chat, tokenize=False) == \
        auto.apply_chat_template(chat, tokenize=False)
    for text in ("\n\nHuman: hi\n\nAssistant: Hello there! <|eos|>", "  spaces  and\ttabs",
                 "émoji 🦉 and <|user|> markers"):
        for special in (True, False):
            assert mine(text, add_special_tokens=special)["input_ids"] == \
                auto(text, add_special_tokens=special)["input_ids"]

    # anything else goes through AutoTokenizer: another model type, remote code
    for name, edit in (("gpt2", lambda cfg, tok: cfg.update(model_type="gpt2")),
                       ("remote", lambda cfg, tok: tok.update(auto_map={"AutoTokenizer": "x"}))):
        folder = tmp_path / name
        shutil.copytree(tiny_model_path, folder)
        cfg = json.loads((folder / "config.json").read_text())
        tok = json.loads((folder / "tokenizer_config.json").read_text())
        edit(cfg, tok)
        (folder / "config.json").write_text(json.dumps(cfg))
        (folder / "tokenizer_config.json").write_text(json.dumps(tok))
        assert not loads_directly(str(folder)), name
    assert not loads_directly("org/hub-id") and not loads_directly(str(tmp_path / "none"))
