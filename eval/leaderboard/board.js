/* SAKE leaderboard page: renders window.SAKE_BOARD (data.js) into sortable, filterable tables and an SVG
   gap-vs-metric chart. Plain DOM, no libraries, no network. User-provided strings go through textContent only. */
(function () {
  "use strict";

  var DATA = window.SAKE_BOARD || { rows: [] };
  var SVG_NS = "http://www.w3.org/2000/svg";
  // Method display names and order come from data.js (written by build.py from sake.protocol / sake.registry).
  var METHOD_NAMES = {}, METHOD_RANK = {};
  (DATA.methods || []).forEach(function (m, i) { METHOD_NAMES[m.id] = m.name; METHOD_RANK[m.id] = i; });
  var HEADLINE = ["reliability", "generality", "locality_audio", "locality_text", "portability"];
  // Column layout: top-level entries with `cols` become a group header spanning its sub-columns.
  var LAYOUT = [
    { key: "model", label: "Model", text: true },
    { key: "method", label: "Method", text: true },
    { key: "source", label: "Source", text: true },
    { key: "reliability", label: "Reliability" },
    { label: "Generality", cols: [
      { key: "generality", label: "Avg" }, { key: "generality_type1", label: "T1" },
      { key: "generality_type2", label: "T2" }, { key: "generality_type3", label: "T3" }] },
    { label: "Audio locality", cols: [
      { key: "locality_audio", label: "Avg" }, { key: "locality_audio_type1", label: "T1" },
      { key: "locality_audio_type2", label: "T2" }, { key: "locality_audio_type3", label: "T3" },
      { key: "locality_audio_type4", label: "T4" }] },
    { key: "locality_text", label: "Text locality" },
    { key: "portability", label: "Portability" },
    { label: "Port. by category", modes: ["single"], cols: [
      { key: "port_cat_std", label: "Std", modes: ["single"], plain: true,
        title: "sample standard deviation of portability across knowledge categories (paper Table 3)" },
      { key: "port_cat_range", label: "Range", modes: ["single"], plain: true,
        title: "max - min of portability across knowledge categories (paper Table 3)" }] },
    { key: "average", label: "Average", cls: "avg" },
    { key: "degeneration_rate", label: "Degen.", modes: ["sequential"], plain: true,
      title: "percent of degenerated outputs (lower is better)" },
    { key: "protocol", label: "Protocol", text: true,
      title: "how items were judged: paper (the paper's LLM judge settings), paper+choice (with the choice " +
             "prefilter), custom (another judge model, seed or endpoint), offline (deterministic stages only); rows " +
             "are ranked within one group (protocol, judge model and host, prompt version, dataset), never across" },
    { key: "judge", label: "Judge", text: true }
  ];
  var PROTOCOL_ORDER = { "paper": 0, "paper+choice": 1, "custom": 2, "custom+choice": 3, "offline": 4 };
  // Scored rows by ranking group (protocol first); the paper's reference rows last, in a block of their own.
  function protocolRank(row) {
    if (row.reference) { return 9; }
    var order = PROTOCOL_ORDER[row.protocol];
    return order === undefined ? 5 : order;
  }
  function groupOf(row) { return row.reference ? "reference" : String(row.group || ""); }
  function columnsOf(mode) { return COLUMNS.filter(function (c) { return !c.modes || c.modes.indexOf(mode) >= 0; }); }
  function layoutOf(mode) { return LAYOUT.filter(function (c) { return !c.modes || c.modes.indexOf(mode) >= 0; }); }
  var COLUMNS = [];
  LAYOUT.forEach(function (c) { if (c.cols) { c.cols.forEach(function (s) { COLUMNS.push(s); }); } else { COLUMNS.push(c); } });
  var PALETTE = ["#2f5fb3", "#d1495b", "#00798c", "#edae49", "#66a182", "#8d5a97", "#e07a5f", "#3d405b",
                 "#81b29a", "#b5651d", "#5e60ce", "#c9184a"];

  var state = {
    attribute: "ALL", model: "", method: "", showReference: true, gap: "all", chartMetric: "reliability",
    sort: { single: { key: "average", dir: -1 }, sequential: { key: "average", dir: -1 } }
  };

  function $(id) { return document.getElementById(id); }
  function el(tag, attrs, text) {
    var node = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) { node.setAttribute(k, attrs[k]); });
    if (text !== undefined && text !== null) { node.textContent = String(text); }
    return node;
  }
  function methodName(id) { return METHOD_NAMES[id] || id; }
  function isHttp(url) { return typeof url === "string" && /^https?:\/\//.test(url); }

  function metricsFor(row, mode) {
    var m = row.metrics || {};
    if (mode === "sequential" && state.gap !== "all") {
      return (m.per_gap || {})[state.gap] || null;
    }
    if (state.attribute === "ALL") { return m.overall || null; }
    return (m.per_attribute || {})[state.attribute] || null;
  }

  // Portability per knowledge category, pooled over the attributes of the current view (paper Table 3).
  function categoryValues(row, mode) {
    var m = row.metrics || {}, per = m.per_attribute || {}, out = [];
    if (mode === "sequential" && state.gap !== "all") { return out; }
    var attrs = state.attribute === "ALL" ? Object.keys(per).sort() : [state.attribute];
    attrs.forEach(function (a) {
      var cats = (per[a] || {}).portability_by_category || {};
      Object.keys(cats).forEach(function (k) { if (typeof cats[k] === "number") { out.push(cats[k]); } });
    });
    return out;
  }

  function spread(values, kind) {
    if (values.length < 2) { return null; }
    var max = Math.max.apply(null, values), min = Math.min.apply(null, values);
    if (kind === "range") { return max - min; }
    var mean = values.reduce(function (s, v) { return s + v; }, 0) / values.length;
    var ss = values.reduce(function (s, v) { return s + (v - mean) * (v - mean); }, 0);
    return Math.sqrt(ss / (values.length - 1));
  }

  function average(metrics) {
    if (!metrics) { return null; }
    var total = 0;
    for (var i = 0; i < HEADLINE.length; i++) {
      var v = metrics[HEADLINE[i]];
      if (typeof v !== "number") { return null; }
      total += v;
    }
    return total / HEADLINE.length;
  }

  function value(row, key, mode) {
    if (key === "model") { return row.model_display || row.model; }
    if (key === "method") { return methodName(row.method); }
    if (key === "source") { return row.reference ? "paper " + row.source : row.submitter || row.id; }
    if (key === "judge") { return row.judge || ""; }
    if (key === "protocol") { return row.protocol || ""; }
    if (key === "port_cat_std") { return spread(categoryValues(row, mode), "std"); }
    if (key === "port_cat_range") { return spread(categoryValues(row, mode), "range"); }
    if (key === "degeneration_rate") { return typeof row.degeneration_rate === "number" ? row.degeneration_rate : null; }
    var metrics = metricsFor(row, mode);
    if (key === "average") { return average(metrics); }
    var v = metrics ? metrics[key] : null;
    return typeof v === "number" ? v : null;
  }

  function visibleRows(mode) {
    return DATA.rows.filter(function (row) {
      if (row.mode !== mode) { return false; }
      if (!state.showReference && row.reference) { return false; }
      if (state.model && row.model !== state.model) { return false; }
      if (state.method && row.method !== state.method) { return false; }
      return true;
    });
  }

  function compare(a, b, key, dir, mode) {
    var va = value(a, key, mode), vb = value(b, key, mode);
    if (va === null && vb !== null) { return 1; }   // missing values last in both directions
    if (vb === null && va !== null) { return -1; }
    if (va !== null && vb !== null && va !== vb) {
      if (typeof va === "number") { return (va - vb) * dir; }
      return String(va).localeCompare(String(vb)) * dir;
    }
    var ta = value(a, "model", mode) + "\u0000" + value(a, "method", mode) + "\u0000" + (a.reference ? 1 : 0) + a.id;
    var tb = value(b, "model", mode) + "\u0000" + value(b, "method", mode) + "\u0000" + (b.reference ? 1 : 0) + b.id;
    return ta < tb ? -1 : ta > tb ? 1 : 0;
  }

  function renderHead(table, mode) {
    var thead = el("thead");
    var top = el("tr"), bottom = el("tr");
    var sort = state.sort[mode];
    function headerCell(col, rowspan) {
      var th = el("th", { "data-key": col.key, title: (col.title ? col.title + "; " : "") + "sort by " + col.label }, col.label);
      th.className = "sortable" + (col.text ? " text" : "") + (col.cls ? " " + col.cls : "");
      if (rowspan) { th.setAttribute("rowspan", "2"); }
      if (sort.key === col.key) { th.className += sort.dir > 0 ? " sorted-asc" : " sorted-desc"; }
      th.addEventListener("click", function () {
        if (sort.key === col.key) { sort.dir = -sort.dir; } else { sort.key = col.key; sort.dir = col.text ? 1 : -1; }
        render();
      });
      return th;
    }
    layoutOf(mode).forEach(function (c) {
      if (c.cols) {
        top.appendChild(el("th", { colspan: String(c.cols.length), title: c.cols[0].title || c.label }, c.label));
        c.cols.forEach(function (s) { bottom.appendChild(headerCell(s, false)); });
      } else {
        top.appendChild(headerCell(c, true));
      }
    });
    thead.appendChild(top);
    thead.appendChild(bottom);
    table.appendChild(thead);
  }

  function renderTable(mode) {
    var table = $("table-" + mode);
    table.textContent = "";
    renderHead(table, mode);
    var rows = visibleRows(mode);
    var sort = state.sort[mode];
    // Rows are sorted within their ranking group only (protocol, judge model and host, prompt version, dataset):
    // an offline row never ranks among paper rows; the paper's reference rows are never ranked at all.
    rows.sort(function (a, b) {
      var ga = groupOf(a), gb = groupOf(b);
      return protocolRank(a) - protocolRank(b) || (ga < gb ? -1 : ga > gb ? 1 : 0) ||
        compare(a, b, sort.key, sort.dir, mode);
    });
    var columns = columnsOf(mode);
    var best = {}, sizes = {};  // best value per (group, column), over scored rows only
    rows.forEach(function (r) {
      if (r.reference) { return; }
      var g = groupOf(r);
      sizes[g] = (sizes[g] || 0) + 1;
      best[g] = best[g] || {};
      columns.forEach(function (c) {
        if (c.text || c.plain) { return; }
        var v = value(r, c.key, mode);
        if (v !== null && (best[g][c.key] === undefined || v > best[g][c.key])) { best[g][c.key] = v; }
      });
    });
    var tbody = el("tbody");
    var shownGroup = null;
    rows.forEach(function (row) {
      var g = groupOf(row);
      if (g !== shownGroup) {
        shownGroup = g;
        var head = el("tr", { "data-group": g });
        head.className = "group";
        var label = row.reference ? "Reported in the paper: reference rows, not ranked and never marked best"
          : "Ranked together: " + (row.group_label || row.protocol || "");
        var headCell = el("td", { colspan: String(columns.length) }, label);
        headCell.className = "text group-label";
        head.appendChild(headCell);
        tbody.appendChild(head);
      }
      var tr = el("tr", { "data-id": row.id, "data-model": row.model, "data-method": row.method,
                          "data-protocol": row.protocol || "", "data-group": g });
      tr.className = "row" + (row.reference ? " ref" : "");
      columns.forEach(function (c) {
        var td = el("td");
        td.className = (c.text ? "text" : "num") + (c.cls ? " " + c.cls : "");
        if (c.key === "model" && isHttp(row.model_link)) {
          td.appendChild(el("a", { href: row.model_link, rel: "noopener" }, value(row, "model", mode)));
        } else if (c.key === "source") {
          if (row.reference) {
            td.appendChild(el("span", { "class": "badge", title: "reported in the paper: not re-scored, not ranked" },
                              "reference"));
            var note = "reported in the paper: " + (row.source_detail || row.source) + (row.overall_note ? "; overall = " + row.overall_note : "");
            td.appendChild(el("a", { href: row.link, title: note }, row.source));
          } else if (row.link) {
            td.appendChild(el("a", { href: row.link, title: "submission metadata" }, row.submitter || row.id));
          } else {
            td.textContent = row.submitter || row.id;
          }
        } else if (c.key === "judge") {
          td.textContent = row.judge || "";
          var stages = Object.keys(row.judge_stages || {}).sort().map(function (k) {
            return k + " " + (100 * row.judge_stages[k]).toFixed(1) + "%";
          });
          if (stages.length) { td.title = "decided by: " + stages.join(", "); }
        } else if (c.text) {
          td.textContent = value(row, c.key, mode);
        } else {
          var v = value(row, c.key, mode);
          if (v === null) { td.textContent = "\u2013"; td.className += " na"; }
          else {
            td.textContent = v.toFixed(2);
            if (!row.reference && sizes[g] > 1 && v === best[g][c.key]) { td.className += " best"; }
          }
        }
        tr.appendChild(td);
      });
      tbody.appendChild(tr);
    });
    if (!rows.length) {
      var empty = el("tr"), cell = el("td", { colspan: String(columns.length) }, "No rows match the filters.");
      cell.className = "text muted";
      empty.appendChild(cell);
      tbody.appendChild(empty);
    }
    table.appendChild(tbody);
    return rows.length;
  }

  function svg(tag, attrs, text) {
    var node = document.createElementNS(SVG_NS, tag);
    Object.keys(attrs || {}).forEach(function (k) { node.setAttribute(k, String(attrs[k])); });
    if (text !== undefined) { node.textContent = text; }
    return node;
  }

  function renderChart() {
    var holder = $("gap-chart"), legend = $("gap-legend");
    holder.textContent = "";
    legend.textContent = "";
    var W = 760, H = 330, L = 48, R = 16, T = 14, B = 40, gaps = [0, 1, 2, 3, 4, 5];
    var x = function (g) { return L + (W - L - R) * g / 5; };
    var y = function (v) { return T + (H - T - B) * (1 - v / 100); };
    var root = svg("svg", { viewBox: "0 0 " + W + " " + H, width: W, height: H, role: "img",
                            "aria-label": "metric versus edit gap" });
    [0, 20, 40, 60, 80, 100].forEach(function (v) {
      root.appendChild(svg("line", { x1: L, x2: W - R, y1: y(v), y2: y(v), stroke: "#e3e6ec" }));
      root.appendChild(svg("text", { x: L - 8, y: y(v) + 4, "text-anchor": "end", "font-size": 11, fill: "#667085" }, String(v)));
    });
    gaps.forEach(function (g) {
      root.appendChild(svg("text", { x: x(g), y: H - B + 16, "text-anchor": "middle", "font-size": 11, fill: "#667085" }, String(g)));
    });
    root.appendChild(svg("text", { x: (L + W - R) / 2, y: H - 6, "text-anchor": "middle", "font-size": 12 }, "edit gap"));
    var metric = state.chartMetric;
    var rows = visibleRows("sequential").slice().sort(function (a, b) { return compare(a, b, "model", 1, "sequential"); });
    var drawn = 0;
    rows.forEach(function (row, i) {
      var perGap = (row.metrics || {}).per_gap || {};
      var points = gaps.filter(function (g) { return perGap[g] && typeof perGap[g][metric] === "number"; })
        .map(function (g) { return [x(g), y(perGap[g][metric])]; });
      if (!points.length) { return; }
      var color = PALETTE[i % PALETTE.length];
      var label = (row.model_display || row.model) + " \u00b7 " + methodName(row.method) + (row.reference ? " (paper)" : "");
      var line = svg("polyline", { points: points.map(function (p) { return p.join(","); }).join(" "), fill: "none",
                                   stroke: color, "stroke-width": 2, "class": "gap-line", "data-id": row.id });
      if (row.reference) { line.setAttribute("stroke-dasharray", "5 4"); }
      line.appendChild(svg("title", {}, label));
      root.appendChild(line);
      points.forEach(function (p) { root.appendChild(svg("circle", { cx: p[0], cy: p[1], r: 2.5, fill: color })); });
      var item = el("li");
      var swatch = el("span", { "class": "swatch" + (row.reference ? " dashed" : "") });
      swatch.style.background = color;
      swatch.style.borderColor = color;
      item.appendChild(swatch);
      item.appendChild(document.createTextNode(label));
      legend.appendChild(item);
      drawn += 1;
    });
    if (!drawn) {
      root.appendChild(svg("text", { x: W / 2, y: H / 2, "text-anchor": "middle", fill: "#667085" }, "no sequential rows to draw"));
    }
    holder.appendChild(root);
  }

  function fillSelect(select, values, labelOf) {
    values.forEach(function (v) { select.appendChild(el("option", { value: v }, labelOf(v))); });
  }

  function render() {
    var nSingle = renderTable("single");
    var nSeq = renderTable("sequential");
    renderChart();
    $("row-count").textContent = nSingle + " single, " + nSeq + " sequential row(s) shown";
    $("seq-gap-note").textContent = state.gap !== "all" && state.attribute !== "ALL"
      ? "(per-gap values are over all attributes)" : "";
  }

  function init() {
    var models = {}, methods = {};
    DATA.rows.forEach(function (r) { models[r.model] = r.model_display || r.model; methods[r.method] = methodName(r.method); });
    fillSelect($("filter-model"), Object.keys(models).sort(function (a, b) { return models[a].localeCompare(models[b]); }),
               function (v) { return models[v]; });
    function rank(id) { return id in METHOD_RANK ? METHOD_RANK[id] : Infinity; }
    fillSelect($("filter-method"), Object.keys(methods).sort(function (a, b) {
      return (rank(a) - rank(b)) || methods[a].localeCompare(methods[b]); }),
               function (v) { return methods[v]; });
    $("view-attribute").addEventListener("change", function (e) { state.attribute = e.target.value; render(); });
    $("filter-model").addEventListener("change", function (e) { state.model = e.target.value; render(); });
    $("filter-method").addEventListener("change", function (e) { state.method = e.target.value; render(); });
    $("show-reference").addEventListener("change", function (e) { state.showReference = e.target.checked; render(); });
    $("seq-gap").addEventListener("change", function (e) { state.gap = e.target.value; render(); });
    $("chart-metric").addEventListener("change", function (e) { state.chartMetric = e.target.value; render(); });
    $("reference-text").textContent = DATA.reference_note || "(none shipped with this build)";
    var judges = {};
    DATA.rows.forEach(function (r) { judges[r.judge_base || r.judge] = true; });
    $("judges").textContent = "Judges on this board: " + Object.keys(judges).sort().join("; ");
    $("generated").textContent = DATA.generated ? "Latest submission: " + DATA.generated : "";
    render();
  }

  if (document.readyState === "loading") { document.addEventListener("DOMContentLoaded", init); } else { init(); }
})();
