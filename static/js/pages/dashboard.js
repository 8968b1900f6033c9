/* Dashboard: live counters (connections from /api/v1/ws/stats, messages/s
   measured on this page, tasks by status, agents) and a live event feed. */
(function (global) {
  'use strict';
  var page = global.Agentcast && global.Agentcast.page;
  if (!page) return;
  var el = page.el;
  var $ = function (id) { return document.getElementById(id); };
  var FEED_MAX = 50;
  var RATE_WINDOW_MS = 10000;
  var STATS_EVERY_MS = 5000;

  // ---- tasks and agents, from their views ----------------------------------
  function renderTasks() {
    var counts = { queued: 0, running: 0, completed: 0, failed: 0 };
    tasks.items.forEach(function (t) { if (counts[t.status] !== undefined) counts[t.status]++; });
    $('stat-tasks').textContent = String(tasks.items.size);
    Object.keys(counts).forEach(function (status) {
      var dd = document.querySelector('#stat-task-statuses dd[data-status="' + status + '"]');
      if (dd) dd.textContent = String(counts[status]);
    });
  }
  function renderAgents() { $('stat-agents').textContent = String(agents.items.size); }

  var tasks = new page.LiveView({ url: '/api/v1/tasks?limit=500', listKey: 'tasks', idKey: 'task_id', type: 'task_update', onChange: renderTasks });
  var agents = new page.LiveView({
    url: '/api/v1/agents?limit=500', listKey: 'agents', idKey: 'agent_id', type: 'agent_update',
    isDelete: function (msg) { return msg.data.action === 'deleted'; }, onChange: renderAgents
  });
  tasks.attach(page.client).load();
  agents.attach(page.client).load();

  // ---- messages per second, measured here ------------------------------------
  var arrivals = [];
  var received = 0;
  function renderRate() {
    var cutoff = Date.now() - RATE_WINDOW_MS;
    while (arrivals.length && arrivals[0] < cutoff) arrivals.shift();
    $('stat-rate').textContent = (arrivals.length / (RATE_WINDOW_MS / 1000)).toFixed(1);
    $('stat-received').textContent = received + ' received on this page';
  }
  global.setInterval(renderRate, 1000);

  // ---- connections, from the stats endpoint -----------------------------------
  function loadStats() {
    if (document.visibilityState === 'hidden') return;
    page.api('/api/v1/ws/stats').then(function (result) {
      var stats = result.ok && result.data && result.data.stats;
      if (!stats) return;
      $('stat-connections').textContent = String(stats.current_connections);
      $('stat-connections-total').textContent = stats.total_connections + ' accepted since start';
    });
  }
  loadStats();
  global.setInterval(loadStats, STATS_EVERY_MS);
  page.client.on('@connected', loadStats);

  // ---- the feed -----------------------------------------------------------------
  var feed = $('feed');
  function describe(msg) {
    var d = msg.data || {};
    switch (msg.type) {
      case 'task_update':
        return [page.badge(d.status), ' ', String(d.task_id), d.query ? ' — ' + d.query : '',
          typeof d.progress === 'number' ? ' (' + d.progress + '%)' : ''];
      case 'agent_update':
        return [page.badge(d.action), ' ', String(d.name || d.agent_id)];
      case 'system':
        return [page.badge(d.level || 'info'), ' ', String(d.message)];
      default: {
        var text = JSON.stringify(d);
        return [text && text.length > 140 ? text.slice(0, 140) + '…' : text];
      }
    }
  }
  page.client.on('*', function (msg) {
    arrivals.push(Date.now());
    received++;
    renderRate();
    var item = el('li', { 'data-type': msg.type }, [
      el('span', { class: 'feed__type' }, msg.type),
      el('span', { class: 'feed__text' }, describe(msg)),
      page.timeEl(msg.ts)
    ]);
    feed.insertBefore(item, feed.firstChild);
    while (feed.children.length > FEED_MAX) feed.removeChild(feed.lastChild);
    $('feed-empty').hidden = true;
  });
  $('feed-clear').addEventListener('click', function () {
    page.clear(feed);
    $('feed-empty').hidden = false;
  });
})(window);
