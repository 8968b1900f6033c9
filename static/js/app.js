/*
 * The shared chrome of every authenticated page: checks the stored token, draws
 * the top bar (nav, current user, logout, the connection indicator from
 * /static/ws-status.html), opens the one WebSocket, and offers the page scripts
 * small helpers (REST calls, element builder, live views merged by `seq`).
 * Pages load it after websocket.js and before their own script, and find
 * everything in `Agentcast.page`.
 */
(function (global) {
  'use strict';

  var Agentcast = global.Agentcast;
  var doc = global.document;

  var NAV = [
    { href: '/dashboard.html', label: 'Dashboard' },
    { href: '/tasks.html', label: 'Tasks' },
    { href: '/agents.html', label: 'Agents' },
    { href: '/analytics.html', label: 'Analytics' },
    { href: '/settings.html', label: 'Settings' },
    { href: '/api-keys.html', label: 'API keys', admin: true }
  ];

  // ---- who is logged in ----------------------------------------------------

  var token = null;
  try { token = global.localStorage.getItem('token'); } catch (e) { token = null; }
  var claims = Agentcast.decodeToken(token);
  if (!claims || Agentcast.tokenExpired(token, 0)) {
    // No (valid) session: the login page brings the user back here afterwards.
    global.location.replace('/login.html?next=' + encodeURIComponent(global.location.pathname + global.location.search));
    return;
  }
  var user = {
    id: String(claims.sub || ''),
    name: String(claims.name || claims.sub || 'unknown'),
    role: claims.role === 'admin' ? 'admin' : 'user',
    tenant: String(claims.tenant || 'default')
  };
  user.isAdmin = user.role === 'admin';

  // ---- DOM helpers -----------------------------------------------------------

  /**
   * Builds an element: el('td', {class: 'num', title: 'x'}, ['text', otherNode]).
   * Text goes through textContent, so message content never becomes markup.
   */
  function el(tag, attrs, children) {
    var node = doc.createElement(tag);
    if (attrs) {
      Object.keys(attrs).forEach(function (name) {
        var value = attrs[name];
        if (value === null || value === undefined || value === false) return;
        if (name === 'class') node.className = value;
        else if (name === 'text') node.textContent = value;
        else if (name === 'hidden') node.hidden = true;
        else if (name.slice(0, 2) === 'on' && typeof value === 'function') node.addEventListener(name.slice(2), value);
        else node.setAttribute(name, value === true ? '' : String(value));
      });
    }
    (Array.isArray(children) ? children : children === undefined ? [] : [children]).forEach(function (child) {
      if (child === null || child === undefined || child === false) return;
      node.appendChild(typeof child === 'object' ? child : doc.createTextNode(String(child)));
    });
    return node;
  }

  function clear(node) {
    while (node && node.firstChild) node.removeChild(node.firstChild);
    return node;
  }

  function fmtTime(ts) {
    var d = ts ? new Date(ts) : new Date();
    if (isNaN(d.getTime())) return '';
    return d.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit', second: '2-digit' });
  }

  function timeEl(ts) {
    var d = ts ? new Date(ts) : new Date();
    var iso = isNaN(d.getTime()) ? '' : d.toISOString();
    return el('time', { datetime: iso, title: iso }, fmtTime(ts));
  }

  function badge(value, kind) {
    var safe = String(value || 'unknown');
    return el('span', { class: 'badge badge--' + (kind || safe.replace(/[^a-z]/g, '')) }, safe);
  }

  // ---- REST ------------------------------------------------------------------

  /** fetch with the stored token; never rejects. Resolves {ok, status, data}. */
  function api(path, options) {
    options = options || {};
    var headers = { 'Accept': 'application/json' };
    var current = null;
    try { current = global.localStorage.getItem('token'); } catch (e) { current = null; }
    if (current) headers['Authorization'] = 'Bearer ' + current;
    var init = { method: options.method || 'GET', headers: headers };
    if (options.body !== undefined) {
      headers['Content-Type'] = 'application/json';
      init.body = JSON.stringify(options.body);
    }
    return global.fetch(path, init).then(function (response) {
      return response.text().then(function (text) {
        var data = null;
        try { data = text ? JSON.parse(text) : null; } catch (e) { data = null; }
        return { ok: response.ok, status: response.status, data: data, headers: response.headers };
      });
    }).catch(function () {
      return { ok: false, status: 0, data: null, headers: null };
    });
  }

  /** The human message of a JSON error body, or a fallback. */
  function errorText(result, fallback) {
    var error = result && result.data && result.data.error;
    if (error && typeof error.message === 'string') return error.message;
    if (result && result.status === 0) return 'the server cannot be reached';
    return fallback || ('request failed (' + (result ? result.status : '?') + ')');
  }

  // ---- live views --------------------------------------------------------------

  /**
   * A keyed view loaded over REST and kept current by live messages (SPEC §5):
   * each entry carries the `seq` that set it, and a message only applies when its
   * `seq` is higher, so the REST load and the live stream can arrive in any order.
   * Messages seen while a load is in flight are applied again on top of its result.
   *
   * options: url, listKey ('tasks'), idKey ('task_id'), type ('task_update'),
   *          isDelete(msg) -> bool, onChange(change) with change.kind one of
   *          'reset' | 'upsert' | 'delete'.
   */
  function LiveView(options) {
    this.options = options;
    this.items = new Map();
    this.loading = false;
    this.again = false;
    this.buffer = [];
  }

  /**
   * A view entry as GET /api/v1/tasks|agents lists it ({task_id, status, seq,
   * updated_at, …, data: <the message's data>}) in the shape a live message
   * gives (the data's fields at the top), so rows read one shape. The entry's
   * own fields win: the server keeps e.g. a task's last known query.
   */
  function flatten(entry) {
    var data = entry.data && typeof entry.data === 'object' && !Array.isArray(entry.data) ? entry.data : {};
    var flat = Object.assign({}, data, entry);
    delete flat.data;
    return flat;
  }

  LiveView.prototype.values = function () {
    return Array.from(this.items.values());
  };

  LiveView.prototype.load = function () {
    var self = this;
    if (this.loading) { this.again = true; return Promise.resolve(); }
    this.loading = true;
    this.buffer = [];
    return api(this.options.url).then(function (result) {
      var list = result.ok && result.data && Array.isArray(result.data[self.options.listKey])
        ? result.data[self.options.listKey] : null;
      if (list) {
        var fresh = new Map();
        list.forEach(function (entry) {
          var key = entry && entry[self.options.idKey];
          if (typeof key !== 'string' || !key) return;
          var flat = flatten(entry);
          fresh.set(key, flat);
          if (self.client && self.options.type === 'task_update') self.client.nameTask(key, flat.query);
        });
        self.items = fresh;
      } else {
        // The view could not be read (server busy or away): live messages are
        // all we know. Forget their seqs so the next messages still apply.
        self.items.forEach(function (entry) { entry.seq = 0; });
      }
      var buffered = self.buffer;
      self.buffer = [];
      self.loading = false;
      buffered.forEach(function (msg) { self.apply(msg, true); });
      self.options.onChange({ kind: 'reset', status: result.status });
      if (self.again) { self.again = false; return self.load(); }
    });
  };

  LiveView.prototype.apply = function (msg, quiet) {
    var data = msg && msg.data;
    var key = data && data[this.options.idKey];
    if (typeof key !== 'string' || !key) return;
    if (this.loading) this.buffer.push(msg);
    var existing = this.items.get(key);
    var seq = typeof msg.seq === 'number' ? msg.seq : 0;
    if (existing && typeof existing.seq === 'number' && existing.seq >= seq && seq > 0) return;
    if (this.options.isDelete && this.options.isDelete(msg)) {
      if (!existing) return;
      this.items.delete(key);
      if (!quiet) this.options.onChange({ kind: 'delete', key: key, entry: existing, msg: msg });
      return;
    }
    var entry = Object.assign({}, existing || {}, data, { seq: seq, updated_at: msg.ts || data.updated_at });
    this.items.set(key, entry);
    if (!quiet) this.options.onChange({ kind: 'upsert', key: key, entry: entry, isNew: !existing, msg: msg });
  };

  /** Wires a view to the client: live messages, and a reload on every resync. */
  LiveView.prototype.attach = function (client) {
    var self = this;
    this.client = client;
    client.on(this.options.type, function (msg) { self.apply(msg); });
    client.on('@resync', function () { self.load(); });
    return this;
  };

  // ---- system messages, kept for the settings and api-keys pages -------------

  var SYSTEM_KEY = 'agentcast.system';
  var SYSTEM_MAX = 50;

  function systemLog() {
    try {
      var list = JSON.parse(global.sessionStorage.getItem(SYSTEM_KEY) || '[]');
      return Array.isArray(list) ? list : [];
    } catch (e) {
      return [];
    }
  }

  function rememberSystem(msg) {
    var data = msg.data || {};
    var list = systemLog().filter(function (m) { return m.id !== msg.id; });
    list.unshift({
      id: msg.id, seq: msg.seq, ts: msg.ts,
      message: String(data.message || ''), level: String(data.level || 'info'),
      category: typeof data.category === 'string' ? data.category : ''
    });
    try { global.sessionStorage.setItem(SYSTEM_KEY, JSON.stringify(list.slice(0, SYSTEM_MAX))); } catch (e) { /* full */ }
  }

  // ---- the chrome --------------------------------------------------------------

  function renderChrome(client) {
    var header = doc.getElementById('app-header');
    if (!header) return;
    var here = global.location.pathname;
    var links = NAV.filter(function (item) { return !item.admin || user.isAdmin; }).map(function (item) {
      return el('li', null, el('a', { href: item.href, 'aria-current': item.href === here ? 'page' : null }, item.label));
    });
    var status = el('div', { class: 'ws-status-slot', id: 'ws-status-slot' });
    var logout = el('button', { type: 'button', class: 'btn btn--small btn--ghost', id: 'logout' }, 'Log out');
    logout.addEventListener('click', function () {
      client.close();
      try { global.localStorage.removeItem('token'); } catch (e) { /* ignore */ }
      global.location.assign('/login.html');
    });
    clear(header);
    header.appendChild(el('a', { class: 'skip-link', href: '#main' }, 'Skip to content'));
    header.appendChild(el('a', { class: 'brand', href: '/dashboard.html' }, [
      el('img', { src: '/static/img/favicon.svg', alt: '' }), 'agentcast'
    ]));
    header.appendChild(el('nav', { class: 'nav', 'aria-label': 'Main' }, el('ul', null, links)));
    header.appendChild(el('div', { class: 'topbar__right' }, [
      status,
      el('div', { class: 'user', id: 'current-user' }, [
        el('span', { class: 'visually-hidden' }, 'Signed in as'),
        el('span', { class: 'user__name' }, user.name),
        el('span', { class: 'user__role badge badge--' + user.role }, user.role)
      ]),
      logout
    ]));
    // The indicator's markup has one home, the snippet every page can use.
    global.fetch('/static/ws-status.html').then(function (response) {
      return response.ok ? response.text() : '';
    }).then(function (html) {
      var template = doc.createElement('template');
      template.innerHTML = html;
      status.appendChild(template.content);
      client.renderIndicator();
    }).catch(function () { /* the page still works without the indicator */ });

    if (!doc.getElementById('notifications')) {
      doc.body.appendChild(el('div', {
        id: 'notifications', class: 'notifications', 'aria-live': 'polite', 'aria-label': 'Notifications'
      }));
    }
  }

  /** Hides everything marked data-admin-only from non-admins (the server refuses them anyway). */
  function applyRole() {
    var nodes = doc.querySelectorAll('[data-admin-only]');
    Array.prototype.forEach.call(nodes, function (node) {
      if (user.isAdmin) node.hidden = false;
      else node.remove();
    });
    Array.prototype.forEach.call(doc.querySelectorAll('[data-user-only]'), function (node) {
      node.hidden = user.isAdmin;
    });
  }

  var client = Agentcast.connect();
  client.on('system', rememberSystem);

  Agentcast.page = {
    client: client,
    user: user,
    api: api,
    errorText: errorText,
    el: el,
    clear: clear,
    badge: badge,
    fmtTime: fmtTime,
    timeEl: timeEl,
    LiveView: LiveView,
    systemLog: systemLog
  };

  renderChrome(client);
  applyRole();
})(window);
