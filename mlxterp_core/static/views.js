// mlxterp's HTML views: one renderer per kind of result (mlxterp_analyses/views.py writes the data).
// Text reaches the page only through textContent, never as markup.
if (typeof window.mlxterpView !== "function") {
window.mlxterpView = (function () {
  "use strict";

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

  // Colours: sequential blue for [0, 1], blue/red around 0 for signed values.
  function unitColour(v) {
    v = Math.max(0, Math.min(1, v));
    return "rgba(9, 105, 218, " + v.toFixed(3) + ")";
  }
  function signedColour(v, scale) {
    var a = scale > 0 ? Math.min(1, Math.abs(v) / scale) : 0;
    return v >= 0 ? "rgba(9, 105, 218, " + a.toFixed(3) + ")" : "rgba(207, 34, 46, " + a.toFixed(3) + ")";
  }
  function ink(alpha) { return alpha > 0.55 ? "#ffffff" : "#1f2328"; }

  function fmt(v) {
    if (!isFinite(v)) return String(v);
    var a = Math.abs(v);
    return a !== 0 && (a < 0.01 || a >= 1e4) ? v.toExponential(2) : v.toFixed(a < 1 ? 3 : a < 100 ? 2 : 1);
  }

  function header(root, data) {
    if (data.title) root.appendChild(el("div", "mv-title", data.title));
    if (data.subtitle) root.appendChild(el("div", "mv-subtitle", data.subtitle));
  }

  function select(labelText, options, onChange) {
    var wrap = el("span"), sel = el("select");
    wrap.appendChild(el("label", null, labelText + " "));
    options.forEach(function (name, i) { var o = el("option", null, name); o.value = String(i); sel.appendChild(o); });
    sel.addEventListener("change", function () { onChange(parseInt(sel.value, 10)); });
    wrap.appendChild(sel);
    return wrap;
  }

  // ------------------------------------------------------------ values over tokens
  function tokens(root, data) {
    header(root, data);
    var values = decode(data.values), total = data.values.shape[1], row = 0, spans = [];
    var controls = el("div", "mv-controls");
    if (data.labels.length > 1) controls.appendChild(select("show", data.labels, function (r) { row = r; paint(); }));
    var legend = el("span", "mv-legend");
    controls.appendChild(legend);
    root.appendChild(controls);
    var body = el("div", "mv-body"), offset = 0;
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
      });
      offset += text.length;
      body.appendChild(line);
    });
    root.appendChild(body);
    var info = el("div", "mv-info", "hover a token for its value");
    root.appendChild(info);
    function paint() {
      var scale = data.scale[row];
      legend.textContent = data.labels[row] + ": max |value| " + fmt(scale);
      spans.forEach(function (span) {
        var v = values[row * total + parseInt(span.dataset.index, 10)], a = scale > 0 ? Math.abs(v) / scale : 0;
        span.style.background = signedColour(v, scale);
        span.style.color = ink(a);
        span.dataset.value = fmt(v);
      });
    }
    body.addEventListener("mouseover", function (e) {
      var span = e.target.closest(".mv-tok");
      if (!span) return;
      spans.forEach(function (s) { s.classList.toggle("mv-focus", s === span); });
      info.textContent = (data.texts.length > 1 ? "text " + span.dataset.text + ", " : "") + "position " +
        span.dataset.position + " " + quoted(span.dataset.token) + ": " + data.labels[row] + " = " + span.dataset.value;
    });
    paint();
  }

  // ------------------------------------------------------------ attention patterns
  function drawPattern(canvas, weights, base, T, row, gamma) {
    canvas.width = T; canvas.height = T;
    var ctx = canvas.getContext("2d"), img = ctx.createImageData(T, T);
    for (var i = 0; i < T; i++) for (var j = 0; j < T; j++) {
      var v = Math.pow(weights[base + i * T + j], gamma), p = 4 * (i * T + j), hl = (i === row) ? 1 : 0;
      img.data[p] = Math.round(255 - v * (255 - 9)) - hl * 40;
      img.data[p + 1] = Math.round(255 - v * (255 - 105)) - hl * 40;
      img.data[p + 2] = Math.round(255 - v * (255 - 218)) - hl * 10;
      img.data[p + 3] = 255;
    }
    ctx.putImageData(img, 0, 0);
  }

  function attention(root, data) {
    header(root, data);
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
    row.appendChild(el("div", "mv-legend", "rows: attending (query) tokens; columns: attended (key) tokens; darker = more weight"));
    root.appendChild(row);

    function thumbs() {
      thumbCanvases.forEach(function (c, k) {
        var b = k === H ? layer * T * T : (layer * H + k) * T * T;
        drawPattern(c, k === H ? mean : w, b, T, -1, gamma);
        c.parentNode.classList.toggle("mv-on", k === head);
      });
    }
    function current() { return locked >= 0 ? locked : focus; }
    function paint() {
      var q = current();
      drawPattern(big, weights(), base(), T, mode === "to" ? q : -1, gamma);
      var where = "layer " + data.layers[layer] + ", " + (head === H ? "mean of " + H + " heads" : "head " + data.heads[head]);
      spans.forEach(function (span, t) {
        span.classList.toggle("mv-focus", t === q);
        span.classList.toggle("mv-locked", t === locked);
        var v = q < 0 ? 0 : (mode === "to" ? at(q, t) : at(t, q));
        var shade = Math.pow(v, gamma);
        span.style.background = q < 0 ? "" : unitColour(shade);
        span.style.color = ink(q < 0 ? 0 : shade);
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

  // ------------------------------------------------------------ logit lens
  function lens(root, data) {
    header(root, data);
    var L = data.layers.length, T = data.tokens.length, K = data.ids.shape[2];
    var ids = decode(data.ids), probs = decode(data.probs), locked = null;
    function cell(l, t, k) { return (l * T + t) * K + k; }
    var row = el("div", "mv-row"), table = el("table", "mv-grid"), panel = el("div", "mv-panel");
    for (var l = L - 1; l >= 0; l--) {  // the last layer on top, as the residual stream flows upwards
      var tr = el("tr");
      tr.appendChild(el("th", null, "L" + data.layers[l]));
      for (var t = 0; t < T; t++) {
        var i = cell(l, t, 0), p = probs[i], td = el("td", "mv-cell", ids[i] >= 0 ? shown(data.vocab[ids[i]]) : "");
        td.style.background = unitColour(p);
        td.style.color = ink(p);
        td.dataset.layer = String(l);
        td.dataset.position = String(t);
        tr.appendChild(td);
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
    root.appendChild(el("div", "mv-legend", "each cell: the top prediction after that layer (colour: its probability); " +
      "bottom row: the input token at that position. Hover a cell for its top-" + K + ", click to keep it."));
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
    show(table.querySelector("td.mv-cell[data-position='" + (T - 1) + "']"));
  }

  // ------------------------------------------------------------ labelled heatmap (patching)
  function heatmap(root, data) {
    header(root, data);
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
        var v = values[r * C + c], a = scale > 0 ? Math.abs(v) / scale : 0;
        var label = numbers ? (scale >= 10 ? Math.round(v).toString() : v.toFixed(2)) : "";
        var td = el("td", "mv-cell", /^-0(\.0+)?$/.test(label) ? label.slice(1) : label);  // no "-0"
        td.style.background = signedColour(v, scale);
        td.style.color = ink(a);
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

  var renderers = { tokens: tokens, attention: attention, lens: lens, heatmap: heatmap };

  return function render(root) {
    if (!root || root.dataset.rendered) return;
    root.dataset.rendered = "1";
    try {
      var data = JSON.parse(root.querySelector("script.mlxterp-data").textContent);
      renderers[data.kind](root, data);
    } catch (err) {
      root.appendChild(el("pre", "mv-error", "mlxterp view failed: " + err));
      throw err;
    }
  };
})();
}
