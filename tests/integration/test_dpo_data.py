"""The Ray Data pipeline on a local cluster: every format streams through with stable
ids and exact counts; hh-rlhf's implicit format is read as docs/data-formats.md describes."""

import json

import numpy as np
import pytest

from rlhf.data import pipeline as data
from rlhf.config import ColumnsConfig, DataConfig
from rlhf.data.demo import demo_pair


def build(cfg, tokenizer_path, **kw):
    plan = data.inspect(cfg, **kw)
    return plan, data.build(plan, cfg, tokenizer_path, seed=0)


def _rows(ds):
    return ds.take_all()


def test_hh_rlhf_implicit_format(ray_cluster, hh_rlhf, tiny_model_path, tokenizer):
    cfg = DataConfig(path=str(hh_rlhf), max_length=256, max_prompt_length=128,
                     eval_fraction=0.2)
    plan, pipes = build(cfg, tiny_model_path)
    assert plan.train_layout.format == "implicit"
    total = sum(pipes.train_counts.values()) + sum(pipes.eval_counts.values())
    assert total == 2312  # every line read, in train or held-out
    held_share = sum(pipes.eval_counts.values()) / total
    assert 0.15 < held_share < 0.25
    rows = _rows(pipes.eval)
    assert len(rows) == sum(pipes.eval_counts.values())
    assert len({r["id"] for r in rows}) == len(rows)
    good = [r for r in rows if not r["drop"]]
    for r in good[:50]:
        assert tokenizer.decode(r["prompt_ids"]).rstrip().endswith("Assistant:")
        assert len(r["prompt_ids"]) <= 128
        assert len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"])) <= 256
    assert any(r["prompt_truncated"] for r in good)  # real dialogues exceed 128 tokens
    dropped = [r for r in rows if r["drop"]]
    assert len(dropped) == sum(v for k, v in pipes.eval_counts.items() if k)


def test_explicit_files_in_every_format(ray_cluster, tmp_path, tiny_model_path):
    import pyarrow as pa
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    pairs = [demo_pair(i) for i in range(40)]
    pairs[3] = {**pairs[3], "rejected": pairs[3]["chosen"]}  # identical: counted
    pairs[5] = {**pairs[5], "chosen": "", "rejected": " "}  # both empty: counted
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "a.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs[:10]))
    (folder / "b.json").write_text(json.dumps(pairs[10:20]))
    pq.write_table(pa.Table.from_pylist(pairs[20:30]), folder / "c.parquet")
    pcsv.write_csv(pa.Table.from_pylist(pairs[30:40]), folder / "d.csv")
    cfg = DataConfig(path=str(folder), eval_path=str(folder / "a.jsonl"))
    _, pipes = build(cfg, tiny_model_path)
    assert pipes.train_counts == {"": 38, data.DROP_IDENTICAL: 1, data.DROP_EMPTY: 1}
    rows = _rows(pipes.train)
    assert len(rows) == 40 and len({r["id"] for r in rows}) == 40
    # ids are (file index, row): stable across reads
    assert sorted(r["id"] for r in rows) == sorted(r["id"] for r in _rows(pipes.train))
    # a held-out share larger than data.eval_max_rows is cut down to about that by the
    # same hash; the rows it releases train (none lost)
    cfg = DataConfig(path=str(folder), eval_fraction=0.5, eval_max_rows=8)
    _, pipes = build(cfg, tiny_model_path)
    assert 3 <= pipes.eval_counts[""] <= 13 and pipes.train_counts[""] + pipes.eval_counts[""] == 38
    assert "(data.eval_max_rows=8); the rest train" in pipes.notes[0]


def test_conversational_in_memory_dataset(ray_cluster, tiny_model_path, tokenizer):
    import datasets

    def conv(i):
        p = demo_pair(i)
        user = [{"role": "user", "content": p["prompt"].split("Human: ")[1].split("\n")[0]}]
        return {"chosen": user + [{"role": "assistant", "content": p["chosen"].strip()}],
                "rejected": user + [{"role": "assistant", "content": p["rejected"].strip()}]}

    ds = datasets.Dataset.from_list([conv(i) for i in range(24)])
    held = datasets.Dataset.from_list([conv(100 + i) for i in range(8)])
    plan, pipes = build(DataConfig(format="conversational"), tiny_model_path,
                         dataset=ds, eval_dataset=held)
    assert plan.train_layout.chat
    rows = _rows(pipes.train)
    assert len(rows) == 24
    r = rows[0]
    assert tokenizer.decode(r["prompt_ids"]).startswith("<|user|>")
    assert tokenizer.decode(r["prompt_ids"]).endswith("<|assistant|>\n")
    assert tokenizer.decode(r["chosen_ids"]).endswith("<|end|>\n")


def test_column_mapping_and_saved_dataset(ray_cluster, tmp_path, tiny_model_path, tokenizer):
    """A saved datasets.Dataset with columns of its own, mapped by data.columns: every row
    arrives once, and its tokens are the mapped columns' text (question -> prompt, good ->
    chosen, bad -> rejected), not another column's."""
    import datasets

    rows = [demo_pair(i) for i in range(20)]
    renamed = [{"question": r["prompt"], "good": r["chosen"], "bad": r["rejected"]} for r in rows]
    datasets.Dataset.from_list(renamed).save_to_disk(tmp_path / "saved")
    cfg = DataConfig(path=str(tmp_path / "saved"), eval_fraction=0.25,
                     columns=ColumnsConfig(prompt="question", chosen="good", rejected="bad"))
    _, pipes = build(cfg, tiny_model_path)
    assert pipes.train_counts[""] + pipes.eval_counts[""] == 20
    assert pipes.eval_counts[""] > 0  # a held-out share was split off
    got = _rows(pipes.train) + _rows(pipes.eval)
    assert len(got) == 20 and len({r["id"] for r in got}) == 20
    decoded = sorted((tokenizer.decode(r["prompt_ids"]),
                      tokenizer.decode(r["chosen_ids"], skip_special_tokens=True),
                      tokenizer.decode(r["rejected_ids"], skip_special_tokens=True))
                     for r in got)
    assert decoded == sorted((r["question"], r["good"], r["bad"]) for r in renamed)


def test_drop_policy_counts_too_long_pairs(ray_cluster, tmp_path, tiny_model_path):
    pairs = [demo_pair(i) for i in range(12)]
    pairs[0] = {**pairs[0], "chosen": " long" * 300}
    f = tmp_path / "p.jsonl"
    f.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    cfg = DataConfig(path=str(f), eval_path=str(f), max_length=128, max_prompt_length=64,
                     truncation="drop")
    _, pipes = build(cfg, tiny_model_path)
    rows = _rows(pipes.train)
    assert sum(r["drop"] == data.DROP_TOO_LONG for r in rows) == 1
    # truncated instead (the default): what the limits will cut is counted before
    # training, over all the rows (or the first 2,000), with the setting that keeps them
    pairs[1] = {**pairs[1], "prompt": " why" * 100 + pairs[1]["prompt"]}
    f.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    _, pipes = build(DataConfig(path=str(f), eval_path=str(f), max_length=128,
                                max_prompt_length=64), tiny_model_path)
    preview = data.truncation_preview(pipes.train, {"prompt_truncated": "",
                                                    "response_truncated": ""})
    line = data.describe_truncation(preview, "pairs")
    long = next(r for r in _rows(pipes.train) if r["prompt_truncated"])
    assert preview["rows"] == 12 and preview["all"]
    assert preview["prompt_truncated"] == (1, long["full_prompt_length"]) and long["full_prompt_length"] > 100
    assert line.startswith("length limits: of all 12 pairs, these will be cut: 1 prompt ")
    assert f"data.max_prompt_length={long['full_prompt_length']} keeps it whole" in line
    assert preview["response_truncated"][0] == 1  # pair 0's long answer


def test_malformed_line_stops_the_scan_with_file_and_line(ray_cluster, tmp_path,
                                                           tiny_model_path):
    f = tmp_path / "bad.jsonl"
    lines = [json.dumps(demo_pair(i)) for i in range(30)]
    lines[17] = lines[17][:-5]
    f.write_text("\n".join(lines) + "\n")
    with pytest.raises(Exception, match=r"bad.jsonl, line 18: not valid JSON"):
        build(DataConfig(path=str(f)), tiny_model_path)


def test_ray_dataset_source_gets_content_ids(ray_cluster, tiny_model_path):
    import ray.data

    train = ray.data.from_items([demo_pair(i) for i in range(30)])
    held = ray.data.from_items([demo_pair(i, "eval") for i in range(6)])
    _, pipes = build(DataConfig(), tiny_model_path, dataset=train, eval_dataset=held)
    assert pipes.train_counts == {"": 30} and pipes.eval_counts == {"": 6}
    ids = sorted(r["id"] for r in _rows(pipes.train))
    assert len(set(ids)) == 30 and ids == sorted(r["id"] for r in _rows(pipes.train))


def test_a_workers_rows_come_shuffled_by_seed_and_epoch(ray_cluster):
    """data.shuffle_buffer with train.seed: every row once an epoch, in an order drawn
    from the seed and the epoch (TRL's sampler shuffles by its seed too); 0 keeps the
    source's order."""
    import ray.data

    from cluster.feed import RowFeed

    ds = ray.data.from_items([{"id": i, "drop": ""} for i in range(60)])

    def order(seed: int, epoch: int, buffer: int = 10000) -> list[int]:
        feed = RowFeed(ds, micro=4, accum=2, shuffle_buffer=buffer, seed=seed)
        return [int(r["id"]) for mbs, _, _ in feed.steps(epoch) for mb in mbs for r in mb]

    first = order(0, 0)
    assert sorted(first) == list(range(60)) and first != list(range(60))
    assert order(0, 0) == first  # reproducible from the seed
    assert order(0, 1) != first and order(1, 0) != first  # another epoch, another seed
    assert order(0, 0, buffer=0) == list(range(60))


def test_prompt_pipeline_counts_and_metadata(ray_cluster, tiny_model_path, tmp_path):
    """Online RL's prompts on the same pipeline: the demo pairs serve as prompts (their
    other columns as metadata); empty and too-long prompts are counted."""
    from rlhf.config import PromptDataConfig
    from rlhf.data.prompts import DROP_PROMPT_TOO_LONG, PROMPTS

    cfg = PromptDataConfig(demo_pairs=40, demo_eval_pairs=8)
    plan, pipes = build(cfg, tiny_model_path, kind=PROMPTS)
    rows = _rows(pipes.train)
    assert pipes.train_counts[""] == 40 and len(rows) == 40
    assert all(len(r["prompt_ids"]) > 0 and "chosen" in json.loads(r["metadata"]) for r in rows)
    f = tmp_path / "p.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "What is 1+1?", "answer": "2"}, {"prompt": "", "answer": "x"},
        {"prompt": "word " * 600, "answer": "y"}]) + "\n")
    cfg = PromptDataConfig(path=str(f), eval_path=str(f), max_prompt_length=64)
    plan, pipes = build(cfg, tiny_model_path, kind=PROMPTS)
    assert pipes.train_counts == {"": 2, data.DROP_EMPTY: 1}
    drops = sorted(r["drop"] for r in _rows(pipes.train))
    assert drops == ["", data.DROP_EMPTY, DROP_PROMPT_TOO_LONG]


def test_public_formats_with_no_column_flags(ray_cluster, tmp_path, tiny_model_path):
    """UltraFeedback (argilla's) and OpenAssistant message tables through the pipeline:
    recognised by their columns, ratings filtered, trees rebuilt in Ray Data (grouped by
    tree id) with each tree on one side of the held-out split; every drop counted."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from rlhf.data import formats as fmt
    from rlhf.config import SFTDataConfig
    from rlhf.data.examples import EXAMPLES
    from tests.data_samples import argilla_rows, oasst_tree

    f = tmp_path / "uf.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in argilla_rows(40)))
    plan, pipes = build(DataConfig(path=str(f), eval_path=str(f), min_score_gap=0.5),
                         tiny_model_path)
    assert plan.train_layout.source_format == fmt.ULTRAFEEDBACK_ARGILLA
    assert pipes.train_counts == {"": 30, data.DROP_SCORE_GAP: 10}
    good = [r for r in _rows(pipes.train) if not r["drop"]]
    assert len(good) == 30 and all(r["chosen_ids"] and r["prompt_ids"] for r in good)

    messages = [m for t in range(30) for m in oasst_tree(t, "de" if t % 10 == 9 else "en")]
    pq.write_table(pa.Table.from_pylist(messages), tmp_path / "oasst.parquet")
    cfg = DataConfig(path=str(tmp_path / "oasst.parquet"), eval_fraction=0.3, lang="en")
    plan, pipes = build(cfg, tiny_model_path)
    both = pipes.train_counts + pipes.eval_counts
    # 27 English trees: 3 pairs each (tree 1 loses a deleted reply: 2), one unreviewed
    # reply each; 3 German trees: the root left out and its 7 messages below it.
    assert both == {"": 27 * 3 - 1, fmt.DROP_UNREVIEWED: 27, fmt.DROP_DELETED: 1,
                    fmt.DROP_LANG: 3, fmt.DROP_BELOW: 21}
    assert "pairs per tree: 2.96 mean, 3 median, 3 max, over 27 trees" in pipes.notes[1]
    normalised = data.read_normalised(plan.train, plan.train_layout)
    trees = [{r["group"] for r in _rows(split.select_columns(["group", "drop"])) if not r["drop"]}
             for split in data.split_held_out(normalised, 0.3, seed=0)]
    assert trees[0] and trees[1] and not trees[0] & trees[1]
    sft_cfg = SFTDataConfig(path=cfg.path, eval_fraction=0.3, lang="en")
    _, pipes = build(sft_cfg, tiny_model_path, kind=EXAMPLES)
    assert (pipes.train_counts + pipes.eval_counts)[""] == 27  # one thread per tree
    # A small table whose 5% held-out share holds none of its 3 trees: the tree with the
    # smallest split hash is held out instead, and the driver says so (it stopped with
    # "held-out data: no usable pairs (0 rows, 0 usable)")
    few = [m for t in (3, 4, 5) for m in oasst_tree(t)]
    pq.write_table(pa.Table.from_pylist(few), tmp_path / "few.parquet")
    cfg = DataConfig(path=str(tmp_path / "few.parquet"))
    assert not any(data._in_eval_split(np.array([fmt.stable_id(f"tree-{t}")]), 0.05, 0)[0]
                   for t in (3, 4, 5))
    _, pipes = build(cfg, tiny_model_path)
    assert pipes.eval_counts[""] == 3 and pipes.train_counts[""] == 6  # a tree, two trees
    assert "held none of its trees out, so the first by the split's hash" in pipes.notes[0]
    one = [m for m in oasst_tree(0)]
    pq.write_table(pa.Table.from_pylist(one), tmp_path / "one.parquet")
    with pytest.raises(data.DataError, match="make one tree.*data.eval_path"):
        build(DataConfig(path=str(tmp_path / "one.parquet")), tiny_model_path)


def test_hub_layout_folder_picks_each_entry_points_splits(ray_cluster, tmp_path,
                                                          tiny_model_path):
    """A folder laid out as a hub dataset repository (HuggingFaceH4/ultrafeedback_binarized's
    split names, data files plus the card's YAML configs) goes through
    datasets.load_dataset, the call a hub id takes; DPO reads train_prefs/test_prefs
    (ties dropped at data.min_score_gap), SFT train_sft, PPO train_gen's prompts."""
    from rlhf.config import PromptDataConfig, SFTDataConfig
    from rlhf.data.prompts import PROMPTS
    from rlhf.data.examples import EXAMPLES
    from tests.data_samples import write_h4_repo

    repo = write_h4_repo(tmp_path / "ultrafeedback_binarized",
                         {"train_prefs": 20, "test_prefs": 5, "train_sft": 12, "test_sft": 4,
                          "train_gen": 8, "test_gen": 3})
    plan, pipes = build(DataConfig(path=str(repo), min_score_gap=1.0), tiny_model_path)
    assert plan.train.name.endswith("[train_prefs]") and plan.held.name.endswith("[test_prefs]")
    assert pipes.train_counts == {"": 16, data.DROP_SCORE_TIE: 4}
    assert pipes.eval_counts == {"": 4, data.DROP_SCORE_TIE: 1}
    plan, pipes = build(SFTDataConfig(path=str(repo)), tiny_model_path, kind=EXAMPLES)
    assert plan.train.name.endswith("[train_sft]") and pipes.train_counts == {"": 12}
    assert plan.train_layout.format == "conversational"
    plan, pipes = build(PromptDataConfig(path=str(repo)), tiny_model_path, kind=PROMPTS)
    assert plan.train.name.endswith("[train_gen]") and pipes.eval_counts == {"": 3}
