/* Settings: the system notifications of this session, the admin broadcast form
   (POST /api/v1/ws/broadcast), and notification preferences in localStorage. */
(function (global) {
  'use strict';
  var page = global.Agentcast && global.Agentcast.page;
  if (!page) return;
  var el = page.el;
  var $ = function (id) { return document.getElementById(id); };

  // ---- system notifications --------------------------------------------------
  var list = $('system-list');
  function render() {
    var entries = page.systemLog();
    page.clear(list);
    entries.forEach(function (m) {
      list.appendChild(el('li', null, [page.badge(m.level), el('span', { class: 'feed__text' }, m.message), page.timeEl(m.ts)]));
    });
    $('system-empty').hidden = entries.length > 0;
  }
  // app.js stores the message first (it subscribed first), so re-reading is enough.
  page.client.on('system', render);
  render();

  // ---- preferences -------------------------------------------------------------
  var prefsForm = $('prefs-form');
  var prefs = global.Agentcast.prefs.load();
  Object.keys(prefs).forEach(function (key) {
    if (prefsForm.elements[key]) prefsForm.elements[key].checked = prefs[key];
  });
  prefsForm.addEventListener('change', function () {
    var next = {};
    Object.keys(prefs).forEach(function (key) { next[key] = prefsForm.elements[key].checked; });
    prefs = global.Agentcast.prefs.save(next);
    $('prefs-status').textContent = 'Saved.';
    $('prefs-status').className = 'form-status is-ok';
  });

  // ---- broadcast (admins only; the form is not even on the page for others) ---
  var form = $('broadcast-form');
  if (!form || !page.user.isAdmin) return;
  var status = $('broadcast-status');
  form.addEventListener('submit', function (event) {
    event.preventDefault();
    var message = form.elements.message.value.trim();
    var level = form.elements.level.value;
    if (!message) {
      form.elements.message.setAttribute('aria-invalid', 'true');
      status.textContent = 'Write a message first.';
      status.className = 'form-status is-error';
      form.elements.message.focus();
      return;
    }
    form.elements.message.setAttribute('aria-invalid', 'false');
    $('broadcast-send').disabled = true;
    page.api('/api/v1/ws/broadcast', { method: 'POST', body: { type: 'system', data: { message: message, level: level } } })
      .then(function (result) {
        $('broadcast-send').disabled = false;
        if (result.ok && result.data) {
          status.textContent = 'Sent to ' + result.data.recipients + ' connection' + (result.data.recipients === 1 ? '' : 's') + ' (seq ' + result.data.seq + ').';
          status.className = 'form-status is-ok';
          form.elements.message.value = '';
        } else {
          status.textContent = 'Not sent: ' + page.errorText(result) + '.';
          status.className = 'form-status is-error';
        }
      });
  });
})(window);
