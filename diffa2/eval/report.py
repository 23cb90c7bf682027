"""Reports of a scored benchmark: report.json, report.md, a per-category bar chart (PNG) and a console table.

``report.json`` always has ``overall`` = {correct, total, accuracy} (accuracy in percent, micro over the counted
items) and ``breakdown`` = {field: {value: {correct, total, accuracy}}}, plus the mode, the counts behind the
denominator (missing / empty / unparseable predictions, wrong-format rate, audio problems), data quirks, warnings
and, for runs (``run``), the decoding profile's name and full settings, model and data identity and the seed.
Nothing time-dependent goes in these files, so a resumed run writes the same bytes as an uninterrupted one.
"""

from __future__ import annotations

import io
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from diffa2.eval.loaders import MISSING_VALUE, Record, answer_of, breakdown_value, choices_of
from diffa2.eval.scoring import EMPTY, NULL, SCORED, UNPARSEABLE, ScoreResult, word_set
from diffa2.eval.specs import BenchmarkSpec
from diffa2.io import atomic_write_bytes, atomic_write_json, atomic_write_text

MODE_NOTES = {
    "official": "official rule; records without a prediction are left out of the count (MMSU: counted wrong; "
    "null and wrong-format responses are left out)",
    "strict": "official rule; every record counts, missing or unparseable predictions are wrong",
    "normalized": "final answer extracted first (<answer> tag, option letter -> text, 'The answer is X'),"
    " then the official rule",
}


def data_quirks(records: Sequence[Record], spec: BenchmarkSpec) -> dict[str, Any]:
    """Counts of the data's edge cases (list-valued labels, duplicate or indistinguishable choices, values outside
    the official scorer's tables) so a report shows they were handled."""
    n_choices: Counter[int] = Counter()
    duplicates = indistinguishable = as_list = no_answer = 0
    unexpected: dict[str, Counter[str]] = {}
    for rec in records:
        data = rec.data if isinstance(rec.data, dict) else {}
        choices = choices_of(data, spec.format)
        present = [c for c in choices if isinstance(c, str)] if isinstance(choices, list) else []
        n_choices[len(present)] += 1
        if len(set(present)) < len(present):
            duplicates += 1
        answer = answer_of(data, spec.format)
        if not answer:
            no_answer += 1
        elif spec.rule == "mmau_wordset" and isinstance(answer, str):
            gold = word_set(answer)
            if any(c != answer and word_set(c) == gold for c in present):
                indistinguishable += 1
        if any(isinstance(data.get(f), list) for f in (*spec.breakdown, "category")):
            as_list += 1
        for field, allowed in spec.official_values.items():
            value = breakdown_value(data.get(field))
            if value not in allowed:
                unexpected.setdefault(field, Counter())[value] += 1
    return {
        "choices_per_item": {str(k): v for k, v in sorted(n_choices.items())},
        "duplicate_choices": duplicates,
        # A wrong option with exactly the answer's word set: the official rule counts it correct too.
        "indistinguishable_choices": indistinguishable,
        "label_stored_as_list": as_list,
        "no_gold_answer": no_answer,
        "values_outside_official_set": {f: dict(sorted(c.items())) for f, c in sorted(unexpected.items())},
    }


def build_report(result: ScoreResult, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The report.json content for a score result; `extra` (run identity, audio counts) is merged in."""
    spec = result.spec
    status = result.status_counts()
    answered = [s for s in result.items if s.status in (SCORED, EMPTY, UNPARSEABLE)]
    wrong_format = sum(not s.well_formed for s in answered)
    counted = [s for s in result.items if s.counted]
    quirks = data_quirks(result.records, spec)
    warnings = []
    if result.key_note not in ("spec", "given"):
        warnings.append(f"prediction key: {result.key_note}")
    if status[NULL] and spec.rule == "mmau_wordset":
        warnings.append(f"{status[NULL]} prediction(s) are null: the official script would crash on them "
                        f"({'left out' if result.mode != 'strict' else 'counted wrong'} here)")
    if status["not_string"]:
        warnings.append(f"{status['not_string']} prediction(s) are not strings (the official script would crash)")
    for field, values in quirks["values_outside_official_set"].items():
        warnings.append(f"{field} values outside the official set (the official script raises KeyError): "
                        f"{', '.join(f'{v!r} x{n}' for v, n in values.items())}")
    if quirks["no_gold_answer"]:
        warnings.append(f"{quirks['no_gold_answer']} record(s) have no gold answer (withheld test split?): "
                        "their accuracy is meaningless")
    report: dict[str, Any] = {
        "benchmark": spec.name,
        "spec_version": spec.version,
        "data_version": spec.data_version,
        "rule": spec.rule,
        "mode": result.mode,
        "mode_note": MODE_NOTES[result.mode],
        "prediction_key": result.prediction_key,
        "aggregation": spec.aggregation,
        "higher_is_better": spec.higher_is_better,
        "overall": result.overall(),
        "breakdown": result.breakdown(),
        "counts": {
            "records": len(result.items),
            "counted": len(counted),
            "left_out": len(result.items) - len(counted),
            **{f"prediction_{k}": v for k, v in status.items()},
            "wrong_format": wrong_format,
            "wrong_format_rate": (100.0 * wrong_format / len(answered)) if answered else None,
        },
        "data_quirks": quirks,
        "warnings": warnings,
    }
    if extra:
        for key, value in extra.items():
            if key == "counts":
                report["counts"].update(value)
            elif key == "warnings":
                report["warnings"] += list(value)
            else:
                report[key] = value
    return report


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def format_table(report: dict[str, Any]) -> str:
    """A plain-text table for the console (accuracies with two decimals, like the official scripts)."""
    o = report["overall"]
    lines = [
        f"{report['benchmark']}  mode={report['mode']}  key={report['prediction_key']}",
        f"  overall: {_pct(o['accuracy'])}%  ({o['correct']}/{o['total']})",
    ]
    for field, values in report["breakdown"].items():
        lines.append(f"  by {field}:")
        width = max((len(v) for v in values), default=0)
        for value, cell in values.items():
            lines.append(f"    {value:<{width}}  {_pct(cell['accuracy']):>6}%  ({cell['correct']}/{cell['total']})")
    c = report["counts"]
    lines.append(
        f"  counted {c['counted']} of {c['records']} records; missing {c['prediction_missing']}, "
        f"null {c['prediction_null']}, empty {c['prediction_empty']}, unparseable {c['prediction_unparseable']}; "
        f"wrong-format rate {_pct(c['wrong_format_rate'])}%"
    )
    if "run" in report:
        lines.append(f"  decoding profile: {decoding_summary(report['run'])}")
    for key in ("audio_missing", "audio_unreadable", "audio_trimmed"):
        if key in c:
            lines.append(f"  {key.replace('_', ' ')}: {c[key]}")
    for w in report["warnings"]:
        lines.append(f"  warning: {w}")
    return "\n".join(lines)


def decoding_summary(run: dict[str, Any]) -> str:
    """A run's decoding in one line: profile name, lengths and the speed settings that are on."""
    d = run["decoding"]
    speed = [f"{k} {d[k]}" for k in ("threshold", "factor", "cache") if d.get(k) not in (None, "none")]
    speed += [k for k in ("factor_quirk", "eos_early_exit") if d.get(k)]
    if d.get("eos_early_exit") and d.get("exit_on_eot") is False:
        speed.append("EOS only")
    lengths = f"{d['gen_length']}/{d['block_length']}/{d['steps']}, temperature {d['temperature']}"
    return f"{run.get('profile', 'custom')} ({lengths}; {', '.join(speed) or 'one token per step'})"


def to_markdown(report: dict[str, Any], chart_name: str | None = None) -> str:
    o = report["overall"]
    out = [
        f"# {report['benchmark']} results",
        "",
        f"- mode: **{report['mode']}** ({report['mode_note']})",
        f"- rule: `{report['rule']}`, prediction key `{report['prediction_key']}`, {report['aggregation']} accuracy",
        f"- spec version {report['spec_version']}; data: {report['data_version']}",
        "",
        "| | correct | total | accuracy (%) |",
        "|---|---:|---:|---:|",
        f"| **overall** | {o['correct']} | {o['total']} | {_pct(o['accuracy'])} |",
        "",
    ]
    for field, values in report["breakdown"].items():
        out += [f"## By {field}", "", f"| {field} | correct | total | accuracy (%) |", "|---|---:|---:|---:|"]
        out += [f"| {v} | {c['correct']} | {c['total']} | {_pct(c['accuracy'])} |" for v, c in values.items()]
        out.append("")
    out += ["## Counts", "", "| count | value |", "|---|---:|"]
    for key, value in report["counts"].items():
        out.append(f"| {key} | {_pct(value) if isinstance(value, float) else value} |")
    out += ["", "## Data quirks", ""]
    for key, value in report["data_quirks"].items():
        out.append(f"- {key}: {value}")
    if report["warnings"]:
        out += ["", "## Warnings", ""] + [f"- {w}" for w in report["warnings"]]
    if "run" in report:
        out += ["", "## Run", ""]
        for key, value in report["run"].items():
            out.append(f"- {key}: `{value}`")
    if chart_name:
        out += ["", f"![per-category accuracy]({chart_name})"]
    return "\n".join(out) + "\n"


def chart_png(report: dict[str, Any]) -> bytes:
    """Horizontal bar charts of accuracy per value of every breakdown field (matplotlib's Agg canvas)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fields = [f for f, v in report["breakdown"].items() if v] or ["overall"]
    sizes = [max(len(report["breakdown"].get(f, {})), 1) for f in fields]
    fig = Figure(figsize=(9, 1.2 + 0.32 * sum(sizes) + 0.6 * len(fields)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(fields), 1, squeeze=False, gridspec_kw={"height_ratios": sizes})[:, 0]
    for ax, field in zip(axes, fields, strict=True):
        cells = report["breakdown"].get(field) or {"overall": report["overall"]}
        labels = [v if v != MISSING_VALUE else "(missing)" for v in cells]
        values = [c["accuracy"] or 0.0 for c in cells.values()]
        ax.barh(range(len(labels)), values, color="#4c72b0")
        ax.set_yticks(range(len(labels)), labels=[f"{lab} (n={c['total']})" for lab, c in zip(labels, cells.values(),
                                                                                          strict=True)], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlim(0, 100)
        ax.set_title(f"accuracy by {field} (%)", fontsize=9)
        for i, v in enumerate(values):
            ax.text(min(v + 1, 92), i, f"{v:.1f}", va="center", fontsize=7)
    o = report["overall"]
    fig.suptitle(f"{report['benchmark']} ({report['mode']}): {_pct(o['accuracy'])}% overall, n={o['total']}",
                 fontsize=10)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, metadata={"Software": None})
    return buffer.getvalue()


def write_report(report: dict[str, Any], out_dir: str | Path, stem: str = "report") -> dict[str, Path]:
    """Write <stem>.json, <stem>.md and <stem>.png atomically; return their paths."""
    out_dir = Path(out_dir)
    paths = {"json": out_dir / f"{stem}.json", "md": out_dir / f"{stem}.md", "png": out_dir / f"{stem}.png"}
    atomic_write_json(paths["json"], report)
    atomic_write_text(paths["md"], to_markdown(report, paths["png"].name))
    atomic_write_bytes(paths["png"], chart_png(report))
    return paths
