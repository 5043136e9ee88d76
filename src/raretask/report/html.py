"""Write a :class:`~raretask.report.build.Report` as one self-contained HTML page.

No template engine: the page is a handful of fixed blocks, every piece of text goes through
``html.escape``, and figures are PNGs embedded as ``data:`` URIs, so the file opens offline with
no external request (no scripts, fonts or style sheets from elsewhere).
"""

from __future__ import annotations

import base64
import html
import re

from raretask.report.build import Figure, Report, Section, Table
from raretask.report.fix import FIX_FILE

STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;
max-width:1180px;padding:0 1.5em 3em;color:#1d1d1f;line-height:1.45}
h1{margin-top:1em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
code,pre{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.88em}
figure{margin:1.2em 0;border:1px solid #e3e3e3;padding:.6em;background:#fafafa}
figure img{max-width:100%;height:auto;display:block;margin:0 auto}
figcaption{font-size:.9em;margin-top:.5em}figcaption .src{color:#555;display:block}
table{border-collapse:collapse;margin:.8em 0 1.4em;font-size:.86em}
th,td{border:1px solid #ddd;padding:.2em .55em;text-align:right;white-space:nowrap}
th{background:#f0f0f0}caption{caption-side:top;text-align:left;font-size:.95em;
padding:.3em 0;white-space:normal}
.empty{color:#8a4b00;background:#fff6e5;border-left:4px solid #f0a030;padding:.5em .8em}
.toc li.none{color:#888}details{margin:.4em 0}.wrap{overflow-x:auto}
"""


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _code(text: str) -> str:
    """Escape, then show `backticked` spans as code."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", _e(text))


def _figure(f: Figure, key: str) -> str:
    data = base64.b64encode(f.png).decode("ascii")
    src = "".join(f'<span class="src">{_e(s)}</span>' for s in f.source)
    return (f'<figure id="{_e(key)}"><img src="data:image/png;base64,{data}" alt="{_e(f.title)}">'
            f"<figcaption><b>{_e(f.title)}.</b> {_code(f.caption)}{src}</figcaption></figure>")


def _table(t: Table) -> str:
    head = "".join(f"<th>{_e(c)}</th>" for c in t.columns)
    body = "".join("<tr>" + "".join(f"<td>{_e(v)}</td>" for v in row) + "</tr>" for row in t.rows)
    return (f'<div class="wrap"><table id="{_e(t.name)}"><caption>{_code(t.caption)}</caption>'
            f"<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>")


def _section(s: Section) -> str:
    parts = [f'<section id="{_e(s.key)}" data-has-data="{str(s.has_data).lower()}">',
             f"<h2>{_e(s.title)}</h2>", f"<p>{_code(s.intro)}</p>"]
    if not s.has_data:
        parts.append(f'<p class="empty">{_code(s.empty or "No data for this section.")}</p>')
    for i, f in enumerate(s.figures):
        parts.append(_figure(f, f"{s.key}-fig{i}"))
    parts.extend(_table(t) for t in s.tables)
    parts.append("</section>")
    return "\n".join(parts)


def render(report: Report) -> str:
    """The whole page as a string."""
    toc = "".join(
        f'<li class="{"has" if s.has_data else "none"}"><a href="#{_e(s.key)}">{_e(s.title)}</a>'
        + ("" if s.has_data else " (no data)") + "</li>" for s in report.sections)
    inputs = []
    for r in report.inputs:
        cells = len(r.cells)
        line = (f"<li><code>{_e(r.path)}</code>: {_e(r.kind)} run <b>{_e(r.name)}</b>, "
                f"{cells} cells, axes {_e(r.axes)}; made by <code>{_e(r.made_by)}</code>"
                + (f" [{_e(r.version)}]" if r.version else ""))
        if r.fix_only:
            line = (f"<li><code>{_e(r.path)}</code>: fix result <b>{_e(r.name)}</b> "
                    f"(<code>{FIX_FILE}</code>); made by <code>{_e(r.made_by)}</code>")
        if r.config_text:
            line += (f"<details><summary>resolved config</summary><pre>{_e(r.config_text)}</pre>"
                     "</details>")
        inputs.append(line + "</li>")
    cmd = (f"<p>Made by <code>{_e(report.command)}</code>.</p>" if report.command else "")
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<title>{_e(report.title)}</title>
<style>{STYLE}</style>
</head>
<body>
<h1>{_e(report.title)}</h1>
<p>The figures of <i>Why Larger Models Learn More</i> (arXiv 2605.29548) drawn from the runs
below. Every number comes from the same rows <code>raretask show DIR</code> prints.</p>
{cmd}
<h2 id="inputs">Inputs</h2>
<ul>{"".join(inputs)}</ul>
<nav class="toc"><h2>Contents</h2><ol>{toc}</ol></nav>
{"".join(_section(s) for s in report.sections)}
</body>
</html>
"""


def write_report(dirs, out, scaling_csv=None, title: str = "raretask report",
                 command: str = "", calibrations=(), partial: bool = False):
    """Build the report of ``dirs`` and write it to ``out`` atomically; returns the path.

    Every input is checked before anything is written: a bad directory leaves no file behind.
    """
    from pathlib import Path

    from raretask.errors import UserError
    from raretask.report.build import build_report
    from raretask.runs import store

    out = Path(out)
    if out.is_dir():
        raise UserError(f"--out: {out} is a directory, expected a file name (e.g. report.html)")
    page = render(build_report(dirs, scaling_csv, title, command, calibrations, partial))
    store.write_text(out, page)
    return out
