/* Agents page: the agent view of SPEC §5 (GET /api/v1/agents) kept current by
   live agent_update messages: rows are added, updated and removed with a toast. */
(function (global) {
  'use strict';
  var page = global.Agentcast && global.Agentcast.page;
  if (!page) return;
  var el = page.el;
  var body = document.getElementById('agents-body');
  var empty = document.getElementById('agents-empty');
  var count = document.getElementById('agents-count');
  var rows = new Map();
  var SKIP = { agent_id: 1, name: 1, action: 1, seq: 1, updated_at: 1 };

  function details(agent) {
    // Whatever else the backend sent (status, model, version…), briefly.
    return Object.keys(agent).filter(function (k) { return !SKIP[k]; }).slice(0, 4).map(function (k) {
      var v = agent[k];
      return k + ': ' + (typeof v === 'object' ? JSON.stringify(v) : String(v));
    }).join(' · ').slice(0, 160);
  }

  function buildRow(agent) {
    return el('tr', { 'data-agent-id': agent.agent_id }, [
      el('td', null, [el('span', { class: 'agent-name' }), el('span', { class: 'cell-sub cell-id' }, agent.agent_id)]),
      el('td', { class: 'agent-action' }),
      el('td', { class: 'hide-sm agent-details note' }),
      el('td', { class: 'hide-sm agent-updated' })
    ]);
  }

  function fill(row, agent) {
    row.querySelector('.agent-name').textContent = typeof agent.name === 'string' && agent.name ? agent.name : agent.agent_id;
    page.clear(row.querySelector('.agent-action')).appendChild(page.badge(agent.action || 'registered'));
    row.querySelector('.agent-details').textContent = details(agent);
    page.clear(row.querySelector('.agent-updated')).appendChild(page.timeEl(agent.updated_at));
  }

  function summary() {
    var n = view.items.size;
    count.textContent = n + (n === 1 ? ' agent' : ' agents');
    empty.hidden = n > 0;
  }

  function notifyChange(change) {
    if (!global.Agentcast.prefs.load().agents) return;
    var name = (change.entry && change.entry.name) || change.key;
    if (change.kind === 'delete') global.Agentcast.notify(name + ' was removed', 'warning', 'Agent removed');
    else if (change.isNew) global.Agentcast.notify(name + ' registered', 'success', 'Agent registered');
    else global.Agentcast.notify(name + ' updated', 'info', 'Agent updated');
  }

  var view = new page.LiveView({
    url: '/api/v1/agents?limit=500',
    listKey: 'agents',
    idKey: 'agent_id',
    type: 'agent_update',
    isDelete: function (msg) { return msg.data.action === 'deleted'; },
    onChange: function (change) {
      if (change.kind === 'reset') {
        page.clear(body);
        rows.clear();
        view.values().forEach(function (agent) {
          var row = buildRow(agent);
          fill(row, agent);
          rows.set(agent.agent_id, row);
          body.appendChild(row);
        });
      } else if (change.kind === 'delete') {
        var gone = rows.get(change.key);
        rows.delete(change.key);
        if (gone) gone.remove();
        notifyChange(change);
      } else {
        var row = rows.get(change.key);
        if (!row) {
          row = buildRow(change.entry);
          rows.set(change.key, row);
          body.insertBefore(row, body.firstChild);
        }
        fill(row, change.entry);
        row.classList.remove('flash');
        void row.offsetWidth;
        row.classList.add('flash');
        notifyChange(change);
      }
      summary();
    }
  });
  view.attach(page.client);
  view.load();
})(window);
