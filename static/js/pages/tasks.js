/* Tasks page: the task view of SPEC §5 (GET /api/v1/tasks) kept current by live
   task_update messages; a row's badge and progress bar change in place, and its
   id links to the task's own page (/task.html?id=…). */
(function (global) {
  'use strict';
  var page = global.Agentcast && global.Agentcast.page;
  if (!page) return;
  var el = page.el;
  var body = document.getElementById('tasks-body');
  var empty = document.getElementById('tasks-empty');
  var filter = document.getElementById('task-filter');
  var search = document.getElementById('task-search');
  var rows = new Map();
  var noMatch = document.getElementById('tasks-nomatch');
  var STATUSES = ['queued', 'running', 'completed', 'failed'];

  function progressOf(task) {
    if (typeof task.progress === 'number' && task.progress >= 0) return Math.min(100, task.progress);
    return task.status === 'completed' ? 100 : 0;
  }

  function buildRow(task) {
    var bar = el('progress', { max: '100', 'aria-label': 'Progress of ' + task.task_id });
    var row = el('tr', { 'data-task-id': task.task_id }, [
      el('td', null, [
        el('a', { class: 'cell-id task-link', href: '/task.html?id=' + encodeURIComponent(task.task_id) }, task.task_id),
        el('span', { class: 'cell-sub task-query' })
      ]),
      el('td', { class: 'task-status' }),
      el('td', null, el('div', { class: 'progress' }, [bar, el('span', { class: 'task-progress' })])),
      el('td', { class: 'hide-sm task-updated' })
    ]);
    return row;
  }

  function fill(row, task) {
    var status = STATUSES.indexOf(task.status) >= 0 ? task.status : 'queued';
    row.setAttribute('data-status', status);
    row.querySelector('.task-query').textContent = typeof task.query === 'string' ? task.query : '';
    page.clear(row.querySelector('.task-status')).appendChild(page.badge(status));
    var pct = progressOf(task);
    var bar = row.querySelector('progress');
    bar.value = pct;
    bar.className = 'is-' + status;
    row.querySelector('.task-progress').textContent = Math.round(pct) + '%';
    page.clear(row.querySelector('.task-updated')).appendChild(page.timeEl(task.updated_at));
  }

  function matches(task) {
    var want = filter.value;
    var text = search.value.trim().toLowerCase();
    if (want && task.status !== want) return false;
    if (!text) return true;
    return String(task.task_id).toLowerCase().indexOf(text) >= 0 ||
      (typeof task.query === 'string' && task.query.toLowerCase().indexOf(text) >= 0);
  }

  function refreshVisibility() {
    var shown = 0;
    view.items.forEach(function (task, key) {
      var row = rows.get(key);
      if (!row) return;
      row.hidden = !matches(task);
      if (!row.hidden) shown++;
    });
    empty.hidden = view.items.size > 0;
    noMatch.hidden = view.items.size === 0 || shown > 0;
  }

  function sortKey(task) { return String(task.updated_at || ''); }

  function renderAll() {
    page.clear(body);
    rows.clear();
    view.values().sort(function (a, b) { return sortKey(b) < sortKey(a) ? -1 : 1; }).forEach(function (task) {
      var row = buildRow(task);
      fill(row, task);
      rows.set(task.task_id, row);
      body.appendChild(row);
    });
    refreshVisibility();
  }

  var view = new page.LiveView({
    url: '/api/v1/tasks?limit=500',
    listKey: 'tasks',
    idKey: 'task_id',
    type: 'task_update',
    onChange: function (change) {
      if (change.kind === 'reset') { renderAll(); return; }
      var row = rows.get(change.key);
      if (!row) {
        row = buildRow(change.entry);
        rows.set(change.key, row);
        body.insertBefore(row, body.firstChild);
      }
      fill(row, change.entry);
      row.classList.remove('flash');
      void row.offsetWidth; // restart the highlight animation
      row.classList.add('flash');
      refreshVisibility();
    }
  });
  view.attach(page.client);
  view.load();
  filter.addEventListener('change', refreshVisibility);
  search.addEventListener('input', refreshVisibility);
})(window);
