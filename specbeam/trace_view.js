// specbeam's beam trace view: draws the JSON of <script id="trace-data"> as SVG. Every text goes in
// through textContent (never markup), so a token's text cannot inject anything. No network access.
"use strict";
(function () {
  const DATA = JSON.parse(document.getElementById("trace-data").textContent);
  const NS = "http://www.w3.org/2000/svg"; // a namespace name for createElementNS, never fetched
  const COL = 124, ROW = 32, DROW = 24, LEFT = 64, TOP = 40; // px: a step's column, a rank's row
  const svg = document.getElementById("tree"), scene = document.getElementById("scene");
  const tip = document.getElementById("tip"), bar = document.getElementById("bar");
  const listBox = document.getElementById("returned");
  const last = Math.max(DATA.num_steps - 1, 0);
  const state = { prompt: 0, from: 0, to: last, drafts: false, selected: -1, view: { x: 0, y: 0, k: 1 } };

  function el(name, attrs, parent, text) {
    const node = document.createElementNS(NS, name);
    for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, value);
    if (text !== undefined) node.textContent = text;
    if (parent) parent.appendChild(node);
    return node;
  }
  function html(name, attrs, parent, text) {
    const node = document.createElement(name);
    for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, value);
    if (text !== undefined) node.textContent = text;
    if (parent) parent.appendChild(node);
    return node;
  }
  const P = () => DATA.prompts[state.prompt];
  const x = (step) => LEFT + (step - state.from + 1) * COL; // step -1 (the prompt) sits at LEFT
  const y = (rank) => TOP + rank * ROW;
  const score = (s) => (s === null ? "-inf" : s.toFixed(4));
  const curve = (x1, y1, x2, y2) => `M${x1},${y1} C${(x1 + x2) / 2},${y1} ${(x1 + x2) / 2},${y2} ${x2},${y2}`;

  // --- the path of a node back to the prompt, and which nodes the returned hypotheses pass through ---
  function pathTo(id) {
    const nodes = P().nodes, path = [];
    for (let n = id; n >= 0; n = nodes[n].parent) path.push(n);
    return path.reverse();
  }
  function returnedSets() {
    const onPath = new Set(), ends = new Map();
    P().returned.forEach((r, i) => {
      r.path.forEach((n) => onPath.add(n));
      ends.set(r.node, i);
    });
    return { onPath, ends };
  }

  // --- drawing ---
  function draw() {
    scene.textContent = "";
    const nodes = P().nodes.filter((n) => n.step >= state.from && n.step <= state.to);
    const { onPath, ends } = returnedSets();
    const selected = new Set(state.selected >= 0 ? pathTo(state.selected) : []);
    const edges = el("g", { class: "edges" }, scene), glyphs = el("g", { class: "nodes" }, scene);
    drawRoot(glyphs);
    const order = { dropped: 0, finished: 1, running: 2 }; // the live edges on top of the dead ones
    nodes.slice().sort((a, b) => order[a.fate] - order[b.fate]).forEach((n) => {
      const from = n.parent >= 0 ? P().nodes[n.parent] : null;
      let cls = "edge " + n.fate;
      if (onPath.has(n.id)) cls += " returned";
      if (selected.has(n.id)) cls += " selected";
      el("path", { class: cls, d: curve(x(n.step - 1), y(from ? from.rank : 0), x(n.step), y(n.rank)) }, edges);
    });
    nodes.forEach((n) => drawNode(glyphs, n, ends, selected));
    if (state.drafts) drawDrafts();
    drawAxis();
  }

  function drawRoot(parent) {
    const label = state.from === 0 ? "prompt" : `… step ${state.from - 1}`;
    const g = el("g", { class: "root" }, parent);
    el("rect", { x: LEFT - 6, y: y(0) - 6, width: 12, height: 12 }, g);
    el("text", { x: LEFT, y: y(0) - 12, "text-anchor": "middle" }, g, label);
  }

  function drawNode(parent, n, ends, selected) {
    const g = el("g", { class: `node ${n.fate}` + (selected.has(n.id) ? " selected" : ""), "data-id": n.id }, parent);
    if (ends.has(n.id)) el("circle", { class: "ring", cx: x(n.step), cy: y(n.rank), r: 10 }, g);
    if (n.fate === "finished") el("rect", { x: x(n.step) - 5, y: y(n.rank) - 5, width: 10, height: 10 }, g);
    else el("circle", { cx: x(n.step), cy: y(n.rank), r: n.fate === "dropped" ? 3.5 : 5 }, g);
    el("text", { x: x(n.step), y: y(n.rank) - 9, "text-anchor": "middle" }, g, n.label);
    g.addEventListener("mousemove", (e) => showTip(e, nodeTip(n, ends)));
    g.addEventListener("mouseleave", hideTip);
    g.addEventListener("click", (e) => {
      if (dragged) return;
      e.stopPropagation();
      state.selected = state.selected === n.id ? -1 : n.id;
      draw();
      showSelection();
    });
  }

  function nodeTip(n, ends) {
    const nodes = P().nodes, lines = [`${JSON.stringify(n.text)}  (token ${n.token})`];
    lines.push(`step ${n.step}, rank ${n.rank} of ${DATA.num_candidates} candidates: ${fateName(n.fate)}`);
    lines.push(`score ${score(n.score)}  (cumulative log-probability)`);
    if (n.parent < 0) lines.push(`parent: the prompt (beam ${n.slot})`);
    else {
      const p = nodes[n.parent];
      lines.push(`parent: step ${p.step}, rank ${p.rank} ${JSON.stringify(p.text)} (running beam ${n.slot})`);
    }
    if (n.beam >= 0) lines.push(`runs on as beam ${n.beam}`);
    if (ends.has(n.id)) lines.push(`returned sequence #${ends.get(n.id) + 1}`);
    return lines.join("\n");
  }
  const fateName = (f) => ({ running: "kept (running)", finished: "finished", dropped: "dropped" })[f];

  function drawAxis() {
    const g = el("g", { class: "axis" }, scene);
    for (let t = state.from; t <= state.to; t++) el("text", { x: x(t), y: 14, "text-anchor": "middle" }, g, `step ${t}`);
  }

  // --- drafted trees: one lane per round modulo (max depth + 1), so that no two rounds overlap ---
  function drawDrafts() {
    const rounds = P().drafts, kept = new Set();
    if (!rounds.length) return;
    const maxDepth = Math.max(...rounds.map((r) => Math.max(...r.depths)));
    const laneRows = Math.max(...rounds.map((r) => Math.max(...countByDepth(r))));
    const lanes = maxDepth + 1, laneHeight = (laneRows + 1) * DROW;
    const top = y(DATA.num_candidates) + 10;
    const g = el("g", { class: "drafts" }, scene);
    el("text", { class: "lane-title", x: 4, y: top }, g, "drafted trees (filled: kept by the target)");
    rounds.forEach((r, i) => {
      if (r.step > state.to || r.step + maxDepth - 1 < state.from) return;
      drawRound(g, r, top + 10 + (i % lanes) * laneHeight, kept);
    });
    // the candidates a draft proposed and the target kept, ringed in the beam tree
    kept.forEach((id) => {
      const n = P().nodes[id];
      if (n.step >= state.from && n.step <= state.to)
        el("circle", { class: "drafted-ring", cx: x(n.step), cy: y(n.rank), r: 8 }, g);
    });
  }
  function countByDepth(r) {
    const counts = [];
    r.depths.forEach((d) => (counts[d] = (counts[d] || 0) + 1));
    return counts;
  }

  function drawRound(parent, r, top, kept) {
    const g = el("g", { class: "round" }, parent), seen = [], at = [];
    r.depths.forEach((d, i) => {
      seen[d] = (seen[d] || 0) + 1;
      at.push([x(r.step + d - 1), top + DROW * seen[d]]);
    });
    el("text", { class: "round-title", x: at[0][0] - 8, y: top + 6, "text-anchor": "end" }, g, `round @${r.step}`);
    r.parents.forEach((p, i) => {
      if (p >= 0) el("path", { class: "draft-edge" + (r.kept[i] ? " kept" : ""), d: curve(...at[p], ...at[i]) }, g);
    });
    r.tokens.forEach((token, i) => {
      if (r.match[i] >= 0) kept.add(r.match[i]);
      const cls = r.parents[i] < 0 ? "draft-root" : r.kept[i] ? "draft kept" : "draft rejected";
      const n = el("g", { class: cls }, g);
      el("circle", { cx: at[i][0], cy: at[i][1], r: r.parents[i] < 0 ? 3 : 4 }, n);
      const text = r.parents[i] < 0 ? `b${r.beams[i]} ${r.labels[i]}` : r.labels[i];
      el("text", { x: at[i][0] + 7, y: at[i][1] + 4 }, n, text);
      n.addEventListener("mousemove", (e) => showTip(e, draftTip(r, i)));
      n.addEventListener("mouseleave", hideTip);
    });
  }

  function draftTip(r, i) {
    const lines = [`${JSON.stringify(r.texts[i])}  (token ${r.tokens[i]})`];
    if (r.parents[i] < 0) lines.push(`root: running beam ${r.beams[i]} when the round began at step ${r.step}`);
    else {
      lines.push(`drafted at depth ${r.depths[i]} under beam ${r.beams[i]}, for step ${r.step + r.depths[i] - 1}`);
      lines.push(r.kept[i] ? "kept: the target's beam step chose it" : "rejected by the target");
      if (r.match[i] >= 0) lines.push(`= candidate rank ${P().nodes[r.match[i]].rank} of that step`);
    }
    return lines.join("\n");
  }

  // --- tooltip ---
  function showTip(e, text) {
    tip.textContent = text;
    tip.style.display = "block";
    const box = svg.getBoundingClientRect();
    tip.style.left = `${e.clientX - box.left + 14}px`;
    tip.style.top = `${e.clientY - box.top + 14}px`;
  }
  function hideTip() {
    tip.style.display = "none";
  }

  // --- pan and zoom: one transform on the scene ---
  let dragged = false, drag = null;
  function applyView() {
    const v = state.view;
    scene.setAttribute("transform", `translate(${v.x},${v.y}) scale(${v.k})`);
  }
  svg.addEventListener("wheel", (e) => {
    e.preventDefault();
    const box = svg.getBoundingClientRect(), v = state.view;
    const px = e.clientX - box.left, py = e.clientY - box.top;
    const k = Math.min(4, Math.max(0.05, v.k * (e.deltaY < 0 ? 1.15 : 1 / 1.15)));
    v.x = px - ((px - v.x) * k) / v.k;
    v.y = py - ((py - v.y) * k) / v.k;
    v.k = k;
    applyView();
  }, { passive: false });
  svg.addEventListener("pointerdown", (e) => {
    drag = { x: e.clientX, y: e.clientY, vx: state.view.x, vy: state.view.y };
    dragged = false;
  });
  window.addEventListener("pointermove", (e) => {
    if (!drag) return;
    const dx = e.clientX - drag.x, dy = e.clientY - drag.y;
    if (Math.abs(dx) + Math.abs(dy) > 3) dragged = true;
    state.view.x = drag.vx + dx;
    state.view.y = drag.vy + dy;
    applyView();
  });
  window.addEventListener("pointerup", () => {
    drag = null;
    setTimeout(() => (dragged = false), 0); // the click that ends a drag is no click
  });
  svg.addEventListener("click", () => {
    if (dragged || state.selected < 0) return;
    state.selected = -1;
    draw();
    showSelection();
  });
  function fit() {
    const box = scene.getBBox(), w = svg.clientWidth, h = svg.clientHeight;
    const k = Math.min(1.5, (w - 20) / Math.max(box.width, 1), (h - 20) / Math.max(box.height, 1));
    state.view = { x: 10 - box.x * k, y: 10 - box.y * k, k };
    applyView();
  }
  function center(id) {
    const n = P().nodes[id], v = state.view;
    if (n.step < state.from || n.step > state.to) {
      state.from = Math.max(0, Math.min(state.from, n.step));
      state.to = Math.max(state.to, n.step);
      syncRange();
      draw();
    }
    v.x = svg.clientWidth * 0.75 - x(n.step) * v.k;
    v.y = svg.clientHeight * 0.4 - y(n.rank) * v.k;
    applyView();
  }

  // --- controls ---
  let fromInput, toInput;
  function buildBar() {
    html("strong", {}, bar, "specbeam beam trace");
    if (DATA.prompts.length > 1) {
      const label = html("label", {}, bar, "prompt ");
      const select = html("select", { id: "prompt" }, label);
      DATA.prompts.forEach((_, i) => html("option", { value: i }, select, String(i)));
      select.addEventListener("change", () => {
        state.prompt = Number(select.value);
        state.selected = -1;
        draw();
        showReturned();
        showSelection();
      });
    }
    const range = html("label", {}, bar, "steps ");
    fromInput = html("input", { id: "from", type: "number", min: 0, max: last, value: 0 }, range);
    range.appendChild(document.createTextNode(" to "));
    toInput = html("input", { id: "to", type: "number", min: 0, max: last, value: last }, range);
    const onRange = () => {
      const a = Math.max(0, Math.min(last, Number(fromInput.value) || 0));
      const b = Math.max(a, Math.min(last, Number(toInput.value) || 0));
      state.from = a;
      state.to = b;
      draw();
    };
    fromInput.addEventListener("change", onRange);
    toInput.addEventListener("change", onRange);
    const hasDrafts = DATA.prompts.some((p) => p.drafts.length);
    const toggle = html("label", {}, bar);
    const box = html("input", { id: "drafts", type: "checkbox" }, toggle);
    toggle.appendChild(document.createTextNode(hasDrafts ? " drafted trees" : " drafted trees (none: not a speculative run)"));
    box.disabled = !hasDrafts;
    box.addEventListener("change", () => {
      state.drafts = box.checked;
      draw();
    });
    const fitButton = html("button", { type: "button" }, bar, "fit");
    fitButton.addEventListener("click", fit);
    const oneButton = html("button", { type: "button" }, bar, "1:1");
    oneButton.addEventListener("click", () => {
      state.view = { x: 0, y: 0, k: 1 };
      applyView();
    });
    const legend = html("span", { class: "legend" }, bar);
    [["running", "kept (running)"], ["finished", "finished"], ["dropped", "dropped"], ["returned", "returned path"],
     ["selected", "selected path"]].forEach(([cls, text]) => html("span", { class: "key " + cls }, legend, text));
    html("span", { class: "hint" }, bar, "drag to pan, wheel to zoom, click a node for its path");
  }
  function syncRange() {
    fromInput.value = state.from;
    toInput.value = state.to;
  }

  function showReturned() {
    listBox.textContent = "";
    const returned = P().returned;
    html("div", { class: "title" }, listBox, returned.length ? "returned sequences (best first; click to find)" : "no returned sequence recorded");
    returned.forEach((r, i) => {
      const row = html("div", { class: "seq", "data-node": r.node }, listBox);
      html("span", { class: "rank" }, row, `#${i + 1}`);
      html("span", { class: "score", title: "cumulative log-probability" }, row, `log p ${score(r.score)}`);
      html("code", { title: r.text }, row, oneLine(r.text));
      row.addEventListener("click", () => {
        state.selected = r.node;
        draw();
        showSelection();
        center(r.node);
      });
    });
    html("div", { class: "selection" }, listBox);
  }
  function showSelection() {
    const box = listBox.querySelector(".selection");
    box.textContent = "";
    if (state.selected < 0) return;
    const nodes = P().nodes, path = pathTo(state.selected), end = nodes[state.selected];
    html("span", { class: "rank" }, box, `selected: step ${end.step}, rank ${end.rank}`);
    html("code", {}, box, oneLine(path.map((n) => nodes[n].text).join("")));
  }
  const oneLine = (text) => text.replace(/\r?\n/g, "↵").replace(/\t/g, "⇥");

  // the address can open the page in a given state: #prompt=1&from=10&to=30&drafts&fit
  function fromHash() {
    const options = new URLSearchParams(location.hash.slice(1));
    const int = (name, low, high, fallback) => {
      const v = Number(options.get(name));
      return options.has(name) && Number.isInteger(v) ? Math.max(low, Math.min(high, v)) : fallback;
    };
    state.prompt = int("prompt", 0, DATA.prompts.length - 1, 0);
    state.from = int("from", 0, last, 0);
    state.to = int("to", state.from, last, last);
    state.drafts = options.has("drafts") && P().drafts.length > 0;
    const select = document.getElementById("prompt");
    if (select) select.value = state.prompt;
    document.getElementById("drafts").checked = state.drafts;
    syncRange();
    return options.has("fit");
  }

  buildBar();
  const fitNow = fromHash();
  showReturned();
  draw();
  applyView();
  if (fitNow) fit();
})();
