"""The three report formats of a validation run (each written atomically by the command):
JSON with every metric, its limit and verdict; JUnit XML with one testcase per check (what CI
systems display); a Markdown table (for a PR comment or a job summary). Plus the stdout table."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from koala_core.atomic import staged_file


def _fmt(v: Any, metric: str = "") -> str:
    if v is None:
        return "n/a"
    if metric == "nonfinite":
        return str(int(v))
    if metric.split("@")[0] in ("cosine", "ssim"):
        return f"{v:.6f}"
    if metric.split("@")[0] == "psnr":
        return "inf" if v == float("inf") else f"{v:.2f}"
    return f"{v:.3e}"


def junit_xml(report: dict[str, Any]) -> bytes:
    """<testsuites><testsuite> with one <testcase> per check; a failed check carries a <failure>
    naming every broken metric; the metrics of each check are in its <system-out>."""
    checks = report["checks"]
    failed = sum(not c["passed"] for c in checks)
    root = ET.Element("testsuites", name="koala-trt validate", tests=str(len(checks)), failures=str(failed),
                      errors="0", time=f"{report['seconds']:.3f}")
    suite = ET.SubElement(root, "testsuite", name=f"koala-trt validate {report['backend']}", tests=str(len(checks)),
                          failures=str(failed), errors="0", skipped="0", time=f"{report['seconds']:.3f}")
    props = ET.SubElement(suite, "properties")
    for k in ("artifacts", "model", "backend", "height", "width", "steps"):
        ET.SubElement(props, "property", name=k, value=str(report[k]))
    for c in checks:
        case = ET.SubElement(suite, "testcase", classname=f"validate.{c['component']}", name=c["id"],
                             time=f"{sum(c['seconds'].values()):.3f}")
        bad = [m for m in c["metrics"] if not m["passed"]]
        if bad:
            msg = "; ".join(f"{c['component']}.{m['output']} {m['metric']} {_fmt(m['value'], m['metric'])} "
                            f"(limit {_fmt(m['limit'], m['metric'])})" for m in bad)
            fail = ET.SubElement(case, "failure", message=msg, type="AccuracyDrift")
            fail.text = "\n".join(f"{m['output']} {m['metric']}: {_fmt(m['value'], m['metric'])}, limit "
                                  f"{_fmt(m['limit'], m['metric'])} {m['note']}".rstrip() for m in bad)
        out = ET.SubElement(case, "system-out")
        out.text = "\n".join(f"{m['output']} {m['metric']} = {_fmt(m['value'], m['metric'])} (limit {_fmt(m['limit'], m['metric'])}) "
                             f"{'ok' if m['passed'] else 'FAIL'}" for m in c["metrics"])
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True)


def write_junit(path: Path, report: dict[str, Any]) -> None:
    with staged_file(path) as tmp:
        tmp.write_bytes(junit_xml(report))


SUMMARY_HEADER = ["check", "precision", "output", "metric", "value", "limit", "verdict"]


def summary_rows(report: dict[str, Any], failures_only: bool = False) -> list[list[str]]:
    """One row per measured metric (check, precision, output, metric, value, limit, ok/FAIL)."""
    rows = []
    for c in report["checks"]:
        for m in c["metrics"]:
            if failures_only and m["passed"]:
                continue
            op = ">=" if m["metric"].split("@")[0] in ("cosine", "psnr", "ssim") else "<="
            rows.append([c["id"], c["precision"], m["output"], m["metric"], _fmt(m["value"], m["metric"]),
                         f"{op} {_fmt(m['limit'], m['metric'])}", "ok" if m["passed"] else "FAIL"])
    return rows


def markdown(report: dict[str, Any]) -> str:
    verdict = "PASSED" if report["passed"] else "FAILED"
    lines = [f"## koala-trt validate: {verdict}", "",
             f"Artifacts `{report['artifacts']}` ({report['model']}) on **{report['backend_description']}** "
             f"against PyTorch; {report['width']}x{report['height']}, {report['steps']} denoising steps, "
             f"{len(report['prompts'])} prompts, {len(report['checks'])} checks, {report['seconds']:.1f} s.", ""]
    if report.get("baseline"):
        b = report["baseline"]
        lines += [f"Baseline `{b['path']}`: {b['compared']} metrics compared, {len(b['worse'])} worse beyond the margin "
                  f"({b['margin']:g} relative + {b['floor_of_tolerance']:g} x tolerance).", ""]
    lines += ["| " + " | ".join(SUMMARY_HEADER) + " |", "|" + "---|" * len(SUMMARY_HEADER)]
    for r in summary_rows(report):
        r = r[:-1] + ["ok" if r[-1] == "ok" else "**FAIL**"]
        lines.append("| " + " | ".join(x.replace("|", "\\|") for x in r) + " |")
    if report["failures"]:
        lines += ["", "Failures:", ""] + [f"- {f}" for f in report["failures"]]
    return "\n".join(lines) + "\n"


def write_markdown(path: Path, report: dict[str, Any]) -> None:
    with staged_file(path) as tmp:
        tmp.write_text(markdown(report))
