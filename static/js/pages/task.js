/* Task page (/task.html?id=<task_id>, SPEC §7): the task's state from
   GET /api/v1/tasks/:task_id, kept current by live task_update messages of the
   tenant stream (applied only when their seq is higher), and the timeline of
   the channel task:<id>: its history over REST first, then live from that
   head through websocket.js's subscribe, resumed across reconnects.

   The timeline shows each frame once: frames are rendered in seq order and a
   seq at or below the last rendered one is dropped, whichever way it came
   (history, replay or live). All message text goes through textContent. */
(function (global) {
  'use strict';
  var page = global.Agentcast && global.Agentcast.page;
  if (!page) return;
  var el = page.el;
  var client = page.client;

  /** SPEC §4.4; a task id that does not fit has no channel. */
  var CHANNEL_NAME = /^[a-z][a-z0-9_-]{0,31}:[A-Za-z0-9_.:@=-]{1,128}$/;
  /** The most one history request returns (the server's own maximum). */
  var HISTORY_LIMIT = 1000;
  /** A history longer than this many pages is shown from its newest pages. */
  var HISTORY_PAGES = 20;
  /** Long params or event data are cut for display. */
  var MAX_DETAIL = 600;
  var STATUSES = ['queued', 'running', 'completed', 'failed'];
  var TOOL_END = { success: 'success', error: 'error', completed_with_errors: 'completed with errors' };

  var taskId = new URLSearchParams(global.location.search).get('id') || '';
  var channel = 'task:' + taskId;

  var $ = function (id) { return document.getElementById(id); };
  var head = {
    id: $('task-id'), status: $('task-status'), query: $('task-query'),
    progressWrap: $('task-progress-wrap'), progress: $('task-progress'),
    progressText: $('task-progress-text'), updated: $('task-updated'), missing: $('task-missing')
  };
  var timeline = $('timeline');
  var timelineEmpty = $('timeline-empty');
  var timelineNote = $('timeline-note');

  // ---- the task's state ---------------------------------------------------

  /** The view's entry (or what live messages told), with the seq that set it. */
  var task = null;

  /** A view entry flattened like a live message's data (see app.js LiveView). */
  function flatten(entry) {
    var data = entry.data && typeof entry.data === 'object' && !Array.isArray(entry.data) ? entry.data : {};
    var flat = Object.assign({}, data, entry);
    delete flat.data;
    return flat;
  }

  function renderTask() {
    head.id.textContent = taskId;
    if (!task) return;
    head.missing.hidden = true;
    var status = STATUSES.indexOf(task.status) >= 0 ? task.status : 'queued';
    page.clear(head.status).appendChild(page.badge(status));
    head.query.hidden = typeof task.query !== 'string' || !task.query;
    head.query.textContent = head.query.hidden ? '' : task.query;
    var known = typeof task.progress === 'number';
    var pct = known ? Math.max(0, Math.min(100, task.progress)) : status === 'completed' ? 100 : null;
    head.progressWrap.hidden = pct === null;
    if (pct !== null) {
      head.progress.value = pct;
      head.progress.className = 'is-' + status;
      head.progressText.textContent = Math.round(pct) + '%';
    }
    head.updated.hidden = !task.updated_at;
    if (task.updated_at) {
      page.clear(head.updated).appendChild(document.createTextNode('Updated '));
      head.updated.appendChild(page.timeEl(task.updated_at));
    }
  }

  function loadTask() {
    return page.api('/api/v1/tasks/' + encodeURIComponent(taskId)).then(function (result) {
      var entry = result.ok && result.data && result.data.task;
      if (entry && typeof entry === 'object') {
        var flat = flatten(entry);
        // A live update newer than this answer wins; the answer fills in the rest.
        task = task && task.seq > flat.seq ? Object.assign(flat, task) : flat;
        client.nameTask(taskId, task.query);
        renderTask();
      } else if (!task) {
        head.missing.hidden = false;
        head.missing.textContent = result.status === 404 || result.status === 422
          ? 'Task "' + taskId + '" was not found (or is not yours to see). Its timeline below still shows what is published to ' + channel + '.'
          : 'The task could not be loaded: ' + page.errorText(result) + '.';
      }
    });
  }

  client.on('task_update', function (msg) {
    var data = msg && msg.data;
    if (!data || data.task_id !== taskId) return;
    var seq = typeof msg.seq === 'number' ? msg.seq : 0;
    if (task && typeof task.seq === 'number' && seq <= task.seq) return;
    task = Object.assign({}, task || {}, data, { seq: seq, updated_at: msg.ts || data.updated_at });
    renderTask();
  });
  // Messages may have been missed before the socket was up, or while it was down.
  client.on('@resync', loadTask);

  // ---- the timeline ---------------------------------------------------------

  var stream = {
    /** The channel epoch the rendered frames belong to. */
    epoch: null,
    /** The highest seq rendered: anything at or below it is a duplicate. */
    seq: 0,
    /** While history loads, live frames wait here (then apply in order). */
    loading: false,
    buffer: [],
    /** tool -> the <li> of its running step. */
    steps: new Map(),
    /** The output block that the next `output` frame grows, while it is the last row. */
    output: null
  };

  function note(text) {
    timelineNote.hidden = !text;
    timelineNote.textContent = text || '';
  }

  function detail(value) {
    if (value === undefined) return '';
    var text;
    try { text = typeof value === 'string' ? value : JSON.stringify(value); } catch (e) { text = String(value); }
    return text.length > MAX_DETAIL ? text.slice(0, MAX_DETAIL) + '…' : text;
  }

  function row(frame, kind, children) {
    var li = el('li', {
      class: 'event event--' + kind,
      'data-type': frame.type,
      'data-seq': typeof frame.seq === 'number' ? frame.seq : null
    }, [page.timeEl(frame.ts), el('div', { class: 'event__body' }, children)]);
    timeline.appendChild(li);
    timelineEmpty.hidden = true;
    return li;
  }

  function str(value) { return typeof value === 'string' ? value : value === undefined || value === null ? '' : String(value); }

  function fmtDuration(seconds) {
    if (typeof seconds !== 'number' || !isFinite(seconds) || seconds < 0) return '';
    if (seconds < 1) return Math.round(seconds * 1000) + ' ms';
    if (seconds < 60) return (Math.round(seconds * 10) / 10) + ' s';
    var m = Math.floor(seconds / 60);
    return m + ' min ' + Math.round(seconds - m * 60) + ' s';
  }

  /** The step of `tool`: its running one, or a new one (its start may be older than the history). */
  function step(frame, tool) {
    var li = stream.steps.get(tool);
    if (li) return li;
    li = row(frame, 'step', [
      el('div', { class: 'step__head' }, [
        el('span', { class: 'step__state' }),
        el('span', { class: 'step__tool' }, tool || '(tool)'),
        el('span', { class: 'step__duration' })
      ]),
      el('div', { class: 'step__params', hidden: true }),
      el('div', { class: 'step__message', hidden: true }),
      el('progress', { class: 'step__progress', max: '100', hidden: true, 'aria-label': 'Progress of ' + (tool || 'the tool') })
    ]);
    li.setAttribute('data-tool', tool);
    setStepState(li, 'running', 'running');
    stream.steps.set(tool, li);
    return li;
  }

  function setStepState(li, state, label) {
    li.setAttribute('data-state', state);
    page.clear(li.querySelector('.step__state')).appendChild(page.badge(label, state === 'completed_with_errors' ? 'warning' : state));
  }

  function setText(li, selector, text) {
    var node = li.querySelector(selector);
    node.hidden = !text;
    node.textContent = text;
  }

  function render(frame) {
    var data = frame.data && typeof frame.data === 'object' && !Array.isArray(frame.data) ? frame.data : {};
    var tool = str(data.tool);
    var li;
    switch (frame.type) {
      case 'tool_start':
        stream.steps.delete(tool); // a new run of the same tool is a new step
        li = step(frame, tool);
        setText(li, '.step__params', data.params === undefined ? '' : detail(data.params));
        break;
      case 'tool_progress':
        li = step(frame, tool);
        if (data.message !== undefined) setText(li, '.step__message', str(data.message));
        if (typeof data.progress === 'number') {
          var bar = li.querySelector('.step__progress');
          bar.hidden = false;
          bar.value = Math.max(0, Math.min(1, data.progress)) * 100;
        }
        break;
      case 'tool_end':
        li = step(frame, tool);
        stream.steps.delete(tool);
        var status = TOOL_END[data.status] ? data.status : 'error';
        setStepState(li, status, TOOL_END[status]);
        var end = [fmtDuration(data.duration_s)];
        if (typeof data.exit_code === 'number') end.push('exit ' + data.exit_code);
        li.querySelector('.step__duration').textContent = end.filter(Boolean).join(' · ');
        li.querySelector('.step__progress').hidden = true;
        break;
      case 'log':
        var level = ['debug', 'info', 'warning', 'error'].indexOf(data.level) >= 0 ? data.level : 'info';
        li = row(frame, 'log', [page.badge(level, level === 'debug' ? 'neutral' : level), el('span', { class: 'log__message' }, str(data.message))]);
        li.setAttribute('data-level', level);
        break;
      case 'output':
        if (stream.output && stream.output === timeline.lastElementChild) {
          // Streamed output grows in place: one text node, appended to.
          stream.output.querySelector('.output__text').firstChild.appendData(str(data.text));
          stream.output.setAttribute('data-seq', frame.seq);
          return;
        }
        var pre = el('pre', { class: 'output__text' });
        pre.appendChild(document.createTextNode(str(data.text)));
        stream.output = row(frame, 'output', [pre]);
        return;
      default:
        row(frame, 'other', [
          el('span', { class: 'event__type' }, frame.type),
          el('span', { class: 'event__data' }, detail(frame.data))
        ]);
    }
  }

  /** One frame of the channel, from wherever it came: rendered once, in seq order. */
  function take(frame) {
    if (!frame || typeof frame.type !== 'string') return;
    if (stream.loading) { stream.buffer.push(frame); return; }
    if (typeof frame.seq === 'number') {
      if (frame.seq <= stream.seq) return;
      stream.seq = frame.seq;
    }
    try {
      render(frame);
    } catch (e) {
      global.setTimeout(function () { throw e; });
    }
  }

  /** A separator row, at the end or before `beforeRow`. */
  function divider(text, beforeRow) {
    if (!timeline.firstChild) return;
    timeline.insertBefore(el('li', { class: 'event event--divider', role: 'separator' }, text), beforeRow || null);
    if (!beforeRow) stream.steps.clear();
  }

  /** The first row of the current epoch (after the last divider) with a seq above `seq`. */
  function firstRowAfter(seq) {
    var rows = timeline.children;
    for (var i = rows.length - 1, found = null; i >= 0; i--) {
      var row = rows[i];
      if (row.classList.contains('event--divider')) break;
      if (Number(row.getAttribute('data-seq')) > seq) found = row;
      else return found;
    }
    return found;
  }

  function historyUrl(since) {
    // The name's characters are all legal in a path segment (CHANNEL_NAME), so it goes as is.
    var url = '/api/v1/channels/' + channel + '/history?since=' + since + '&limit=' + HISTORY_LIMIT;
    return stream.epoch ? url + '&epoch=' + encodeURIComponent(stream.epoch) : url;
  }

  /**
   * Loads the channel's history after `stream.seq` (page by page) and renders
   * it, then what arrived live meanwhile. Resolves true when the history was
   * read, 'forbidden' for a 403, false when it could not be (the note says why).
   */
  function loadHistory() {
    stream.loading = true;
    var pages = 0;
    var first = true;
    function next() {
      return page.api(historyUrl(stream.seq)).then(function (result) {
        var body = result.ok && result.data;
        if (!body || !Array.isArray(body.messages)) {
          if (result.status === 403) {
            note('You may not watch this task\'s timeline.');
            return 'forbidden';
          }
          note('The timeline\'s history could not be loaded (' + page.errorText(result) + ').');
          return false;
        }
        if (typeof body.epoch === 'string') stream.epoch = body.epoch;
        if (first && body.complete === false && stream.seq === 0) {
          note('Earlier events are no longer kept; the timeline starts with the oldest one the server has.');
        }
        first = false;
        stream.loading = false; // render these now, in order
        body.messages.forEach(take);
        stream.loading = true;
        var head = typeof body.head === 'number' ? body.head : stream.seq;
        if (body.messages.length >= HISTORY_LIMIT && stream.seq < head && ++pages < HISTORY_PAGES) return next();
        // Everything up to the head has been read (an empty tail is no frame to wait for).
        if (body.messages.length < HISTORY_LIMIT && head > stream.seq) stream.seq = head;
        return true;
      });
    }
    return next().then(function (ok) {
      stream.loading = false;
      var buffered = stream.buffer;
      stream.buffer = [];
      buffered.forEach(take);
      return ok;
    });
  }

  /** The server could not resume the channel (subscribed.complete false): fill in over REST. */
  function onReset(name, data) {
    if (typeof data.epoch === 'string' && stream.epoch && data.epoch !== stream.epoch) {
      // Another epoch: its seqs start over, the rows above stay as they were.
      divider('The stream started over: the events above are from before.');
      stream.output = null;
      stream.seq = 0;
      stream.epoch = data.epoch;
    } else if (typeof data.from === 'number') {
      // Same epoch, but history no longer reaches back to where this page was: what
      // the server still had came before `subscribed`, so the gap is just before it.
      divider('Some events were missed here: the server no longer keeps them.', firstRowAfter(data.from));
    }
    loadHistory();
  }

  function onChannelError(name, data) {
    if (data.code === 'forbidden') note('You may not watch this task\'s timeline.');
    else if (data.code === 'too_many_subscriptions') note('Too many live streams are open on this connection: the timeline is not live.');
    else note('The timeline is not live: ' + str(data.message || data.code) + '.');
  }

  function startTimeline() {
    $('timeline-channel').textContent = channel;
    if (!CHANNEL_NAME.test(channel)) {
      note('This task id cannot name a channel, so the task has no timeline.');
      timelineEmpty.hidden = true;
      return;
    }
    loadHistory().then(function (ok) {
      if (ok === 'forbidden') return; // the subscription would be refused the same way
      if (!ok && stream.epoch === null) {
        // No history: the subscription replays whatever the server still has.
        client.subscribe(channel, take, { since: 0, onReset: onReset, onError: onChannelError });
        return;
      }
      client.subscribe(channel, take, { since: stream.seq, epoch: stream.epoch, onReset: onReset, onError: onChannelError });
    });
  }

  // ---- start ----------------------------------------------------------------

  if (!taskId) {
    head.missing.hidden = false;
    head.missing.textContent = 'No task given: open a task from the task list.';
    timelineEmpty.hidden = true;
    $('timeline-channel').textContent = '';
    return;
  }
  document.title = 'Task ' + taskId + ' · agentcast';
  head.id.textContent = taskId;
  loadTask();
  startTimeline();
})(window);
