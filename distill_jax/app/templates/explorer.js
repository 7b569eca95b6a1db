// explorer.html's script: reads the JSON embedded by distill_jax.app._explorer and draws the page.
// No library, no network. Elements carry data-* attributes with the exact values shown (tests read them).
"use strict";
(async function () {
  const DATA = JSON.parse(document.getElementById("explorer-data").textContent);
  const [H, W, C] = DATA.image_shape;
  const N = DATA.count;
  const CLASSES = DATA.classes;
  const SVG_NS = "http://www.w3.org/2000/svg";
  const TEACHER = DATA.models[0].name;

  // ---- decoding and small DOM helpers ----
  function bytes(b64) {
    const s = atob(b64);
    const out = new Uint8Array(s.length);
    for (let i = 0; i < s.length; i++) out[i] = s.charCodeAt(i);
    return out;
  }
  // zlib-compressed base64 (the images and maps: most of the page's bytes) -> Uint8Array
  async function inflated(b64) {
    const stream = new Blob([bytes(b64)]).stream().pipeThrough(new DecompressionStream("deflate"));
    return new Uint8Array(await new Response(stream).arrayBuffer());
  }
  const floats = (b64) => { const b = bytes(b64); return new Float32Array(b.buffer, 0, b.length / 4); };
  const int8s = (b64) => { const b = bytes(b64); return new Int8Array(b.buffer, 0, b.length); };

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") node.className = v; else node.setAttribute(k, v);
    }
    for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
    return node;
  }
  function svg(tag, attrs, ...children) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
    return node;
  }
  const fmt = (v, d = 3) => (v === null || v === undefined || !Number.isFinite(v) ? "n/a" : v.toFixed(d));

  // value in [0, 1] -> white..red; G = B = 255 (1 - v) encodes the value exactly (to 1/255)
  const heat = (v) => [255 - Math.round(80 * v), 255 - Math.round(255 * v), 255 - Math.round(255 * v)];
  // value in [-1, 1] -> blue..white..red
  function signed(v) {
    const a = Math.round(255 * (1 - Math.min(1, Math.abs(v))));
    return v >= 0 ? [255, a, a] : [a, a, 255];
  }
  // draws an h x w field through `colour(value)`; values[p] for p = row * w + col
  function paint(canvas, h, w, valueAt, colour) {
    canvas.width = w; canvas.height = h;
    const ctx = canvas.getContext("2d");
    const img = ctx.createImageData(w, h);
    for (let p = 0; p < h * w; p++) {
      const [r, g, b] = colour(valueAt(p));
      img.data[4 * p] = r; img.data[4 * p + 1] = g; img.data[4 * p + 2] = b; img.data[4 * p + 3] = 255;
    }
    ctx.putImageData(img, 0, 0);
    return canvas;
  }
  // channel-summed value of a [.., H, W, C] float array at pixel p of image offset `base`
  const channelSum = (arr, base, p) => { let s = 0; for (let c = 0; c < C; c++) s += arr[base + p * C + c]; return s; };

  // ---- the images ----
  const PIXELS = await inflated(DATA.images.pixels);
  function drawImage(canvas, i) {
    canvas.width = W; canvas.height = H;
    const ctx = canvas.getContext("2d");
    const img = ctx.createImageData(W, H);
    for (let p = 0; p < H * W; p++) {
      const base = (i * H * W + p) * C;
      const r = PIXELS[base], g = C >= 3 ? PIXELS[base + 1] : r, b = C >= 3 ? PIXELS[base + 2] : r;
      img.data[4 * p] = r; img.data[4 * p + 1] = g; img.data[4 * p + 2] = b; img.data[4 * p + 3] = 255;
    }
    ctx.putImageData(img, 0, 0);
    return canvas;
  }
  const label = (i) => DATA.images.labels[i];
  const modelByName = Object.fromEntries(DATA.models.map((m) => [m.name, m]));
  const predicted = (name, i) => modelByName[name].predicted[i];

  // ---- verdict ----
  function drawVerdict() {
    const box = document.getElementById("verdict");
    box.append(el("h2", {}, "Verdict: which student, which explanation"));
    for (const p of DATA.verdict) {
      const para = el("p", {}, el("strong", {}, p.lead + ": "), p.text);
      if (p.rule) para.append(" ", el("span", { class: "rule" }, "Rule: " + p.rule));
      box.append(para);
    }
  }

  // ---- image browser: filters and thumbnails ----
  const state = { current: 0, expanded: {} };
  const filters = {
    trueClass: document.getElementById("filter-true"), model: document.getElementById("filter-model"),
    predClass: document.getElementById("filter-pred"), disagree: document.getElementById("filter-disagree"),
  };
  function disagrees(name, i) {
    if (name !== TEACHER) return predicted(name, i) !== predicted(TEACHER, i);
    return DATA.models.some((m) => m.name !== TEACHER && predicted(m.name, i) !== predicted(TEACHER, i));
  }
  function setUpFilters() {
    for (const select of [filters.trueClass, filters.predClass]) {
      select.append(el("option", { value: "" }, "any"));
      CLASSES.forEach((c, k) => select.append(el("option", { value: String(k) }, c)));
    }
    for (const m of DATA.models) filters.model.append(el("option", { value: m.name }, m.name));
    if (DATA.models.length > 1) filters.model.value = DATA.models[1].name;
    for (const input of Object.values(filters)) input.addEventListener("change", applyFilters);
  }
  function matches(i) {
    const name = filters.model.value;
    if (filters.trueClass.value !== "" && label(i) !== Number(filters.trueClass.value)) return false;
    if (filters.predClass.value !== "" && predicted(name, i) !== Number(filters.predClass.value)) return false;
    return !(filters.disagree.checked && !disagrees(name, i));
  }
  function drawThumbs() {
    const box = document.getElementById("thumbs");
    for (let i = 0; i < N; i++) {
      const button = el("button", { class: "thumb", "data-i": String(i), type: "button",
        title: `test image ${DATA.images.test_index[i]}: ${CLASSES[label(i)]}` }, drawImage(el("canvas"), i));
      button.addEventListener("click", () => select(i));
      box.append(button);
    }
  }
  function applyFilters() {
    const name = filters.model.value;
    document.getElementById("disagree-name").textContent = name === TEACHER ? "any student" : name;
    let shown = 0;
    for (const button of document.querySelectorAll(".thumb")) {
      const i = Number(button.dataset.i);
      const ok = matches(i);
      button.hidden = !ok;
      button.classList.toggle("disagree", disagrees(name, i));
      shown += ok;
    }
    document.getElementById("match-count").textContent = `${shown} of ${N} images`;
  }

  // ---- the chosen image: predictions ----
  function drawPredictions(i) {
    const table = document.getElementById("predictions");
    table.replaceChildren(el("tr", {}, ...["model", "predicted", "p(predicted)", `p(${CLASSES[label(i)]})`,
      "probabilities", "test accuracy", "agreement"].map((h) => el("th", {}, h))));
    for (const m of DATA.models) {
      const probs = m.probs[i], k = m.predicted[i];
      const bars = el("span", {});
      probs.forEach((p, c) => bars.append(el("span", { class: "bar", title: `${CLASSES[c]}: ${fmt(p, 4)}`,
        style: `width:${Math.max(1, Math.round(60 * p))}px;opacity:${c === k ? 1 : 0.35}` })));
      table.append(el("tr", { "data-model": m.name },
        el("td", {}, m.name), el("td", { class: "pred" + (k === label(i) ? "" : " wrong"), "data-class": String(k) },
          CLASSES[k]), el("td", { class: "prob", "data-prob": String(probs[k]) }, fmt(probs[k], 4)),
        el("td", {}, fmt(probs[label(i)], 4)), el("td", {}, bars),
        el("td", { class: "accuracy", "data-value": String(m.accuracy) }, fmt(m.accuracy, 4)),
        el("td", { class: "agreement", "data-value": String(m.agreement) }, m.agreement === null ? "" : fmt(m.agreement, 4))));
    }
  }

  // ---- maps: one row per method, one column per model ----
  const MAPS = {};
  for (const [name, per] of Object.entries(DATA.maps)) {
    MAPS[name] = {};
    for (const [method, m] of Object.entries(per)) MAPS[name][method] = { data: await inflated(m.data), max: m.max };
  }
  function drawMaps(i) {
    const shared = document.getElementById("shared-scale").checked;
    const names = DATA.models.map((m) => m.name);
    const table = el("table", {}, el("tr", {}, el("th", {}, "method"), ...names.map((n) => el("th", {}, n))));
    for (const method of DATA.methods) {
      const have = names.filter((n) => MAPS[n] && MAPS[n][method]);
      const top = Math.max(...have.map((n) => MAPS[n][method].max[i]));
      const row = el("tr", {}, el("td", {}, method));
      for (const name of names) {
        const m = MAPS[name] && MAPS[name][method];
        if (!m) { row.append(el("td", { class: "note" }, "n/a")); continue; }
        const own = m.max[i], scale = shared ? top : own;
        const factor = scale > 0 ? own / scale : 0;
        const offset = i * H * W;
        const canvas = paint(el("canvas", { class: "map", "data-model": name, "data-method": method,
          "data-max": String(own), "data-scale": String(scale), title: `${name}, ${method}: max |a| ${own.toPrecision(3)}` }),
        H, W, (p) => (m.data[offset + p] / 255) * factor, heat);
        row.append(el("td", {}, canvas));
      }
      table.append(row);
    }
    document.getElementById("maps").replaceChildren(table);
  }
  function drawScores(i) {
    const metrics = [];
    for (const per of Object.values(DATA.scores))
      for (const s of Object.values(per)) for (const k of Object.keys(s)) if (!metrics.includes(k)) metrics.push(k);
    const table = el("table", {}, el("tr", {}, el("th", {}, "model"), el("th", {}, "method"),
      ...metrics.map((k) => el("th", {}, k.replaceAll("_", " ")))));
    for (const [name, per] of Object.entries(DATA.scores))
      for (const [method, s] of Object.entries(per))
        table.append(el("tr", { "data-model": name, "data-method": method }, el("td", {}, name), el("td", {}, method),
          ...metrics.map((k) => el("td", { "data-metric": k }, s[k] ? fmt(s[k][i]) : ""))));
    document.getElementById("scores").replaceChildren(table);
  }

  // ---- soft trees ----
  const TREES = {};
  for (const [name, t] of Object.entries(DATA.trees)) {
    const inner = 2 ** t.depth - 1;
    TREES[name] = { depth: t.depth, inner, leaves: inner + 1, routing: floats(t.routing),
      filters: int8s(t.filters.data), leafProbs: t.leaf_probs, filterUrls: {} };
  }
  // reach[node] for every node of the complete tree (inner nodes 0..inner-1, leaf l is node inner + l)
  function reachOf(tree, i) {
    const p = tree.routing.subarray(i * tree.inner, (i + 1) * tree.inner);
    const reach = new Float64Array(2 * tree.inner + 1);
    reach[0] = 1;
    for (let j = 0; j < tree.inner; j++) { reach[2 * j + 1] = reach[j] * (1 - p[j]); reach[2 * j + 2] = reach[j] * p[j]; }
    return { p, reach };
  }
  function greedyPath(tree, p) {  // the more likely branch at every node: the tree's hard decision
    const path = [0];
    while (path[path.length - 1] < tree.inner) { const j = path[path.length - 1]; path.push(2 * j + 1 + (p[j] > 0.5 ? 1 : 0)); }
    return path;
  }
  function filterUrl(tree, j) {
    if (!tree.filterUrls[j]) {
      const base = j * H * W;
      tree.filterUrls[j] = paint(document.createElement("canvas"), H, W, (q) => tree.filters[base + q] / 127, signed)
        .toDataURL();
    }
    return tree.filterUrls[j];
  }
  // the visible part of the tree: the root, and the children of every expanded node; x by in-order of terminals
  function layout(tree, expanded) {
    const nodes = [];
    let slot = 0;
    (function place(j, level) {
      const open = j < tree.inner && expanded.has(j);
      let x;
      if (open) { const a = place(2 * j + 1, level + 1), b = place(2 * j + 2, level + 1); x = (a + b) / 2; }
      else x = slot++;
      nodes.push({ j, level, x, open });
      return x;
    })(0, 0);
    return { nodes, slots: slot };
  }
  function drawTree(name, i) {
    const tree = TREES[name];
    const { p, reach } = reachOf(tree, i);
    const path = greedyPath(tree, p), onPath = new Set(path);
    if (!state.expanded[name]) state.expanded[name] = new Set(path.filter((j) => j < tree.inner));
    const expanded = state.expanded[name];
    const { nodes, slots } = layout(tree, expanded);
    const dx = 92, dy = 118, width = Math.max(1, slots) * dx + 20, levels = Math.max(...nodes.map((n) => n.level)) + 1;
    const root = svg("svg", { width, height: levels * dy + 10, viewBox: `0 0 ${width} ${levels * dy + 10}`,
      class: "tree-svg", "data-model": name });
    const pos = (n) => [10 + n.x * dx + dx / 2, 8 + n.level * dy];
    const byNode = Object.fromEntries(nodes.map((n) => [n.j, n]));
    for (const n of nodes) if (n.open) for (const child of [2 * n.j + 1, 2 * n.j + 2]) {
      const [x1, y1] = pos(n), [x2, y2] = pos(byNode[child]);
      root.append(svg("path", { class: "edge" + (onPath.has(n.j) && onPath.has(child) ? " on-path" : ""),
        d: `M${x1},${y1 + 84} C${x1},${y1 + 100} ${x2},${y2 - 18} ${x2},${y2}` }));
    }
    for (const n of nodes) root.append(n.j < tree.inner ? innerNode(tree, name, n, pos(n), p, reach, onPath)
      : leafNode(tree, n, pos(n), reach, onPath));
    return root;
  }
  function innerNode(tree, name, n, [x, y], p, reach, onPath) {
    const j = n.j;
    const cls = "node" + (onPath.has(j) ? " on-path" : "") + (n.open ? "" : " collapsed") + (onPath.has(j) ? "" : " expandable");
    const g = svg("g", { class: cls, "data-node": String(j), "data-routing": String(p[j]), "data-reach": String(reach[j]) },
      svg("title", {}, `node ${j}: reached with probability ${reach[j].toFixed(4)}; goes right with ${p[j].toFixed(4)}` +
        (n.open ? "" : " (click to open its subtree)")),
      svg("rect", { x: x - 40, y, width: 80, height: 84, rx: 4 }));
    if (n.open) {
      g.append(svg("image", { href: filterUrl(tree, j), x: x - 22, y: y + 3, width: 44, height: 44,
        style: "image-rendering:pixelated" }));
      g.append(svg("text", { x: x - 37, y: y + 60 }, `reach ${reach[j].toFixed(3)}`));
      g.append(svg("text", { x: x - 37, y: y + 74 }, `right ${p[j].toFixed(3)}`));
    } else {
      g.append(svg("text", { x: x - 30, y: y + 36 }, "+ subtree"));
      g.append(svg("text", { x: x - 37, y: y + 56 }, `reach ${reach[j].toFixed(3)}`));
    }
    if (!onPath.has(j)) g.addEventListener("click", () => {
      const set = state.expanded[name];
      if (set.has(j)) { for (const k of [...set]) if (isBelow(k, j)) set.delete(k); } else set.add(j);
      drawTrees(state.current);
    });
    return g;
  }
  const isBelow = (k, j) => { while (k > j) k = Math.floor((k - 1) / 2); return k === j; };  // k in j's subtree
  function leafNode(tree, n, [x, y], reach, onPath) {
    const l = n.j - tree.inner, probs = tree.leafProbs[l];
    const top = probs.indexOf(Math.max(...probs));
    const g = svg("g", { class: "leaf" + (onPath.has(n.j) ? " on-path" : ""), "data-leaf": String(l),
      "data-path-prob": String(reach[n.j]) },
    svg("title", {}, `leaf ${l}: path probability ${reach[n.j].toFixed(4)}; ` +
      probs.map((v, c) => `${CLASSES[c]} ${v.toFixed(3)}`).join(", ")),
    svg("rect", { class: "frame", x: x - 40, y, width: 80, height: 84, rx: 4 }));
    const bw = 70 / probs.length;
    probs.forEach((v, c) => g.append(svg("rect", { x: x - 35 + c * bw, y: y + 44 - 36 * v, width: Math.max(1, bw - 1),
      height: 36 * v, fill: c === top ? "#d33" : "#3569b5" })));
    g.append(svg("text", { x: x - 37, y: y + 60 }, CLASSES[top].slice(0, 12)));
    g.append(svg("text", { x: x - 37, y: y + 74 }, `P ${reach[n.j].toFixed(3)}`));
    return g;
  }
  function leafSummary(probs) {  // the leaf's three most likely classes
    return probs.map((p, c) => [p, c]).sort((a, b) => b[0] - a[0]).slice(0, 3)
      .map(([p, c]) => `${CLASSES[c]} ${p.toFixed(3)}`).join(", ");
  }
  function leafStrip(name, i) {
    const tree = TREES[name];
    const { p, reach } = reachOf(tree, i);
    const onPath = greedyPath(tree, p).at(-1) - tree.inner;
    const w = Math.max(3, Math.min(24, 900 / tree.leaves));
    const strip = svg("svg", { class: "leafstrip", width: tree.leaves * w + 2, height: 26, "data-model": name });
    let best = 0;
    for (let l = 0; l < tree.leaves; l++) {
      const v = reach[tree.inner + l];
      if (v > reach[tree.inner + best]) best = l;
      strip.append(svg("rect", { x: 1 + l * w, y: 2, width: w - 0.5, height: 22, "data-leaf": String(l),
        "data-path-prob": String(v), class: l === onPath ? "on-path" : "", fill: `rgb(${heat(Math.sqrt(v)).join(",")})` },
      svg("title", {}, `leaf ${l}: path probability ${v.toFixed(4)}; ` + leafSummary(tree.leafProbs[l]))));
    }
    return { strip, best, bestProb: reach[tree.inner + best] };
  }
  function drawTrees(i) {
    const box = document.getElementById("trees");
    box.replaceChildren();
    for (const name of Object.keys(TREES)) {
      const tree = TREES[name];
      const { strip, best, bestProb } = leafStrip(name, i);
      const probs = tree.leafProbs[best];
      box.append(el("div", { class: "tree", "data-model": name },
        el("h3", {}, `${name}: soft decision tree, depth ${tree.depth}`),
        el("p", { class: "note" }, "Each inner node shows its filter (red: positive weights send the image right, blue: " +
          "left), the probability of reaching it and of going right. Red: the path that takes the more likely branch at " +
          "every node (the tree's hard decision). Dashed nodes are closed subtrees: click to open or close them."),
        drawTree(name, i),
        el("p", { class: "note" }, `Path probability of every leaf (left to right; the darker, the more likely). ` +
          `Most likely leaf: ${best} (P = ${bestProb.toFixed(4)}, holds ${CLASSES[probs.indexOf(Math.max(...probs))]}).`),
        strip));
    }
  }

  // ---- linear students ----
  const LINEAR = {};
  for (const [name, m] of Object.entries(DATA.linear)) {
    LINEAR[name] = { k: m.k, weights: floats(m.weights), bias: m.bias, z: floats(m.z), templates: floats(m.templates),
      centered: floats(m.centered), chosen: null };
  }
  const D = H * W * C, K = CLASSES.length;
  function linearLogit(m, i, c) {
    let s = m.bias[c];
    for (let j = 0; j < m.k; j++) s += m.weights[j * K + c] * m.z[i * m.k + j];
    return s;
  }
  function drawLinear(name, i) {
    const m = LINEAR[name];
    const logits = CLASSES.map((_, c) => linearLogit(m, i, c));
    const c = m.chosen ?? logits.indexOf(Math.max(...logits));
    const choose = el("select", { class: "linear-class" });
    CLASSES.forEach((cl, k) => choose.append(el("option", { value: String(k) }, cl)));
    choose.value = String(c);
    choose.addEventListener("change", () => { m.chosen = Number(choose.value); drawLinears(state.current); });
    const contributions = [];
    for (let j = 0; j < m.k; j++) contributions.push([j, m.weights[j * K + c] * m.z[i * m.k + j]]);
    const top = contributions.slice().sort((a, b) => Math.abs(b[1]) - Math.abs(a[1])).slice(0, 12);
    const largest = Math.max(1e-12, ...top.map(([, v]) => Math.abs(v)));
    const bars = svg("svg", { width: 330, height: 14 * top.length + 6, class: "contributions" });
    top.forEach(([j, v], r) => {
      const len = 120 * Math.abs(v) / largest;
      bars.append(svg("text", { x: 2, y: 13 + 14 * r }, `PC ${j + 1}`));
      bars.append(svg("rect", { class: "contrib", "data-component": String(j), "data-value": String(v),
        x: v >= 0 ? 170 : 170 - len, y: 4 + 14 * r, width: len, height: 11, fill: v >= 0 ? "#c33" : "#36c" }));
      bars.append(svg("text", { x: 300, y: 13 + 14 * r }, v.toFixed(2)));
    });
    const pixelMap = new Float64Array(H * W);
    let peak = 1e-12, tpeak = 1e-12;
    for (let q = 0; q < H * W; q++) {
      let s = 0;
      for (let ch = 0; ch < C; ch++) s += m.templates[c * D + q * C + ch] * m.centered[i * D + q * C + ch];
      pixelMap[q] = s; peak = Math.max(peak, Math.abs(s));
      tpeak = Math.max(tpeak, Math.abs(channelSum(m.templates, c * D, q)));
    }
    const logitTable = el("table", {}, el("tr", {}, el("th", {}, "class"), el("th", {}, "logit")));
    logits.map((v, k) => [k, v]).sort((a, b) => b[1] - a[1]).forEach(([k, v]) => logitTable.append(
      el("tr", { class: "logit", "data-class": String(k), "data-value": String(v) }, el("td", {}, CLASSES[k]),
        el("td", {}, v.toFixed(3)))));
    const sum = contributions.reduce((a, [, v]) => a + v, 0);
    return el("div", { class: "linear", "data-model": name },
      el("h3", {}, `${name}: linear model over ${m.k} PCA components`),
      el("p", {}, "Contributions to class ", choose, `: logit = ${sum.toFixed(3)} (components) + ${m.bias[c].toFixed(3)} ` +
        `(bias) = ${(sum + m.bias[c]).toFixed(3)}.`),
      el("div", { class: "row" },
        el("figure", {}, paint(el("canvas"), H, W, (q) => channelSum(m.templates, c * D, q) / tpeak, signed),
          el("figcaption", {}, "class template")),
        el("figure", {}, paint(el("canvas", { class: "pixel-contributions" }), H, W, (q) => pixelMap[q] / peak, signed),
          el("figcaption", {}, "template x (image - mean)")),
        el("figure", {}, bars, el("figcaption", {}, "largest component contributions")),
        logitTable));
  }
  function drawLinears(i) {
    document.getElementById("linears").replaceChildren(...Object.keys(LINEAR).map((name) => drawLinear(name, i)));
  }

  // ---- selection ----
  function select(i) {
    state.current = i;
    state.expanded = {};
    for (const m of Object.values(LINEAR)) m.chosen = null;
    for (const b of document.querySelectorAll(".thumb")) b.classList.toggle("selected", Number(b.dataset.i) === i);
    const section = document.getElementById("selected");
    section.dataset.i = String(i);
    section.dataset.testIndex = String(DATA.images.test_index[i]);
    document.getElementById("selected-title").textContent =
      `Test image ${DATA.images.test_index[i]}: true class ${CLASSES[label(i)]}`;
    drawImage(document.getElementById("selected-image"), i);
    drawPredictions(i);
    drawMaps(i);
    drawScores(i);
    drawTrees(i);
    drawLinears(i);
  }

  drawVerdict();
  setUpFilters();
  drawThumbs();
  applyFilters();
  document.getElementById("shared-scale").addEventListener("change", () => drawMaps(state.current));
  select(0);
  document.body.dataset.ready = "true";
  performance.mark("explorer-ready");
})();
