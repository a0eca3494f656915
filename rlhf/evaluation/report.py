"""The evaluation report (rlhf.evaluate): plots as PNG files and one self-contained HTML
page (the same plots embedded, the verdict, the flags in words, a table of measures and
example pairs side by side), which opens from disk, in any browser, with no network; and
the same results in a few lines for the console (`describe`).
"""

from __future__ import annotations

import base64
import html
import json
import random
from pathlib import Path

from rlhf.core.eval_metrics import WORKING, WORSE, repeated_ngram_rate
from rlhf.evaluation import general_tasks

COLORS = {"base": "#8c8c8c", "aligned": "#1f77b4"}


def _plots(out: Path, results: dict, samples: list[dict]) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = {}
    w = results["win_rate"]

    fig, ax = plt.subplots(figsize=(7, 2.4))
    n = max(w["comparisons"], 1)
    left = 0.0
    for key, color in (("wins", "#2ca02c"), ("ties", "#bbbbbb"), ("losses", "#d62728")):
        share = w[key] / n
        ax.barh([0], [share], left=left, color=color, height=0.5,
                label=f"{key} {w[key]} ({share:.0%})")
        left += share
    ax.errorbar([w["rate"]], [0.55], xerr=[[w["rate"] - w["ci95"][0]],
                                            [w["ci95"][1] - w["rate"]]],
                fmt="o", color="black", capsize=6, label=f"win rate {w['rate']:.1%} (95% CI)")
    ax.axvline(WORSE, color="#d62728", ls="--", lw=1)
    ax.axvline(WORKING, color="#2ca02c", ls="--", lw=1)
    ax.text(WORSE, 0.95, " 50%: worse below", fontsize=8, va="top", ha="right")
    ax.text(WORKING, 0.95, " 55%: working above", fontsize=8, va="top")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.4, 1.0)
    ax.set_yticks([])
    ax.set_xlabel("share of comparisons (aligned vs base)")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.35), ncol=4, fontsize=8,
              frameon=False)
    paths["win_rate"] = _save(fig, out / "win_rate.png", plt)

    fig, ax = plt.subplots(figsize=(7, 3))
    ja = [x for s in samples for x in s["judge_aligned"]]
    jb = [x for s in samples for x in s["judge_base"]]
    if results["judge"]["kind"] == "reward_model":
        bins = _bins(ja + jb)
        ax.hist(jb, bins=bins, alpha=0.6, color=COLORS["base"], label="base")
        ax.hist(ja, bins=bins, alpha=0.6, color=COLORS["aligned"], label="aligned")
        ax.set_xlabel("reward model score")
        ax.set_title("Reward of each response", fontsize=10)
    else:
        labels = ["aligned preferred", "tie", "base preferred"]
        counts = [sum(x > 0 for x in ja), sum(x == 0 for x in ja), sum(x < 0 for x in ja)]
        ax.bar(labels, counts, color=["#2ca02c", "#bbbbbb", "#d62728"])
        ax.set_title("Pairwise judge verdicts", fontsize=10)
    ax.set_ylabel("responses")
    ax.legend(fontsize=8) if results["judge"]["kind"] == "reward_model" else None
    paths["rewards"] = _save(fig, out / "rewards.png", plt)

    fig, axes = plt.subplots(1, 2, figsize=(9, 3))
    la = [x for s in samples for x in s["aligned_tokens"]]
    lb = [x for s in samples for x in s["base_tokens"]]
    bins = _bins(la + lb, integer=True)
    axes[0].hist(lb, bins=bins, alpha=0.6, color=COLORS["base"], label="base")
    axes[0].hist(la, bins=bins, alpha=0.6, color=COLORS["aligned"], label="aligned")
    axes[0].set_xlabel("response length (tokens)")
    axes[0].set_ylabel("responses")
    axes[0].legend(fontsize=8)
    ra = [repeated_ngram_rate(t) for s in samples for t in s["aligned"]]
    rb = [repeated_ngram_rate(t) for s in samples for t in s["base"]]
    rbins = [i / 20 for i in range(21)]
    axes[1].hist(rb, bins=rbins, alpha=0.6, color=COLORS["base"], label="base")
    axes[1].hist(ra, bins=rbins, alpha=0.6, color=COLORS["aligned"], label="aligned")
    axes[1].axvline(0.5, color="#d62728", ls="--", lw=1)
    axes[1].set_xlabel("repeated 4-gram rate (>= 0.5: stuck in a loop)")
    axes[1].legend(fontsize=8)
    paths["lengths"] = _save(fig, out / "lengths_repetition.png", plt)
    return paths


def _bins(values: list[float], integer: bool = False, n: int = 30):
    if not values:
        return 10
    lo, hi = min(values), max(values)
    if integer:
        step = max(1, int((hi - lo) / n) + 1)
        return list(range(int(lo), int(hi) + step + 1, step))
    if hi <= lo:
        return [lo - 0.5, lo + 0.5]
    return [lo + (hi - lo) * i / n for i in range(n + 1)]


def _save(fig, path: Path, plt) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img class="plot" alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _examples(samples: list[dict], k: int = 4, seed: int = 0) -> list[tuple[str, dict, int]]:
    """(why shown, sample, index) for the clearest wins, the clearest losses and a few
    picked at random."""
    flat = [(s, i, s["judge_aligned"][i] - s["judge_base"][i]) for s in samples
            for i in range(len(s["aligned"]))]
    flat.sort(key=lambda x: x[2])
    losses = [("aligned lost", s, i) for s, i, d in flat[:k] if d < 0]
    wins = [("aligned won", s, i) for s, i, d in reversed(flat[-k:]) if d > 0]
    shown = {(id(s), i) for _, s, i in losses + wins}
    rest = [(s, i) for s, i, _ in flat if (id(s), i) not in shown]
    picks = random.Random(seed).sample(rest, min(k, len(rest)))
    return wins + losses + [("random", s, i) for s, i in picks]


def _prompt_text(prompt: str) -> str:
    try:
        msgs = json.loads(prompt)
        if isinstance(msgs, list):
            return "\n".join(f"{m['role']}: {m['content']}" for m in msgs)
    except (ValueError, TypeError, KeyError):
        pass
    return prompt


def write_report(out: Path, results: dict, samples: list[dict]) -> Path:
    """PNG plots and report.html in `out`; returns the page's path."""
    plots = _plots(out, results, samples)
    e = html.escape
    w, st = results["win_rate"], results["stats"]
    verdict_color = {"working": "#2ca02c", "worse": "#d62728"}.get(w["verdict"], "#b8860b")
    rows = [("mean judge score", results["judge_scores"]["base"],
             results["judge_scores"]["aligned"])]
    for key, label in (("length_tokens", "response length (tokens)"),
                       ("length_words", "response length (words)"),
                       ("distinct_1", "distinct-1"), ("distinct_2", "distinct-2"),
                       ("repeated_4gram_rate", "repeated 4-gram rate"),
                       ("loop_share", "share stuck in a loop"),
                       ("truncated_share", "share cut at the token limit")):
        rows.append((label, st["base"][key], st["aligned"][key]))
    table = "".join(f"<tr><td>{e(label)}</td><td>{b:.3f}</td><td>{a:.3f}</td></tr>"
                    for label, b, a in rows)
    kl = results["kl"]
    extra = [f"KL of the aligned model to its base: <b>{kl['per_token']:.4f}</b> nats per "
             f"token, {kl['per_response']:.3f} per response (on the aligned responses)"]
    if "preference" in results:
        p = results["preference"]
        extra.append(f"Held-out preference accuracy (DPO implicit reward, beta {p['beta']}): "
                     f"<b>{p['accuracy']:.1%}</b> over {p['pairs']} pairs, mean margin "
                     f"{p['margin']:.4f}")
    if results["judge"].get("first_position_share") is not None:
        both = ", both asked" if results["judge"]["both_orders"] else ""
        extra.append(f"Pairwise judge picked the first position in "
                     f"{results['judge']['first_position_share']:.0%} of its answers "
                     f"(orders randomised{both})")
    flags = results["flags"]
    flag_html = ("".join(f'<li class="flag"><b>{e(f["flag"])}</b>: {e(f["message"])}</li>'
                         for f in flags)
                 if flags else '<li class="ok">No sign of degeneration or drift: the aligned '
                               "model's responses are as varied, as long and as loop-free "
                               "as its base's, within the thresholds.</li>")
    ex_rows = []
    for why, s, i in _examples(samples):
        outcome = {1: "aligned", 0: "tie", -1: "base"}[s["outcome"][i]]
        ex_rows.append(
            f"<tr><td>{e(why)}<br><small>row {s['id']}</small></td>"
            f"<td><pre>{e(_prompt_text(s['prompt'])[-600:])}</pre></td>"
            f"<td><pre>{e(s['base'][i])}</pre><small>score {s['judge_base'][i]:.3f}</small></td>"
            f"<td><pre>{e(s['aligned'][i])}</pre><small>score {s['judge_aligned'][i]:.3f}"
            f"</small></td><td>{outcome}</td></tr>")
    d = results["data"]
    dropped = ", ".join(f"{n} {r}" for r, n in {**d["dropped"], **d["left_out"]}.items())
    more = _benchmarks_html(results.get("benchmarks"), results.get("general_tasks"))
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>Evaluation: {e(Path(results['aligned']).name)} vs base</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto;
        padding: 0 1em; color: #222; }}
h1 {{ font-size: 1.4em; }} h2 {{ font-size: 1.15em; margin-top: 1.6em; }}
.verdict {{ border-left: 6px solid {verdict_color}; padding: .6em 1em; background: #f6f6f6; }}
table {{ border-collapse: collapse; width: 100%; }}
td, th {{ border: 1px solid #ddd; padding: .35em .5em; vertical-align: top; text-align: left; }}
pre {{ white-space: pre-wrap; margin: 0; font-size: .85em; }}
.plot {{ max-width: 100%; display: block; margin: .6em 0; }}
.flag {{ color: #a00; }} .ok {{ color: #2a7d2a; }} small {{ color: #666; }}
</style></head><body>
<h1>Aligned model vs its base</h1>
<p><b>aligned</b> {e(results['aligned'])}<br><b>base</b> {e(results['base'])}<br>
<b>judge</b> {e(results['judge']['kind'])}: {e(results['judge']['path'])}<br>
<b>prompts</b> {d['prompts']} held-out prompts x {d['samples_per_prompt']} sample(s) from
{e(str(d['source']))}{' (left out: ' + e(dropped) + ')' if dropped else ''}</p>
<div class="verdict"><b>Win rate {w['rate']:.1%}</b> (95% CI {w['ci95'][0]:.1%} to
{w['ci95'][1]:.1%}; {w['wins']} wins, {w['ties']} ties, {w['losses']} losses):
{e(w['says'])}</div>
{_img(plots['win_rate'], 'win rate with its 95% interval')}
<h2>Degeneration and drift</h2>
<ul>{flag_html}</ul>
<p>{'<br>'.join(extra)}</p>
<table><tr><th>measure</th><th>base</th><th>aligned</th></tr>{table}</table>
{_img(plots['rewards'], 'judge scores of base and aligned responses')}
{_img(plots['lengths'], 'response lengths and repetition')}
{more}
<h2>Examples</h2>
<table><tr><th></th><th>prompt</th><th>base</th><th>aligned</th><th>better</th></tr>
{''.join(ex_rows)}</table>
<p><small>All per-prompt samples: samples.jsonl; every figure: results.json.</small></p>
<script>
// a check for headless browsers (and people): every plot decoded
window.addEventListener("load", function () {{
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.length > 0 && imgs.every(function (i) {{
    return i.complete && i.naturalWidth > 0; }});
  document.body.setAttribute("data-plots", ok ? "ok:" + imgs.length : "broken");
}});
</script>
</body></html>
"""
    path = out / "report.html"
    path.write_text(page)
    return path


def _benchmarks_html(b: dict | None, general: list | None) -> str:
    """MT-Bench / AlpacaEval (local judge) and general tasks, as tables; "" when none ran."""
    e = html.escape
    parts = []
    if b:
        rows = [f"<tr><td>{e(name)}</td><td>{base}</td><td>{aligned}</td><td>{e(change)}</td></tr>"
                for name, base, aligned, change in _benchmark_rows(b)]
        parts.append("<h2>Benchmarks</h2><table><tr><th>benchmark</th><th>base</th><th>"
                     "aligned</th><th>difference</th></tr>" + "".join(rows) + "</table>"
                     "<p><small>Files for the official judges (they need an OpenAI key) and "
                     "their commands: benchmarks/COMMANDS.txt</small></p>")
    if general:
        flagged = ' class="flag"'
        rows = "".join(
            f"<tr{flagged if r['worse_beyond_noise'] else ''}><td>{e(r['task'])} "
            f"{e(r['metric'])}</td><td>{r['base']:.3f}</td><td>{r['aligned']:.3f}</td><td>"
            f"{r['difference']:+.3f} &plusmn; {r['difference_stderr']:.3f}"
            f"{' (worse beyond noise)' if r['worse_beyond_noise'] else ''}</td></tr>"
            for r in general)
        parts.append("<h2>General tasks (lm-evaluation-harness)</h2><table><tr><th>task"
                     "</th><th>base</th><th>aligned</th><th>difference (paired SE)</th></tr>"
                     + rows + "</table>")
    return "\n".join(parts)


def describe(out: Path) -> str:
    """The report's headline figures and flags, for the console."""
    r = json.loads((out / "results.json").read_text())
    w = r["win_rate"]
    lines = [f"win rate of the aligned model against its base: {w['rate']:.1%} (95% CI "
             f"{w['ci95'][0]:.1%}-{w['ci95'][1]:.1%}; {w['wins']} wins, {w['ties']} ties, "
             f"{w['losses']} losses): {w['says']}"]
    if "preference" in r:
        p = r["preference"]
        lines.append(f"held-out preference accuracy (implicit reward, beta {p['beta']}): "
                     f"{p['accuracy']:.1%} over {p['pairs']} pairs, margin {p['margin']:.3f}")
    lines.append(f"KL to the base: {r['kl']['per_token']:.3f} nats per token")
    lines += [f"warning [{f['flag']}]: {f['message']}" for f in r["flags"]]
    lines += describe_benchmarks(r.get("benchmarks"), out)
    if r.get("general_tasks"):
        lines += ["general tasks (aligned - base):"] + general_tasks.describe(r["general_tasks"])
    lines.append(f"report: {out / 'report.html'}\n  results: {out / 'results.json'}\n  "
                 f"samples: {out / 'samples.jsonl'}")
    return "\n".join(lines)


def describe_benchmarks(b: dict | None, out: Path) -> list[str]:
    """The benchmarks' lines of `describe`: local-judge scores and the official commands."""
    if not b:
        return []
    rows = _benchmark_rows(b)
    lines = ["benchmarks (base | aligned | difference; 95% intervals):"] if rows else []
    lines += [f"  {name}: {base or '-'} | {aligned} | {change}"
              for name, base, aligned, change in rows]
    mt = b.get("mt_bench")
    if mt and "aligned" not in mt:
        lines.append(f"MT-Bench: answers exported, not graded ({mt['judge']})")
    lines.append(f"benchmark files: {out / 'benchmarks'}; the official judges need an "
                 "OpenAI key, their commands:")
    lines += b["official_commands"]
    return lines


def _benchmark_rows(b: dict) -> list[tuple[str, str, str, str]]:
    """(benchmark, base, aligned, difference or verdict) of what the local judge graded:
    the rows of the report's table and of the console's lines."""
    rows = []
    mt, ae = b.get("mt_bench"), b.get("alpaca_eval")
    if mt and "aligned" in mt:
        rows.append((f"MT-Bench, {mt['questions']} questions (1-10, local judge)",
                     _with_ci(mt["base"]), _with_ci(mt["aligned"]),
                     _with_ci(mt["difference"], signed=True)))
    if ae:
        rows.append((f"AlpacaEval, {ae['instructions']} instructions (win rate against the "
                     "base, local judge)", "",
                     f"{ae['win_rate']:.1%} ({ae['ci95'][0]:.1%}-{ae['ci95'][1]:.1%})",
                     ae["verdict"]))
    return rows


def _with_ci(x: dict, signed: bool = False) -> str:
    """A score with its 95% interval: "5.20 (4.90-5.50)", signed "+0.30 (-0.10 to +0.70)"."""
    f, sep = ("+.2f", " to ") if signed else (".2f", "-")
    return f"{x['score']:{f}} ({x['ci95'][0]:{f}}{sep}{x['ci95'][1]:{f}})"
