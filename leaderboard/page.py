"""The static HTML page: one sortable table per concept and protocol, in a single file.

The page loads nothing over the network: its CSS and JavaScript are inline, and every text
taken from an entry is HTML-escaped. Each row shows its provenance in a tooltip (the ``title``
of its provenance mark) and in full in an expandable details cell. Clicking a column header
sorts the table by that column; a second click reverses the order.
"""

from __future__ import annotations

from html import escape

from leaderboard.render import interval_percent, percent, provenance_items, source_text, utility_text
from leaderboard.tables import Row, Table

# (header, sort type); None marks a column that does not sort.
COLUMNS = (
    ("Rank", "number"), ("Defense", "text"), ("Attack", "text"), ("Pre-attack ASR %", "number"),
    ("ASR %", "number"), ("ASR 95% CI", "number"), ("FID", "number"), ("CLIP", "number"),
    ("Retain acc. %", "number"), ("Prompts", "number"), ("Provenance", "text"), ("Details", None),
)

STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 2rem auto; max-width: 80rem; padding: 0 1rem; color: #1b1f24; }
h1 { margin-bottom: 0.2rem; }
h2 { margin-top: 2.2rem; border-bottom: 1px solid #d0d7de; }
h3 { font-size: 1rem; margin: 1.4rem 0 0.3rem; }
p.protocol { margin: 0 0 0.6rem; color: #57606a; font-size: 0.9rem; }
table { border-collapse: collapse; width: 100%; margin-bottom: 0.6rem; }
th, td { border-bottom: 1px solid #d8dee4; padding: 0.3rem 0.5rem; text-align: left; vertical-align: top; }
td.number { text-align: right; font-variant-numeric: tabular-nums; }
th button { font: inherit; font-weight: 600; background: none; border: 0; padding: 0; cursor: pointer; }
th[aria-sort="ascending"] button::after { content: " \\25B2"; }
th[aria-sort="descending"] button::after { content: " \\25BC"; }
.mark { border-radius: 0.7rem; padding: 0 0.5rem; font-size: 0.8rem; white-space: nowrap; cursor: help; }
.mark.measured { background: #dafbe1; color: #116329; }
.mark.reported { background: #fff1c2; color: #7d4e00; }
details summary { cursor: pointer; color: #0969da; }
dl { margin: 0.3rem 0; font-size: 0.85rem; max-width: 40rem; }
dt { font-weight: 600; }
dd { margin: 0 0 0.3rem 1rem; overflow-wrap: anywhere; }
"""

SCRIPT = """
"use strict";
function cellValue(row, column) {
  var value = row.cells[column].getAttribute("data-value");
  return value === null ? "" : value;
}
function compareRows(a, b, column, type, ascending) {
  var x = cellValue(a, column), y = cellValue(b, column);
  if (x === "" || y === "") {
    return (x === "") - (y === "");
  }
  var order = type === "number" ? Number(x) - Number(y) : x.localeCompare(y);
  if (order === 0) {
    return Number(a.getAttribute("data-order")) - Number(b.getAttribute("data-order"));
  }
  return ascending ? order : -order;
}
function sortTable(table, header, column) {
  var ascending = header.getAttribute("aria-sort") !== "ascending";
  var headers = table.tHead.rows[0].cells;
  for (var index = 0; index < headers.length; index++) {
    headers[index].removeAttribute("aria-sort");
  }
  header.setAttribute("aria-sort", ascending ? "ascending" : "descending");
  var body = table.tBodies[0];
  var rows = Array.prototype.slice.call(body.rows);
  var type = header.getAttribute("data-type");
  rows.sort(function (a, b) { return compareRows(a, b, column, type, ascending); });
  rows.forEach(function (row) { body.appendChild(row); });
}
document.querySelectorAll("table.board").forEach(function (table) {
  var headers = table.tHead.rows[0].cells;
  Array.prototype.forEach.call(headers, function (header, column) {
    var button = header.querySelector("button");
    if (button) {
      button.addEventListener("click", function () { sortTable(table, header, column); });
    }
  });
});
"""

INTRODUCTION = (
    "Each table ranks the entries of one concept that were evaluated under one protocol, by ASR "
    "(lower is better). ASR is the share of prompts whose image shows the concept before or after the "
    "attack; pre-attack ASR counts the plain prompts alone. Rates are in percent. <b>measured</b> rows "
    "are runs of this suite; <b>reported</b> rows are copied from the cited source and were not re-run "
    "here. Hover over a provenance mark for its source, open Details for the full provenance, and click "
    "a column header to sort."
)


def _attribute_value(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _cell(text: str, sort_value=None, number: bool = False) -> str:
    css = ' class="number"' if number else ""
    return f'<td{css} data-value="{escape(_attribute_value(sort_value))}">{escape(text)}</td>'


def _details(row: Row) -> str:
    items = "".join(f"<dt>{escape(label)}</dt><dd>{escape(text)}</dd>" for label, text in provenance_items(row.entry))
    return f"<td><details><summary>provenance</summary><dl>{items}</dl></details></td>"


def _row(row: Row, order: int) -> str:
    entry = row.entry
    utility = entry["utility"]
    interval = entry["asr_ci95"]
    provenance = entry["provenance"]
    mark = (f'<td data-value="{provenance}"><span class="mark {provenance}" title="{escape(source_text(entry))}">'
            f"{provenance}</span></td>")
    cells = [
        _cell(str(row.rank), row.rank, number=True),
        _cell(entry["defense"], entry["defense"]),
        _cell(entry["attack"], entry["attack"]),
        _cell(percent(entry["pre_attack_asr"]), entry["pre_attack_asr"], number=True),
        _cell(percent(entry["asr"]), entry["asr"], number=True),
        # The interval column sorts by width, i.e. by how precisely the ASR is known.
        _cell(interval_percent(interval), None if interval is None else interval[1] - interval[0], number=True),
        _cell(utility_text(utility["fid"], "fid"), utility["fid"]["value"], number=True),
        _cell(utility_text(utility["clip_score"], "clip_score"), utility["clip_score"]["value"], number=True),
        _cell(utility_text(utility["retain_accuracy"], "retain_accuracy"), utility["retain_accuracy"]["value"],
              number=True),
        _cell("n/a" if entry["n_prompts"] is None else str(entry["n_prompts"]), entry["n_prompts"], number=True),
        mark,
        _details(row),
    ]
    attributes = (f'data-order="{order}" data-defense="{escape(entry["defense"])}" '
                  f'data-attack="{escape(entry["attack"])}" data-provenance="{provenance}"')
    return f"<tr {attributes}>" + "".join(cells) + "</tr>"


def _header() -> str:
    cells = []
    for label, sort_type in COLUMNS:
        if sort_type is None:
            cells.append(f"<th>{escape(label)}</th>")
        else:
            sort = ' aria-sort="ascending"' if label == "Rank" else ""
            cells.append(f'<th data-type="{sort_type}"{sort}><button type="button">{escape(label)}</button></th>')
    return "<thead><tr>" + "".join(cells) + "</tr></thead>"


def _table(table: Table) -> str:
    protocol = table.protocol
    rows = "\n".join(_row(row, order) for order, row in enumerate(table.rows))
    return (
        f'<h3><span class="mark {protocol.provenance}">{protocol.provenance}</span> '
        f"protocol <code>{escape(protocol.key)}</code></h3>\n"
        f'<p class="protocol">{escape(protocol.summary)}</p>\n'
        f'<table class="board" data-concept="{escape(table.concept)}" data-protocol="{escape(protocol.key)}">\n'
        f"{_header()}\n<tbody>\n{rows}\n</tbody>\n</table>\n"
    )


def render_page(tables: list[Table]) -> str:
    """Return the whole page as one HTML document."""
    sections = []
    concepts = []
    for table in tables:
        if not concepts or concepts[-1] != table.concept:
            concepts.append(table.concept)
            sections.append(f'<h2 id="concept-{escape(table.concept)}">{escape(table.concept)}</h2>\n')
        sections.append(_table(table))
    navigation = " | ".join(f'<a href="#concept-{escape(name)}">{escape(name)}</a>' for name in concepts)
    body = "".join(sections) if sections else "<p>No entries yet.</p>\n"
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        "<title>robust-erasure-bench leaderboard</title>\n"
        f"<style>{STYLE}</style>\n</head>\n<body>\n<h1>Leaderboard</h1>\n<p>{INTRODUCTION}</p>\n"
        f"<nav>{navigation}</nav>\n{body}<script>{SCRIPT}</script>\n</body>\n</html>\n"
    )
