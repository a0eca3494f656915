"""The Ray Data pipeline on a local cluster: every format streams through with stable
ids and exact counts; hh-rlhf's implicit format is read as the README describes."""

import json

import pytest

from rlhf import data
from rlhf.config import ColumnsConfig, DataConfig
from rlhf.demo import demo_pair


def _build(cfg, tokenizer_path, **kw):
    plan = data.inspect(cfg, **kw)
    return plan, data.build(plan, cfg, tokenizer_path, seed=0)


def _rows(ds):
    return ds.take_all()


def test_hh_rlhf_implicit_format(ray_cluster, hh_rlhf, tiny_model_path, tokenizer):
    cfg = DataConfig(path=str(hh_rlhf), max_length=256, max_prompt_length=128,
                     eval_fraction=0.2)
    plan, pipes = _build(cfg, tiny_model_path)
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
    _, pipes = _build(cfg, tiny_model_path)
    assert pipes.train_counts == {"": 38, data.DROP_IDENTICAL: 1, data.DROP_EMPTY: 1}
    rows = _rows(pipes.train)
    assert len(rows) == 40 and len({r["id"] for r in rows}) == 40
    # ids are (file index, row): stable across reads
    assert sorted(r["id"] for r in rows) == sorted(r["id"] for r in _rows(pipes.train))


def test_conversational_in_memory_dataset(ray_cluster, tiny_model_path, tokenizer):
    import datasets

    def conv(i):
        p = demo_pair(i)
        user = [{"role": "user", "content": p["prompt"].split("Human: ")[1].split("\n")[0]}]
        return {"chosen": user + [{"role": "assistant", "content": p["chosen"].strip()}],
                "rejected": user + [{"role": "assistant", "content": p["rejected"].strip()}]}

    ds = datasets.Dataset.from_list([conv(i) for i in range(24)])
    held = datasets.Dataset.from_list([conv(100 + i) for i in range(8)])
    plan, pipes = _build(DataConfig(format="conversational"), tiny_model_path,
                         dataset=ds, eval_dataset=held)
    assert plan.train_layout.chat
    rows = _rows(pipes.train)
    assert len(rows) == 24
    r = rows[0]
    assert tokenizer.decode(r["prompt_ids"]).startswith("<|user|>")
    assert tokenizer.decode(r["prompt_ids"]).endswith("<|assistant|>\n")
    assert tokenizer.decode(r["chosen_ids"]).endswith("<|end|>\n")


def test_column_mapping_and_saved_dataset(ray_cluster, tmp_path, tiny_model_path):
    import datasets

    rows = [demo_pair(i) for i in range(20)]
    renamed = [{"question": r["prompt"], "good": r["chosen"], "bad": r["rejected"]} for r in rows]
    datasets.Dataset.from_list(renamed).save_to_disk(tmp_path / "saved")
    cfg = DataConfig(path=str(tmp_path / "saved"), eval_fraction=0.25,
                     columns=ColumnsConfig(prompt="question", chosen="good", rejected="bad"))
    _, pipes = _build(cfg, tiny_model_path)
    assert pipes.train_counts[""] + pipes.eval_counts[""] == 20


def test_drop_policy_counts_too_long_pairs(ray_cluster, tmp_path, tiny_model_path):
    pairs = [demo_pair(i) for i in range(12)]
    pairs[0] = {**pairs[0], "chosen": " long" * 300}
    f = tmp_path / "p.jsonl"
    f.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    cfg = DataConfig(path=str(f), eval_path=str(f), max_length=128, max_prompt_length=64,
                     truncation="drop")
    _, pipes = _build(cfg, tiny_model_path)
    rows = _rows(pipes.train)
    assert sum(r["drop"] == data.DROP_TOO_LONG for r in rows) == 1


def test_malformed_line_stops_the_scan_with_file_and_line(ray_cluster, tmp_path,
                                                           tiny_model_path):
    f = tmp_path / "bad.jsonl"
    lines = [json.dumps(demo_pair(i)) for i in range(30)]
    lines[17] = lines[17][:-5]
    f.write_text("\n".join(lines) + "\n")
    with pytest.raises(Exception, match=r"bad.jsonl, line 18: not valid JSON"):
        _build(DataConfig(path=str(f)), tiny_model_path)


def test_ray_dataset_source_gets_content_ids(ray_cluster, tiny_model_path):
    import ray.data

    train = ray.data.from_items([demo_pair(i) for i in range(30)])
    held = ray.data.from_items([demo_pair(i, "eval") for i in range(6)])
    _, pipes = _build(DataConfig(), tiny_model_path, dataset=train, eval_dataset=held)
    assert pipes.train_counts == {"": 30} and pipes.eval_counts == {"": 6}
    ids = sorted(r["id"] for r in _rows(pipes.train))
    assert len(set(ids)) == 30 and ids == sorted(r["id"] for r in _rows(pipes.train))


def test_prompt_pipeline_counts_and_metadata(ray_cluster, tiny_model_path, tmp_path):
    """Online RL's prompts on the same pipeline: the demo pairs serve as prompts (their
    other columns as metadata); empty and too-long prompts are counted."""
    from rlhf.config import PromptDataConfig
    from rlhf.prompt_data import DROP_PROMPT_TOO_LONG, PROMPTS

    cfg = PromptDataConfig(demo_pairs=40, demo_eval_pairs=8)
    plan, pipes = _build(cfg, tiny_model_path, kind=PROMPTS)
    rows = _rows(pipes.train)
    assert pipes.train_counts[""] == 40 and len(rows) == 40
    assert all(len(r["prompt_ids"]) > 0 and "chosen" in json.loads(r["metadata"]) for r in rows)
    f = tmp_path / "p.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "What is 1+1?", "answer": "2"}, {"prompt": "", "answer": "x"},
        {"prompt": "word " * 600, "answer": "y"}]) + "\n")
    cfg = PromptDataConfig(path=str(f), eval_path=str(f), max_prompt_length=64)
    plan, pipes = _build(cfg, tiny_model_path, kind=PROMPTS)
    assert pipes.train_counts == {"": 2, data.DROP_EMPTY: 1}
    drops = sorted(r["drop"] for r in _rows(pipes.train))
    assert drops == ["", data.DROP_EMPTY, DROP_PROMPT_TOO_LONG]
