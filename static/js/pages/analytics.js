/* Analytics: live charts drawn with the vendored uPlot (MIT, static/vendor/).
   - messages/s by type over the last two minutes, counted from the WebSocket;
   - open connections over the last ten minutes, from /api/v1/ws/stats;
   - the last hour per minute from GET /api/v1/analytics (messages by type and
     connections opened), extended live and reloaded every minute. */
(function (global) {
  'use strict';
  var page = global.Agentcast && global.Agentcast.page;
  var uPlot = global.uPlot;
  if (!page || !uPlot) return;
  var $ = function (id) { return document.getElementById(id); };
  var COLORS = ['#6ea8fe', '#34d399', '#fbbf24', '#f87171', '#a78bfa', '#f472b6', '#22d3ee'];
  var MAX_TYPES = 6; // beyond this, types are summed as "other"
  var RATE_SECONDS = 120;
  var CONN_POINTS = 120;
  var STATS_EVERY_MS = 5000;
  var HOUR_EVERY_MS = 60000;
  var AXIS = { stroke: '#9aa6bf', grid: { stroke: '#26344f', width: 1 }, ticks: { stroke: '#26344f' } };

  function now() { return Math.floor(Date.now() / 1000); }

  function clock(withSeconds) {
    return function (u, splits) {
      return splits.map(function (t) {
        var d = new Date(t * 1000);
        var hh = ('0' + d.getHours()).slice(-2);
        var mm = ('0' + d.getMinutes()).slice(-2);
        return withSeconds ? hh + ':' + mm + ':' + ('0' + d.getSeconds()).slice(-2) : hh + ':' + mm;
      });
    };
  }

  /** A time window ending now, so an empty or one-point chart still has sane axes. */
  function lastSeconds(span) {
    return function () { var end = now(); return [end - span, end]; };
  }

  /** Counts start at zero and the axis never collapses to a point. */
  function fromZero(u, min, max) { return [0, Math.max(2, Math.ceil((max || 0) * 1.15))]; }

  function makeChart(container, series, extra, span, withSeconds) {
    var opts = Object.assign({
      width: Math.max(280, container.clientWidth),
      height: 240,
      series: [{}].concat(series),
      scales: { x: { time: true, range: lastSeconds(span) }, y: { range: fromZero } },
      axes: [Object.assign({ values: clock(withSeconds) }, AXIS), Object.assign({}, AXIS)],
      legend: { live: true },
      cursor: { drag: { x: false, y: false } }
    }, extra || {});
    var data = [[]].concat(series.map(function () { return []; }));
    var chart = new uPlot(opts, data, container);
    if (global.ResizeObserver) {
      new global.ResizeObserver(function () {
        chart.setSize({ width: Math.max(280, container.clientWidth), height: 240 });
      }).observe(container);
    }
    return chart;
  }

  /** A series; sparse ones (a point per poll) show their points, dense ones just the line. */
  function line(label, index, scale, withPoints) {
    return {
      label: label, stroke: COLORS[index % COLORS.length], width: 2, scale: scale || 'y',
      points: { show: !!withPoints, size: 6, fill: COLORS[index % COLORS.length] }
    };
  }

  /**
   * Types get a fixed series slot in order of appearance; past MAX_TYPES they
   * share "other". `first` is the chart's series index of slot 0.
   */
  function TypeSlots(chart, first, redraw) { this.chart = chart; this.first = first; this.redraw = redraw; this.names = []; }
  TypeSlots.prototype.slot = function (type) {
    var i = this.names.indexOf(type);
    if (i >= 0) return i;
    if (this.names.length >= MAX_TYPES) {
      i = this.names.indexOf('other');
      if (i >= 0) return i;
      type = 'other';
    }
    this.names.push(type);
    i = this.names.length - 1;
    this.chart.addSeries(line(type, i), this.first + i);
    this.redraw(); // uPlot wants data for the new series before it paints again
    return i;
  };

  // ---- messages/s by type, live ------------------------------------------------
  var rateChart = makeChart($('chart-rate'), [], {}, RATE_SECONDS, true);
  var rateSlots = new TypeSlots(rateChart, 1, function () { drawRate(); });
  var perSecond = new Map(); // second -> counts per slot

  function drawRate() {
    var end = now();
    var xs = [];
    var ys = rateSlots.names.map(function () { return []; });
    for (var s = end - RATE_SECONDS + 1; s <= end; s++) {
      xs.push(s);
      var counts = perSecond.get(s) || [];
      for (var k = 0; k < ys.length; k++) ys[k].push(counts[k] || 0);
    }
    perSecond.forEach(function (_, second) { if (second <= end - RATE_SECONDS) perSecond.delete(second); });
    rateChart.setData([xs].concat(ys));
  }

  // ---- connections, live -----------------------------------------------------------
  var connChart = makeChart($('chart-connections'), [line('connections', 0, 'y', true)], {}, CONN_POINTS * STATS_EVERY_MS / 1000, true);
  var connXs = [];
  var connYs = [];
  function loadStats() {
    if (document.visibilityState === 'hidden') return;
    page.api('/api/v1/ws/stats').then(function (result) {
      var stats = result.ok && result.data && result.data.stats;
      if (!stats || typeof stats.current_connections !== 'number') return;
      connXs.push(now());
      connYs.push(stats.current_connections);
      if (connXs.length > CONN_POINTS) { connXs.shift(); connYs.shift(); }
      connChart.setData([connXs.slice(), connYs.slice()]);
    });
  }

  // ---- the last hour -----------------------------------------------------------------
  var hourChart = makeChart($('chart-hour'), [line('connections opened', 6, 'conn')], {
    scales: { x: { time: true, range: lastSeconds(3600) }, y: { range: fromZero }, conn: { range: fromZero } },
    axes: [
      Object.assign({ values: clock(false) }, AXIS),
      Object.assign({ label: 'messages / min' }, AXIS),
      Object.assign({ side: 1, scale: 'conn', label: 'connections opened' }, AXIS, { grid: { show: false } })
    ]
  }, 3600, false);
  var hourSlots = new TypeSlots(hourChart, 2, function () { drawHour(); });
  // minute (unix s) -> { counts: [per hour slot], connections: opened that minute }
  var minutes = new Map();

  /**
   * GET /api/v1/analytics: {tenant, minutes: [{minute (RFC 3339), messages:
   * {type: n}, messages_total, deliveries, connections, peak_connections}]},
   * oldest first. The server's counts replace what this page counted live.
   */
  function loadHour() {
    page.api('/api/v1/analytics').then(function (result) {
      var list = result.ok && result.data && Array.isArray(result.data.minutes) ? result.data.minutes : null;
      if (!list) {
        $('hour-note').textContent = 'History could not be loaded (' + page.errorText(result) + '); showing what arrives from now on.';
        return;
      }
      $('hour-note').textContent = '';
      var totals = { messages: 0, deliveries: 0, connections: 0 };
      list.forEach(function (bucket) {
        var t = bucket && Date.parse(bucket.minute);
        if (!t) return;
        t = Math.floor(t / 1000);
        t -= t % 60;
        var entry = { counts: [], connections: typeof bucket.connections === 'number' ? bucket.connections : 0 };
        var byType = bucket.messages && typeof bucket.messages === 'object' ? bucket.messages : {};
        Object.keys(byType).forEach(function (type) {
          if (typeof byType[type] !== 'number' || byType[type] <= 0) return;
          var slot = hourSlots.slot(type);
          entry.counts[slot] = (entry.counts[slot] || 0) + byType[type];
        });
        totals.messages += typeof bucket.messages_total === 'number' ? bucket.messages_total : 0;
        totals.deliveries += typeof bucket.deliveries === 'number' ? bucket.deliveries : 0;
        totals.connections += entry.connections;
        minutes.set(t, entry);
      });
      hourTotals = totals;
      drawSummary();
      drawHour();
    });
  }

  /** The server's totals at the last load, plus the messages seen live since. */
  var hourTotals = null;
  function drawSummary() {
    if (!hourTotals) return;
    $('hour-summary').textContent = 'Last hour: ' + plural(hourTotals.messages, 'message') + ' published, ' +
      plural(hourTotals.deliveries, 'delivery', 'deliveries') + ', ' + plural(hourTotals.connections, 'connection') + ' opened.';
  }

  function plural(n, one, many) { return n + ' ' + (n === 1 ? one : many || one + 's'); }

  function drawHour() {
    var end = now() - (now() % 60);
    var xs = [];
    var conns = [];
    var ys = hourSlots.names.map(function () { return []; });
    for (var m = end - 59 * 60; m <= end; m += 60) {
      var entry = minutes.get(m);
      xs.push(m);
      conns.push(entry ? entry.connections : 0);
      for (var k = 0; k < ys.length; k++) ys[k].push(entry ? entry.counts[k] || 0 : 0);
    }
    minutes.forEach(function (_, minute) { if (minute < end - 59 * 60) minutes.delete(minute); });
    hourChart.setData([xs, conns].concat(ys));
  }

  // ---- live input -------------------------------------------------------------------
  page.client.on('*', function (msg) {
    var second = now();
    var counts = perSecond.get(second) || [];
    var slot = rateSlots.slot(msg.type);
    counts[slot] = (counts[slot] || 0) + 1;
    perSecond.set(second, counts);
    var minute = second - (second % 60);
    var entry = minutes.get(minute) || { counts: [], connections: 0 };
    var hourSlot = hourSlots.slot(msg.type);
    entry.counts[hourSlot] = (entry.counts[hourSlot] || 0) + 1;
    minutes.set(minute, entry);
    if (hourTotals) hourTotals.messages++;
    scheduleDraw();
  });

  /** Redraw on the next frame, once however many messages arrive before it. */
  var drawPending = false;
  function scheduleDraw() {
    if (drawPending) return;
    drawPending = true;
    global.requestAnimationFrame(function () {
      drawPending = false;
      drawRate();
      drawHour();
      drawSummary();
    });
  }
  page.client.on('@connected', loadStats);

  drawRate();
  drawHour();
  loadHour();
  loadStats();
  global.setInterval(drawRate, 1000);
  global.setInterval(loadStats, STATS_EVERY_MS);
  global.setInterval(function () {
    if (document.visibilityState !== 'hidden') loadHour();
  }, HOUR_EVERY_MS);
})(window);
