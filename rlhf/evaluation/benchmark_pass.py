"""rlhf.evaluate's benchmark hand-off: both models answer MT-Bench's questions (turn by
turn, each turn after the model's own previous answer) and AlpacaEval's instructions in
the vLLM engine slot rlhf.evaluate uses; the answers are written in each tool's format;
the local judge grades them (rlhf/evaluation/benchmarks.py has the formats and the maths).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from cluster.models import load_tokenizer
from cluster.vllm_engines import sample_seed
from rlhf.core import eval_metrics as em
from rlhf.data.pipeline import encode
from rlhf.evaluation import benchmarks as bm
from rlhf.evaluation.comparison import win_rate
from rlhf.evaluation.judges import continuation_logprobs, judge


def _render(tok, messages: list[dict]) -> list[int]:
    """Token ids of a conversation ending where the assistant answers: the chat template
    with its generation prompt, or hh-rlhf's plain layout without one."""
    if tok.chat_template:
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return encode(tok, text, True)
    text = "".join(f"\n\n{'Human' if m['role'] == 'user' else 'Assistant'}: {m['content']}"
                   for m in messages) + "\n\nAssistant:"
    return encode(tok, text, False)


def _answer(engine, tok, conversations: list[list[dict]], temperatures: list[float],
            seeds: list[int], top_p: float, max_new_tokens: int, max_prompt: int,
            counts: Counter) -> list[str]:
    """One answer per conversation (greedy where the temperature is 0); prompts longer
    than max_prompt keep their end (counted)."""
    import ray

    prompts = []
    for conv in conversations:
        ids = _render(tok, conv)
        if len(ids) > max_prompt:
            counts["prompt cut to fit the engine (kept its end)"] += 1
            ids = ids[-max_prompt:]
        prompts.append(ids)
    out: list[str] = [""] * len(prompts)
    for temp in sorted(set(temperatures)):
        idx = [i for i, t in enumerate(temperatures) if t == temp]
        res = ray.get(engine.generate.remote(
            [prompts[i] for i in idx], n=1, temperature=temp, top_p=top_p if temp else 1.0,
            max_tokens=max_new_tokens, seeds=[seeds[i] for i in idx]))
        for i, r in zip(idx, res):
            out[i] = tok.decode(r[0]["token_ids"], skip_special_tokens=True).strip()
    return out


def mt_bench_answers(engine, tok, questions: list[dict], cfg: Any, seed: int,
                     max_prompt: int, counts: Counter) -> list[list[str]]:
    """Every question's answers, one per turn: turn k+1 is asked after the model's own
    answer to turn k, as FastChat's gen_model_answer does."""
    b = cfg.benchmarks
    answers: list[list[str]] = [[] for _ in questions]
    for k in range(max(len(q["turns"]) for q in questions)):
        todo = [i for i, q in enumerate(questions) if k < len(q["turns"])]
        convs = []
        for i in todo:
            conv = []
            for j in range(k):
                conv += [{"role": "user", "content": questions[i]["turns"][j]},
                         {"role": "assistant", "content": answers[i][j]}]
            convs.append(conv + [{"role": "user", "content": questions[i]["turns"][k]}])
        temps = [bm.MT_BENCH_TEMPERATURE.get(questions[i]["category"], bm.DEFAULT_TEMPERATURE)
                 for i in todo]
        seeds = [sample_seed(seed, f"mt_bench/{k}", i, 1) for i in todo]
        for i, a in zip(todo, _answer(engine, tok, convs, temps, seeds, 1.0,
                                      b.max_new_tokens, max_prompt, counts)):
            answers[i].append(a)
    return answers


def alpaca_eval_outputs(engine, tok, rows: list[dict], cfg: Any, seed: int,
                        max_prompt: int, counts: Counter) -> list[str]:
    g, b = cfg.generation, cfg.benchmarks
    convs = [[{"role": "user", "content": r["instruction"]}] for r in rows]
    seeds = [sample_seed(seed, "alpaca_eval", i, 1) for i in range(len(rows))]
    return _answer(engine, tok, convs, [g.temperature] * len(rows), seeds, g.top_p,
                   b.max_new_tokens, max_prompt, counts)


def grade(engines, judge_path: str, questions: list[dict], answers: list[list[str]],
          max_length: int) -> list[list[float]]:
    """The local judge's expected 1-10 rating of every answer (per question, per turn)."""
    tok = load_tokenizer(judge_path)
    groups, where = [], []
    for qi, (q, ans) in enumerate(zip(questions, answers)):
        for k in range(len(ans)):
            text = bm.grade_text(q["turns"], ans, k)
            question, focus = text.rsplit("\n\n", 1)
            if tok.chat_template:
                lead = tok.apply_chat_template([{"role": "user", "content": question}],
                                               tokenize=False, add_generation_prompt=True)
                lead, templated = lead + focus, True
            else:
                lead, templated = question + "\n\n" + focus, False
            ids = [encode(tok, f"{lead}{r}]]", templated) for r in bm.RATINGS]
            cut = max(0, max(map(len, ids)) - (max_length - 1))  # keep the end
            groups.append([x[cut:] for x in ids])
            where.append(qi)
    out: list[list[float]] = [[] for _ in questions]
    for qi, lps in zip(where, continuation_logprobs(engines, judge_path, groups)):
        out[qi].append(bm.expected_rating(lps))
    return out


def model_ids(cfg: Any, setup: Any) -> tuple[str, str]:
    """Names of the two models in the exported files (FastChat names answers by file)."""
    def name(path: str) -> str:
        p = Path(path)
        return p.parent.name if p.name == "model" else p.name

    aligned = cfg.benchmarks.model_id or (setup.run_dir.name if setup.run_dir
                                          else name(setup.aligned))
    base = name(setup.base)
    return aligned, base if base != aligned else f"{base}-base"


def run(cfg: Any, setup: Any, engines: Any) -> dict:
    """Both models through the configured benchmarks; the local judge (the evaluation's
    own: rlhf/evaluation/judges.py) where there is one. Returns {"results": {...},
    "export": {benchmark: (questions, answers)}} (`write` puts the export in files once
    rlhf.evaluate's run directory exists)."""
    b = cfg.benchmarks
    aligned_id, base_id = model_ids(cfg, setup)
    paths = {aligned_id: setup.aligned, base_id: setup.base}
    counts: Counter = Counter()
    need = b.max_prompt_length + b.max_new_tokens
    results: dict = {"model_ids": {"aligned": aligned_id, "base": base_id}}
    export: dict[str, Any] = {}
    def each_model(answer, asked):  # one model after the other in the engine slot
        return {mid: answer(engines.get(path, need), load_tokenizer(path), asked, cfg,
                            setup.seed, b.max_prompt_length, counts)
                for mid, path in paths.items()}

    if b.mt_bench:
        questions = bm.load_mt_bench(b.mt_bench, b.max_questions)
        answers = each_model(mt_bench_answers, questions)
        export["mt_bench"] = (questions, answers)
        r = {"questions": len(questions), "turns": sum(len(q["turns"]) for q in questions)}
        if setup.judge == "pairwise":  # a judge LM grades; a reward model cannot
            ratings = {mid: grade(engines, setup.judge_path, questions, ans,
                                  cfg.judge.max_length) for mid, ans in answers.items()}
            for mid, key in ((aligned_id, "aligned"), (base_id, "base")):
                flat = [x for q in ratings[mid] for x in q]
                mean, lo, hi = bm.mean_interval([sum(q) / len(q) for q in ratings[mid]],
                                                seed=setup.seed)
                per_turn = [[q[k] for q in ratings[mid] if len(q) > k]
                            for k in range(max(map(len, ratings[mid])))]
                r[key] = {"score": mean, "ci95": [lo, hi], "answers": len(flat),
                          "per_turn": [sum(t) / len(t) for t in per_turn]}
            diff = [sum(a) / len(a) - sum(c) / len(c)
                    for a, c in zip(ratings[aligned_id], ratings[base_id])]
            mean, lo, hi = bm.mean_interval(diff, seed=setup.seed)
            r["difference"] = {"score": mean, "ci95": [lo, hi]}
            r["judge"] = setup.judge_path
            r["ratings"] = ratings
        else:
            r["judge"] = ("none: MT-Bench grading needs a judge LM (judge.model); a reward "
                          "model gives no 1-10 rating")
        results["mt_bench"] = r
    if b.alpaca_eval:
        rows = bm.load_alpaca_eval(b.alpaca_eval, b.max_questions)
        outputs = each_model(alpaca_eval_outputs, rows)
        export["alpaca_eval"] = (rows, outputs)
        items = [{"id": i, "prompt": json.dumps([{"role": "user", "content": r["instruction"]}]),
                  "chat": True} for i, r in enumerate(rows)]
        judged = judge(cfg, setup, engines, items, [[o] for o in outputs[aligned_id]],
                       [[o] for o in outputs[base_id]])
        tol = cfg.judge.tie_tolerance if setup.judge == "reward_model" else 0.0
        won = win_rate([em.outcomes([a], [c], tol)
                        for a, c in zip(judged["aligned"], judged["base"])], setup.seed)
        results["alpaca_eval"] = {"instructions": len(rows), "win_rate": won.pop("rate"),
                                  **won, "judge": f"{setup.judge} {setup.judge_path}"}
    if counts:
        results["left_out"] = dict(counts)
    return {"results": results, "export": export}


def write(out_dir: Path, ran: dict) -> list[str]:
    """The exported files under out_dir/benchmarks/, and the official judges' commands
    (also written to benchmarks/COMMANDS.txt)."""
    root = out_dir / "benchmarks"
    ids = ran["results"]["model_ids"]
    if "mt_bench" in ran["export"]:
        questions, answers = ran["export"]["mt_bench"]
        bm.write_mt_bench(root, questions, answers)
    if "alpaca_eval" in ran["export"]:
        rows, outputs = ran["export"]["alpaca_eval"]
        bm.write_alpaca_eval(root, rows, outputs)
    cmds = bm.official_commands(root, ids["aligned"], ids["base"], list(ran["export"]))
    (root / "COMMANDS.txt").write_text("\n\n".join(cmds) + "\n")
    return cmds
