"""Public data sets recognised by their columns (rlhf.data.formats): UltraFeedback's two
forms, OpenAssistant trees -> pairs / threads / prompts, the score filter, split names."""

import pytest

from rlhf.data import pipeline as data

from rlhf.data import formats as fmt
from rlhf.config import DataConfig
from rlhf.data.readers import PAIR_SPLITS, DataError, Splits, pick_splits
from tests.data_samples import argilla_rows, h4_row, oasst_tree


def test_formats_are_recognised_by_their_columns():
    assert fmt.recognise(argilla_rows(1)[0]) == fmt.ULTRAFEEDBACK_ARGILLA
    assert fmt.recognise(oasst_tree(0)[0]) == fmt.OASST
    assert fmt.recognise(h4_row(0)) == ""  # generic conversational pairs with scores
    assert fmt.recognise({"prompt": "p", "chosen": "c", "rejected": "r"}) == ""


def test_argilla_rows_become_conversational_pairs_with_scores():
    row = fmt.from_argilla(argilla_rows(1)[0])
    assert row["prompt"] == [{"role": "user", "content": "Name 2 colours of the rainbow."}]
    assert row["chosen"][0]["role"] == row["rejected"][0]["role"] == "assistant"
    assert (row["score_chosen"], row["score_rejected"]) == (3.0, 1.25)
    assert row["source"] == "flan_v2_niv2" and row["rejected_model"] == "alpaca-7b"
    lay = data.detect(data.PAIRS, argilla_rows(1)[0], DataConfig(), "x")
    assert lay.chat and lay.inner.format == "explicit" and lay.inner.scored


@pytest.mark.parametrize("gap,expected", [
    (0.0, {"": 11, data.DROP_SCORE_REVERSED: 1}),
    (0.5, {"": 8, data.DROP_SCORE_GAP: 3, data.DROP_SCORE_REVERSED: 1}),
    (2.0, {"": 3, data.DROP_SCORE_GAP: 8, data.DROP_SCORE_REVERSED: 1}),
])
def test_min_score_gap_drops_close_pairs_and_counts_them(gap, expected):
    rows = argilla_rows(12)
    rows[0] = {**rows[0], "chosen_avg_rating": 1.0}  # below its rejected one
    lay = data.detect(data.PAIRS, rows[0], DataConfig(min_score_gap=gap), "x")
    table = lay.table(list(range(12)), rows).to_pydict()
    counts = {}
    for d in table["drop"]:
        counts[d] = counts.get(d, 0) + 1
    assert counts == expected


def test_h4_ties_and_score_gap_as_margin():
    rows = [h4_row(i) for i in range(10)]  # i % 5 == 0: tied scores
    lay = data.detect(data.PAIRS, rows[0], DataConfig(min_score_gap=0.5), "x")
    t = lay.table(list(range(10)), rows).to_pydict()
    assert t["drop"].count(data.DROP_SCORE_TIE) == 2
    cfg = DataConfig()
    cfg.columns.margin = fmt.SCORE_GAP
    lay = data.detect(data.PAIRS, rows[1], cfg, "x")
    t = lay.table([1], rows[1:2]).to_pydict()
    assert t["margin"] == [2.0] and t["drop"] == [""]
    assert t["prompt"][0].startswith('[{"role": "user"')  # the shared user turn


def test_scores_asked_of_data_without_them_fail_with_the_fix():
    with pytest.raises(DataError, match="min_score_gap=1.0 needs scores"):
        data.detect(data.PAIRS, {"prompt": "p", "chosen": "c", "rejected": "r"},
                    DataConfig(min_score_gap=1.0), "x")


def _count(reasons):
    out = {}
    for r in reasons:
        out[r] = out.get(r, 0) + 1
    return out


def test_oasst_pairs_best_against_each_lower_ranked_sibling():
    rows, drop_ids, drops = fmt.tree_rows(oasst_tree(0), "pairs")
    pairs = [(r["chosen"][0]["content"], r["rejected"][0]["content"], r["score_gap"])
             for _, r in rows]
    assert pairs == [("Paris is the capital (0).", "France's capital is Paris, I think (0).", 1.0),
                     ("Paris is the capital (0).", "Lyon (0).", 2.0),
                     ("Berlin is Germany's capital (0).", "Berlin (0).", 1.0)]
    # the second turn's prompt is the whole conversation before it
    second = rows[2][1]["prompt"]
    assert [m["role"] for m in second] == ["user", "assistant", "user"]
    assert second[1]["content"] == "Paris is the capital (0)."
    assert drops == [fmt.DROP_UNREVIEWED] and len(drop_ids) == 1
    assert len({i for i, _ in rows}) == 3


def test_oasst_left_out_messages_are_counted_with_what_is_below_them():
    _, _, drops = fmt.tree_rows(oasst_tree(1), "pairs")  # a2 deleted, b2 unreviewed
    assert _count(drops) == {fmt.DROP_DELETED: 1, fmt.DROP_UNREVIEWED: 1}
    rows, _, drops = fmt.tree_rows(oasst_tree(2, lang="de"), "pairs", langs=("en",))
    assert rows == [] and _count(drops) == {fmt.DROP_LANG: 1, fmt.DROP_BELOW: 7}
    # a table without review columns is not filtered on review
    bare = [{k: v for k, v in m.items() if k != "review_result"} for m in oasst_tree(0)]
    rows, _, drops = fmt.tree_rows(bare, "pairs", reviewed=False)
    assert len(rows) == 3 and drops == []  # b2 has no rank: not paired, not dropped


def test_oasst_sft_thread_and_ppo_prompts():
    rows, _, _ = fmt.tree_rows(oasst_tree(0), "examples")
    assert len(rows) == 1
    thread = rows[0][1]["messages"]
    assert [m["content"] for m in thread] == [
        "What is the capital of France? (tree 0)", "Paris is the capital (0).",
        "And of Germany? (0)", "Berlin is Germany's capital (0)."]
    rows, _, _ = fmt.tree_rows(oasst_tree(0), "prompts")
    assert [len(r["prompt"]) for _, r in rows] == [1, 3]
    lone = [m for m in oasst_tree(3) if m["role"] == "prompter" and m["parent_id"] is None]
    rows, _, drops = fmt.tree_rows(lone, "examples")
    assert rows == [] and drops == [fmt.DROP_NO_REPLY]


def test_oasst_layout_wraps_the_kinds_own_and_keeps_trees_together():
    import pyarrow as pa

    msgs = oasst_tree(0)
    lay = data.detect(data.PAIRS, msgs[0], DataConfig(), "x")
    table = lay.table(list(range(len(msgs))), msgs)
    out = fmt._tree_table(table, lay).to_pydict()
    assert out["drop"] == ["", "", "", fmt.DROP_UNREVIEWED]
    assert len(set(out["group"])) == 1
    assert isinstance(table, pa.Table)


def test_split_names_per_entry_point():
    names = ["train_prefs", "test_prefs", "train_sft", "test_sft", "train_gen", "test_gen"]
    cfg = DataConfig()
    assert pick_splits(names, cfg, PAIR_SPLITS, "x") == ("train_prefs", "test_prefs")
    sft = Splits(("train_sft", "train"), ("test_sft", "test"))
    assert pick_splits(names, cfg, sft, "x") == ("train_sft", "test_sft")
    assert pick_splits(["train", "validation"], cfg, PAIR_SPLITS, "x") == ("train", "validation")
    assert pick_splits(["only"], cfg, PAIR_SPLITS, "x") == ("only", None)
    cfg.split, cfg.eval_split = "train_gen", "test_sft"
    assert pick_splits(names, cfg, PAIR_SPLITS, "x") == ("train_gen", "test_sft")
    with pytest.raises(DataError, match="none named train_prefs or train; say which"):
        pick_splits(["a", "b"], DataConfig(), PAIR_SPLITS, "x")
    cfg.split = "nope"
    with pytest.raises(DataError, match="no split named data.split='nope'"):
        pick_splits(names, cfg, PAIR_SPLITS, "x")


def test_unreachable_hub_fails_at_once_with_what_to_do(monkeypatch):
    """No network here: a hub id fails after one connection attempt, not datasets'
    ~25 s of retries; offline, the message says how to fill the cache."""
    import time

    from rlhf.data import readers

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(readers, "_hub_reachable", lambda: False)  # whatever the sandbox
    t = time.time()
    with pytest.raises(DataError, match=r"data.path=nobody/nothing: no local file or folder "
                                        r"of that name, and could not load it from the hub "
                                        r".*HF_HUB_OFFLINE=1 to use the local cache"):
        readers.resolve_sources(DataConfig(path="nobody/nothing"))
    assert time.time() - t < 5
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    text = readers._hub_advice("a/b", "data.path=a/b", ConnectionError("x"))
    assert "not in the local hub cache" in text and "share HF_HOME" in text
