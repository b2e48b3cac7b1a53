"""Verdicts and the written table (`fidelity.md`) of a fidelity run.

A row is **reproduced** when our ASR after the defence is within 3 points of the paper's
(or both are <= 5%) and our ACC drop (before -> after) is within 2 points of the paper's
drop. Drops, not absolute accuracies, are compared: our CIFAR-10 is a JPEG copy (about 2
points lower clean accuracy) and our victims train on 95% of the training set.
"""
from __future__ import annotations

from .rows import AMPLIFIED, ROWS, Row

ASR_TOLERANCE, ACC_DROP_TOLERANCE, BOTH_SAFE = 3.0, 2.0, 5.0


def asr_matches(ours: float, paper: float) -> bool:
    return abs(ours - paper) <= ASR_TOLERANCE or (ours <= BOTH_SAFE and paper <= BOTH_SAFE)


def judge(row: Row, before: dict, after: dict) -> dict:
    """Deltas and verdict of a defence row from our before / after metrics (percent)."""
    metric = row.asr_metric
    (p_acc0, p_asr0), (p_acc1, p_asr1) = row.paper_before, row.paper_after
    acc0, asr0, acc1, asr1 = before["acc"], before[metric], after["acc"], after[metric]
    paper_drop, our_drop = p_acc0 - p_acc1, acc0 - acc1
    asr_ok = asr_matches(asr1, p_asr1)
    drop_ok = abs(our_drop - paper_drop) <= ACC_DROP_TOLERANCE
    reasons = []
    if not asr_ok:
        reasons.append(f"ASR after {asr1:.2f} vs paper {p_asr1:.2f} (|delta| {abs(asr1 - p_asr1):.2f} > "
                       f"{ASR_TOLERANCE:g}, not both <= {BOTH_SAFE:g})")
    if not drop_ok:
        reasons.append(f"ACC drop {our_drop:.2f} vs paper {paper_drop:.2f} (|delta| "
                       f"{abs(our_drop - paper_drop):.2f} > {ACC_DROP_TOLERANCE:g})")
    notes = []
    if abs(asr0 - p_asr0) > ASR_TOLERANCE:
        notes.append(f"our victim's ASR before is {asr0:.2f}, the paper's {p_asr0:.2f}: the comparison is weak")
    return {"verdict": "reproduced" if asr_ok and drop_ok else "not reproduced", "reasons": reasons, "notes": notes,
            "delta_asr_after": asr1 - p_asr1, "acc_drop": our_drop, "paper_acc_drop": paper_drop,
            "delta_acc_drop": our_drop - paper_drop}


def judge_amplified(row: Row, done: dict) -> dict:
    """The amplified-trigger row from the finished rows it reads: x1 (the row's own ASR
    metric, Eq. 9), x4, x9 per defence, each compared as an ASR."""
    table, reasons = {}, []
    for source in row.derived_from:
        rec = done[source]
        defense = rec["defense"]
        ours = (rec["after"][ROWS[source].asr_metric], rec["after"].get("asr_x4"), rec["after"].get("asr_x9"))
        paper = row.paper_amplified[defense]
        cells = []
        for copies, o, p in zip(AMPLIFIED, ours, paper):
            ok = o is not None and asr_matches(o, p)
            cells.append({"copies": copies, "ours": o, "paper": p, "ok": ok})
            if not ok:
                reasons.append(f"{defense} x{copies}: ASR {o if o is None else round(o, 2)} vs paper {p:.2f}")
        table[defense] = cells
    return {"verdict": "reproduced" if not reasons else "not reproduced", "reasons": reasons, "notes": [],
            "amplified": table}


def _pair(values) -> str:
    return "-" if values is None else f"{values[0]:.2f} / {values[1]:.2f}"


def render_markdown(state: dict) -> str:
    """`fidelity.md`: the header (preset, data, device, scale), the verdict table, the reasons,
    the amplified-trigger table, NFT's ASR against steps, the victims, the rows not measured yet."""
    scale = state["schedule_scale"]
    lines = [
        "# Fidelity: the seeds' headline rows re-measured",
        "",
        f"Preset `{state['preset']}` ({state['preset_description']}); data: {state['data']}; schedule scale "
        f"{scale:g}{' (SHORTENED schedules: not the papers protocol)' if scale != 1 else ''}; precision "
        f"{state.get('precision', 'bf16')}; last update {state.get('updated', '-')}.",
        "",
        RULE,
        "",
    ]
    lines += table_sections(state["rows"])
    timing = [(rid, rec) for rid, rec in state["rows"].items() if "seconds" in rec]
    if timing:
        lines += ["", "## Time per row (defence only)", "",
                  ", ".join(f"`{rid}` {rec['seconds']:.0f} s" for rid, rec in timing)]
    lines += not_measured(state["rows"], state.get("failed", {}))
    return "\n".join(lines) + "\n"


RULE = ("ACC / ASR in %. A row is *reproduced* when our ASR after the defence is within "
        f"{ASR_TOLERANCE:g} points of the paper's (or both are <= {BOTH_SAFE:g}%) and our ACC drop is within "
        f"{ACC_DROP_TOLERANCE:g} points of the paper's drop. Drops are compared, not accuracies: our CIFAR-10 is "
        "the JPEG copy (about 2 points lower clean accuracy) and our victims train on 95% of the training set "
        "(5% is the defender's pool).")


def table_sections(rows: dict) -> list[str]:
    """The verdict table, the reasons, the amplified-trigger table, NFT's ASR against steps and
    the victims, for the recorded `rows` (row id -> record)."""
    lines = [
        "| row | source | defence | paper before | paper after | ours before | ours after | ASR after - paper | "
        "ACC drop (paper) | scale | device | verdict |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row_id, row in ROWS.items():
        rec = rows.get(row_id)
        if rec is None or row.defense is None:
            continue
        metric = row.asr_metric
        ours_before = (rec["before"]["acc"], rec["before"][metric])
        ours_after = (rec["after"]["acc"], rec["after"][metric])
        lines.append(f"| {row_id} | {row.source} | {row.defense} | {_pair(row.paper_before)} | "
                     f"{_pair(row.paper_after)} | {_pair(ours_before)} | {_pair(ours_after)} | "
                     f"{rec['delta_asr_after']:+.2f} | {rec['acc_drop']:.2f} ({rec['paper_acc_drop']:.2f}) | "
                     f"{rec['schedule_scale']:g} | {rec.get('device', '-')} | **{rec['verdict']}** |")
    explained = [(rid, rec) for rid, rec in rows.items() if rec.get("reasons") or rec.get("notes")]
    if explained:
        lines += ["", "## Why", ""]
        for rid, rec in explained:
            lines.append(f"- `{rid}`: " + "; ".join(rec.get("reasons", []) + rec.get("notes", [])))
    amp = rows.get("amplified-3x3")
    if amp is not None:
        lines += ["", "## Amplified triggers (DHBE Table 6): ASR x1 / x4 / x9 after each defence", "",
                  f"Verdict: **{amp['verdict']}**. x1 is Eq. 9 (as Table 3); x4 / x9 count all non-target images.", "",
                  "| defence | paper x1 / x4 / x9 | ours x1 / x4 / x9 |", "| --- | --- | --- |"]
        for defense, cells in amp["amplified"].items():
            fmt = lambda key: " / ".join("-" if c[key] is None else f"{c[key]:.2f}" for c in cells)  # noqa: E731
            lines.append(f"| {defense} | {fmt('paper')} | {fmt('ours')} |")
    lines += asr_against_steps(rows)
    victims = {rec["victim"]["victim_id"]: rec["victim"] for rec in rows.values() if "victim" in rec}
    if victims:
        lines += ["", "## Victims", "", "| recipe | victim id | epochs | ACC | ASR | ASR (Eq. 9) | trained in |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for vid, v in victims.items():
            m = v["metrics"]
            took = "cache" if v["from_cache"] and not v.get("train_seconds") else f"{v['train_seconds']:.0f} s"
            lines.append(f"| {v['recipe']} | {vid} | {v['spec']['epochs']} | {m['acc']:.2f} | {m['asr']:.2f} | "
                         f"{m['asr_eq9']:.2f} | {took} |")
    return lines


def asr_against_steps(rows: dict) -> list[str]:
    """NFT rows: ACC / ASR at every evaluated round, against the optimiser steps done, with the
    source of each row's schedule (the two NFT schedules disagree by 20x)."""
    nft = [(rid, rows[rid]) for rid, row in ROWS.items() if row.defense == "nft" and rid in rows]
    if not nft:
        return []
    lines = ["", "## NFT: ASR against steps", ""]
    for rid, rec in nft:
        lines.append(f"- `{rid}`: schedule from {ROWS[rid].schedule_source or 'the defaults'}.")
    lines += ["", "| row | steps: ACC / ASR |", "| --- | --- |"]
    for rid, rec in nft:
        cells = [f"{h.get('steps', h['epoch'])}: {h['acc']:.2f} / {h[ROWS[rid].asr_metric]:.2f}"
                 for h in rec.get("history", []) if "acc" in h and ROWS[rid].asr_metric in h]
        lines.append(f"| {rid} | {'; '.join(cells) or '-'} |")
    return lines


def not_measured(rows: dict, failed: dict) -> list[str]:
    missing = [rid for rid in ROWS if rid not in rows]
    if not missing:
        return []
    lines = ["", "## Not measured yet", ""]
    for rid in missing:
        why = f": failed ({failed[rid]['error']})" if rid in failed else ""
        lines.append(f"- `{rid}` ({ROWS[rid].source}){why}")
    return lines
