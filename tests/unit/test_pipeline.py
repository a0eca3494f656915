"""Normalisation, tokenisation and readers, without Ray."""

import gzip
import json

import pytest

from rlhf.data import pipeline as data
from rlhf.config import ColumnsConfig, DataConfig

EXPLICIT = data.Layout("explicit", False, "prompt", "chosen", "rejected", "\n\nAssistant:")
IMPLICIT = data.Layout("implicit", False, "prompt", "chosen", "rejected", "\n\nAssistant:")


def test_implicit_prompt_is_shared_prefix_to_last_marker():
    row = {"chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: more?\n\nAssistant: Sure, here.",
           "rejected": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: more?\n\nAssistant: No."}
    p, c, r, chat, drop = data.normalise_row(row, IMPLICIT)
    assert drop == "" and not chat
    assert p == "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: more?\n\nAssistant:"
    assert c == " Sure, here." and r == " No."


@pytest.mark.parametrize("row, reason", [
    ({"chosen": "same", "rejected": "same"}, data.DROP_IDENTICAL),
    ({"chosen": "Human: a", "rejected": "Human: b"}, data.DROP_NO_MARKER),
    ({"chosen": "", "rejected": " "}, data.DROP_EMPTY),
    ({"chosen": 3, "rejected": "x"}, data.DROP_EMPTY),
    ({"chosen": None, "rejected": "x"}, data.DROP_EMPTY),
    ({"rejected": "x"}, data.DROP_MISSING),
])
def test_bad_rows_get_a_reason(row, reason):
    assert data.normalise_row(row, IMPLICIT)[4] == reason


def test_explicit_and_conversational():
    p, c, r, chat, drop = data.normalise_row({"prompt": "Q", "chosen": " a", "rejected": " b"}, EXPLICIT)
    assert (p, c, r, chat, drop) == ("Q", " a", " b", False, "")
    conv = data.Layout("explicit", True, "prompt", "chosen", "rejected", "")
    row = {"prompt": [{"role": "user", "content": "hi"}],
           "chosen": [{"role": "assistant", "content": "hello"}],
           "rejected": [{"role": "assistant", "content": "go away"}]}
    p, c, r, chat, drop = data.normalise_row(row, conv)
    assert chat and drop == "" and json.loads(c)[0]["content"] == "hello"
    implicit_conv = data.Layout("implicit", True, "prompt", "chosen", "rejected", "")
    row = {"chosen": row["prompt"] + row["chosen"], "rejected": row["prompt"] + row["rejected"]}
    p, c, r, chat, drop = data.normalise_row(row, implicit_conv)
    assert json.loads(p) == [{"role": "user", "content": "hi"}] and drop == ""


def test_missing_columns_name_the_fix():
    with pytest.raises(data.DataError) as e:
        data.detect_layout({"question": "q", "preferred": "a", "worse": "b"}, DataConfig(), "f.jsonl")
    msg = str(e.value)
    assert "'chosen'" in msg and "'rejected'" in msg and "question, preferred, worse" in msg
    # the flags that map them, guessed from the names, ready to paste
    assert msg.endswith("data.columns.chosen=preferred data.columns.rejected=worse "
                        "data.columns.prompt=question")
    lay = data.detect_layout({"question": "q", "preferred": "a", "worse": "b"},
                             DataConfig(columns=ColumnsConfig("question", "preferred", "worse")), "f")
    assert lay.format == "explicit"
    # the seed's own example: a dispreferred response says "prefer" too
    with pytest.raises(data.DataError, match="data.columns.chosen=preferred "
                       "data.columns.rejected=dispreferred data.columns.prompt=instruction$"):
        data.detect_layout({"instruction": "q", "preferred": "a", "dispreferred": "b"},
                           DataConfig(), "f.jsonl")
    with pytest.raises(data.DataError, match="data.columns.chosen=<column> "
                       "data.columns.rejected=<column>$"):
        data.detect_layout({"a": "q", "b": "a"}, DataConfig(), "f.jsonl")
    # KTO's unpaired rows handed to rlhf.dpo
    with pytest.raises(data.DataError, match="Train on them with python -m rlhf.kto"):
        data.detect_layout({"prompt": "q", "completion": "a", "label": True}, DataConfig(), "f")


def test_detects_formats():
    cfg = DataConfig()
    assert data.detect_layout({"chosen": "a", "rejected": "b"}, cfg, "x").format == "implicit"
    msgs = [{"role": "user", "content": "x"}]
    assert data.detect_layout({"chosen": msgs, "rejected": msgs}, cfg, "x").chat


def test_tokenize_pair_matches_trl_scheme(tokenizer):
    tok = tokenizer
    p, c, r, pc, rc, drop = data.tokenize_pair(tok, "\n\nHuman: hi\n\nAssistant:", " Sure.", " No.",
                                               False, 1024, 512, "truncate")
    assert drop == "" and not pc and not rc
    assert p + c == tok("\n\nHuman: hi\n\nAssistant: Sure." + tok.eos_token)["input_ids"]
    assert c[-1] == tok.eos_token_id and r[-1] == tok.eos_token_id


def test_truncation_counts_and_drop_policy(tokenizer):
    long_prompt = "word " * 200
    p, c, r, pc, rc, drop = data.tokenize_pair(tokenizer, long_prompt, " yes " * 50, " no",
                                               False, 64, 32, "truncate")
    assert pc and rc and drop == ""
    assert len(p) == 32 and len(p) + len(c) == 64 and len(p) + len(r) <= 64
    *_, drop = data.tokenize_pair(tokenizer, long_prompt, " yes", " no", False, 64, 32, "drop")
    assert drop == data.DROP_TOO_LONG


def test_chat_template_rendering(tokenizer):
    msgs = json.dumps([{"role": "user", "content": "hi"}])
    p, c, r, *_ = data.tokenize_pair(tokenizer, msgs, json.dumps([{"role": "assistant", "content": "hello"}]),
                                     json.dumps([{"role": "assistant", "content": "bye"}]), True, 1024, 512, "truncate")
    assert tokenizer.decode(p).endswith("<|assistant|>\n")
    assert tokenizer.decode(c) == "hello<|end|>\n"


def _write_jsonl(path, rows, compress=False):
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if compress:
        with gzip.open(path, "wt") as f:
            f.write(text)
    else:
        path.write_text(text)


def test_readers_peek_every_format(tmp_path):
    import pyarrow as pa
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    rows = [{"prompt": "p", "chosen": "a", "rejected": "b"}] * 3
    _write_jsonl(tmp_path / "a.jsonl", rows)
    _write_jsonl(tmp_path / "b.jsonl.gz", rows, compress=True)
    (tmp_path / "c.json").write_text(json.dumps(rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    pcsv.write_csv(pa.Table.from_pylist(rows), tmp_path / "e.csv")
    for name in ("a.jsonl", "b.jsonl.gz", "c.json", "d.parquet", "e.csv"):
        src, held = data.resolve_sources(DataConfig(path=str(tmp_path / name)))
        assert data.peek_rows(src, 2) == rows[:2], name
        assert held is None
    src, _ = data.resolve_sources(DataConfig(path=str(tmp_path)))
    assert len(src.files) == 5


def test_malformed_json_names_file_and_line(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"chosen": "a", "rejected": "b"}\n\n{"chosen": "a", "rejected": \n')
    src, _ = data.resolve_sources(DataConfig(path=str(f)))
    with pytest.raises(data.DataError, match=r"bad.jsonl, line 3: not valid JSON"):
        data.peek_rows(src, 5)


def test_missing_path_and_empty_folder(tmp_path):
    with pytest.raises(data.DataError, match="no such file or folder"):
        data.resolve_sources(DataConfig(path=str(tmp_path / "nope.jsonl")))
    with pytest.raises(data.DataError, match="no data files"):
        data.resolve_sources(DataConfig(path=str(tmp_path)))


def test_saved_dataset_dict_gives_train_and_test(tmp_path):
    import datasets

    rows = {"prompt": ["p"] * 4, "chosen": ["a"] * 4, "rejected": ["b"] * 4}
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows),
                          "test": datasets.Dataset.from_dict(rows)}).save_to_disk(tmp_path / "dd")
    train, held = data.resolve_sources(DataConfig(path=str(tmp_path / "dd")))
    assert train.files[0].endswith(".arrow") and held is not None
    assert data.peek_rows(train, 1) == [{"prompt": "p", "chosen": "a", "rejected": "b"}]


def test_eval_split_is_stable_and_sized():
    import numpy as np

    ids = np.arange(100_000, dtype=np.int64)
    a = data._in_eval_split(ids, 0.05, 42)
    assert 0.045 < a.mean() < 0.055
    assert (a == data._in_eval_split(ids, 0.05, 42)).all()
    assert (a != data._in_eval_split(ids, 0.05, 7)).any()


def test_demo_pairs_are_deterministic_and_held_out_topics_unseen():
    from rlhf.data.demo import EVAL_TOPICS, TRAIN_TOPICS, demo_pair

    assert demo_pair(7) == demo_pair(7)
    assert not set(EVAL_TOPICS) & set(TRAIN_TOPICS)
    assert any(t in demo_pair(3, "eval")["prompt"] for t in EVAL_TOPICS)


def test_margin_column_is_read_and_bad_values_dropped():
    lay = data.Layout("explicit", False, "prompt", "chosen", "rejected", "\n\nAssistant:",
                      margin="score_gap")
    rows = [{"prompt": "Q", "chosen": " a", "rejected": " b", "score_gap": 1.5},
            {"prompt": "Q", "chosen": " a", "rejected": " b", "score_gap": "n/a"},
            {"prompt": "Q", "chosen": " a", "rejected": " b"},
            {"prompt": "Q", "chosen": "", "rejected": " ", "score_gap": 2}]
    t = data._normalised_table([0, 1, 2, 3], rows, lay).to_pydict()
    assert t["margin"] == [1.5, 0.0, 0.0, 2.0]
    # an unusable margin drops the row (counted); an earlier reason is kept
    assert t["drop"] == ["", data.DROP_MARGIN, data.DROP_MARGIN, data.DROP_EMPTY]
    assert data._normalised_table([0], rows[:1], EXPLICIT).to_pydict()["margin"] == [0.0]


def test_one_empty_response_is_a_preference_not_a_drop(tokenizer):
    # hh-rlhf has pairs where the assistant saying nothing was preferred
    row = {"chosen": "\n\nHuman: list bad words\n\nAssistant: ",
           "rejected": "\n\nHuman: list bad words\n\nAssistant: Ok"}
    p, c, r, chat, drop = data.normalise_row(row, IMPLICIT)
    assert drop == "" and c == " " and r == " Ok"
    p_ids, c_ids, r_ids, *_, why = data.tokenize_pair(tokenizer, p, c, r, False, 64, 32,
                                                      "truncate")
    assert why == "" and c_ids[-1] == tokenizer.eos_token_id and len(r_ids) > len(c_ids) - 1


def test_the_plan_counts_the_rows_the_equal_split_leaves_out():
    """The steps printed before training are the steps that run: Ray's equal split over
    2 workers leaves 1 of 33 rows out (33 rows printed "5 steps of 8" and ran 4)."""
    from collections import Counter
    from types import SimpleNamespace

    from rlhf.config import ClusterConfig
    from rlhf.train.driver import rows_per_epoch
    from rlhf.train.tasks.dpo import DPOTask

    def pipes(usable, dropped=0):
        return SimpleNamespace(train_rows=usable,
                               train_counts=Counter({"": usable, "too long": dropped}))

    two = ClusterConfig(num_workers=2)
    assert rows_per_epoch(pipes(33), two, DPOTask) == 32  # 4 steps of 8, as run
    assert rows_per_epoch(pipes(33, dropped=1), two, DPOTask) == 33  # 34 split evenly
    assert rows_per_epoch(pipes(32, dropped=1), two, DPOTask) == 32  # the drop goes first
    assert rows_per_epoch(pipes(33), ClusterConfig(num_workers=[2, 4]), DPOTask) == 33


def test_truncation_lines_name_the_setting_that_keeps_rows_whole():
    preview = {"rows": 2000, "all": False, "prompt_truncated": (4, 5210),
               "response_truncated": (0, 0)}
    line = data.describe_truncation(preview, "pairs")
    assert line == ("length limits: of a sample, the first 2000 pairs, these will be cut: 4 "
                    "prompts (the longest seen 5210 tokens: data.max_prompt_length=5210 keeps "
                    "it whole). Their cut tokens are not trained on")
    # after training, from the run's counts (a response cut the sample had not seen)
    end = data.describe_truncation(preview, "pairs",
                                   {"prompt_truncated": 4, "response_truncated": 3})
    assert end == ("length limits: training cut 4 prompts (the longest seen 5210 tokens: "
                   "data.max_prompt_length=5210 keeps it whole); 3 responses (raise "
                   "data.max_length to keep them whole)")
    assert data.describe_truncation({"rows": 5, "all": True, "truncated": (0, 0)}, "x") == ""
