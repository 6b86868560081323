// saex feature browser index: every latent of one SAE from the data of latents.js (window.SAEX_LATENTS), drawn
// one page of rows at a time so the index stays fast for tens of thousands of latents.
"use strict";

function featureIndex(root, data) {
  const PAGE = 100;
  const columns = data.columns;
  const cls = columns.findIndex((c) => c.key === "class");
  let rows = data.rows.slice();
  let shown = rows;
  let page = 0;
  let sortColumn = -1;
  let descending = false;

  const controls = document.createElement("div");
  controls.className = "pager";
  const search = document.createElement("input");
  search.type = "search";
  search.className = "filter";
  search.placeholder = "search: latent id, class, top token…";
  search.setAttribute("aria-label", "search latents");
  const withPage = document.createElement("label");
  withPage.innerHTML = '<input type="checkbox"> only latents with a page';
  const prev = document.createElement("button");
  prev.textContent = "◀ previous";
  const next = document.createElement("button");
  next.textContent = "next ▶";
  const status = document.createElement("span");
  status.className = "status";
  controls.append(search, withPage, prev, status, next);

  const table = document.createElement("table");
  table.className = "data paged";
  const head = table.createTHead().insertRow();
  columns.forEach((c, i) => {
    const th = document.createElement("th");
    th.textContent = c.label;
    if (c.title) th.title = c.title;
    th.addEventListener("click", () => sortBy(i));
    head.appendChild(th);
  });
  const body = table.createTBody();
  root.append(controls, table);

  function value(row, i) {
    const v = row[i];
    return v === null || v === undefined ? null : v;
  }

  function sortBy(i) {
    descending = sortColumn === i ? !descending : columns[i].type === "num" && columns[i].key !== "id";
    sortColumn = i;
    const sign = descending ? -1 : 1;
    rows.sort((a, b) => {
      const x = value(a, i), y = value(b, i);
      if (x === null || y === null) return x === y ? a[0] - b[0] : x === null ? 1 : -1;
      const order = typeof x === "number" ? x - y : String(x).localeCompare(String(y));
      return sign * order || a[0] - b[0];
    });
    Array.from(head.cells).forEach((th, j) => {
      if (j === i) th.setAttribute("aria-sort", descending ? "descending" : "ascending");
      else th.removeAttribute("aria-sort");
    });
    apply();
  }

  function apply() {
    const words = search.value.toLowerCase().split(/\s+/).filter(Boolean);
    const onlyPages = withPage.querySelector("input").checked;
    shown = rows.filter((row) => {
      if (onlyPages && !data.pages[row[0]]) return false;
      const text = row.join(" ").toLowerCase();
      return words.every((w) => (/^\d+$/.test(w) ? String(row[0]) === w || text.includes(w) : text.includes(w)));
    });
    page = 0;
    draw();
  }

  function draw() {
    const pages = Math.max(1, Math.ceil(shown.length / PAGE));
    page = Math.min(page, pages - 1);
    body.replaceChildren();
    for (const row of shown.slice(page * PAGE, (page + 1) * PAGE)) {
      const tr = body.insertRow();
      row.forEach((v, i) => {
        const td = tr.insertCell();
        const c = columns[i];
        if (i === 0 && data.pages[row[0]]) {
          const a = document.createElement("a");
          a.href = data.pages[row[0]];
          a.textContent = v;
          td.appendChild(a);
        } else if (v === null || v === undefined) {
          td.textContent = "";
        } else if (c.type === "num" && c.key !== "id") {
          td.textContent = Number(v).toPrecision(3);
        } else {
          td.textContent = v;
        }
        if (i === cls) td.className = "class-" + v;
      });
    }
    status.textContent = `${shown.length} of ${rows.length} latents · page ${page + 1} of ${pages}`;
    prev.disabled = page === 0;
    next.disabled = page >= pages - 1;
  }

  search.addEventListener("input", apply);
  withPage.querySelector("input").addEventListener("change", apply);
  prev.addEventListener("click", () => { page -= 1; draw(); });
  next.addEventListener("click", () => { page += 1; draw(); });
  apply();
}

document.addEventListener("DOMContentLoaded", () => {
  const root = document.getElementById("latents");
  if (root && window.SAEX_LATENTS) featureIndex(root, window.SAEX_LATENTS);
});
