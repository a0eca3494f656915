"""KTO's data (rlhf.data.unpaired), without Ray: TRL's unpaired format in text and in
messages, labels and their errors, pairs split into a desirable and an undesirable
example (ids, counts), the mismatched completion each row carries for the KL point, and
the desirable:undesirable balance warning."""

import numpy as np
import pytest

from rlhf.config import KTODataConfig
from rlhf.data import pipeline as data
from rlhf.data.readers import DataError
from rlhf.data.unpaired import (DROP_LABEL, UNPAIRED, UnpairedLayout, _kl_partners,
                                tokenize_kto_batch)
from rlhf.kto import balance_warning
from tests.data_samples import argilla_rows


def _batch(table) -> dict:
    return {k: np.array(v, dtype=object) if k in ("prompt", "completion", "chosen", "rejected")
            else np.array(v) for k, v in table.to_pydict().items()}


def test_unpaired_rows_text_and_messages_labels_and_drops():
    cfg = KTODataConfig()
    rows = [{"prompt": "Q: hi\nA:", "completion": " hello", "label": True},
            {"prompt": "Q: hi\nA:", "completion": " go away", "label": 0},
            {"prompt": "Q: hi\nA:", "completion": " ok", "label": "maybe"},
            {"prompt": "Q: hi\nA:", "completion": "  ", "label": True}]
    lay = data.detect(UNPAIRED, rows[0], cfg, "x")
    assert isinstance(lay, UnpairedLayout) and not lay.chat
    t = lay.table([0, 1, 2, 3], rows).to_pydict()
    assert t["label"][:2] == [True, False]
    assert t["drop"] == ["", "", DROP_LABEL, data.DROP_EMPTY]
    chat = [{"prompt": [{"role": "user", "content": "hi"}],
             "completion": [{"role": "assistant", "content": "hello"}], "label": False}]
    lay = data.detect(UNPAIRED, chat[0], cfg, "x")
    assert lay.chat and lay.table([5], chat).to_pydict()["label"] == [False]


def test_column_errors_name_the_flags():
    with pytest.raises(DataError, match=r"no column\(s\) 'label'.*data\.columns\.label=<column>"):
        data.detect(UNPAIRED, {"prompt": "p", "completion": "c"}, KTODataConfig(), "f.jsonl")
    with pytest.raises(DataError, match="data.columns.completion=<column> data.columns.label="):
        data.detect(UNPAIRED, {"question": "p", "answer": "c"}, KTODataConfig(), "f.jsonl")


def test_pairs_split_in_two_with_a_mismatched_completion_each(tiny_model_path):
    cfg = KTODataConfig()
    rows = [{"prompt": f"Q{i}:", "chosen": f" good {i}", "rejected": f" bad {i}"}
            for i in range(3)]
    lay = data.detect(UNPAIRED, rows[0], cfg, "x")
    assert UNPAIRED.rows_per(lay) == 2 and lay.format == "explicit"
    table = lay.table([10, 11, 12], rows)
    out = tokenize_kto_batch(_batch(table), tiny_model_path, 64, 32, "truncate").to_pylist()
    assert [r["id"] for r in out] == [20, 21, 22, 23, 24, 25]  # (pair id << 1) | side
    assert [r["label"] for r in out] == [True, False] * 3
    assert out[0]["prompt_ids"] == out[1]["prompt_ids"] != out[2]["prompt_ids"]
    for r in out:  # another row's completion, to another prompt, never its own pair's
        partner = [o for o in out if o["completion_ids"] == r["kl_completion_ids"]]
        assert partner and partner[0]["prompt_ids"] != r["prompt_ids"]
    # public formats arrive as pairs and are split the same way
    lay = data.detect(UNPAIRED, argilla_rows(1)[0], cfg, "x")
    assert UNPAIRED.rows_per(lay) == 2


def test_kl_partner_is_the_nearest_earlier_row_with_another_prompt():
    assert _kl_partners([[1], [2], [3]]) == [2, 0, 1]  # TRL's rotation by one
    assert _kl_partners([[1], [1], [2], [2]]) == [3, 3, 1, 1]
    assert _kl_partners([[1], [1]]) == [0, 1]  # one prompt only: its own


def test_balance_warning_names_the_weights():
    assert balance_warning(100, 100, 1.0, 1.0) == ""
    assert balance_warning(120, 100, 1.0, 1.0) == ""  # 1.2 is within 1 .. 4/3
    w = balance_warning(100, 300, 1.0, 1.0)
    assert "weighted ratio of 0.33" in w and "loss.desirable_weight in [3.00, 4.00]" in w
    assert balance_warning(100, 300, 3.0, 1.0) == ""
