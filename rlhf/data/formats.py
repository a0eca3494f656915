"""Public preference sets recognised by their columns, so they load with no column flags.

    argilla/ultrafeedback-binarized-preferences
        instruction, chosen_response, rejected_response, chosen_avg_rating,
        rejected_avg_rating, chosen_model, rejected_model, source
        -> prompt [user], chosen [assistant], rejected [assistant], score_chosen,
           score_rejected (the ratings), the other columns kept as they are
    HuggingFaceH4/ultrafeedback_binarized
        prompt, chosen / rejected (message lists holding the user turn too),
        score_chosen, score_rejected, messages (the *_sft splits)
        -> read as they are (the generic conversational format); the scores act through
           rlhf.data.pipeline (data.min_score_gap, data.columns.margin=score_gap)
    OpenAssistant/oasst1, oasst2 (one row per message)
        message_id, parent_id, message_tree_id, role (prompter | assistant), text, rank,
        lang, deleted, review_result, ...
        -> trees rebuilt in Ray Data (grouped by message_tree_id), then per entry point:
           pairs (rlhf.dpo, rlhf.rm), the top-ranked thread (rlhf.sft), every prompter
           turn with the conversation before it (rlhf.ppo)

A recognised format wraps the entry point's own layout (rlhf.data.pipeline.Layout,
rlhf.data.examples.SFTLayout, rlhf.data.prompts.PromptLayout): rows are rewritten into
the generic columns and then normalised, counted and tokenised exactly like any other
data. OpenAssistant pairing rule: at every prompter turn, the best-ranked assistant reply
(rank 0) is paired with each lower-ranked sibling (k ranked replies -> k-1 pairs). Every
pair then teaches what the SFT thread teaches (the top reply), the count grows linearly
with the siblings rather than quadratically (all k(k-1)/2 pairs would let trees with many
replies dominate), and pairs between two poor replies, whose order the rankers agree on
least, are left out. The reward model's margin (`data.columns.margin= score_gap`) is the
rank difference.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

ULTRAFEEDBACK_ARGILLA = "argilla/ultrafeedback-binarized-preferences"
OASST = "OpenAssistant (oasst1/oasst2 message table)"

ARGILLA_COLUMNS = ("instruction", "chosen_response", "rejected_response")
OASST_COLUMNS = ("message_id", "parent_id", "message_tree_id", "role", "text")
SCORE_COLUMNS = ("score_chosen", "score_rejected")
SCORE_GAP = "score_gap"  # data.columns.margin=score_gap: the score difference

# Why an OpenAssistant message (or turn) gave no row; counted like any drop.
DROP_DELETED = "message deleted (oasst)"
DROP_UNREVIEWED = "message not accepted in review (oasst)"
DROP_LANG = "message in another language (data.lang)"
DROP_BELOW = "message below a left-out one (oasst)"
DROP_FEW_RANKED = "prompter turn with fewer than two ranked replies (oasst)"
DROP_NO_REPLY = "tree without an assistant reply (oasst)"


def recognise(row: dict) -> str:
    """The known format a raw row is in, or "" for the generic ones."""
    if all(c in row for c in OASST_COLUMNS):
        return OASST
    if all(c in row for c in ARGILLA_COLUMNS) and "chosen" not in row:
        return ULTRAFEEDBACK_ARGILLA
    return ""


def stable_id(*parts: Any) -> int:
    """A non-negative int64 from strings: row ids that do not depend on read order."""
    h = hashlib.blake2b("\x1f".join(str(p) for p in parts).encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little") >> 1


# ------------------------------------------------------------------------- UltraFeedback


def from_argilla(row: dict) -> dict:
    """argilla/ultrafeedback-binarized-preferences row -> the generic conversational
    columns; the ratings become score_chosen / score_rejected."""
    out = {k: v for k, v in row.items()
           if k not in ARGILLA_COLUMNS + ("chosen_avg_rating", "rejected_avg_rating")}
    out["prompt"] = [{"role": "user", "content": row.get("instruction")}]
    out["chosen"] = [{"role": "assistant", "content": row.get("chosen_response")}]
    out["rejected"] = [{"role": "assistant", "content": row.get("rejected_response")}]
    out["score_chosen"] = row.get("chosen_avg_rating")
    out["score_rejected"] = row.get("rejected_avg_rating")
    return out


@dataclass(frozen=True)
class Rewritten:
    """A layout whose rows are rewritten into generic columns first (UltraFeedback)."""

    inner: Any  # the entry point's layout, detected on a rewritten row
    source_format: str

    @property
    def chat(self) -> bool:
        return self.inner.chat

    def table(self, ids: list[int], rows: list[dict]):
        return self.inner.table(ids, [from_argilla(r) for r in rows])


# ------------------------------------------------------------------------ OpenAssistant

MESSAGE_FIELDS = ("message_id", "parent_id", "message_tree_id", "role", "text", "rank",
                  "lang", "deleted", "review_result", "created_date")


@dataclass(frozen=True)
class OasstTrees:
    """OpenAssistant messages -> rows of the entry point's kind, a tree at a time.

    Reading yields the message table (`table`); `regroup` rebuilds the trees in Ray Data
    and hands each tree's rows to `inner` (the kind's own layout), adding a `group`
    column (the tree) so the held-out split keeps whole trees on one side.
    """

    inner: Any
    kind: str  # "pairs", "examples" or "prompts" (rlhf.data.pipeline.RowKind.name)
    langs: tuple[str, ...] = ()  # data.lang; () keeps every language
    reviewed: bool = True  # the table has review_result: leave out what failed review
    source_format: str = OASST

    @property
    def chat(self) -> bool:
        return True

    def table(self, ids: list[int], rows: list[dict]):
        import pyarrow as pa

        cols = {f: [r.get(f) for r in rows] for f in MESSAGE_FIELDS}
        strings = ("message_id", "parent_id", "message_tree_id", "role", "text", "lang",
                   "created_date")
        return pa.table({
            **{f: pa.array([None if v is None else str(v) for v in cols[f]], pa.string())
               for f in strings},
            "rank": pa.array([_number(v) for v in cols["rank"]], pa.float64()),
            "deleted": pa.array([bool(v) if v is not None else None for v in cols["deleted"]],
                                pa.bool_()),
            "review_result": pa.array([bool(v) if v is not None else None
                                       for v in cols["review_result"]], pa.bool_()),
        })

    def regroup(self, ds, partitions: int | None = None):
        return ds.groupby("message_tree_id", num_partitions=partitions).map_groups(
            _tree_table, batch_format="pyarrow", fn_kwargs={"layout": self})


def _number(v: Any) -> float | None:
    try:
        return float(v) if v is not None else None
    except (TypeError, ValueError):
        return None


def _tree_table(batch, layout: OasstTrees):
    """map_groups body: one tree's messages -> its rows (the kind's normalised table)."""
    import pyarrow as pa

    messages = batch.to_pylist()
    rows, ids, drops = tree_rows(messages, layout.kind, layout.langs, layout.reviewed)
    out_ids = [i for i, _ in rows] + ids
    table = layout.inner.table(out_ids, [r for _, r in rows] + [{} for _ in ids])
    reasons = table.column("drop").to_pylist()
    reasons[len(rows):] = drops
    table = table.set_column(table.schema.get_field_index("drop"), "drop",
                             pa.array(reasons, pa.string()))
    tree = messages[0]["message_tree_id"] if messages else ""
    return table.append_column("group", pa.array([stable_id(tree)] * len(out_ids),
                                                 pa.int64()))


def _conversation(path: list[dict]) -> list[dict]:
    return [{"role": "user" if m["role"] == "prompter" else "assistant",
             "content": m["text"]} for m in path]


def _order(m: dict) -> tuple:
    # Best first: ranked before unranked, then by rank, then the earlier message.
    return (m.get("rank") is None, m.get("rank") or 0.0, m.get("created_date") or "",
            m["message_id"])


def tree_rows(messages: list[dict], kind: str, langs: tuple[str, ...] = (),
              reviewed: bool = True) -> tuple[list[tuple[int, dict]], list[int], list[str]]:
    """One tree's messages -> ([(row id, generic row)], [drop row ids], [drop reasons]).

    kind "pairs": {prompt, chosen, rejected, score_gap} per lower-ranked reply (see the
    module docstring); "examples": {messages}, the top-ranked thread; "prompts":
    {prompt} per prompter turn (the conversation up to and including it). Deleted,
    unreviewed and other-language messages are left out with everything below them,
    each counted.
    """
    by_id = {m["message_id"]: m for m in messages}
    children: dict[Any, list[dict]] = {}
    for m in messages:
        children.setdefault(m.get("parent_id"), []).append(m)
    drop_ids: list[int] = []
    drops: list[str] = []

    def left_out(m: dict) -> str:
        if m.get("deleted"):
            return DROP_DELETED
        if reviewed and m.get("review_result") is not True:
            return DROP_UNREVIEWED
        if langs and m.get("lang") not in langs:
            return DROP_LANG
        return ""

    def drop(key: str, reason: str) -> None:
        drop_ids.append(stable_id(key, reason))
        drops.append(reason)

    def drop_subtree(m: dict, reason: str) -> None:
        drop(m["message_id"], reason)
        for c in children.get(m["message_id"], []):
            drop_subtree(c, DROP_BELOW)

    kept: dict[str, list[dict]] = {}  # message id -> its kept children, best first

    def keep(ms: list[dict]) -> list[dict]:
        """The messages of `ms` that stay, each walked below; the others dropped with
        everything under them."""
        out = []
        for m in ms:
            reason = left_out(m)
            if reason:
                drop_subtree(m, reason)
            else:
                out.append(m)
                kept[m["message_id"]] = sorted(keep(children.get(m["message_id"], [])),
                                               key=_order)
        return out

    roots = [m for m in messages if m.get("parent_id") is None or m["parent_id"] not in by_id]
    live_roots = keep(roots)

    rows: list[tuple[int, dict]] = []

    def path_to(m: dict) -> list[dict]:
        path = [m]
        while path[-1].get("parent_id") in by_id:
            path.append(by_id[path[-1]["parent_id"]])
        return path[::-1]

    prompter_turns = [m for m in messages if m["message_id"] in kept and m["role"] == "prompter"]
    if kind == "pairs":
        for p in prompter_turns:
            ranked = [c for c in kept[p["message_id"]]
                      if c["role"] == "assistant" and c.get("rank") is not None]
            if len(ranked) < 2:
                drop(p["message_id"], DROP_FEW_RANKED)
                continue
            prompt = _conversation(path_to(p))
            best = ranked[0]
            for worse in ranked[1:]:
                rows.append((stable_id(best["message_id"], worse["message_id"]), {
                    "prompt": prompt,
                    "chosen": _conversation([best]), "rejected": _conversation([worse]),
                    SCORE_GAP: float(worse["rank"] - best["rank"]),
                    "message_tree_id": p["message_tree_id"]}))
    elif kind == "examples":
        for r in live_roots:
            thread = [r]
            while kept.get(thread[-1]["message_id"]):
                thread.append(kept[thread[-1]["message_id"]][0])
            while thread and thread[-1]["role"] != "assistant":
                thread.pop()
            if not thread:
                drop(r["message_id"], DROP_NO_REPLY)
                continue
            rows.append((stable_id(r["message_id"], "thread"),
                         {"messages": _conversation(thread)}))
    else:
        for p in prompter_turns:
            rows.append((stable_id(p["message_id"], "prompt"),
                         {"prompt": _conversation(path_to(p)),
                          "message_tree_id": p["message_tree_id"]}))
    return rows, drop_ids, drops


# ------------------------------------------------------------------------------ detect


def sample_row(fmt: str, kind: str, row: dict) -> dict:
    """A generic row of the shape the format will produce, to detect the inner layout."""
    if fmt == ULTRAFEEDBACK_ARGILLA:
        return from_argilla(row)
    turn = [{"role": "user", "content": "q"}]
    reply = [{"role": "assistant", "content": "a"}]
    return {"pairs": {"prompt": turn, "chosen": reply, "rejected": reply, SCORE_GAP: 1.0},
            "examples": {"messages": turn + reply},
            "prompts": {"prompt": turn}}[kind]


def wrap(fmt: str, inner: Any, kind: str, langs: tuple[str, ...], first_row: dict) -> Any:
    """The layout for a recognised format around the kind's own layout."""
    if fmt == ULTRAFEEDBACK_ARGILLA:
        return Rewritten(inner, fmt)
    return OasstTrees(inner, kind, langs, reviewed="review_result" in first_row)


def describe(fmt: str) -> str:
    return {ULTRAFEEDBACK_ARGILLA: "UltraFeedback (argilla's binarized preferences)",
            OASST: "OpenAssistant message trees"}.get(fmt, fmt)

