// mlxterp's HTML views: one renderer per kind of result (mlxterp_core/views.py writes the data).
// Text reaches the page only through textContent, never as markup.
//
// This file is one function expression; views.py calls it with (version, stylesheet) in the one
// script element that a page (or a notebook session) carries. It puts the stylesheet in the
// page's head, renders every view on the page (a div of class mlxterp-view holding its data, JSON,
// in its data-mlxterp attribute), and watches the page for views added later (the outputs of
// later notebook cells, which carry no script at all), in whatever order they arrive. Its text
// names no tag in angle brackets, so it can sit inside a script element as it is.
(function (version, css) {
  "use strict";
  var loaded = window.mlxterpViews;
  if (loaded && loaded.version === version) { loaded.scan(document); return; }

  function decode(enc) {
    var bin = atob(enc.b64), bytes = new Uint8Array(bin.length);
    for (var i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
    var view = new DataView(bytes.buffer), n = enc.shape.reduce(function (a, b) { return a * b; }, 1);
    var out = new Float32Array(n);
    if (enc.codec === "u8") {
      for (var j = 0; j < n; j++) out[j] = bytes[j] / 255;
    } else if (enc.codec === "f16") {
      for (var k = 0; k < n; k++) out[k] = half(view.getUint16(2 * k, true));
    } else if (enc.codec === "i32") {
      out = new Int32Array(n);
      for (var m = 0; m < n; m++) out[m] = view.getInt32(4 * m, true);
    } else {
      throw new Error("unknown codec " + enc.codec);
    }
    return out;
  }

  function half(h) {
    var s = (h & 0x8000) ? -1 : 1, e = (h >> 10) & 0x1f, f = h & 0x3ff;
    if (e === 0) return s * Math.pow(2, -14) * (f / 1024);
    if (e === 31) return f ? NaN : s * Infinity;
    return s * Math.pow(2, e - 15) * (1 + f / 1024);
  }

  function el(tag, cls, text) {
    var node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  // A token as shown: newlines and tabs visible, an empty token as a symbol.
  function shown(token) {
    if (token === "") return "\u2205";
    var text = token.replace(/\n/g, "\u21b5").replace(/\t/g, "\u21e5");
    return text.trim() === "" ? text.replace(/ /g, "\u2423") : text;  // a space token stays visible
  }

  function quoted(token) { return JSON.stringify(token); }

  // ------------------------------------------------------------ colours
  // A cell's colour is mixed with the view's own background when it is painted (opaque, so it
  // does not depend on what is behind it), and its text is black or white, whichever contrasts
  // more: at least 4.6:1 for any background.
  function parseColour(text) {
    text = String(text || "").trim();
    var hex = /^#([0-9a-f]{3}|[0-9a-f]{6})$/i.exec(text);
    if (hex) {
      var h = hex[1].length === 3 ? hex[1].replace(/./g, "$&$&") : hex[1];
      return [parseInt(h.slice(0, 2), 16), parseInt(h.slice(2, 4), 16), parseInt(h.slice(4, 6), 16), 1];
    }
    var rgb = /^rgba?\(([^)]*)\)$/.exec(text);
    if (rgb) {
      var parts = rgb[1].split(/[\s,\/]+/).filter(Boolean).map(parseFloat);
      return [parts[0], parts[1], parts[2], parts.length > 3 ? parts[3] : 1];
    }
    return null;
  }
  function luminance(c) {
    var l = c.slice(0, 3).map(function (v) { v /= 255; return v <= 0.04045 ? v / 12.92 : Math.pow((v + 0.055) / 1.055, 2.4); });
    return 0.2126 * l[0] + 0.7152 * l[1] + 0.0722 * l[2];
  }
  function mix(colour, alpha, background) {
    alpha = Math.max(0, Math.min(1, alpha));
    return [0, 1, 2].map(function (i) { return Math.round(background[i] + alpha * (colour[i] - background[i])); });
  }
  function css3(c) { return "rgb(" + c[0] + ", " + c[1] + ", " + c[2] + ")"; }
  function ink(c) { return luminance(c) > 0.179 ? "#000000" : "#ffffff"; }  // the crossing of the two contrasts

  function palette(root) {
    var style = getComputedStyle(root);
    function colour(name, fallback) { return parseColour(style.getPropertyValue(name)) || fallback; }
    var bg = parseColour(style.backgroundColor);
    if (!bg || bg[3] === 0) bg = [255, 255, 255, 1];
    var p = {
      bg: bg, fg: parseColour(style.color) || [31, 35, 40, 1],
      pos: colour("--mv-pos", [9, 105, 218]), neg: colour("--mv-neg", [207, 34, 46]),
    };
    p.fill = function (node, colour, alpha) {
      var c = mix(colour, alpha, p.bg);
      node.style.background = css3(c);
      node.style.color = ink(c);
    };
    p.unit = function (node, v) { p.fill(node, p.pos, v); };
    p.signed = function (node, v, scale) { p.fill(node, v >= 0 ? p.pos : p.neg, scale > 0 ? Math.abs(v) / scale : 0); };
    p.clear = function (node) { node.style.background = ""; node.style.color = ""; };
    return p;
  }

  function fmt(v) {
    if (!isFinite(v)) return String(v);
    var a = Math.abs(v);
    return a !== 0 && (a < 0.01 || a >= 1e4) ? v.toExponential(2) : v.toFixed(a < 1 ? 3 : a < 100 ? 2 : 1);
  }

  function header(root, data) {
    if (data.title) root.appendChild(el("div", "mv-title", data.title));
    if (data.subtitle) root.appendChild(el("div", "mv-subtitle", data.subtitle));
  }

  function select(labelText, options, onChange, cls) {
    var wrap = el("span"), sel = el("select", cls);
    wrap.appendChild(el("label", null, labelText + " "));
    options.forEach(function (name, i) { var o = el("option", null, name); o.value = String(i); sel.appendChild(o); });
    sel.addEventListener("change", function () { onChange(parseInt(sel.value, 10)); });
    wrap.appendChild(sel);
    return wrap;
  }

  // ------------------------------------------------------------ values over tokens
  function tokens(root, data) {
    header(root, data);
    var colours = palette(root);
    var values = decode(data.values), total = data.values.shape[1], row = 0, spans = [];
    var controls = el("div", "mv-controls");
    if (data.labels.length > 1) controls.appendChild(select("show", data.labels, function (r) { row = r; paint(); }));
    var legend = el("span", "mv-legend");
    controls.appendChild(legend);
    root.appendChild(controls);
    var body = el("div", "mv-body"), offset = 0, where = [];
    data.texts.forEach(function (text, n) {
      var line = el("div", "mv-tokens mv-line");
      text.forEach(function (token, t) {
        var span = el("span", "mv-tok", shown(token));
        span.dataset.index = String(offset + t);
        span.dataset.text = String(n);
        span.dataset.position = String(t);
        span.dataset.token = token;
        line.appendChild(span);
        spans.push(span);
        where.push((data.texts.length > 1 ? "text " + n + ", " : "") + "position " + t + " " + quoted(token));
      });
      offset += text.length;
      body.appendChild(line);
    });
    root.appendChild(body);
    var info = el("div", "mv-info", "hover a token for its value");
    root.appendChild(info);
    function paint() {
      var scale = data.scale[row], clipped = (data.clipped || [])[row] || [];
      var text = data.labels[row] + ": full colour at |value| " + fmt(scale);
      if (clipped.length) {
        text += (data.outliers ? "; left out of the scale as outliers (as an attention sink is), at full colour, dashed: "
                               : "; past the scale, at full colour, dashed: ") +
          clipped.slice(0, 5).map(function (i) { return where[i] + " = " + fmt(values[row * total + i]); }).join(", ") +
          (clipped.length > 5 ? " and " + (clipped.length - 5) + " more" : "");
      }
      legend.textContent = text;
      spans.forEach(function (span) {
        var i = parseInt(span.dataset.index, 10), v = values[row * total + i];
        colours.signed(span, v, scale);
        span.classList.toggle("mv-clipped", clipped.indexOf(i) >= 0);
        span.dataset.value = fmt(v);
      });
    }
    body.addEventListener("mouseover", function (e) {
      var span = e.target.closest(".mv-tok");
      if (!span) return;
      spans.forEach(function (s) { s.classList.toggle("mv-focus", s === span); });
      info.textContent = where[parseInt(span.dataset.index, 10)] + ": " + data.labels[row] + " = " + span.dataset.value;
    });
    paint();
  }

  // ------------------------------------------------------------ attention patterns
  function drawPattern(canvas, weights, base, T, row, gamma, colours) {
    canvas.width = T; canvas.height = T;
    var ctx = canvas.getContext("2d"), img = ctx.createImageData(T, T);
    for (var i = 0; i < T; i++) for (var j = 0; j < T; j++) {
      var c = mix(colours.pos, Math.pow(weights[base + i * T + j], gamma), colours.bg), p = 4 * (i * T + j);
      if (i === row) c = mix(colours.fg, 0.18, c);  // the hovered query's row, towards the text colour
      img.data[p] = c[0]; img.data[p + 1] = c[1]; img.data[p + 2] = c[2]; img.data[p + 3] = 255;
    }
    ctx.putImageData(img, 0, 0);
  }

  function attention(root, data) {
    header(root, data);
    var colours = palette(root);
    var w = decode(data.patterns), L = data.layers.length, H = data.heads.length, T = data.tokens.length;
    var layer = 0, head = 0, mode = "to", focus = -1, locked = -1;  // head === H: mean of the heads
    var gamma = 1;  // colour = weight ** gamma; 0.5 brings out small weights
    var mean = new Float32Array(L * T * T);
    for (var l = 0; l < L; l++) for (var h = 0; h < H; h++) for (var x = 0; x < T * T; x++)
      mean[l * T * T + x] += w[(l * H + h) * T * T + x] / H;
    function weights() { return head === H ? mean : w; }
    function base() { return head === H ? layer * T * T : (layer * H + head) * T * T; }
    function at(i, j) { return weights()[base() + i * T + j]; }

    var controls = el("div", "mv-controls");
    if (L > 1) controls.appendChild(select("layer", data.layers.map(String), function (v) { layer = v; thumbs(); paint(); }));
    var modes = el("span");
    [["to", "attends to"], ["from", "attended by"]].forEach(function (m) {
      var b = el("button", m[0] === mode ? "mv-on" : "", "hovered token " + m[1]);
      b.dataset.mode = m[0];
      b.addEventListener("click", function () {
        mode = m[0];
        Array.prototype.forEach.call(modes.children, function (c) { c.classList.toggle("mv-on", c.dataset.mode === mode); });
        paint();
      });
      modes.appendChild(b);
    });
    controls.appendChild(modes);
    var contrast = el("button", "", "\u221a weights (show small ones)");
    contrast.className = "mv-contrast";
    contrast.addEventListener("click", function () {
      gamma = gamma === 1 ? 0.5 : 1;
      contrast.classList.toggle("mv-on", gamma !== 1);
      thumbs(); paint();
    });
    controls.appendChild(contrast);
    root.appendChild(controls);

    var heads = el("div", "mv-heads"), thumbCanvases = [];
    for (var k = 0; k <= H; k++) {
      if (k === H && H === 1) break;
      var box = el("div", "mv-thumb"), c = el("canvas");
      c.style.width = "64px"; c.style.height = "64px";
      box.appendChild(c);
      box.appendChild(el("span", null, k === H ? "mean" : "head " + data.heads[k]));
      box.dataset.head = String(k);
      box.addEventListener("click", function () { head = parseInt(this.dataset.head, 10); thumbs(); paint(); });
      heads.appendChild(box);
      thumbCanvases.push(c);
    }
    root.appendChild(heads);

    var bar = el("div", "mv-tokens"), spans = [];
    data.tokens.forEach(function (token, t) {
      var span = el("span", "mv-tok", shown(token));
      span.dataset.position = String(t);
      span.dataset.token = token;
      bar.appendChild(span);
      spans.push(span);
    });
    root.appendChild(bar);
    var info = el("div", "mv-info");
    root.appendChild(info);
    var row = el("div", "mv-row"), big = el("canvas");
    var side = Math.max(240, Math.min(480, T * 14));
    big.style.width = side + "px"; big.style.height = side + "px";
    big.className = "mv-pattern";
    row.appendChild(big);
    row.appendChild(el("div", "mv-legend", "rows: attending (query) tokens; columns: attended (key) tokens; stronger colour = more weight"));
    root.appendChild(row);

    function thumbs() {
      thumbCanvases.forEach(function (c, k) {
        var b = k === H ? layer * T * T : (layer * H + k) * T * T;
        drawPattern(c, k === H ? mean : w, b, T, -1, gamma, colours);
        c.parentNode.classList.toggle("mv-on", k === head);
      });
    }
    function current() { return locked >= 0 ? locked : focus; }
    function paint() {
      var q = current();
      drawPattern(big, weights(), base(), T, mode === "to" ? q : -1, gamma, colours);
      var where = "layer " + data.layers[layer] + ", " + (head === H ? "mean of " + H + " heads" : "head " + data.heads[head]);
      spans.forEach(function (span, t) {
        span.classList.toggle("mv-focus", t === q);
        span.classList.toggle("mv-locked", t === locked);
        var v = q < 0 ? 0 : (mode === "to" ? at(q, t) : at(t, q));
        if (q < 0) colours.clear(span); else colours.unit(span, Math.pow(v, gamma));
        span.dataset.weight = q < 0 ? "" : v.toFixed(3);
      });
      if (q < 0) { info.textContent = where + ": hover a token (click to keep it)"; return; }
      var order = [];
      for (var t = 0; t < T; t++) order.push([mode === "to" ? at(q, t) : at(t, q), t]);
      order.sort(function (a, b) { return b[0] - a[0]; });
      info.textContent = where + ": " + quoted(data.tokens[q]) + " (position " + q + ") " +
        (mode === "to" ? "attends to " : "is attended by ") +
        order.slice(0, 3).map(function (o) { return quoted(data.tokens[o[1]]) + " " + o[0].toFixed(2); }).join(", ");
    }
    bar.addEventListener("mouseover", function (e) {
      var span = e.target.closest(".mv-tok");
      if (!span) return;
      focus = parseInt(span.dataset.position, 10);
      paint();
    });
    bar.addEventListener("mouseleave", function () { focus = -1; paint(); });
    bar.addEventListener("click", function (e) {
      var span = e.target.closest(".mv-tok");
      if (!span) return;
      var t = parseInt(span.dataset.position, 10);
      locked = locked === t ? -1 : t;
      paint();
    });
    big.addEventListener("mousemove", function (e) {
      var r = big.getBoundingClientRect(), i = Math.floor((e.clientY - r.top) / r.height * T), j = Math.floor((e.clientX - r.left) / r.width * T);
      if (i < 0 || j < 0 || i >= T || j >= T) return;
      info.textContent = quoted(data.tokens[i]) + " (" + i + ") -> " + quoted(data.tokens[j]) + " (" + j + "): " + at(i, j).toFixed(3);
    });
    thumbs();
    paint();
  }

  // ------------------------------------------------------------ logit lens (and tuned lens)
  // Optional data.metrics: per (layer, position) numbers shown with a cell's top-k (a tuned
  // lens's KL to the final distribution, entropy, rank of the final top-1) and selectable as
  // the cells' colour instead of the top token's probability.
  function lens(root, data) {
    header(root, data);
    var colours = palette(root);
    var L = data.layers.length, T = data.tokens.length, K = data.ids.shape[2];
    var ids = decode(data.ids), probs = decode(data.probs), locked = null;
    var metrics = (data.metrics || []).map(function (m) {
      var values = decode(m.values), top = 0;
      for (var i = 0; i < values.length; i++) top = Math.max(top, m.log ? Math.log1p(Math.max(0, values[i])) : values[i]);
      return { name: m.name, unit: m.unit || "", log: !!m.log, integer: !!m.integer, values: values, top: top };
    });
    var colourBy = -1;  // -1: the top token's probability; else a metric
    function cell(l, t, k) { return (l * T + t) * K + k; }
    function metricText(m, v) { return m.integer ? String(Math.round(v)) : fmt(v) + m.unit; }
    var legend = el("div", "mv-legend");
    if (metrics.length) {
      var controls = el("div", "mv-controls");
      controls.appendChild(select("colour", ["top-1 probability"].concat(metrics.map(function (m) { return m.name; })),
        function (v) { colourBy = v - 1; paint(); }, "mv-colour-by"));
      root.appendChild(controls);
    }
    var row = el("div", "mv-row"), table = el("table", "mv-grid"), panel = el("div", "mv-panel"), cells = [];
    for (var l = L - 1; l >= 0; l--) {  // the last layer on top, as the residual stream flows upwards
      var tr = el("tr");
      tr.appendChild(el("th", null, "L" + data.layers[l]));
      for (var t = 0; t < T; t++) {
        var i = cell(l, t, 0), td = el("td", "mv-cell", ids[i] >= 0 ? shown(data.vocab[ids[i]]) : "");
        td.dataset.layer = String(l);
        td.dataset.position = String(t);
        metrics.forEach(function (m, n) { td.dataset["metric" + n] = metricText(m, m.values[l * T + t]); });
        tr.appendChild(td);
        cells.push(td);
      }
      table.appendChild(tr);
    }
    var foot = el("tr");
    foot.appendChild(el("th", null, ""));
    data.tokens.forEach(function (token) { foot.appendChild(el("th", "mv-col", shown(token))); });
    table.appendChild(foot);
    row.appendChild(table);
    row.appendChild(panel);
    root.appendChild(row);
    root.appendChild(legend);
    function paint() {
      var m = metrics[colourBy];
      cells.forEach(function (td) {
        var l = parseInt(td.dataset.layer, 10), t = parseInt(td.dataset.position, 10);
        if (!m) { colours.unit(td, probs[cell(l, t, 0)]); return; }
        var v = m.values[l * T + t], s = m.log ? Math.log1p(Math.max(0, v)) : v;
        colours.unit(td, m.top > 0 ? s / m.top : 0);
      });
      legend.textContent = "each cell: the top prediction after that layer (colour: " +
        (m ? m.name + ", full at " + (m.integer ? String(Math.round(Math.expm1(m.top))) : fmt(m.top) + m.unit) + (m.log ? ", log scale" : "")
           : "its probability") +
        "); bottom row: the input token at that position. Hover a cell for its top-" + K +
        (metrics.length ? " and " + metrics.map(function (x) { return x.name; }).join(", ") : "") + ", click to keep it.";
    }
    function show(td) {
      var l = parseInt(td.dataset.layer, 10), t = parseInt(td.dataset.position, 10);
      Array.prototype.forEach.call(table.querySelectorAll("td.mv-focus"), function (c) { c.classList.remove("mv-focus"); });
      td.classList.add("mv-focus");
      panel.textContent = "";
      panel.appendChild(el("div", "mv-title", "layer " + data.layers[l] + ", position " + t + " " + quoted(data.tokens[t])));
      var topk = el("table", "mv-topk");
      for (var k = 0; k < K; k++) {
        var i = cell(l, t, k);
        if (ids[i] < 0) continue;
        var tr = el("tr"), barCell = el("td"), bar = el("div", "mv-bar");
        bar.style.width = Math.max(1, Math.round(probs[i] * 120)) + "px";
        barCell.appendChild(bar);
        tr.appendChild(el("td", null, quoted(data.vocab[ids[i]])));
        tr.appendChild(el("td", null, (100 * probs[i]).toFixed(1) + "%"));
        tr.appendChild(barCell);
        topk.appendChild(tr);
      }
      panel.appendChild(topk);
      metrics.forEach(function (m, n) {
        var line = el("div", "mv-metrics", m.name + ": " + td.dataset["metric" + n]);
        line.dataset.metric = m.name;
        panel.appendChild(line);
      });
    }
    table.addEventListener("mouseover", function (e) {
      var td = e.target.closest("td.mv-cell");
      if (td && !locked) show(td);
    });
    table.addEventListener("click", function (e) {
      var td = e.target.closest("td.mv-cell");
      if (!td) return;
      locked = locked === td ? null : td;
      show(td);
    });
    paint();
    show(table.querySelector("td.mv-cell[data-position='" + (T - 1) + "']"));
  }

  // ------------------------------------------------------------ labelled heatmap (patching)
  function heatmap(root, data) {
    header(root, data);
    var colours = palette(root);
    var R = data.rows.length, C = data.columns.length, values = decode(data.values), scale = data.scale;
    var unit = data.unit || "", numbers = C <= 32;
    var table = el("table", "mv-grid"), info = el("div", "mv-info");
    var order = [];
    for (var r = 0; r < R; r++) order.push(r);
    if (data.flip) order.reverse();
    order.forEach(function (r) {
      var tr = el("tr");
      tr.appendChild(el("th", null, data.rows[r]));
      for (var c = 0; c < C; c++) {
        var v = values[r * C + c];
        var label = numbers ? (scale >= 10 ? Math.round(v).toString() : v.toFixed(2)) : "";
        var td = el("td", "mv-cell", /^-0(\.0+)?$/.test(label) ? label.slice(1) : label);  // no "-0"
        colours.signed(td, v, scale);
        td.dataset.row = String(r);
        td.dataset.column = String(c);
        tr.appendChild(td);
      }
      table.appendChild(tr);
    });
    var foot = el("tr");
    foot.appendChild(el("th", null, ""));
    data.columns.forEach(function (name) { foot.appendChild(el("th", "mv-col", shown(name))); });
    table.appendChild(foot);
    root.appendChild(table);
    root.appendChild(info);
    root.appendChild(el("div", "mv-legend", "blue: positive, red: negative; full colour at |value| = " + fmt(scale) + unit));
    info.textContent = "hover a cell for its value";
    table.addEventListener("mouseover", function (e) {
      var td = e.target.closest("td.mv-cell");
      if (!td) return;
      Array.prototype.forEach.call(table.querySelectorAll("td.mv-focus"), function (c) { c.classList.remove("mv-focus"); });
      td.classList.add("mv-focus");
      var r = parseInt(td.dataset.row, 10), c = parseInt(td.dataset.column, 10);
      info.textContent = data.row_name + " " + data.rows[r] + ", " + data.column_name + " " +
        (data.quote_columns ? quoted(data.columns[c]) : data.columns[c]) +
        ": " + fmt(values[r * C + c]) + unit;
    });
  }


  // ------------------------------------------------------------ layered node-link graph (circuits)
  // Nodes sit at (row, column): rows bottom to top (inputs below, outputs above), columns the
  // token positions; several nodes of one cell side by side. Edges are lines from source to
  // target, width by |weight|, blue positive and red negative. Hover a node for its text and
  // its strongest inputs and outputs; click it to keep only its neighbours lit (click again, or
  // on the background, to release).
  var SVG = "http://www.w3.org/2000/svg";
  function svg(tag, attrs) {
    var node = document.createElementNS(SVG, tag);
    for (var k in attrs) node.setAttribute(k, attrs[k]);
    return node;
  }

  function graph(root, data) {
    header(root, data);
    var R = data.rows.length, C = data.columns.length;
    var rowOf = decode(data.node_row), colOf = decode(data.node_col), kindOf = decode(data.node_kind), sizeOf = decode(data.node_size);
    var src = decode(data.edge_source), dst = decode(data.edge_target), w = decode(data.edge_weight);
    var N = rowOf.length, E = src.length;
    // cell widths: as many slots as the fullest cell of the column needs
    var perCell = {}, slot = new Int32Array(N), need = [];
    for (var c = 0; c < C; c++) need.push(1);
    for (var i = 0; i < N; i++) {
      var key = rowOf[i] + ":" + colOf[i];
      slot[i] = perCell[key] = (perCell[key] === undefined ? 0 : perCell[key] + 1);
      need[colOf[i]] = Math.max(need[colOf[i]], slot[i] + 1);
    }
    var step = 16, rowH = 34, left = 56, bottom = 46, top = 14, xs = [left];
    for (var c2 = 0; c2 < C; c2++) xs.push(xs[c2] + Math.max(44, need[c2] * step + 12));
    var width = xs[C] + 10, height = top + R * rowH + bottom;
    function x(i) {
      var c = colOf[i], n = perCell[rowOf[i] + ":" + c] + 1, cellW = xs[c + 1] - xs[c];
      return xs[c] + cellW / 2 + (slot[i] - (n - 1) / 2) * Math.min(step, (cellW - 8) / Math.max(n, 1));
    }
    function y(i) { return top + (R - 1 - rowOf[i]) * rowH + rowH / 2; }
    var scale = 0;
    for (var e = 0; e < E; e++) scale = Math.max(scale, Math.abs(w[e]));
    var box = el("div", "mv-graph-box"), info = el("div", "mv-info mv-graph-info");
    var canvas = svg("svg", { width: width, height: height, viewBox: "0 0 " + width + " " + height, role: "img" });
    canvas.setAttribute("class", "mv-graph");
    var grid = svg("g", {}), lines = svg("g", {}), dots = svg("g", {});
    for (var r = 0; r < R; r++) {
      var ty = top + (R - 1 - r) * rowH + rowH / 2;
      grid.appendChild(svg("line", { x1: left - 4, x2: width - 6, y1: ty, y2: ty, "class": "mv-graph-rule" }));
      var label = svg("text", { x: left - 8, y: ty + 4, "text-anchor": "end", "class": "mv-graph-label" });
      label.textContent = data.rows[r];
      grid.appendChild(label);
    }
    for (var c3 = 0; c3 < C; c3++) {
      var tx = (xs[c3] + xs[c3 + 1]) / 2, tl = svg("text", { x: tx, y: height - bottom + 16, "text-anchor": "middle", "class": "mv-graph-col" });
      var t = shown(data.columns[c3]);
      tl.textContent = t.length > 9 ? t.slice(0, 8) + "\u2026" : t;
      var tip = svg("title", {}); tip.textContent = data.columns[c3] + " (position " + c3 + ")"; tl.appendChild(tip);
      grid.appendChild(tl);
    }
    var colours = palette(root), edgeNodes = [], nodeNodes = [], ins = [], outs = [];
    for (var n0 = 0; n0 < N; n0++) { ins.push([]); outs.push([]); }
    for (var e2 = 0; e2 < E; e2++) {
      var a = src[e2], b = dst[e2];
      var line = svg("line", { x1: x(a), y1: y(a), x2: x(b), y2: y(b), "stroke-width": (0.4 + 3.2 * Math.abs(w[e2]) / (scale || 1)).toFixed(2) });
      line.setAttribute("class", "mv-graph-edge " + (w[e2] >= 0 ? "mv-pos" : "mv-neg"));
      line.style.stroke = css3(w[e2] >= 0 ? colours.pos : colours.neg);
      lines.appendChild(line);
      edgeNodes.push(line);
      ins[b].push(e2); outs[a].push(e2);
    }
    var shapes = ["circle", "rect", "rect", "path"];
    for (var k = 0; k < N; k++) {
      var kind = data.kinds[kindOf[k]], radius = 3 + 4 * Math.sqrt(Math.max(0, sizeOf[k])), shape;
      if (kind === "feature") shape = svg("circle", { cx: x(k), cy: y(k), r: radius });
      else if (kind === "logit") shape = svg("path", { d: "M" + x(k) + " " + (y(k) - radius - 2) + " l" + (radius + 2) + " " + (radius + 2) + " l" + (-radius - 2) + " " + (radius + 2) + " l" + (-radius - 2) + " " + (-radius - 2) + "z" });
      else shape = svg("rect", { x: x(k) - radius, y: y(k) - radius, width: 2 * radius, height: 2 * radius, rx: kind === "token" ? 2 : 0 });
      shape.setAttribute("class", "mv-graph-node mv-graph-" + kind);
      shape.dataset.node = String(k);
      dots.appendChild(shape);
      nodeNodes.push(shape);
    }
    canvas.appendChild(grid); canvas.appendChild(lines); canvas.appendChild(dots);
    box.appendChild(canvas);
    root.appendChild(box);
    root.appendChild(info);
    root.appendChild(el("div", "mv-legend", data.legend || "circles: features, squares: errors, rounded: tokens, diamonds: logits; blue edges excite, red inhibit"));
    var locked = -1;
    function strongest(list, other) {
      return list.slice().sort(function (p, q) { return Math.abs(w[q]) - Math.abs(w[p]); }).slice(0, 5).map(function (e) {
        return "  " + (w[e] >= 0 ? "+" : "") + fmt(w[e]) + "  " + data.labels[other(e)];
      });
    }
    function describe(k) {
      var text = [data.labels[k]];
      if (data.details[k]) text.push(data.details[k]);
      if (ins[k].length) text = text.concat(["strongest inputs:"], strongest(ins[k], function (e) { return src[e]; }));
      if (outs[k].length) text = text.concat(["strongest outputs:"], strongest(outs[k], function (e) { return dst[e]; }));
      info.textContent = text.join("\n");
    }
    function light(k) {
      var on = {};
      if (k >= 0) {
        on[k] = true;
        ins[k].forEach(function (e) { on[src[e]] = true; });
        outs[k].forEach(function (e) { on[dst[e]] = true; });
      }
      nodeNodes.forEach(function (node, i) { node.classList.toggle("mv-dim", k >= 0 && !on[i]); node.classList.toggle("mv-picked", i === k); });
      edgeNodes.forEach(function (line, e) { line.classList.toggle("mv-dim", k >= 0 && src[e] !== k && dst[e] !== k); });
    }
    info.textContent = "hover a node for what it is and its strongest edges; click it to light its neighbours";
    dots.addEventListener("mouseover", function (ev) {
      var node = ev.target.closest ? ev.target.closest(".mv-graph-node") : null;
      if (node && locked < 0) describe(parseInt(node.dataset.node, 10));
    });
    canvas.addEventListener("click", function (ev) {
      var node = ev.target.closest ? ev.target.closest(".mv-graph-node") : null;
      var k = node ? parseInt(node.dataset.node, 10) : -1;
      locked = k === locked ? -1 : k;
      light(locked);
      if (locked >= 0) describe(locked);
    });
  }

  var renderers = { tokens: tokens, attention: attention, lens: lens, heatmap: heatmap, graph: graph };

  // ------------------------------------------------------------ the page
  function render(root) {
    if (!root || root.dataset.rendered) return;
    root.dataset.rendered = "1";
    try {
      var data = JSON.parse(root.getAttribute("data-mlxterp"));
      renderers[data.kind](root, data);
    } catch (err) {
      root.appendChild(el("pre", "mv-error", "mlxterp view failed: " + err));
      setTimeout(function () { throw err; });  // reported, without stopping the other views
      return;
    }
    // the result's one-line summary stands in for its views where no script runs; here one did
    var result = root.closest(".mlxterp-result"), summary = result && result.querySelector(".mlxterp-summary");
    if (summary) summary.style.display = "none";
  }

  function scan(node) {
    if (node.nodeType === 1 && node.classList.contains("mlxterp-view")) render(node);
    if (!node.querySelectorAll) return;
    Array.prototype.forEach.call(node.querySelectorAll(".mlxterp-view:not([data-rendered])"), render);
  }

  var style = document.querySelector("style[data-mlxterp-views]");
  if (!style) {
    style = document.createElement("style");
    style.setAttribute("data-mlxterp-views", "");
    (document.head || document.documentElement).appendChild(style);
  }
  style.textContent = css;
  if (loaded && loaded.observer) loaded.observer.disconnect();  // an older renderer on this page
  var observer = new MutationObserver(function (records) {
    for (var i = 0; i < records.length; i++) {
      var added = records[i].addedNodes;
      for (var j = 0; j < added.length; j++) {
        var node = added[j];
        if (node.nodeType === 1 && (node.classList.contains("mlxterp-view") || node.getElementsByClassName("mlxterp-view").length)) scan(node);
      }
    }
  });
  observer.observe(document.documentElement, { childList: true, subtree: true });
  window.mlxterpViews = { version: version, render: render, scan: scan, observer: observer };
  scan(document);
})
