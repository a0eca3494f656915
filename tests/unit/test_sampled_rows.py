"""rlhf.sample's rows by hand (rlhf/data/sampled_rows.py), its parts and their commits
(rlhf/data/part_writer.py) on a local folder, and its config's checks."""

import json

import pytest

from rlhf.config import ConfigError, SampleConfig, parse_args
from rlhf.data.part_writer import PartWriter
from rlhf.data.readers import DataError
from rlhf.data.sampled_rows import prompt_rows


def test_a_prompts_rows_by_hand():
    got = prompt_rows("Q?", False, 7, ["a", "b", "c", "d"], [0.5, 1.0, 0.0, 1.0])
    # the best is the first of the equal bests; the worst the last of the lowest
    assert got["sft"] == [{"prompt": "Q?", "completion": "b", "score": 1.0, "prompt_id": 7}]
    assert got["pairs"] == [{"prompt": "Q?", "chosen": "b", "rejected": "c",
                             "score_chosen": 1.0, "score_rejected": 0.0, "prompt_id": 7}]
    # median 0.75: above it desirable
    assert [r["label"] for r in got["scored"]] == [False, True, False, True]
    assert [r["sample"] for r in got["scored"]] == [0, 1, 2, 3]
    # a threshold for SFT (rejection sampling) and for the labels
    got = prompt_rows("Q?", False, 7, ["a", "b"], [0.5, 0.2], sft_min_score=0.6,
                      kto_threshold=0.3)
    assert got["sft"] == [] and [r["label"] for r in got["scored"]] == [True, False]
    # all alike: no pair, no label (rlhf.kto counts and drops None)
    got = prompt_rows("Q?", False, 1, ["a", "b"], [0.0, 0.0])
    assert got["pairs"] == [] and [r["label"] for r in got["scored"]] == [None, None]
    # a chat prompt: conversational rows, the answers as assistant messages
    msgs = [{"role": "user", "content": "hi"}]
    got = prompt_rows(msgs, True, 2, ["x", "y"], [1.0, 0.0], pairs="all",
                      extra=[{"parts": {"f": 1.0}}, {"parts": {"f": 0.0}}])
    assert got["pairs"][0]["chosen"] == [{"role": "assistant", "content": "x"}]
    assert got["pairs"][0]["prompt"] == msgs and got["scored"][1]["parts"] == {"f": 0.0}
    with pytest.raises(ValueError, match="2 responses but 1 scores"):
        prompt_rows("Q?", False, 1, ["a", "b"], [0.0])


def test_parts_are_committed_whole_and_resumed_only_with_the_same_settings(tmp_path):
    w = PartWriter(str(tmp_path / "out"), ["sft", "pairs"], {"seed": 0})
    assert w.committed() == (set(), 0, {})
    w.write(0, {"sft": [{"a": 1}], "pairs": []}, [3, 1], {"samples": 8})
    w.write(1, {"sft": [{"a": 2}], "pairs": [{"b": 1}]}, [5], {"samples": 4})
    done, nxt, totals = w.committed()
    assert (done, nxt, totals) == ({1, 3, 5}, 2, {"samples": 12})
    assert sorted(p.name for p in (tmp_path / "out" / "sft").iterdir()) == \
        ["part-00000.jsonl", "part-00001.jsonl"]  # no hidden leftovers
    assert not (tmp_path / "out" / "pairs" / "part-00000.jsonl").exists()  # nothing to write
    assert json.loads((tmp_path / "out" / "sft" / "part-00001.jsonl").read_text()) == {"a": 2}
    # a part written but not committed (killed before its marker) is written again
    (tmp_path / "out" / "sft" / "part-00002.jsonl").write_text('{"half": 1}\n')
    assert w.committed()[1] == 2
    with pytest.raises(DataError, match="differ in seed"):
        PartWriter(str(tmp_path / "out"), ["sft"], {"seed": 1}).committed()


def test_sample_config_checks():
    def cfg(*argv):
        return parse_args(SampleConfig, list(argv), "x")

    assert cfg().sample.write == ["sft", "pairs", "scored"]
    for argv, why in ((["sample.write=[sft,json]"], "sft, pairs, scored"),
                      (["sample.samples_per_prompt=1"], "a pair needs two samples"),
                      (["sample.pairs=worst"], "best_worst, best_random, all"),
                      (["reward.min_score=0.5"], "sample.sft_min_score"),
                      (["reward.functions=[]"], "No reward"),
                      (["sample.shard_prompts=0"], "at least 1")):
        with pytest.raises(ConfigError, match=why):
            cfg(*argv)
    assert cfg("sample.samples_per_prompt=1", "sample.write=[sft]").sample.write == ["sft"]
