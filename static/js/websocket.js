/*!
 * agentcast websocket.js — the browser client of the agentcast WebSocket
 * (SPEC §4 and §7). Plain JS, no build step, no dependencies.
 *
 *   const live = Agentcast.connect();            // token from localStorage.token
 *   live.on('task_update', (msg) => …);          // msg = {type, data, id, seq, ts}
 *   live.on('*', (msg) => …);                    // every published message
 *   live.on('@state', (s) => …);                 // connecting|connected|reconnecting|disconnected|closed
 *   live.on('@resync', () => …);                 // reload your view over REST
 *   live.subscribe('task:7f3a', (msg) => …, {    // one channel (SPEC §4.4)
 *     since, epoch,                              // resume from there (e.g. a history load)
 *     onReset: (channel, data) => …,             // resume incomplete: reload its history
 *     onError: (channel, data) => …              // forbidden, too_many_subscriptions, …
 *   });
 *   live.unsubscribe('task:7f3a');
 *
 * Why it looks the way it does:
 * - The token travels as the subprotocol pair ['token', jwt], never in the URL,
 *   so it stays out of logs, history and Referer headers.
 * - A socket can die without a close event (sleeping laptop, NAT timeout), so
 *   the client pings every `heartbeat_s` and treats a missing answer within
 *   10 s as a dead link.
 * - Reconnects use exponential backoff with full jitter (1 s base, 20 s cap,
 *   5 attempts, then a slow retry) so a restarted server is not hit by every
 *   browser in the same second.
 * - Every reconnect resumes with `since`/`epoch`; when the server cannot fill
 *   the gap (`replay.complete === false`) the page is told to reload over REST.
 * - Close codes carry intent (SPEC §4.2): 4401 means "log in again", 4403
 *   "stop", 4429 "back off", 4503 and 1012 "come back and resume".
 * - Channels have their own seq and epoch, apart from the tenant log's: a
 *   channel frame (it carries `channel`) goes to its channel's handler only and
 *   never moves the tenant resume position. Subscriptions belong to a
 *   connection, so each (re)connect subscribes again from each channel's last
 *   seq; subscribe frames are paced, as they count against the frame rate.
 */
(function (global) {
  'use strict';

  var Agentcast = global.Agentcast = global.Agentcast || {};

  var STATE_TEXT = {
    idle: 'Not connected',
    connecting: 'Connecting…',
    connected: 'Connected',
    reconnecting: 'Reconnecting…',
    disconnected: 'Disconnected',
    closed: 'Disconnected'
  };

  var DEFAULTS = {
    /** WebSocket URL; default: this origin's /api/v1/ws/connect. */
    url: null,
    /** Returns the current JWT; default reads localStorage.token. */
    getToken: function () { return safeStorageGet('token'); },
    /** Gets a fresh JWT before the current one expires; resolve null if impossible. */
    refreshToken: defaultRefreshToken,
    maxAttempts: 5,
    baseDelayMs: 1000,
    maxDelayMs: 20000,
    /** After the last fast attempt, keep trying this often (plus jitter). */
    slowRetryMs: 30000,
    /** No answer to a ping (or no first frame after connecting) this long: dead link. */
    pongTimeoutMs: 10000,
    /** Ask for a fresh token this long before `exp`. */
    refreshLeadS: 120,
    /** Where 4401 (and a missing token) sends the user; null: stay and report. */
    loginUrl: '/login.html',
    /** Update the #ws-status indicator elements when they are on the page. */
    indicator: true,
    /** Toasts for system messages and finished/failed tasks. */
    notifications: true,
    /** Open the socket immediately. */
    autoConnect: true
  };

  // ---------------------------------------------------------------------------
  // Small helpers

  function safeStorageGet(key) {
    try { return global.localStorage.getItem(key); } catch (e) { return null; }
  }

  function safeStorageSet(key, value) {
    try { global.localStorage.setItem(key, value); } catch (e) { /* private mode */ }
  }

  /** The payload of a JWT (no verification: only to read `exp`, `name`, `role`). */
  function decodeToken(token) {
    if (typeof token !== 'string') return null;
    var parts = token.split('.');
    if (parts.length !== 3) return null;
    try {
      var b64 = parts[1].replace(/-/g, '+').replace(/_/g, '/');
      while (b64.length % 4) b64 += '=';
      var bytes = global.atob(b64);
      var text = decodeURIComponent(Array.prototype.map.call(bytes, function (c) {
        return '%' + ('00' + c.charCodeAt(0).toString(16)).slice(-2);
      }).join(''));
      var claims = JSON.parse(text);
      return claims && typeof claims === 'object' ? claims : null;
    } catch (e) {
      return null;
    }
  }

  function tokenExpired(token, skewS) {
    var claims = decodeToken(token);
    if (!claims || typeof claims.exp !== 'number') return true;
    return claims.exp * 1000 <= Date.now() + (skewS || 0) * 1000;
  }

  /** POST /api/v1/auth/refresh with the current token; null when not possible. */
  function defaultRefreshToken(token) {
    return global.fetch('/api/v1/auth/refresh', {
      method: 'POST',
      headers: { 'Authorization': 'Bearer ' + token, 'Content-Type': 'application/json' },
      body: '{}'
    }).then(function (response) {
      if (!response.ok) return null;
      return response.json().then(function (body) {
        return body && typeof body.token === 'string' ? body.token : null;
      });
    }).catch(function () { return null; });
  }

  function defaultUrl() {
    var scheme = global.location.protocol === 'https:' ? 'wss:' : 'ws:';
    return scheme + '//' + global.location.host + '/api/v1/ws/connect';
  }

  // ---------------------------------------------------------------------------
  // Notification preferences (the settings page edits them)

  var PREFS_KEY = 'agentcast.prefs';
  var PREF_DEFAULTS = { system: true, tasks: true, agents: true };

  function loadPrefs() {
    var prefs = {};
    var stored = null;
    try { stored = JSON.parse(safeStorageGet(PREFS_KEY) || 'null'); } catch (e) { stored = null; }
    Object.keys(PREF_DEFAULTS).forEach(function (key) {
      prefs[key] = stored && typeof stored[key] === 'boolean' ? stored[key] : PREF_DEFAULTS[key];
    });
    return prefs;
  }

  function savePrefs(prefs) {
    var clean = {};
    Object.keys(PREF_DEFAULTS).forEach(function (key) { clean[key] = prefs[key] !== false; });
    safeStorageSet(PREFS_KEY, JSON.stringify(clean));
    return clean;
  }

  // ---------------------------------------------------------------------------
  // Notifications: toasts in one aria-live region

  var LEVELS = ['info', 'success', 'warning', 'error'];
  var MAX_TOASTS = 5;

  function notificationRegion() {
    var region = global.document.getElementById('notifications');
    if (!region) {
      region = global.document.createElement('div');
      region.id = 'notifications';
      region.className = 'notifications';
      region.setAttribute('aria-live', 'polite');
      region.setAttribute('aria-label', 'Notifications');
      global.document.body.appendChild(region);
    }
    return region;
  }

  /**
   * Shows a toast. `level` is info|success|warning|error; errors stay longer.
   * Text only (never HTML), so message content cannot inject markup.
   */
  function notify(text, level, title) {
    if (!global.document || !global.document.body) return null;
    level = LEVELS.indexOf(level) >= 0 ? level : 'info';
    var region = notificationRegion();
    var toast = global.document.createElement('div');
    toast.className = 'toast toast--' + level;
    // The region is already polite-live; only errors interrupt.
    if (level === 'error') toast.setAttribute('role', 'alert');
    if (title) {
      var strong = global.document.createElement('strong');
      strong.className = 'toast__title';
      strong.textContent = title;
      toast.appendChild(strong);
    }
    var body = global.document.createElement('span');
    body.className = 'toast__text';
    body.textContent = String(text).slice(0, 500);
    toast.appendChild(body);
    var close = global.document.createElement('button');
    close.type = 'button';
    close.className = 'toast__close';
    close.setAttribute('aria-label', 'Dismiss notification');
    close.textContent = '×';
    close.addEventListener('click', function () { toast.remove(); });
    toast.appendChild(close);
    region.appendChild(toast);
    while (region.children.length > MAX_TOASTS) region.removeChild(region.firstChild);
    var ttl = level === 'error' ? 12000 : level === 'warning' ? 9000 : 6000;
    global.setTimeout(function () { toast.remove(); }, ttl);
    return toast;
  }

  // ---------------------------------------------------------------------------
  // The status indicator (/static/ws-status.html): found by id on each change,
  // so it may be inserted after the client starts.

  function renderIndicator(state, attempt, maxAttempts, detail) {
    var doc = global.document;
    var box = doc.getElementById('ws-status');
    if (!box) return;
    var text = doc.getElementById('ws-status-text');
    var button = doc.getElementById('ws-status-reconnect');
    var label = STATE_TEXT[state] || state;
    if (state === 'reconnecting' && attempt > 0) {
      label = 'Reconnecting… (attempt ' + attempt + '/' + maxAttempts + ')';
    }
    if (detail && (state === 'disconnected' || state === 'closed')) label += ' — ' + detail;
    box.setAttribute('data-state', state);
    box.classList.add('ws-status--visible');
    if (text) text.textContent = label;
    if (button) button.hidden = !(state === 'disconnected' || state === 'closed');
  }

  // ---------------------------------------------------------------------------
  // The client

  var clients = [];

  /**
   * Subscribe and unsubscribe frames count against the server's client frame
   * rate (10/s, bursts of 50): a page with many channels sends at most this
   * many at once after a connect, then CHANNEL_RATE a second.
   */
  var CHANNEL_BURST = 30;
  var CHANNEL_RATE = 5;
  /** The channel name rule of SPEC §4.4 (the server checks it too). */
  var CHANNEL_NAME = /^[a-z][a-z0-9_-]{0,31}:[A-Za-z0-9_.:@=-]{1,128}$/;

  function Client(options) {
    this.options = Object.assign({}, DEFAULTS, options || {});
    this.handlers = Object.create(null);
    this.socket = null;
    this.state = 'idle';
    this.detail = '';
    /** Failed attempts since the last `connected` (reset on success). */
    this.attempt = 0;
    /** Resume position: the last seq seen and the epoch it belongs to. */
    this.lastSeq = null;
    this.epoch = null;
    this.connection = null;
    this.replaying = false;
    this.heartbeatMs = 25000;
    this.timers = { retry: null, ping: null, pong: null, refresh: null, channels: null };
    this.stopped = false;
    this.replayToasts = 0;
    /** task_id -> query, bounded, so a "completed" toast can name the task. */
    this.taskNames = new Map();
    /**
     * channel name -> {name, handler, onReset, onError, seq, epoch, subscribed}:
     * what to subscribe to after every connect, and from where.
     */
    this.channels = new Map();
    /** Channel frames (subscribe/unsubscribe) waiting for the pacer, in order. */
    this.channelQueue = [];
    this.channelTokens = CHANNEL_BURST;
    this.channelRefilled = 0;
  }

  Client.prototype.on = function (type, fn) {
    if (typeof fn !== 'function') throw new TypeError('handler must be a function');
    (this.handlers[type] = this.handlers[type] || []).push(fn);
    return this;
  };

  Client.prototype.off = function (type, fn) {
    var list = this.handlers[type];
    if (!list) return this;
    this.handlers[type] = fn ? list.filter(function (h) { return h !== fn; }) : [];
    return this;
  };

  Client.prototype.emit = function (type, payload, meta) {
    var list = (this.handlers[type] || []).slice();
    for (var i = 0; i < list.length; i++) {
      try {
        list[i](payload, meta);
      } catch (e) {
        // One broken handler must not stop the others, nor the socket.
        global.setTimeout(function () { throw e; });
      }
    }
  };

  Client.prototype.setState = function (state, detail) {
    this.state = state;
    this.detail = detail || '';
    if (this.options.indicator) {
      renderIndicator(state, this.attempt, this.options.maxAttempts, this.detail);
    }
    this.emit('@state', state, { attempt: this.attempt, maxAttempts: this.options.maxAttempts, detail: this.detail });
  };

  /** Opens the socket now (cancelling any scheduled retry). */
  Client.prototype.connect = function () {
    this.stopped = false;
    this.clearTimer('retry');
    if (this.socket) return this;
    var token = this.options.getToken();
    if (!token || tokenExpired(token, 0)) {
      this.unauthorized('not logged in');
      return this;
    }
    var url = this.options.url || defaultUrl();
    if (this.lastSeq !== null && this.epoch) {
      url += (url.indexOf('?') < 0 ? '?' : '&') +
        'since=' + encodeURIComponent(this.lastSeq) + '&epoch=' + encodeURIComponent(this.epoch);
    }
    // During retries the indicator keeps saying Reconnecting/Disconnected.
    if (this.state === 'idle' || this.state === 'closed' || this.state === 'connecting') {
      this.setState('connecting');
    }
    var socket;
    try {
      socket = new global.WebSocket(url, ['token', token]);
    } catch (e) {
      this.scheduleRetry();
      return this;
    }
    this.socket = socket;
    this.token = token;
    var self = this;
    socket.onmessage = function (event) { self.onFrame(event.data); };
    socket.onclose = function (event) { self.onClose(socket, event.code, event.reason); };
    // An error is always followed by a close event, which does the work.
    socket.onerror = function () {};
    // A handshake into a black hole may never fail by itself: no first frame in
    // time is a dead link too (the first frame clears this timer, see `heard`).
    this.timers.pong = global.setTimeout(function () {
      self.timers.pong = null;
      self.deadLink();
    }, this.options.pongTimeoutMs);
    return this;
  };

  /** Reconnects at once: the Reconnect button, tab visible again, network back. */
  Client.prototype.reconnect = function () {
    this.stopped = false;
    if (this.socket && this.state === 'connected') return this;
    this.dropSocket();
    if (this.state === 'disconnected' || this.state === 'closed') {
      this.attempt = 0;
      this.setState('connecting');
    }
    return this.connect();
  };

  /** Closes for good (until connect/reconnect is called). */
  Client.prototype.close = function () {
    this.stopped = true;
    this.clearAllTimers();
    this.dropSocket(1000, 'bye');
    this.setState('closed');
    return this;
  };

  /** Sends a JSON frame if the socket is open; returns whether it was sent. */
  Client.prototype.send = function (frame) {
    if (!this.socket || this.socket.readyState !== 1) return false;
    this.socket.send(JSON.stringify(frame));
    return true;
  };

  /** Draws the indicator for the current state (after inserting its markup). */
  Client.prototype.renderIndicator = function () {
    renderIndicator(this.state, this.attempt, this.options.maxAttempts, this.detail);
  };

  Client.prototype.onFrame = function (text) {
    var frame;
    try { frame = JSON.parse(text); } catch (e) { return; }
    if (!frame || typeof frame.type !== 'string') return;
    this.heard();
    var data = frame.data && typeof frame.data === 'object' ? frame.data : {};
    switch (frame.type) {
      case 'subscribed':
        this.onSubscribed(data);
        return;
      case 'unsubscribed':
        this.emit('@unsubscribed', data);
        return;
      case 'connected':
        this.onConnected(data);
        return;
      case 'pong':
        return;
      case 'replay':
        this.onReplay(data);
        return;
      case 'refreshed':
        this.scheduleRefresh();
        this.emit('@refreshed', data);
        return;
      case 'error':
        if (typeof data.channel === 'string' || typeof frame.channel === 'string') {
          this.onChannelError(typeof data.channel === 'string' ? data.channel : frame.channel, data);
        }
        this.emit('@error', data);
        return;
    }
    // A channel's message: its seq is the channel's, never the tenant log's.
    if (typeof frame.channel === 'string') {
      this.onChannelFrame(frame);
      return;
    }
    if (typeof frame.seq === 'number') {
      if (this.lastSeq !== null && frame.seq <= this.lastSeq) return; // already seen
      this.lastSeq = frame.seq;
    }
    var meta = { replayed: this.replaying };
    this.builtinNotifications(frame, meta);
    this.emit(frame.type, frame, meta);
    this.emit('*', frame, meta);
  };

  Client.prototype.onConnected = function (data) {
    var resumed = this.lastSeq !== null && this.epoch === data.epoch;
    if (this.epoch !== data.epoch || this.lastSeq === null) {
      // A new history (first connect, or the server lost its log): start at its head.
      this.lastSeq = typeof data.seq === 'number' ? data.seq : 0;
    }
    var wasResume = this.epoch !== null;
    this.epoch = typeof data.epoch === 'string' ? data.epoch : null;
    this.connection = data;
    this.replaying = wasResume;
    this.replayToasts = 0;
    this.attempt = 0;
    if (typeof data.heartbeat_s === 'number' && data.heartbeat_s > 0) {
      this.heartbeatMs = Math.max(1000, data.heartbeat_s * 1000);
    }
    this.setState('connected');
    this.schedulePing();
    this.scheduleRefresh();
    this.emit('@connected', data, { resumed: resumed });
    this.resubscribe();
    if (!wasResume) {
      // First connection of this page: whatever the page loaded before may be older.
      this.emit('@resync', { reason: 'connected' });
    }
  };

  // ---- channels (SPEC §4.4) ----------------------------------------------

  /**
   * Subscribes to one channel: `handler(msg, meta)` gets each of its messages
   * ({type, data, id, seq, ts, channel}) once, in seq order; meta.replayed is
   * true for the ones sent before `subscribed`. options (all optional):
   * `since`/`epoch` where to resume from (e.g. a history load's head and
   * epoch; without them, live messages only), `onReset(channel, data)` when
   * the server could not resume (`subscribed.complete === false`: reload the
   * channel's history), `onError(channel, data)` for an `error` frame about it
   * (`forbidden`, `too_many_subscriptions`, …), `onSubscribed(channel, data)`.
   * Subscribing again to the same channel replaces its handler and options.
   */
  Client.prototype.subscribe = function (channel, handler, options) {
    if (typeof channel !== 'string' || !CHANNEL_NAME.test(channel)) {
      throw new TypeError('not a channel name: ' + channel);
    }
    if (typeof handler !== 'function') throw new TypeError('handler must be a function');
    options = options || {};
    var old = this.channels.get(channel);
    var since = typeof options.since === 'number' && options.since >= 0 && Math.floor(options.since) === options.since
      ? options.since : null;
    var entry = {
      name: channel,
      handler: handler,
      onReset: typeof options.onReset === 'function' ? options.onReset : null,
      onError: typeof options.onError === 'function' ? options.onError : null,
      onSubscribed: typeof options.onSubscribed === 'function' ? options.onSubscribed : null,
      seq: since !== null ? since : old ? old.seq : null,
      epoch: typeof options.epoch === 'string' && options.epoch ? options.epoch : old && since === null ? old.epoch : null,
      subscribed: false
    };
    this.channels.set(channel, entry);
    if (this.state === 'connected') this.queueChannelFrame(entry.name);
    return this;
  };

  /** Stops one channel: no frame of it reaches its handler after this call. */
  Client.prototype.unsubscribe = function (channel) {
    if (!this.channels.delete(channel)) return this;
    this.channelQueue = this.channelQueue.filter(function (item) { return item.channel !== channel; });
    if (this.state === 'connected') {
      this.channelQueue.push({ type: 'unsubscribe', channel: channel });
      this.pumpChannels();
    }
    return this;
  };

  /** A channel's resume position: {seq, epoch, subscribed}, or null. */
  Client.prototype.channel = function (channel) {
    var entry = this.channels.get(channel);
    return entry ? { seq: entry.seq, epoch: entry.epoch, subscribed: entry.subscribed } : null;
  };

  Client.prototype.queueChannelFrame = function (channel) {
    this.channelQueue = this.channelQueue.filter(function (item) { return item.channel !== channel; });
    this.channelQueue.push({ type: 'subscribe', channel: channel });
    this.pumpChannels();
  };

  /** After `connected`: every channel again, from its last seq and epoch. */
  Client.prototype.resubscribe = function () {
    var self = this;
    this.channelQueue = [];
    this.channelTokens = CHANNEL_BURST; // a new connection has a fresh allowance
    this.channelRefilled = Date.now();
    this.channels.forEach(function (entry) {
      entry.subscribed = false;
      self.channelQueue.push({ type: 'subscribe', channel: entry.name });
    });
    this.pumpChannels();
  };

  /** Sends queued channel frames as the allowance permits; the rest later. */
  Client.prototype.pumpChannels = function () {
    var now = Date.now();
    this.channelTokens = Math.min(CHANNEL_BURST,
      this.channelTokens + (now - this.channelRefilled) * CHANNEL_RATE / 1000);
    this.channelRefilled = now;
    while (this.channelQueue.length && this.channelTokens >= 1) {
      if (!this.socket || this.socket.readyState !== 1 || this.state !== 'connected') {
        this.channelQueue = []; // the next `connected` subscribes everything again
        return;
      }
      var item = this.channelQueue.shift();
      var data = { channel: item.channel };
      if (item.type === 'subscribe') {
        var entry = this.channels.get(item.channel);
        if (!entry) continue;
        if (entry.seq !== null) data.since = entry.seq;
        if (entry.epoch) data.epoch = entry.epoch;
      }
      this.send({ type: item.type, data: data });
      this.channelTokens -= 1;
    }
    if (this.channelQueue.length && !this.timers.channels) {
      var self = this;
      this.timers.channels = global.setTimeout(function () {
        self.timers.channels = null;
        self.pumpChannels();
      }, Math.ceil(1000 / CHANNEL_RATE));
    }
  };

  Client.prototype.onChannelFrame = function (frame) {
    var entry = this.channels.get(frame.channel);
    if (!entry) return; // unsubscribed (or never): not for this page any more
    if (typeof frame.seq === 'number') {
      if (typeof frame.epoch === 'string' && frame.epoch && entry.epoch && frame.epoch !== entry.epoch) {
        entry.epoch = frame.epoch; // the channel started over: its seqs too
      } else if (entry.seq !== null && frame.seq <= entry.seq) {
        return; // already seen
      }
      entry.seq = frame.seq;
    }
    try {
      entry.handler(frame, { channel: entry.name, replayed: !entry.subscribed });
    } catch (e) {
      global.setTimeout(function () { throw e; });
    }
  };

  Client.prototype.onSubscribed = function (data) {
    var entry = typeof data.channel === 'string' ? this.channels.get(data.channel) : null;
    if (!entry) return;
    var newEpoch = typeof data.epoch === 'string' && data.epoch !== entry.epoch;
    if (typeof data.epoch === 'string') entry.epoch = data.epoch;
    if (typeof data.to === 'number') {
      // Incomplete (or another epoch): the head is where live messages go on from;
      // the page fills in what lies before it over REST (onReset).
      if (data.complete === false || newEpoch || entry.seq === null || data.to > entry.seq) entry.seq = data.to;
    }
    entry.subscribed = true;
    this.emit('@subscribed', data);
    if (entry.onSubscribed) this.callChannel(entry.onSubscribed, entry.name, data);
    if (data.complete === false && entry.onReset) this.callChannel(entry.onReset, entry.name, data);
  };

  Client.prototype.onChannelError = function (channel, data) {
    var entry = this.channels.get(channel);
    if (!entry) return;
    // Refusals that a retry cannot change: stop asking after every reconnect.
    if (data.code === 'forbidden' || data.code === 'invalid_frame') this.channels.delete(channel);
    if (entry.onError) this.callChannel(entry.onError, channel, data);
  };

  Client.prototype.callChannel = function (fn, channel, data) {
    try {
      fn(channel, data);
    } catch (e) {
      global.setTimeout(function () { throw e; });
    }
  };

  Client.prototype.onReplay = function (data) {
    this.replaying = false;
    if (typeof data.to === 'number' && (this.lastSeq === null || data.to > this.lastSeq)) {
      this.lastSeq = data.to;
    }
    this.emit('@replay', data);
    if (data.complete === false) this.emit('@resync', { reason: 'replay incomplete' });
  };

  Client.prototype.onClose = function (socket, code, reason) {
    if (socket !== this.socket) return; // an older socket we already gave up on
    this.dropSocket();
    this.emit('@close', { code: code, reason: reason });
    if (this.stopped) return;
    switch (code) {
      case 4401:
        this.unauthorized('session expired');
        return;
      case 4403:
        this.stopped = true;
        this.setState('disconnected', 'access denied');
        return;
      case 4503:
        // Slow consumer: come back at once and resume (backoff only if it repeats).
        if (this.attempt === 0) {
          this.attempt = 1;
          this.setState('reconnecting');
          this.connect();
          return;
        }
        break;
      case 4429:
        this.scheduleRetry(5000);
        return;
    }
    this.scheduleRetry();
  };

  Client.prototype.unauthorized = function (why) {
    this.stopped = true;
    this.clearAllTimers();
    this.setState('disconnected', why);
    this.emit('@unauthorized', { reason: why });
    var login = this.options.loginUrl;
    if (login) {
      var here = global.location.pathname + global.location.search;
      global.location.assign(login + '?next=' + encodeURIComponent(here));
    }
  };

  /** Backoff with full jitter: a random delay in [0, min(cap, base·2^(n-1))]. */
  Client.prototype.scheduleRetry = function (floorMs) {
    var o = this.options;
    this.clearTimer('retry');
    this.attempt += 1;
    var delay;
    if (this.attempt > o.maxAttempts) {
      this.setState('disconnected');
      delay = o.slowRetryMs / 2 + Math.random() * o.slowRetryMs / 2;
    } else {
      this.setState('reconnecting');
      var ceiling = Math.min(o.maxDelayMs, o.baseDelayMs * Math.pow(2, this.attempt - 1));
      delay = Math.random() * ceiling;
    }
    delay = Math.max(delay, floorMs || 0);
    var self = this;
    this.timers.retry = global.setTimeout(function () {
      self.timers.retry = null;
      self.connect();
    }, delay);
  };

  Client.prototype.schedulePing = function () {
    var self = this;
    this.clearTimer('ping');
    this.timers.ping = global.setTimeout(function () {
      self.timers.ping = null;
      self.ping();
    }, this.heartbeatMs);
  };

  /** Sends a ping and expects any frame back within pongTimeoutMs. */
  Client.prototype.ping = function () {
    if (!this.send({ type: 'ping' })) return;
    if (this.timers.pong) return;
    var self = this;
    this.timers.pong = global.setTimeout(function () {
      self.timers.pong = null;
      self.deadLink();
    }, this.options.pongTimeoutMs);
  };

  Client.prototype.heard = function () {
    this.clearTimer('pong');
    if (this.state === 'connected') this.schedulePing();
  };

  /** The link is silent: give up on this socket without waiting for a close. */
  Client.prototype.deadLink = function () {
    this.dropSocket(4000, 'no pong');
    if (!this.stopped) this.scheduleRetry();
  };

  Client.prototype.scheduleRefresh = function () {
    this.clearTimer('refresh');
    var claims = decodeToken(this.token);
    if (!claims || typeof claims.exp !== 'number') return;
    var lifetime = typeof claims.iat === 'number' ? claims.exp - claims.iat : 3600;
    var lead = Math.min(this.options.refreshLeadS, Math.max(5, lifetime / 5));
    var wait = claims.exp * 1000 - Date.now() - lead * 1000;
    var self = this;
    // setTimeout's limit is ~24.8 days; a longer token is refreshed on a later page load.
    if (wait > 2147483000) return;
    this.timers.refresh = global.setTimeout(function () {
      self.timers.refresh = null;
      self.refresh();
    }, Math.max(0, wait));
  };

  /** Gets a fresh token and hands it to the live connection (`refresh` frame). */
  Client.prototype.refresh = function () {
    var self = this;
    var current = this.options.getToken() || this.token;
    // Another tab may already have refreshed the stored token.
    var fresh = current !== this.token && !tokenExpired(current, 0)
      ? Promise.resolve(current)
      : Promise.resolve(this.options.refreshToken(current));
    return fresh.then(function (token) {
      if (!token) return false; // the server closes with 4401 at exp, then we go to login
      if (token !== safeStorageGet('token')) safeStorageSet('token', token);
      self.token = token;
      return self.send({ type: 'refresh', data: { token: token } });
    });
  };

  /**
   * Remembers a task's query, to name it in the "finished" toast: later
   * updates often carry only the id. Pages that load tasks over REST call it too.
   */
  Client.prototype.nameTask = function (taskId, query) {
    if (typeof taskId !== 'string' || typeof query !== 'string' || !query) return;
    this.taskNames.delete(taskId);
    this.taskNames.set(taskId, query);
    if (this.taskNames.size > 500) this.taskNames.delete(this.taskNames.keys().next().value);
  };

  Client.prototype.builtinNotifications = function (frame, meta) {
    var o = this.options;
    if (!o.notifications) return;
    var data = frame.data || {};
    if (frame.type === 'task_update') this.nameTask(data.task_id, data.query);
    if (meta.replayed && ++this.replayToasts > 3) return; // a long replay is not a toast storm
    var prefs = loadPrefs();
    if (frame.type === 'system' && prefs.system && typeof data.message === 'string') {
      notify(data.message, data.level || 'info', 'System');
    } else if (frame.type === 'task_update' && prefs.tasks &&
      (data.status === 'completed' || data.status === 'failed')) {
      var name = data.query || this.taskNames.get(data.task_id) || data.task_id;
      notify(String(name), data.status === 'failed' ? 'error' : 'success',
        data.status === 'failed' ? 'Task failed' : 'Task completed');
    }
  };

  /** Forgets the current socket (closing it if still open) and its timers. */
  Client.prototype.dropSocket = function (code, reason) {
    var socket = this.socket;
    this.socket = null;
    this.clearTimer('ping');
    this.clearTimer('pong');
    this.clearTimer('refresh');
    this.clearTimer('channels');
    this.channelQueue = [];
    if (socket) {
      socket.onmessage = null;
      socket.onclose = null;
      socket.onerror = null;
      if (socket.readyState < 2) {
        try { socket.close(code || 1000, reason || ''); } catch (e) { /* already gone */ }
      }
    }
  };

  Client.prototype.clearTimer = function (name) {
    if (this.timers[name]) {
      global.clearTimeout(this.timers[name]);
      this.timers[name] = null;
    }
  };

  Client.prototype.clearAllTimers = function () {
    var self = this;
    Object.keys(this.timers).forEach(function (name) { self.clearTimer(name); });
  };

  /** The tab came back or the network returned: don't wait for the backoff. */
  Client.prototype.wake = function () {
    if (this.stopped) return;
    if (this.state === 'connected') {
      this.ping(); // verify the link survived the sleep
    } else if (this.state === 'reconnecting' || this.state === 'disconnected') {
      this.dropSocket();
      this.connect();
    }
  };

  // ---------------------------------------------------------------------------
  // Page-wide wiring, once

  var wired = false;
  function wirePage() {
    if (wired) return;
    wired = true;
    global.document.addEventListener('visibilitychange', function () {
      if (global.document.visibilityState === 'visible') clients.forEach(function (c) { c.wake(); });
    });
    global.addEventListener('online', function () { clients.forEach(function (c) { c.wake(); }); });
    // Leaving the page closes cleanly; coming back from the back/forward cache resumes.
    global.addEventListener('pagehide', function () {
      clients.forEach(function (c) { c.paused = !c.stopped; c.stopped = true; c.dropSocket(1000, 'page closed'); });
    });
    global.addEventListener('pageshow', function (event) {
      if (!event.persisted) return;
      clients.forEach(function (c) { if (c.paused) { c.paused = false; c.reconnect(); } });
    });
    // The Reconnect button may be inserted later (the snippet is fetched), so delegate.
    global.document.addEventListener('click', function (event) {
      var target = event.target;
      if (target && target.closest && target.closest('#ws-status-reconnect')) {
        clients.forEach(function (c) { c.reconnect(); });
      }
    });
  }

  /**
   * Creates a client and (by default) connects it. See the README section
   * "Using websocket.js from your own page" for the options and events.
   */
  Agentcast.connect = function (options) {
    var client = new Client(options);
    clients.push(client);
    wirePage();
    if (client.options.autoConnect) client.connect();
    return client;
  };

  Agentcast.notify = notify;
  Agentcast.decodeToken = decodeToken;
  Agentcast.tokenExpired = tokenExpired;
  Agentcast.prefs = { load: loadPrefs, save: savePrefs };
  Agentcast.Client = Client;
})(window);
