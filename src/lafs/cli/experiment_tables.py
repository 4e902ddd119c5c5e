"""The tables of ``lafs experiment``: metrics read from ``eval.json``, cells of mean +- sample std over seeds, the
floors of the runs as rows, and the paired differences between arms with their Student-t 95 % intervals (the
papers' comparisons need the differences of runs that share a seed, not two overlapping means), as Markdown."""

from __future__ import annotations

import numpy as np


def metric_value(eval_json: dict, path: str) -> float:
    """``SET:key/sub`` from an ``eval.json``; ``SET@t:key`` reads the affine-sensitivity curve of SET at t;
    ``A - B`` (two such paths) their difference, e.g. the accuracy an arm loses from aligned to misaligned faces
    (KP-RPE paper, Table 1: the robustness claim is about that drop, compared between arms of one seed)."""
    if " - " in path:
        first, second = path.split(" - ", 1)
        return metric_value(eval_json, first.strip()) - metric_value(eval_json, second.strip())
    where, _, key = path.partition(":")
    name, _, t = where.partition("@")
    for result in eval_json["results"]:
        if result.get("name") != name or ("points" in result) != bool(t):
            continue
        if t:
            result = next((p for p in result["points"] if abs(p["t"] - float(t)) < 1e-9), None)
            if result is None:
                break
        value = result
        for part in key.split("/"):
            value = value[part]
        return float(value)
    raise KeyError(f"eval.json has no {path!r}")


def _summarise(cell: dict) -> dict:
    v = np.asarray(cell["values"], float)
    cell["mean"] = float(v.mean()) if v.size else None
    cell["std"] = float(v.std(ddof=1)) if v.size > 1 else None
    return cell


PCA_FLOOR_ROW = "floor: PCA-whitened"  # eval.report.FLOOR_LABELS["pca_whitened"]; cells under it are flagged


# two-sided 95 % quantiles of Student's t, df = 1..30 (any statistics table)
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t975(df: int) -> float:
    """The 97.5 % quantile of Student's t with ``df`` degrees of freedom: the table to 30, beyond it the
    Cornish-Fisher series around the normal's 1.95996 (error < 1e-4 there)."""
    if df < 1:
        raise ValueError(f"a t interval needs at least 2 values (df >= 1), got df={df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def paired_difference(a: dict, b: dict) -> dict:
    """``a`` and ``b``: seed -> value. The differences a - b on the seeds both have, their mean, sample std and the
    95 % confidence interval of the mean difference (Student's t over the seeds; none with fewer than 2)."""
    seeds = sorted(set(a) & set(b))
    d = np.asarray([a[s] - b[s] for s in seeds], float)
    out = {"seeds": seeds, "differences": d.tolist(), "n": len(seeds), "mean": float(d.mean()) if d.size else None,
           "std": float(d.std(ddof=1)) if d.size > 1 else None, "ci": None}
    if d.size > 1:
        half = t975(d.size - 1) * out["std"] / np.sqrt(d.size)
        out["ci"] = [out["mean"] - half, out["mean"] + half]
    return out


def table_metrics(spec: dict) -> dict:
    """A table's columns as ``{label: "SET:key"}``: its ``metrics``, or its one ``metric``."""
    return spec.get("metrics") or {spec["metric"]: spec["metric"]}


def flag_differences(cells: dict, metrics: dict) -> None:
    """A difference column (``A - B``) has no floor of its own: its cell is flagged where a column reading one of its
    operands is below the PCA-whitened floor, since a drop measured from an accuracy at the floors says nothing."""
    column_of = {m: c for c, m in metrics.items()}
    for column, metric in metrics.items():
        operands = [column_of[p.strip()] for p in metric.split(" - ") if p.strip() in column_of] if " - " in metric else []
        for row in cells.values():
            if operands and column in row:
                row[column]["below_floor"] |= any(row.get(o, {}).get("below_floor", False) for o in operands)


def _floor_rows(spec: dict, members: list, load, labels: dict) -> dict:
    """Rows ``floor: <name>`` of a table: the floors its runs' ``eval.json`` hold for each column's set (``lafs eval
    --floors``; a ``metrics`` table's columns each name their own set, and a column whose set has no floors, such as
    a point of the affine curve, gets none), one value per seed and column. The untrained network differs by model:
    with ``floors_by: AXIS`` (e.g. the backbone) one untrained row per value of that axis."""
    from ..eval.floors import FLOOR_KEYS  # torch: imported only when a table has floors
    from ..eval.report import FLOOR_LABELS

    column_axis, by = spec.get("columns"), spec.get("floors_by")
    rows: dict = {}
    for run in members:
        data = load(run, spec.get("file", "eval.json"))
        sets = ((data or {}).get("floors") or {}).get("sets", {})
        if column_axis:  # one metric, a column per value of the axis
            columns = {labels.get(run.values[column_axis], run.values[column_axis]): spec["metric"]}
        else:
            columns = table_metrics(spec)
        for column, metric in columns.items():
            if " - " in metric:
                continue  # a difference of two metrics has no floor (flag_differences marks it from its operands)
            set_name, _, key = metric.partition(":")
            floors = sets.get(set_name, {})
            for floor in FLOOR_KEYS:
                if floor not in floors:
                    continue
                value = floors[floor]
                try:
                    for part in key.split("/"):
                        value = value[part]
                except (KeyError, TypeError):
                    continue  # a metric the floors do not give (e.g. TAR): no floor row for it
                name = f"floor: {FLOOR_LABELS[floor]}"
                if floor == "untrained" and by:
                    name += f" ({labels.get(run.values[by], run.values[by])})"
                cell = rows.setdefault(name, {}).setdefault(column, {"values": [], "seeds": [], "steps": []})
                if run.seed not in cell["seeds"]:  # the same floor read by every arm of a seed: counted once
                    cell["values"].append(float(spec.get("scale", 1.0)) * float(value))
                    cell["seeds"].append(run.seed)
    order = {f"floor: {FLOOR_LABELS[k]}": i for i, k in enumerate(FLOOR_KEYS)}
    for columns in rows.values():
        for cell in columns.values():
            _summarise(cell)
    return dict(sorted(rows.items(), key=lambda kv: order.get(kv[0].split(" (")[0], 9)))


def _paired(spec: dict, members: list, cells: dict, labels: dict) -> list[dict]:
    """Per pair [a, b] of the ``paired`` axis, per remaining row context and column: a - b matched by seed, from the
    table's cells (their ``seeds`` and ``values``)."""
    axis = spec["paired"]["axis"]
    others = [a for a in spec["rows"] if a != axis]
    name = lambda run, axes: " / ".join(labels.get(run.values[a], run.values[a]) for a in axes)
    row_of = {(name(run, others), run.values[axis]): name(run, spec["rows"]) for run in members}
    out = []
    for context in dict.fromkeys(c for c, _ in row_of):
        for a, b in spec["paired"]["pairs"]:
            a, b = str(a), str(b)
            if (context, a) not in row_of or (context, b) not in row_of:
                continue
            row_a, row_b = cells[row_of[(context, a)]], cells[row_of[(context, b)]]
            for column in row_a:
                if column not in row_b:
                    continue
                diff = paired_difference(dict(zip(row_a[column]["seeds"], row_a[column]["values"])),
                                         dict(zip(row_b[column]["seeds"], row_b[column]["values"])))
                below = [v for v, row in ((a, row_a), (b, row_b)) if row[column].get("below_floor")]
                out.append({"context": context, "a": labels.get(a, a), "b": labels.get(b, b), "column": column,
                            **diff, "below_floor": [labels.get(v, v) for v in below]})
    return out


def _cell(cell: dict, digits: int, seeds: int) -> str:
    if cell["mean"] is None:
        return "–"
    text = f"{cell['mean']:.{digits}f}"
    if cell["std"] is not None:
        text += f" ± {cell['std']:.{digits}f}"
    if len(cell["values"]) < seeds:
        text += f" (n={len(cell['values'])})"
    return text + (" †" if cell.get("below_floor") else "")


def _paired_text(p: dict, digits: int) -> str:
    if p["mean"] is None:
        return "–"
    text = f"{p['mean']:+.{digits}f}"
    if p["ci"] is not None:
        text += f" [{p['ci'][0]:+.{digits}f}, {p['ci'][1]:+.{digits}f}]"
    return text + f" (n={p['n']})" + (" †" if p["below_floor"] else "")


def format_paired(t: dict) -> list[str]:
    """A table's paired differences as Markdown: one row per context and pair, its columns' mean difference
    [95 % CI] (n seeds); † where an arm sits below the PCA-whitened floor, which makes the comparison
    uninformative."""
    paired = t.get("paired") or []
    if not paired:
        return []
    rows = list(dict.fromkeys((p["context"], p["a"], p["b"]) for p in paired))
    by = {(p["context"], p["a"], p["b"], p["column"]): p for p in paired}
    head = ["difference"] + [f"{t['column_label']} {c}".strip() if t["column_label"] else str(c) for c in t["columns"]]
    out = [f"**{t['title']}: paired differences over seeds, mean [95 % CI]**", "", "| " + " | ".join(head) + " |",
           "|" + "---|" * len(head)]
    for context, a, b in rows:
        name = f"{context}: {a} - {b}" if context else f"{a} - {b}"
        out.append("| " + " | ".join([name] + [_paired_text(by[(context, a, b, c)], t["digits"])
                                               if (context, a, b, c) in by else "–" for c in t["columns"]]) + " |")
    note = ("Each seed's difference is taken between runs of the same seed; the interval is Student's t over the "
            "seeds. † an arm of the pair is below the PCA-whitened floor: the comparison says nothing.")
    out += ["", note, ""]
    return out


def _steps_text(cell: dict | None) -> str:
    """The steps behind a cell's values: one count, or every count when its seeds differ ("–": none known)."""
    counts = sorted({n for n in (cell or {}).get("steps", []) if n})
    return " / ".join(map(str, counts)) or "–"


def format_tables(result: dict, seeds: int) -> str:
    """The tables as Markdown, each with the steps its arms trained: a ``steps`` column when every cell of a row
    reads models of one step count, else a table of the steps per cell below it."""
    out = []
    for t in result["tables"]:
        head = [t["row_label"]] + [f"{t['column_label']} {c}".strip() if t["column_label"] else str(c) for c in t["columns"]]
        steps = {row: [_steps_text(t["cells"][row].get(c)) for c in t["columns"]] for row in t["rows"]}
        per_row = all(len({s for s in v if s != "–"}) <= 1 for v in steps.values())
        out += [f"**{t['title']}**", "", "| " + " | ".join(head + ["steps"] * per_row) + " |",
                "|" + "---|" * (len(head) + per_row)]
        for row in t["rows"] + t.get("floor_rows", []):
            trained = [next((s for s in steps.get(row, []) if s != "–"), "–")] if per_row else []
            out.append("| " + " | ".join([row] + [_cell(t["cells"][row][c], t["digits"], seeds)
                                                   if c in t["cells"][row] else "–" for c in t["columns"]]
                                         + trained) + " |")
        if not per_row:
            out += ["", "Steps trained:", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            out += ["| " + " | ".join([row] + steps[row]) + " |" for row in t["rows"]]
        if any(c.get("below_floor") for r in t["rows"] for c in t["cells"][r].values()):
            out += ["", "† below the PCA-whitened floor of its column (a difference column: one of its operands "
                    "is): its comparisons are uninformative."]
        if t["note"]:
            out += ["", t["note"].strip()]
        out.append("")
        out += format_paired(t)
    return "\n".join(out)
