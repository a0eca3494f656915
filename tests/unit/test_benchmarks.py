"""MT-Bench / AlpacaEval formats and the local judge's maths (rlhf/evaluation/benchmarks.py)."""

import json
import math

import pytest

from rlhf.evaluation import benchmarks as bm
from rlhf.data.readers import DataError
from tests.data_samples import alpaca_eval_set, mt_bench_questions


def test_expected_rating_by_hand():
    # all mass on "[[7]]" -> 7; uniform -> 5.5; two ratings at equal odds -> their mean
    assert bm.expected_rating([0.0 if r == 7 else -1e9 for r in bm.RATINGS]) == 7
    assert bm.expected_rating([math.log(0.1)] * 10) == pytest.approx(5.5)
    lp = [-1e9] * 10
    lp[1] = lp[8] = math.log(0.5)  # ratings 2 and 9
    assert bm.expected_rating(lp) == pytest.approx(5.5)


def test_mean_interval_brackets_the_mean():
    mean, lo, hi = bm.mean_interval([1.0, 2.0, 3.0, 4.0], seed=1)
    assert mean == 2.5 and lo < mean < hi and 1.0 <= lo and hi <= 4.0
    assert bm.mean_interval([3.0] * 5) == (3.0, 3.0, 3.0)


def test_second_turn_is_judged_with_the_first():
    q = mt_bench_questions()[0]
    text = bm.grade_text(q["turns"], ["note", "new note"], 1)
    assert text.index(q["turns"][0]) < text.index("note") < text.index(q["turns"][1])
    assert text.endswith("Rating: [[") and "last answer" in text


def test_question_sets_load_and_bad_ones_say_what_is_expected(tmp_path):
    f = tmp_path / "question.jsonl"
    f.write_text("".join(json.dumps(q) + "\n" for q in mt_bench_questions()))
    assert [q["question_id"] for q in bm.load_mt_bench(str(f), limit=2)] == [81, 111]
    a = tmp_path / "alpaca_eval.json"
    a.write_text(json.dumps(alpaca_eval_set()))
    rows = bm.load_alpaca_eval(str(a))
    assert len(rows) == 4 and rows[0]["dataset"] == "helpful_base"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question_id": 1, "prompt": "x"}) + "\n")
    with pytest.raises(DataError, match=r"question 1: needs question_id and turns .* found "
                                        r"keys question_id, prompt"):
        bm.load_mt_bench(str(bad))
    with pytest.raises(DataError, match="row 1: no instruction"):
        bm.load_alpaca_eval(str(bad))
    with pytest.raises(DataError, match="no such file; give FastChat's"):
        bm.load_mt_bench(str(tmp_path / "nope.jsonl"))


def test_exports_in_each_tools_layout(tmp_path):
    qs = mt_bench_questions()
    bm.write_mt_bench(tmp_path, qs, {"m": [["a", "b"]] * 3})
    line = json.loads((tmp_path / "data/mt_bench/model_answer/m.jsonl").read_text()
                      .splitlines()[0])
    assert line["question_id"] == 81 and line["choices"] == [{"index": 0, "turns": ["a", "b"]}]
    bm.write_alpaca_eval(tmp_path, alpaca_eval_set(), {"m": ["o"] * 4})
    out = json.loads((tmp_path / "alpaca_eval/m.json").read_text())
    assert out[0] == {"instruction": alpaca_eval_set()[0]["instruction"], "output": "o",
                      "generator": "m", "dataset": "helpful_base"}


def test_auto_question_sets_say_where_to_get_them(monkeypatch):
    import importlib.util

    from rlhf.data import readers

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)  # none installed
    with pytest.raises(DataError, match="no installed package ships MT-Bench's questions"):
        bm.load_mt_bench("auto")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(readers, "_hub_reachable", lambda: False)
    with pytest.raises(DataError, match="hub cannot be reached for tatsu-lab/alpaca_eval"):
        bm.load_alpaca_eval("auto")
