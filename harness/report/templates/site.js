// saex site: plotly figures from embedded JSON, sortable and filterable tables. No network, no server.
"use strict";

function drawPlots(root) {
  for (const div of root.querySelectorAll("div.plot[data-spec]")) {
    const spec = JSON.parse(document.getElementById(div.dataset.spec).textContent);
    div.style.height = (spec.layout.height || 400) + "px"; // the page flows around the figure's own height
    Plotly.newPlot(div, spec.data, spec.layout, { responsive: true, displaylogo: false });
  }
}

const NUMBER = /^[+\-−]?(\d+\.?\d*|\.\d+)(e[+\-]?\d+)?/i;

// The sort key of a cell: a number when its text starts with one (e.g. "0.85 (Δ -0.06)"), else its text.
function cellKey(cell) {
  const text = (cell.dataset.value ?? cell.textContent).trim();
  const match = text.match(NUMBER);
  return match ? { num: parseFloat(match[0].replace("−", "-")), text } : { num: null, text };
}

function compareKeys(a, b) {
  if (a.num !== null && b.num !== null) return a.num - b.num;
  if (a.num !== null) return -1;
  if (b.num !== null) return 1;
  if (!a.text) return b.text ? 1 : 0;
  if (!b.text) return -1;
  return a.text.localeCompare(b.text);
}

function sortTable(table, column, descending) {
  const body = table.tBodies[0];
  const rows = Array.from(body.rows);
  const keyed = rows.map((row, index) => ({ row, index, key: cellKey(row.cells[column]) }));
  keyed.sort((a, b) => {
    const empty = (k) => k.num === null && !k.text;
    if (empty(a.key) !== empty(b.key)) return empty(a.key) ? 1 : -1; // blanks last either way
    return (descending ? -1 : 1) * compareKeys(a.key, b.key) || a.index - b.index;
  });
  for (const { row } of keyed) body.appendChild(row);
  for (const th of table.tHead.rows[0].cells) th.removeAttribute("aria-sort");
  table.tHead.rows[0].cells[column].setAttribute("aria-sort", descending ? "descending" : "ascending");
}

function enhanceTable(table) {
  if (!table.tHead || !table.tBodies.length) return;
  const wrap = document.createElement("div");
  wrap.className = "table-wrap";
  table.parentNode.insertBefore(wrap, table);
  const filter = document.createElement("input");
  filter.type = "search";
  filter.className = "filter";
  filter.placeholder = "filter rows…";
  filter.setAttribute("aria-label", "filter rows");
  filter.addEventListener("input", () => {
    const words = filter.value.toLowerCase().split(/\s+/).filter(Boolean);
    for (const row of table.tBodies[0].rows) {
      const text = row.textContent.toLowerCase();
      row.hidden = !words.every((w) => text.includes(w));
    }
  });
  wrap.appendChild(filter);
  wrap.appendChild(table);
  Array.from(table.tHead.rows[0].cells).forEach((th, column) => {
    th.addEventListener("click", () => sortTable(table, column, th.getAttribute("aria-sort") === "ascending"));
  });
}

document.addEventListener("DOMContentLoaded", () => {
  for (const table of document.querySelectorAll("table.data:not(.paged)")) enhanceTable(table);
  if (window.Plotly) drawPlots(document);
});
