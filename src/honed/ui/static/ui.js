// honed ui: a few lines of plain JS, no framework, nothing fetched from elsewhere.
"use strict";

function esc(s) {
  return String(s).replace(/[&<>"']/g, c => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
}
const SYMBOLS = {ok: "\u2713", warn: "!", fail: "\u2717", skipped: "\u2013", error: "\u2717"};
function badge(guard, status) {
  const s = String(status).toLowerCase(), cls = SYMBOLS[s] ? s : "unknown";
  return `<span class="badge badge-${cls}" title="${esc(guard)}: ${esc(s)}" data-guard="${esc(guard)}" data-status="${esc(s)}">` +
         `<span aria-hidden="true">${SYMBOLS[s] || "?"}</span> ${esc(s)}</span>`;
}
function num(v, d) {
  if (typeof v !== "number") return "\u2014";
  return Math.abs(v) >= 1e4 ? v.toFixed(0) : v.toFixed(d);
}

// ---------------------------------------------------------------- the runs table
function runsTable(table) {
  const guards = table.dataset.guards.split(",");
  const body = table.tBodies[0];
  const filter = document.getElementById("filter"), stateFilter = document.getElementById("state-filter");
  const compareButton = document.getElementById("compare-selected");
  let rows = null, sortKey = "date", sortDir = -1;

  function picked() { return [...body.querySelectorAll("input.pick:checked")].map(i => i.value); }
  function updateCompare() {
    const n = picked().length;
    compareButton.disabled = n < 2 || n > 6;
    compareButton.textContent = n ? `Compare selected (${n})` : "Compare selected";
  }
  function render() {
    if (!rows) return;
    const q = filter.value.trim().toLowerCase(), st = stateFilter.value, keep = new Set(picked());
    const shown = rows.filter(r => (!st || r.state === st) &&
      (!q || [r.name, r.task, r.model, r.method, r.state, r.metric].join(" ").toLowerCase().includes(q)));
    shown.sort((a, b) => {
      const x = a[sortKey], y = b[sortKey];
      if (x === y) return 0;
      if (x === null || x === undefined) return 1;
      if (y === null || y === undefined) return -1;
      return (x < y ? -1 : 1) * sortDir;
    });
    body.innerHTML = shown.map(r => `<tr data-name="${esc(r.name)}" data-state="${esc(r.state)}">
      <td><input type="checkbox" class="pick" value="${esc(r.name)}" aria-label="select ${esc(r.name)} to compare"${keep.has(r.name) ? " checked" : ""}></td>
      <td><a href="/runs/${encodeURI(r.name)}">${esc(r.name)}</a></td><td data-label="task">${esc(r.task)}</td><td data-label="model">${esc(r.model)}</td><td data-label="method">${esc(r.method)}</td>
      <td class="num" data-label="test">${r.test === null ? "\u2014" : esc(r.metric) + " " + num(r.test, 4)}</td>
      <td class="guards" data-label="guards">${guards.map(g => `<span class="guard"><span class="gname">${esc(g)}</span> ${badge(g, r.guards[g])}</span>`).join("")}</td>
      <td class="num" data-label="train s">${num(r.train_seconds, 1)}</td><td data-label="date">${esc(r.date)}</td>
      <td data-label="state"><span class="state state-${esc(r.state)}">${esc(r.state)}</span>${r.state === "running" ? `<span class="note"> ${esc(r.phase)}</span>` : ""}</td></tr>`).join("");
    const none = document.getElementById("no-runs");
    if (none) none.hidden = rows.length > 0;
    updateCompare();
  }
  async function refresh() {
    try {
      const response = await fetch("/api/runs", {headers: {accept: "application/json"}});
      if (!response.ok) return;
      rows = (await response.json()).runs;
      render();
      document.getElementById("refreshed").textContent = "updated " + new Date().toLocaleTimeString();
    } catch (e) { /* the server is restarting: try again at the next tick */ }
  }
  table.querySelectorAll("button.sort").forEach(b => b.addEventListener("click", () => {
    const key = b.dataset.key;
    sortDir = key === sortKey ? -sortDir : 1;
    sortKey = key;
    table.querySelectorAll("th").forEach(th => th.removeAttribute("aria-sort"));
    b.parentElement.setAttribute("aria-sort", sortDir > 0 ? "ascending" : "descending");
    render();
  }));
  filter.addEventListener("input", render);
  stateFilter.addEventListener("change", render);
  body.addEventListener("change", updateCompare);
  compareButton.addEventListener("click", () => {
    location.href = "/compare?" + picked().map(n => "run=" + encodeURIComponent(n)).join("&");
  });
  refresh();
  setInterval(refresh, 2000);
}

// ---------------------------------------------------------------- a run: live progress (server-sent events)
function liveRun(section) {
  if (section.dataset.state !== "running") return;
  const source = new EventSource(section.dataset.events);
  source.onmessage = (message) => {
    const e = JSON.parse(message.data);
    document.getElementById("phase").textContent = e.phase;
    document.getElementById("evaluations").textContent = e.evaluations;
    document.getElementById("step").textContent = e.step === null ? "\u2014" : e.step;
    document.getElementById("sps").textContent = e.samples_per_s === null ? "\u2014" : e.samples_per_s.toFixed(1);
    document.getElementById("live-charts").innerHTML = e.charts;  // the report's own SVG, escaped by the server
    const state = document.getElementById("state");
    state.textContent = e.state;
    state.dataset.state = e.state;
    state.className = "state state-" + e.state;
    if (e.state !== "running") {
      source.close();
      setTimeout(() => location.reload(), 500);  // the report and the final badges
    }
  };
}

// ---------------------------------------------------------------- new run: live check, columns
function checkForm(form) {
  const result = form.querySelector(".check-result");
  let timer = null, serial = 0;
  function fields() {
    const data = {};
    new FormData(form).forEach((v, k) => { data[k] = v; });
    form.querySelectorAll("input[type=checkbox]").forEach(c => { data[c.name] = c.checked; });
    return data;
  }
  async function check() {
    const mine = ++serial;
    form.querySelectorAll(".field-error").forEach(s => { s.textContent = ""; });
    result.textContent = "checking\u2026";
    result.className = "check-result";
    const data = fields();
    if (data.source === "file" && !data.recipe) { result.textContent = ""; return; }
    if (data.source === "form" && !data.train) { result.textContent = "choose the training data to check the recipe"; return; }
    try {
      const response = await fetch("/api/check", {method: "POST", headers: {"content-type": "application/json", accept: "application/json"},
                                                  body: JSON.stringify(data)});
      const answer = await response.json();
      if (mine !== serial) return;
      if (answer.ok) {
        result.textContent = answer.summary + (answer.findings.length ? " \u2014 " + answer.findings.join("; ") : "");
        result.className = "check-result ok";
      } else {
        const message = answer.error || (answer.error && answer.error.message) || "the check failed";
        const slot = form.querySelector(`.field-error[data-for="${CSS.escape(answer.field || "")}"]`);
        if (slot) { slot.textContent = message; result.textContent = "see the error beside " + answer.field; }
        else result.textContent = message;
        result.className = "check-result bad";
      }
    } catch (e) { result.textContent = ""; }
  }
  form.addEventListener("change", () => { clearTimeout(timer); timer = setTimeout(check, 250); });
  form.addEventListener("input", (ev) => { if (ev.target.tagName !== "SELECT") { clearTimeout(timer); timer = setTimeout(check, 700); } });
  const train = form.querySelector("[data-columns]");
  if (train) train.addEventListener("change", async () => {
    const list = document.getElementById(train.dataset.columns), note = document.getElementById("columns-note");
    list.innerHTML = "";
    note.textContent = "";
    if (!train.value) return;
    const response = await fetch("/api/columns?file=" + encodeURIComponent(train.value), {headers: {accept: "application/json"}});
    if (!response.ok) return;
    const cols = (await response.json()).columns;
    list.innerHTML = cols.map(c => `<option value="${esc(c)}">`).join("");
    note.textContent = cols.length ? "columns: " + cols.join(", ") : "";
  });
}

document.addEventListener("DOMContentLoaded", () => {
  const table = document.getElementById("runs");
  if (table) runsTable(table);
  const live = document.getElementById("live");
  if (live) liveRun(live);
  document.querySelectorAll("form.check-form").forEach(checkForm);
  const frame = document.getElementById("report-frame");
  if (frame) frame.addEventListener("load", () => {  // the report's full height, no inner scroll bar
    try { frame.style.height = frame.contentDocument.documentElement.scrollHeight + 20 + "px"; } catch (e) { /* keep the CSS height */ }
  });
});
