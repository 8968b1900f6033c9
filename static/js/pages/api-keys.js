/* API keys (admins): create (the key is shown once, with a copy button), list
   and revoke keys (SPEC §2), and the security alerts feed: the `system` warnings
   of category `security` the server sends when a key is created or revoked. */
(function (global) {
  'use strict';
  var page = global.Agentcast && global.Agentcast.page;
  if (!page || !page.user.isAdmin) return;
  var el = page.el;
  var $ = function (id) { return document.getElementById(id); };

  // ---- security alerts ----------------------------------------------------------
  var alerts = $('alerts');
  function renderAlerts() {
    var entries = page.systemLog().filter(function (m) { return m.category === 'security'; });
    page.clear(alerts);
    entries.forEach(function (m) {
      alerts.appendChild(el('li', null, [page.badge('warning'), el('span', { class: 'feed__text' }, m.message), page.timeEl(m.ts)]));
    });
    $('alerts-empty').hidden = entries.length > 0;
  }
  page.client.on('system', function (msg) {
    renderAlerts();
    if (msg.data && msg.data.category === 'security') loadKeys(); // a key changed somewhere
  });
  renderAlerts();

  // ---- the list ----------------------------------------------------------------------
  var body = $('keys-body');
  var empty = $('keys-empty');
  function when(value) {
    if (value === null || value === undefined || value === '') return 'never';
    var d = typeof value === 'number' ? new Date(value < 1e12 ? value * 1000 : value) : new Date(value);
    return isNaN(d.getTime()) ? String(value) : d.toLocaleString();
  }
  function loadKeys() {
    return page.api('/api/v1/api-keys').then(function (result) {
      // {api_keys: [{id, name, prefix, created_at, last_used_at}]}: never a secret.
      var keys = result.ok && result.data && Array.isArray(result.data.api_keys) ? result.data.api_keys : null;
      page.clear(body);
      if (!keys) {
        empty.textContent = 'Keys could not be loaded: ' + page.errorText(result) + '.';
        empty.hidden = false;
        return;
      }
      keys.forEach(function (key) {
        var revoke = el('button', { type: 'button', class: 'btn btn--small btn--danger', 'aria-label': 'Revoke key ' + key.name }, 'Revoke');
        revoke.addEventListener('click', function () { confirmRevoke(revoke, key); });
        body.appendChild(el('tr', { 'data-key-id': key.id }, [
          el('td', null, String(key.name || '')),
          el('td', { class: 'cell-id' }, String(key.prefix || '') + '…'),
          el('td', { class: 'hide-sm' }, when(key.created_at)),
          el('td', { class: 'hide-sm' }, when(key.last_used_at)),
          el('td', { class: 'num' }, revoke)
        ]));
      });
      empty.textContent = 'No keys yet.';
      empty.hidden = keys.length > 0;
    });
  }

  /** Two clicks to revoke: the first arms the button, the second revokes. */
  function confirmRevoke(button, key) {
    var label = 'Revoke key ' + key.name;
    if (button.getAttribute('data-armed') !== 'yes') {
      button.setAttribute('data-armed', 'yes');
      button.textContent = 'Confirm revoke';
      button.setAttribute('aria-label', 'Confirm: revoke key ' + key.name);
      global.setTimeout(function () {
        button.removeAttribute('data-armed');
        button.textContent = 'Revoke';
        button.setAttribute('aria-label', label);
      }, 5000);
      return;
    }
    button.disabled = true;
    page.api('/api/v1/api-keys/' + encodeURIComponent(key.id), { method: 'DELETE' }).then(function (result) {
      if (result.ok) {
        global.Agentcast.notify('Key "' + key.name + '" revoked', 'warning', 'API key revoked');
        loadKeys();
      } else {
        button.disabled = false;
        global.Agentcast.notify(page.errorText(result), 'error', 'Revoke failed');
      }
    });
  }

  // ---- create -------------------------------------------------------------------------
  var form = $('key-form');
  var status = $('key-status');
  form.addEventListener('submit', function (event) {
    event.preventDefault();
    var name = form.elements.name.value.trim();
    if (!name) {
      form.elements.name.setAttribute('aria-invalid', 'true');
      status.textContent = 'Give the key a name.';
      status.className = 'form-status is-error';
      form.elements.name.focus();
      return;
    }
    form.elements.name.setAttribute('aria-invalid', 'false');
    $('key-create').disabled = true;
    page.api('/api/v1/api-keys', { method: 'POST', body: { name: name } }).then(function (result) {
      $('key-create').disabled = false;
      if (!result.ok || !result.data || typeof result.data.key !== 'string') {
        status.textContent = 'Not created: ' + page.errorText(result) + '.';
        status.className = 'form-status is-error';
        return;
      }
      status.textContent = 'Key "' + result.data.name + '" created.';
      status.className = 'form-status is-ok';
      form.elements.name.value = '';
      $('key-value').value = result.data.key;
      $('key-secret').hidden = false;
      $('key-warning').hidden = false;
      $('key-value').focus();
      $('key-value').select();
      loadKeys();
    });
  });

  $('key-copy').addEventListener('click', function () {
    var input = $('key-value');
    var done = function () { $('key-copy').textContent = 'Copied'; };
    if (global.navigator.clipboard && global.isSecureContext) {
      global.navigator.clipboard.writeText(input.value).then(done, function () { input.select(); });
    } else {
      input.select();
      done();
    }
  });

  loadKeys();
})(window);
