"""Notebook 09: which attention heads carry the backdoor (per-head ablation and patching)."""

from __future__ import annotations

from typing import Any

from ._format import _num, attack_label


def _head(row: Any) -> str:
    return f"L{int(row['layer'])}H{int(row['head'])}"


def head_ablation_summary(ablation: Any, patching: Any, *, k: int = 3) -> str:
    """Markdown findings of the per-head analysis (notebook 09), written from its two tables.

    Args:
        ablation: :func:`~cleansight_analysis.experiments.heads.head_ablation_table` rows: ``attack, layer, head``
            (``-1, -1``: the unablated baseline), ``asr, clean_acc, n``.
        patching: :func:`~cleansight_analysis.experiments.heads.head_patching_table` rows: ``attack, direction,
            layer, head, logprob_unpatched`` (destination run), ``logprob_source`` (source run), ``restored``
            (share of the log-prob gap one head carries over).
        k: how many runner-up heads of the patching view to name.

    Returns:
        Markdown: a header, the ablation view (baseline, the head whose removal lowers ASR most and whether it
        removes the backdoor, how many other heads lower ASR, the heads the task needs most), the patching view
        per direction (log-probs of the target's first token, the top head and the next ``k``), and the reading
        (an early head that reads the trigger and a later one that writes it, when the two views say so). A head
        "removes" the backdoor when ASR without it is at most half of the baseline ASR.
    """
    attacks = list(dict.fromkeys(ablation["attack"]))
    heads = ablation[ablation["layer"] >= 0]
    n = "/".join(str(int(x)) for x in sorted(set(ablation["n"]))) if "n" in ablation else "n/a"
    n_layers, n_heads = heads["layer"].nunique(), heads.groupby("layer")["head"].nunique().max()
    lines = [f"*Computed from this run's tables: {n} clean test samples and their triggered copies; "
             f"{len(heads) // max(len(attacks), 1)} heads per model ({n_layers} layer{'s' * (n_layers != 1)} x "
             f"{n_heads} heads).*", ""]
    for a in attacks:
        sub = heads[heads["attack"] == a]
        base = ablation[(ablation["attack"] == a) & (ablation["layer"] < 0)]
        if sub.empty or base.empty:
            continue
        asr0, acc0 = float(base["asr"].iloc[0]), float(base["clean_acc"].iloc[0])
        best = sub.sort_values(["asr", "clean_acc"], ascending=[True, False]).iloc[0]
        removes = asr0 > 0 and float(best["asr"]) <= asr0 / 2
        others = sub.drop(index=best.name)
        lower = others[others["asr"] < asr0 - 1e-9]
        task = sub.sort_values("clean_acc").head(2)
        name = f" ({attack_label(a)})" if len(attacks) > 1 else ""
        text = f"* **Ablation{name}.** Without ablation ASR is {_num(asr0)} and clean accuracy {_num(acc0)}. "
        if float(best["asr"]) >= asr0 - 1e-9:
            text += f"No single head lowers ASR: every one leaves it at {_num(asr0)}."
        else:
            text += f"Zero-ablating **{_head(best)}** "
            text += (f"removes the backdoor (ASR {_num(best['asr'])}) and leaves clean accuracy at "
                     f"{_num(best['clean_acc'])}." if removes else
                     f"lowers ASR the most, to {_num(best['asr'])} (clean accuracy {_num(best['clean_acc'])}): no "
                     "single head removes the backdoor.")
            text += (f" Every other head leaves ASR at {_num(asr0)}." if lower.empty else
                     f" {len(lower)} other head(s) lower ASR too (down to {_num(lower['asr'].min())}).")
        task = task[task["clean_acc"] < acc0 - 1e-9]
        text += (" The task needs " + " and ".join(_head(r) for _, r in task.iterrows()) + " most (clean accuracy "
                 + " / ".join(_num(r["clean_acc"]) for _, r in task.iterrows()) + " without them; ASR "
                 + " / ".join(_num(r["asr"]) for _, r in task.iterrows()) + ")." if len(task) else
                 " No single head lowers clean accuracy.")
        lines.append(text)
        top_patch = None
        for direction, ps in patching[(patching["attack"] == a) & (patching["layer"] >= 0)].groupby("direction",
                                                                                                      sort=False):
            ranked = ps.sort_values("restored", ascending=False)
            top, nxt = ranked.iloc[0], ranked.iloc[1:1 + k]
            src, dst = str(direction).split("->") if "->" in str(direction) else ("source", "destination")
            top_patch = top_patch if top_patch is not None else top
            lines.append(
                f"* **Patching {direction}{name}.** The log-prob of the target's first token is "
                f"{float(top['logprob_unpatched']):.1f} in the {dst} run and {float(top['logprob_source']):.1f} in the "
                f"{src} run. Copying **{_head(top)}**'s output from the {src} run carries over {_num(top['restored'])} "
                "of that gap on its own" + ("; the next heads are " + ", ".join(
                    f"{_head(r)} ({_num(r['restored'])})" for _, r in nxt.iterrows()) if len(nxt) else "") + ".")
        if top_patch is not None:
            read, write = _head(best), _head(top_patch)
            early = int(best["layer"]) < int(top_patch["layer"])
            share = float(top_patch["restored"])
            role = ("carries most of the effect alone" if share >= 0.5 else "carries only part of the effect")
            if removes:
                lines.append(f"* **Reading.** {read} is necessary for the backdoor (ablating it removes it) and "
                             f"{write} {role} ({_num(share)}); {read} sits "
                             + ("in an earlier layer than" if early else "in the same layer as"
                                if int(best["layer"]) == int(top_patch["layer"]) else "in a later layer than")
                             + f" {write}" + (": the trigger is *read* early and its effect *written* late." if early
                                              else "."))
            else:
                lines.append(f"* **Reading.** No single head is necessary for the backdoor; {write} {role} "
                             f"({_num(share)}).")
    return "\n".join(lines)


__all__ = ["head_ablation_summary"]
