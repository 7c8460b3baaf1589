// megatron-tts run dashboard: draws the data embedded by monitoring/dashboard.py on canvases.
// No libraries and no network, except polling data.json when served live (--serve).
// Each panel gets data-drawn="N" (points or cells drawn; 0 with data-nodata="1" when empty):
// tests/integration/test_dashboard.py reads these from the rendered DOM.
(function () {
  'use strict';
  var PALETTE = ['#1f77b4', '#d62728', '#2ca02c', '#ff7f0e', '#9467bd', '#8c564b', '#e377c2', '#7f7f7f',
                 '#bcbd22', '#17becf', '#393b79', '#ad494a', '#637939', '#e7ba52', '#7b4173', '#3182bd'];
  var KIND_COLOR = {checkpoint: '#2ca02c', checkpoint_failed: '#d62728', resume: '#1f77b4', rollback: '#ff7f0e',
                    stop: '#9467bd', hang: '#8b0000', straggler: '#8c564b', alert: '#e31a1c', profile: '#7f7f7f',
                    skipped: '#ff7f0e', gpu: '#d62728'};
  // Kinds drawn as full-height lines on the loss plot; the others as ticks along its top.
  var STRONG = {checkpoint_failed: 1, resume: 1, rollback: 1, stop: 1, hang: 1};
  var PHASES = ['data', 'forward_backward', 'grad_sync', 'optimizer', 'checkpoint', 'logging'];
  var H = 210;
  var tip = null;

  function el(tag, attrs, text) {
    var e = document.createElement(tag);
    for (var k in (attrs || {})) e.setAttribute(k, attrs[k]);
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }

  function fmt(v, digits) {
    if (v === null || v === undefined || !isFinite(v)) return '-';
    var a = Math.abs(v);
    var p = function (x) { return Number(x.toPrecision(digits || 4)).toString(); };
    if (a >= 1e12) return p(v / 1e12) + 'T';
    if (a >= 1e9) return p(v / 1e9) + 'G';
    if (a >= 1e6) return p(v / 1e6) + 'M';
    if (a >= 1e4) return p(v / 1e3) + 'k';
    if (Number.isInteger(v)) return String(v);
    return Number(v.toPrecision(digits || 4)).toString();
  }

  function fmtTime(t) {
    return t ? new Date(t * 1000).toISOString().replace('T', ' ').slice(0, 19) + 'Z' : '-';
  }

  function fmtDuration(s) {
    if (s === null || s === undefined || !isFinite(s)) return '-';
    if (s < 120) return s.toFixed(0) + ' s';
    if (s < 7200) return (s / 60).toFixed(1) + ' min';
    if (s < 172800) return (s / 3600).toFixed(1) + ' h';
    return (s / 86400).toFixed(1) + ' d';
  }

  function niceTicks(lo, hi, n, minStep) {  // minStep 1: integer ticks (steps)
    var span = hi - lo, step = Math.pow(10, Math.floor(Math.log10(span / n)));
    var err = span / n / step;
    step *= err >= 7.5 ? 10 : err >= 3.5 ? 5 : err >= 1.5 ? 2 : 1;
    step = Math.max(step, minStep || 0);
    var out = [];
    for (var t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) out.push(Math.abs(t) < step * 1e-9 ? 0 : t);
    return out;
  }

  function tickLabel(t, ticks) {  // enough decimals to tell neighbouring ticks apart
    var step = ticks.length > 1 ? Math.abs(ticks[1] - ticks[0]) : 1;
    if (Math.abs(t) >= 1e4) return fmt(t, 4);
    return t.toFixed(Math.max(0, Math.min(10, -Math.floor(Math.log10(step) + 1e-9))));
  }

  function quantile(sorted, q) { return sorted[Math.min(sorted.length - 1, Math.floor(q * (sorted.length - 1)))]; }

  function nearest(xs, x) {  // index of the x value nearest to x in a sorted array
    var lo = 0, hi = xs.length - 1;
    while (hi - lo > 1) { var mid = (lo + hi) >> 1; if (xs[mid] < x) lo = mid; else hi = mid; }
    return Math.abs(xs[lo] - x) <= Math.abs(xs[hi] - x) ? lo : hi;
  }

  // ------------------------------------------------------------------ panels

  function panel(parent, id, title, wide) {
    var root = el('div', {'class': 'panel' + (wide ? ' wide' : ''), id: 'panel-' + id, 'data-panel': id});
    root.appendChild(el('h3', null, title));
    var legend = root.appendChild(el('div', {'class': 'legend'}));
    var body = root.appendChild(el('div'));
    var note = root.appendChild(el('div', {'class': 'note'}));
    parent.appendChild(root);
    return {root: root, legend: legend, body: body, note: note};
  }

  function noData(p, why) {
    p.root.setAttribute('data-drawn', '0');
    p.root.setAttribute('data-nodata', '1');
    p.body.appendChild(el('div', {'class': 'nodata'}, 'no data' + (why ? ': ' + why : '')));
  }

  function guarded(p, draw) {  // one failing panel must not blank the page; the error still shows
    try { draw(); } catch (err) {
      p.body.appendChild(el('div', {'class': 'warn'}, 'cannot draw: ' + err));
      var box = document.getElementById('js-errors');
      box.hidden = false;
      box.textContent += 'panel ' + p.root.id + ': ' + (err && err.stack || err) + '\n';
      document.body.setAttribute('data-js-errors', box.textContent.split('\n').length - 1);
    }
  }

  function canvas(p, height) {
    var c = p.body.appendChild(el('canvas'));
    var w = Math.max(300, p.body.clientWidth || 600), dpr = window.devicePixelRatio || 1;
    c.width = w * dpr; c.height = height * dpr; c.style.height = height + 'px';
    var g = c.getContext('2d');
    g.scale(dpr, dpr);
    g.font = '10px system-ui, sans-serif';
    return {c: c, g: g, w: w, h: height};
  }

  function legend(p, items) {
    items.forEach(function (it) {
      var i = el('i'); i.style.background = it.color;
      p.legend.appendChild(i);
      p.legend.appendChild(document.createTextNode(it.name));
    });
  }

  function showTip(ev, text) {
    if (!text) { tip.style.display = 'none'; return; }
    tip.textContent = text;
    tip.style.display = 'block';
    var x = ev.clientX + 14, y = ev.clientY + 12;
    if (x + tip.offsetWidth > window.innerWidth) x = ev.clientX - tip.offsetWidth - 10;
    if (y + tip.offsetHeight > window.innerHeight) y = ev.clientY - tip.offsetHeight - 10;
    tip.style.left = x + 'px'; tip.style.top = y + 'px';
  }

  // A line chart (or stacked areas) over a shared x (steps). series: [{name, y, lo, hi, color}];
  // lo/hi draw a min-max band (downsampled buckets). markers: [{x, color, msg, strong}].
  function chart(p, x, series, opt) {
    opt = opt || {};
    var markers = opt.markers || [];
    series = series.filter(function (s) { return s.y && s.y.some(function (v) { return v !== null; }); });
    if (!series.length) { noData(p, opt.why); return; }
    legend(p, series);
    var n = x.length, stack = null;
    if (opt.stacked) {  // cumulative tops, drawn bottom-up
      stack = [];
      var base = new Array(n).fill(0);
      series.forEach(function (s) {
        var top = s.y.map(function (v, i) { return base[i] + (v || 0); });
        stack.push({lo: base, hi: top}); base = top;
      });
    }
    var xs = x.concat(markers.map(function (m) { return m.x; }));
    var x0 = Math.min.apply(null, xs), x1 = Math.max.apply(null, xs);
    if (x1 === x0) { x0 -= 1; x1 += 1; }
    var vals = [];
    series.forEach(function (s, k) {
      var arrays = stack ? [stack[k].hi] : opt.robust ? [s.y] : [s.y, s.lo || [], s.hi || []];
      arrays.forEach(function (a) { a.forEach(function (v) { if (v !== null && isFinite(v)) vals.push(v); }); });
    });
    vals.sort(function (a, b) { return a - b; });
    var y0 = stack ? 0 : opt.zero ? Math.min(0, vals[0]) : vals[0], y1 = vals[vals.length - 1];
    if (opt.robust && vals.length > 50) {  // one huge spike must not flatten the curve
      var q0 = quantile(vals, 0.005), q1 = quantile(vals, 0.995), pad = (q1 - q0) * 0.5;
      if (y1 > q1 + pad) { y1 = q1 + pad; p.note.textContent = 'y axis clipped: max ' + fmt(vals[vals.length - 1]); }
      if (!opt.zero && y0 < q0 - pad) y0 = q0 - pad;
    }
    if (y1 === y0) { var d = Math.abs(y0) * 0.1 || 1; y0 -= d; y1 += d; }
    var ypad = (y1 - y0) * 0.03;  // lines at the extremes stay off the frame
    y1 += ypad;
    if (y0 !== 0) y0 -= ypad;
    var m = {l: 58, r: 22, t: 12, b: 20};
    var cv = canvas(p, opt.height || H), g = cv.g, W = cv.w - m.l - m.r, HH = cv.h - m.t - m.b;
    var px = function (v) { return m.l + (v - x0) / (x1 - x0) * W; };
    var py = function (v) { return m.t + (1 - (v - y0) / (y1 - y0)) * HH; };
    // axes and grid
    g.strokeStyle = '#e4e6ea'; g.fillStyle = '#555'; g.lineWidth = 1;
    g.textAlign = 'right'; g.textBaseline = 'middle';
    var yt = niceTicks(y0, y1, 5), xt = niceTicks(x0, x1, 8, 1);
    yt.forEach(function (t) {
      g.beginPath(); g.moveTo(m.l, py(t)); g.lineTo(m.l + W, py(t)); g.stroke();
      g.fillText(tickLabel(t, yt), m.l - 4, py(t));
    });
    g.textAlign = 'center'; g.textBaseline = 'top';
    xt.forEach(function (t) { g.fillText(tickLabel(t, xt), px(t), m.t + HH + 4); });
    g.strokeStyle = '#888'; g.strokeRect(m.l, m.t, W, HH);
    g.save();
    g.beginPath(); g.rect(m.l, m.t, W, HH); g.clip();
    var drawn = 0;
    series.forEach(function (s, k) {
      var lo = stack ? stack[k].lo : s.lo, hi = stack ? stack[k].hi : s.hi;
      if (lo && hi) {  // a band: min-max of a bucket, or a stacked area
        g.fillStyle = s.color; g.globalAlpha = stack ? 0.55 : 0.15;
        var i = 0;
        while (i < n) {  // one polygon per run of defined points
          while (i < n && (lo[i] === null || hi[i] === null)) i++;
          var j = i;
          while (j < n && lo[j] !== null && hi[j] !== null) j++;
          if (j > i) {
            g.beginPath(); g.moveTo(px(x[i]), py(hi[i]));
            for (var a = i + 1; a < j; a++) g.lineTo(px(x[a]), py(hi[a]));
            for (var b = j - 1; b >= i; b--) g.lineTo(px(x[b]), py(lo[b]));
            g.closePath(); g.fill();
          }
          i = j;
        }
        g.globalAlpha = 1;
      }
      if (stack) { drawn += s.y.filter(function (v) { return v !== null; }).length; return; }
      g.strokeStyle = s.color; g.lineWidth = 1.4; g.beginPath();
      var pen = false, lone = [];
      for (var i2 = 0; i2 < n; i2++) {
        var v = s.y[i2];
        if (v === null) { pen = false; continue; }
        drawn++;
        var next = i2 + 1 < n ? s.y[i2 + 1] : null;
        if (!pen && next === null) lone.push(i2);  // isolated point: a line would not show it
        if (pen) g.lineTo(px(x[i2]), py(v)); else g.moveTo(px(x[i2]), py(v));
        pen = true;
      }
      g.stroke();
      g.fillStyle = s.color;
      lone.forEach(function (i3) { g.fillRect(px(x[i3]) - 1.5, py(s.y[i3]) - 1.5, 3, 3); });
    });
    g.restore();
    markers.forEach(function (mk) {
      var X = px(mk.x);
      g.strokeStyle = mk.color; g.fillStyle = mk.color;
      if (mk.strong) {
        g.setLineDash([4, 3]); g.beginPath(); g.moveTo(X, m.t); g.lineTo(X, m.t + HH); g.stroke(); g.setLineDash([]);
      }
      if (mk.bottom) { g.fillRect(X - 1, m.t + HH - 6, 2, 6); return; }
      g.beginPath(); g.moveTo(X - 4, m.t - 8); g.lineTo(X + 4, m.t - 8); g.lineTo(X, m.t); g.closePath(); g.fill();
    });
    p.root.setAttribute('data-drawn', String(drawn));
    p.root.setAttribute('data-markers', String(markers.length));
    cv.c.addEventListener('mousemove', function (ev) {
      var r = cv.c.getBoundingClientRect(), mx = ev.clientX - r.left;
      if (mx < m.l || mx > m.l + W) { showTip(ev, ''); return; }
      var xv = x0 + (mx - m.l) / W * (x1 - x0), lines = [];
      if (n) {
        var i = nearest(x, xv);
        lines.push('step ' + fmt(x[i], 7) + (opt.bucket > 1 ? ' (mean of up to ' + opt.bucket + ' records)' : ''));
        series.forEach(function (s) {
          var band = s.lo && s.hi && s.lo[i] !== s.hi[i] ? '  [' + fmt(s.lo[i]) + ' .. ' + fmt(s.hi[i]) + ']' : '';
          lines.push(s.name + ': ' + fmt(s.y[i], 5) + band);
        });
      }
      markers.forEach(function (mk) { if (Math.abs(px(mk.x) - mx) <= 4) lines.push('* step ' + mk.x + ': ' + mk.msg); });
      showTip(ev, lines.slice(0, 24).join('\n'));
    });
    cv.c.addEventListener('mouseleave', function (ev) { showTip(ev, ''); });
  }

  function stepSeries(D, names, labels) {
    var S = D.steps.series, out = [];
    names.forEach(function (name, k) {
      var s = S[name];
      if (!s) return;
      var label = (labels && labels[k]) || name;
      var nf = D.nonfinite[name];
      out.push({name: label + (nf ? ' (' + nf + ' non-finite)' : ''), y: s.y, lo: s.lo, hi: s.hi,
                color: PALETTE[out.length % PALETTE.length]});
    });
    return out;
  }

  function scaled(series, f) {
    return series.map(function (s) {
      var m = function (a) { return a && a.map(function (v) { return v === null ? null : v * f; }); };
      return {name: s.name, y: m(s.y), lo: m(s.lo), hi: m(s.hi), color: s.color};
    });
  }

  function eventMarkers(D) {
    var out = D.markers.map(function (e) {
      return {x: e.step, color: KIND_COLOR[e.kind] || '#555', msg: e.kind + ': ' + e.msg, strong: !!STRONG[e.kind]};
    });
    D.skipped.forEach(function (s) {
      out.push({x: s, color: KIND_COLOR.skipped, msg: 'skipped step (non-finite or spike)', bottom: true});
    });
    return out;
  }

  // ------------------------------------------------------------------ heatmap

  function heatColor(r) {  // 1 = the median rank: white; slower: red; faster: blue
    if (r === null) return '#eee';
    if (r >= 1) { var t = Math.min(1, (r - 1) / 0.5); return 'rgb(255,' + Math.round(255 - 200 * t) + ',' + Math.round(255 - 220 * t) + ')'; }
    var u = Math.min(1, (1 - r) / 0.2);
    return 'rgb(' + Math.round(255 - 140 * u) + ',' + Math.round(255 - 80 * u) + ',255)';
  }

  function heatmap(p, hm) {
    if (!hm) { noData(p, 'no rank_step_times events in metrics.jsonl'); return; }
    var rows = hm.rows, cols = hm.x.length, labelW = 120;
    var rowH = Math.max(3, Math.min(16, Math.floor(480 / rows.length)));
    var cv = canvas(p, rows.length * rowH + 24), g = cv.g, cw = (cv.w - labelW - 8) / cols, drawn = 0;
    var step = Math.ceil(10 / rowH);  // label every row that has room
    g.textAlign = 'right'; g.textBaseline = 'middle';
    rows.forEach(function (row, r) {
      for (var k = 0; k < cols; k++) {
        var v = row.ratio[k];
        g.fillStyle = heatColor(v);
        g.fillRect(labelW + k * cw, r * rowH, Math.ceil(cw), rowH);
        if (v !== null) drawn++;
      }
      if (r % step === 0) { g.fillStyle = '#333'; g.fillText(hm.labels[r], labelW - 4, r * rowH + rowH / 2); }
    });
    g.textAlign = 'center'; g.textBaseline = 'top'; g.fillStyle = '#555';
    var x0 = hm.x[0], x1 = hm.x[cols - 1];
    if (cols > 1) niceTicks(x0, x1, 8, 1).forEach(function (t) {
      g.fillText(fmt(t), labelW + ((t - x0) / (x1 - x0) * (cols - 1) + 0.5) * cw, rows.length * rowH + 4);
    });
    p.root.setAttribute('data-drawn', String(drawn));
    p.note.textContent = hm.ranks + ' ranks x ' + cols + ' windows of ' + hm.width + ' step(s); colour: step time / ' +
      'median rank of the window (white 1.0, red >= 1.5x, blue faster)' + (hm.ranks > rows.length ? '; a row shows the slowest rank of its group' : '');
    cv.c.addEventListener('mousemove', function (ev) {
      var rc = cv.c.getBoundingClientRect(), k = Math.floor((ev.clientX - rc.left - labelW) / cw),
          r = Math.floor((ev.clientY - rc.top) / rowH);
      if (k < 0 || k >= cols || r < 0 || r >= rows.length) { showTip(ev, ''); return; }
      showTip(ev, hm.labels[r] + '\nsteps around ' + fmt(hm.x[k], 7) + '\nstep time ' + fmt(rows[r].s[k]) + ' s, ' +
              fmt(rows[r].ratio[k]) + 'x the median rank');
    });
    cv.c.addEventListener('mouseleave', function (ev) { showTip(ev, ''); });
  }

  // ------------------------------------------------------------------ tables and header

  function cell(node) { var td = el('td'); td.appendChild(node); return td; }

  function tableRows(parent, head, rows) {  // rows of arrays of strings or nodes
    var t = el('table'), tr = el('tr');
    head.forEach(function (h) { tr.appendChild(el('th', null, h)); });
    t.appendChild(tr);
    rows.forEach(function (r) {
      var row = el('tr');
      r.forEach(function (c) { row.appendChild(c instanceof Node ? cell(c) : el('td', null, c)); });
      t.appendChild(row);
    });
    parent.appendChild(t);
    return t;
  }

  function kindTag(kind) {
    var s = el('span'), b = el('span', {'class': 'kind'});
    b.style.background = KIND_COLOR[kind] || '#555';
    s.appendChild(b); s.appendChild(document.createTextNode(kind));
    return s;
  }

  function header(app, D) {
    var S = D.summary;
    app.appendChild(el('h1', null, D.run_dir));
    var status = app.appendChild(el('div', {'class': 'status', id: 'status'}));
    status.textContent = 'built ' + fmtTime(D.generated) + ' from ' + S.records + ' step records (' + S.steps +
      ' steps after resumes)' + (D.steps.bucket > 1 ? '; plots show means of up to ' +
      D.steps.bucket + ' records per point with their min-max band' : '');
    var cards = app.appendChild(el('div', {'class': 'cards', id: 'summary'}));
    var card = function (label, value, id) {
      var c = cards.appendChild(el('div', {'class': 'card'}));
      c.appendChild(el('b', id ? {id: id} : null, value)); c.appendChild(el('span', null, label));
    };
    card('latest step', S.step === null ? '-' : S.step, 'latest-step');
    card('loss', fmt(S.loss, 5));
    if (S.loss_text !== null) card('text loss', fmt(S.loss_text, 5));
    if (S.loss_speech !== null) card('speech loss', fmt(S.loss_speech, 5));
    card('tokens/s', fmt(S.tokens_per_s));
    if (S.tokens_per_s_per_gpu !== null) card('tokens/s/GPU', fmt(S.tokens_per_s_per_gpu));
    if (S.mfu !== null) card('MFU', (S.mfu * 100).toFixed(1) + '%');
    card('step time', S.step_time_s === null ? '-' : fmt(S.step_time_s, 3) + ' s');
    card('tokens seen', fmt(S.consumed_tokens));
    if (S.audio_hours !== null) card('audio hours', fmt(S.audio_hours));
    if (S.time !== null && S.first_time !== null) card('elapsed (logged)', fmtDuration(S.time - S.first_time));
    if (S.time !== null) card('last record', fmtDuration(D.generated - S.time) + ' before build');
    card('checkpoints', S.checkpoints + (S.last_checkpoint !== null ? ' (last: step ' + S.last_checkpoint + ')' : ''));
    if (S.blocking_max_s !== null) card('save blocking mean / max', fmt(S.blocking_mean_s, 3) + ' / ' + fmt(S.blocking_max_s, 3) + ' s');
    if (S.checkpoint_failures) card('failed saves', S.checkpoint_failures);
    if (S.resumes) card('resumes', S.resumes);
    if (S.skipped_steps !== null) card('skipped steps / spikes / rollbacks',
      fmt(S.skipped_steps) + ' / ' + fmt(S.loss_spikes) + ' / ' + fmt(S.rollbacks));
    if (S.nonfatal_errors) card('non-fatal errors', S.nonfatal_errors);
    var warn = [];
    if (S.bad_lines) warn.push(S.bad_lines + ' unreadable line(s) in metrics.jsonl skipped (torn writes)');
    Object.keys(D.nonfinite).forEach(function (k) { warn.push(k + ': ' + D.nonfinite[k] + ' non-finite value(s)'); });
    if (!S.records) warn.push('no step records yet: the plots fill in once the run logs a step');
    if (warn.length) app.appendChild(el('div', {'class': 'warn', id: 'warnings'}, warn.join('; ')));
    if (D.config) {  // one line in the header; the table is at the end of the page
      var c = {};
      D.config.forEach(function (kv) { c[kv[0]] = kv[1]; });
      var T = 'model.transformer.';
      var parts = [[T + 'num_layers', ' layers'], [T + 'hidden_size', ' hidden'], [T + 'num_attention_heads', ' heads'],
                   ['parallel.tp', '', 'tp='], ['parallel.pp', '', 'pp='], ['parallel.dp', '', 'dp='],
                   ['data.seq_len', '', 'seq_len='], ['train.global_batch_size', '', 'global batch='],
                   ['train.steps', '', 'steps='], ['optim.optimizer.lr', '', 'lr=']]
        .filter(function (q) { return c[q[0]] !== undefined && c[q[0]] !== 'None'; })
        .map(function (q) { return (q[2] || '') + c[q[0]] + q[1]; });
      app.appendChild(el('div', {id: 'config-line'}, 'config: ' + parts.join(', ')));
    }
    if (D.exits && D.exits.length) {
      var codes = {};
      D.exits.forEach(function (e) { var k = e.code + ' (' + e.reason + ')'; codes[k] = (codes[k] || 0) + 1; });
      app.appendChild(el('div', {id: 'exit-line'}, 'exit records: ' + Object.keys(codes).map(function (k) {
        return codes[k] + ' rank(s) exited ' + k; }).join('; ')));
    }
  }

  function samples(app, D) {  // audio samples of checkpoints, newest first (RUN_DIR/samples)
    var A = D.samples || {steps: [], failures: []};
    if (!A.steps.length && !A.failures.length) return;
    app.appendChild(el('h2', null, 'Audio samples'));
    var box = app.appendChild(el('div', {id: 'samples'}));
    if (A.failures.length) {
      box.appendChild(el('div', {'class': 'warn', id: 'sample-failures'}, A.failures.length + ' sampling failure(s), ' +
        'the last at step ' + A.failures[A.failures.length - 1].step + ': ' + A.failures[A.failures.length - 1].why));
    }
    A.steps.forEach(function (st) {
      var sec = box.appendChild(el('div', {'class': 'sample-step', 'data-step': String(st.step)}));
      sec.appendChild(el('h3', null, 'step ' + st.step + (st.seconds ? ' (sampled in ' + fmt(st.seconds, 3) + ' s)' : '')));
      st.prompts.forEach(function (pr) {
        var row = sec.appendChild(el('div', {'class': 'sample'}));
        row.appendChild(el('div', {'class': 'sample-text'}, '"' + pr.text + '" - ' + fmt(pr.seconds, 3) + ' s, ' +
          pr.frames + ' frames, ' + pr.stop));
        if (pr.wav) row.appendChild(el('audio', {controls: '', preload: 'metadata', src: pr.wav}));
        if (pr.png) row.appendChild(el('img', {'class': 'spectrogram', src: pr.png, alt: 'spectrogram'}));
      });
    });
  }

  function footer(app, D) {
    if (D.exits && D.exits.length) {
      app.appendChild(el('h2', null, 'Exit records (RUN_DIR/exit)'));
      var box = app.appendChild(el('div', {'class': 'scroll', id: 'exits'}));
      var known = ['rank', 'host', 'code', 'reason', 'step', 'time', 'pid'];
      tableRows(box, ['rank', 'host', 'code', 'reason', 'step', 'time', 'details'], D.exits.slice(0, 256).map(function (e) {
        var extra = Object.keys(e).filter(function (k) { return known.indexOf(k) < 0; })
          .map(function (k) { return k + '=' + JSON.stringify(e[k]); }).join(' ');
        return [String(e.rank), e.host || '', String(e.code), e.reason || '', e.step === undefined ? '' : String(e.step),
                fmtTime(e.time), extra];
      }));
    }
    if (D.config || D.config_error) {
      app.appendChild(el('h2', null, 'Config (RUN_DIR/config.yaml)'));
      if (D.config_error) app.appendChild(el('div', {'class': 'warn'}, 'config.yaml unreadable: ' + D.config_error));
      if (D.config) {
        tableRows(app.appendChild(el('div', {id: 'config'})), ['key', 'value'], D.config);
        var det = app.appendChild(el('details'));
        det.appendChild(el('summary', null, 'full config.yaml'));
        det.appendChild(el('pre', null, D.config_text));
      }
    }
  }

  // ------------------------------------------------------------------ the page

  function render(D) {
    var app = document.getElementById('app');
    app.textContent = '';
    tip = document.getElementById('tip') || document.body.appendChild(el('div', {id: 'tip'}));
    header(app, D);
    var x = D.steps.x, S = D.steps.series, opts = {bucket: D.steps.bucket};
    var marks = eventMarkers(D);
    var section = function (title) {
      app.appendChild(el('h2', null, title));
      return app.appendChild(el('div', {'class': 'grid'}));
    };
    var plot = function (grid, id, title, series, o) {
      var p = panel(grid, id, title, o && o.wide);
      guarded(p, function () { chart(p, x, series, Object.assign({}, opts, o || {})); });
      return p;
    };
    var missing = function (field) { return 'no ' + field + ' in the step records (an older run, or not measured)'; };

    var g = section('Loss');
    var lp = plot(g, 'loss', 'Loss (total, text, speech; validation) with events',
                  stepSeries(D, ['loss', 'loss_text', 'loss_speech', 'val_loss']),
                  {wide: true, robust: true, markers: marks, why: 'no step records yet'});
    if (marks.length) lp.note.textContent += (lp.note.textContent ? '; ' : '') + 'markers: ' + Object.keys(D.event_counts)
      .filter(function (k) { return k !== 'gpu' && k !== 'rank_step_times'; })
      .map(function (k) { return k + ' ' + D.event_counts[k]; }).join(', ') + (D.skipped.length ? ', skipped steps ' + D.skipped.length : '');
    var src = Object.keys(S).filter(function (k) { return k.indexOf('src.') === 0; });
    plot(g, 'loss_by_source', 'Loss per data source', stepSeries(D, src, src.map(function (k) { return k.slice(4); })),
         {robust: true, why: missing('loss_by_source')});
    plot(g, 'lr', 'Learning rate', stepSeries(D, ['lr']), {why: missing('lr')});
    plot(g, 'grad_norm', 'Gradient norm', stepSeries(D, ['grad_norm']), {robust: true, why: missing('grad_norm')});

    g = section('Throughput');
    plot(g, 'tokens_per_s', 'Tokens/s', stepSeries(D, ['tokens_per_s']), {zero: true, why: missing('tokens_per_s')});
    plot(g, 'tokens_per_s_per_gpu', 'Tokens/s per GPU', stepSeries(D, ['tokens_per_s_per_gpu']), {zero: true, why: missing('tokens_per_s_per_gpu')});
    plot(g, 'mfu', 'MFU (%)', scaled(stepSeries(D, ['mfu'], ['MFU %']), 100), {zero: true, why: missing('mfu')});
    plot(g, 'tflops', 'TFLOP/s per GPU', stepSeries(D, ['tflops_per_gpu']), {zero: true, why: missing('tflops_per_gpu')});

    g = section('Step time');
    var phases = PHASES.filter(function (k) { return S['phase.' + k]; }).map(function (k) { return 'phase.' + k; });
    Object.keys(S).forEach(function (k) { if (k.indexOf('phase.') === 0 && phases.indexOf(k) < 0) phases.push(k); });
    var bp;
    if (phases.length) {
      bp = plot(g, 'step_time', 'Step time by phase (s, stacked)', stepSeries(D, phases, phases.map(function (k) { return k.slice(6); })),
                {stacked: true, wide: true});
    } else if (S.step_time_s && S.data_wait_s) {  // older runs: only the data wait is split out
      var rest = S.step_time_s.y.map(function (v, i) { var d = S.data_wait_s.y[i]; return v === null || d === null ? null : Math.max(0, v - d); });
      bp = plot(g, 'step_time', 'Step time: data wait and the rest (s, stacked)',
                [{name: 'data wait', y: S.data_wait_s.y, color: PALETTE[0]}, {name: 'rest of the step', y: rest, color: PALETTE[1]}],
                {stacked: true, wide: true});
      bp.note.textContent = 'this run logs no phase_s breakdown; only data_wait_s and step_time_s';
    } else {
      bp = plot(g, 'step_time', 'Step time by phase', [], {wide: true, why: missing('phase_s or step_time_s')});
    }
    var hp = panel(g, 'rank_heatmap', 'Step time per rank (ranks x step windows)', true);
    guarded(hp, function () { heatmap(hp, D.heat); });

    g = section('GPUs');
    var G = D.gpu, gm = G ? G.marks.map(function (m) { return {x: m.step, color: KIND_COLOR.gpu, msg: m.msg}; }) : [];
    [['util_pct', 'GPU utilisation (%)'], ['mem_used_gb', 'GPU memory used (GB)'], ['power_w', 'GPU power (W)'],
     ['temp_c', 'GPU temperature (C)'], ['sm_clock_mhz', 'SM clock (MHz)']].forEach(function (spec) {
      var p = panel(g, 'gpu_' + spec[0], spec[1]);
      guarded(p, function () {
        var M = G && G.metrics[spec[0]];
        if (!M) { noData(p, G ? 'no ' + spec[0] + ' in the gpu events' : 'no gpu events in metrics.jsonl'); return; }
        var series = G.mode === 'per_gpu'
          ? Object.keys(M).map(function (k, i) { return {name: k, y: M[k], color: PALETTE[i % PALETTE.length]}; })
          : [{name: 'mean of ' + G.gpus.length + ' GPUs (band: min-max)', y: M.mean, lo: M.lo, hi: M.hi, color: PALETTE[0]}];
        chart(p, G.x, series, {markers: gm, zero: spec[0] !== 'sm_clock_mhz'});
      });
    });
    var tp = panel(g, 'gpu_health', 'Throttling and ECC');
    guarded(tp, function () {
      if (!G) { noData(tp, 'no gpu events in metrics.jsonl'); return; }
      var rows = G.throttle.map(function (t) { return [t.gpu, 'throttle: ' + t.reason, String(t.samples), String(t.first), String(t.last)]; })
        .concat(G.ecc.map(function (e) { return [e.gpu, 'uncorrected ECC: ' + e.errors, '', String(e.first), '']; }));
      tp.root.setAttribute('data-drawn', String(rows.length));
      if (!rows.length) { tp.body.appendChild(el('div', {'class': 'nodata'}, 'no throttling or ECC errors seen')); return; }
      var box = tp.body.appendChild(el('div', {'class': 'scroll'}));
      tableRows(box, ['GPU', 'what', 'samples', 'first step', 'last step'], rows);
    });

    g = section('Memory and guard');
    var mem = Object.keys(S).filter(function (k) { return k.indexOf('mem.') === 0; });
    plot(g, 'memory', 'Memory (GB)', stepSeries(D, mem, mem.map(function (k) { return k.slice(4); })), {zero: true, why: missing('mem')});
    plot(g, 'guard', 'Skipped steps and guard counters',
         stepSeries(D, ['skipped_steps', 'loss_spikes', 'rollbacks', 'skipped_bad_sample', 'skipped_bad_shard', 'nonfatal_errors']),
         {zero: true, markers: D.skipped.map(function (s) { return {x: s, color: KIND_COLOR.skipped, msg: 'skipped step', bottom: true}; }),
          why: missing('guard counters')});

    app.appendChild(el('h2', null, 'Events'));
    var ep = panel(app, 'events', 'Checkpoints, resumes, rollbacks, stops, hangs, stragglers, alerts (newest first)', true);
    guarded(ep, function () {
      if (!D.events.length) { noData(ep, 'no events in metrics.jsonl'); return; }
      ep.root.setAttribute('data-drawn', String(D.events.length));
      ep.legend.textContent = Object.keys(D.event_counts).map(function (k) { return k + ': ' + D.event_counts[k]; }).join('  ');
      var box = ep.body.appendChild(el('div', {'class': 'scroll'}));
      tableRows(box, ['step', 'time', 'event', 'details'], D.events.map(function (e) {
        return [e.step === null ? '' : String(e.step), fmtTime(e.time), kindTag(e.kind), e.msg];
      }));
    });
    samples(app, D);
    footer(app, D);
    document.body.setAttribute('data-step', D.summary.step === null ? '' : String(D.summary.step));
    document.body.setAttribute('data-rendered', String(Number(document.body.getAttribute('data-rendered') || 0) + 1));
  }

  var data = JSON.parse(document.getElementById('dash-data').textContent);
  var live = JSON.parse(document.getElementById('dash-live').textContent);
  render(data);
  var resizeTimer = null;
  window.addEventListener('resize', function () {
    clearTimeout(resizeTimer);
    resizeTimer = setTimeout(function () { render(data); }, 200);
  });
  if (live) {  // served by --serve: poll data.json and redraw when it changed
    var version = data.version;
    var status = function (text, bad) {
      var s = document.getElementById('status');
      if (s) { s.textContent = text; s.className = 'status' + (bad ? ' bad' : ''); }
    };
    var poll = function () {
      fetch('data.json?have=' + encodeURIComponent(version), {cache: 'no-store'}).then(function (r) {
        if (!r.ok) throw new Error('HTTP ' + r.status);
        return r.status === 204 ? null : r.json();  // 204: nothing new since `version`
      }).then(function (d) {
        if (d) { version = d.version; data = d; render(d); }
        status('live: updated ' + new Date().toLocaleTimeString() + ' (every ' + live.interval_s + ' s); latest step ' +
               data.summary.step + ', ' + data.summary.records + ' step records');
      }).catch(function (err) {
        status('live: the dashboard server is unreachable (' + err.message + ') since ' + new Date().toLocaleTimeString() +
               '; showing the last data', true);
      });
    };
    setInterval(poll, live.interval_s * 1000);
  }
})();
