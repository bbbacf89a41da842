"""The browser page of the live task view: ``/tasks.html``, or ``/tasks`` asked for as HTML.

One self-contained page (no outside scripts, styles or fonts: it works offline, behind a
strict proxy). It reads ``/tasks?graph=1`` (JSON) every two seconds, with the page's own
query parameters (``operation``, ``correlation_id``, ``limit``), and shows per loop the groups
by operation, the tasks as a table, and who awaits whom as a tree.
"""

from __future__ import annotations

from typing import Final

__all__ = ["PAGE", "wants_html"]


def wants_html(accept: str) -> bool:
    """Whether an ``Accept`` header prefers HTML to JSON (a browser's does; curl's does not)."""
    best: dict[str, float] = {}
    for part in accept.split(","):
        fields = part.strip().split(";")
        kind = fields[0].strip().lower()
        q = 1.0
        for param in fields[1:]:
            name, _, value = param.strip().partition("=")
            if name == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        best[kind] = max(q, best.get(kind, 0.0))
    html = best.get("text/html", 0.0)
    json_q = max(best.get("application/json", 0.0), best.get("*/*", 0.0) * 0.99)
    return html > 0 and html >= json_q


PAGE: Final = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>asynctrace: tasks in flight</title>
<style>
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #1d1d1f; }
h1 { font-size: 1.3em; margin: 0 0 .3em; } h2 { font-size: 1.05em; margin: 1.2em 0 .4em; }
table { border-collapse: collapse; margin-bottom: 1em; }
th, td { border-bottom: 1px solid #ddd; padding: 3px 10px 3px 0; text-align: left;
  vertical-align: top; }
th { font-weight: 600; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
code, .mono { font-family: ui-monospace, monospace; font-size: 12px; }
#status { color: #666; } .error { color: #b00020; }
ul.tree { list-style: none; padding-left: 1.2em; margin: 0; }
ul.tree li::before { content: "\\2514\\2500 "; color: #999; }
form input { margin-right: .8em; }
</style></head>
<body>
<h1>Tasks in flight</h1>
<form id="filters">operation <input name="operation" size="14">
correlation id <input name="correlation_id" size="20">
limit <input name="limit" size="5" value="100"> <button>filter</button></form>
<p id="status">loading&hellip;</p>
<div id="view"></div>
<script>
"use strict";
const params = new URLSearchParams(location.search);
for (const name of ["operation", "correlation_id", "limit"]) {
  if (params.get(name)) document.querySelector(`[name=${name}]`).value = params.get(name);
}
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  for (const child of children) {
    node.append(child instanceof Node ? child : document.createTextNode(child ?? ""));
  }
  return node;
}
function table(headers, rows, numeric) {
  const t = el("table", {});
  t.append(el("tr", {}, ...headers.map(h => el("th", {}, h))));
  for (const row of rows) {
    t.append(el("tr", {"class": "row"}, ...row.map((cell, i) =>
      el("td", numeric.includes(i) ? {"class": "num"} : {}, cell))));
  }
  return t;
}
function age(s) { return s == null ? "" : s.toFixed(s < 10 ? 3 : 1) + " s"; }
function tree(tasks) {
  const byId = new Map(tasks.map(t => [t.id, t]));
  const children = new Map();
  const roots = [];
  for (const t of tasks) {
    const parents = (t.awaited_by_ids || []).filter(id => byId.has(id));
    if (parents.length === 0) roots.push(t);
    for (const p of parents) {
      if (!children.has(p)) children.set(p, []);
      children.get(p).push(t);
    }
  }
  const seen = new Set();
  function item(t) {
    const label = `${t.name} [${t.operation ?? "-"}] ${age(t.age_s)}`;
    const li = el("li", {"class": "node", "data-id": t.id}, label);
    if (seen.has(t.id)) return li;
    seen.add(t.id);
    const kids = children.get(t.id) || [];
    if (kids.length) li.append(el("ul", {"class": "tree"}, ...kids.map(item)));
    return li;
  }
  return el("ul", {"class": "tree", "id": "tree"}, ...roots.map(item));
}
function render(view) {
  const root = document.getElementById("view");
  root.replaceChildren();
  for (const loop of view.loops) {
    root.append(el("h2", {}, loop.loop));
    if (loop.error) { root.append(el("p", {"class": "error"}, loop.error)); continue; }
    root.append(el("p", {"id": "summary"},
      `${loop.tasks_in_flight} task(s) in flight` + (loop.truncated ? ", first " +
      loop.tasks.length + " listed" : "")));
    root.append(table(["operation", "tasks", "oldest"], loop.groups.map(g =>
      [g.operation ?? "(none)", String(g.count), age(g.oldest_age_s)]), [1, 2]));
    root.append(table(
      ["name", "operation", "correlation id", "trace id", "age", "state", "waiting in",
       "created at"],
      loop.tasks.map(t => [t.name, t.operation ?? "", t.correlation_id ?? "",
        el("span", {"class": "mono"}, t.trace_id ?? ""), age(t.age_s), t.state,
        el("code", {}, t.waiting_in ?? ""), el("code", {}, t.created_at ?? "")]), [4]));
    root.append(el("h2", {}, "who awaits whom"), tree(loop.tasks));
  }
}
async function refresh() {
  const query = new URLSearchParams(params);
  query.set("graph", "1");
  const status = document.getElementById("status");
  try {
    const response = await fetch("tasks?" + query, {headers: {"Accept": "application/json"}});
    const view = await response.json();
    if (!response.ok) throw new Error(view.error || response.statusText);
    render(view);
    status.className = "";
    status.textContent = "updated " + new Date(view.generated_at * 1000).toLocaleTimeString() +
      " (Python " + view.python + "); refreshes every 2 s";
  } catch (err) {
    status.className = "error";
    status.textContent = "cannot read /tasks: " + err.message;
  }
}
refresh();
setInterval(refresh, 2000);
</script></body></html>
"""
