/*
 * The login and signup forms (SPEC §2). Both post JSON with fetch; a successful
 * login stores the token in localStorage.token (where websocket.js reads it) and
 * goes to the page the user came from, or the dashboard. Signup logs in right
 * after creating the account.
 */
(function (global) {
  'use strict';

  var form = document.getElementById('auth-form');
  if (!form) return;
  var mode = form.getAttribute('data-mode') === 'signup' ? 'signup' : 'login';
  var status = document.getElementById('auth-status');
  var submit = document.getElementById('auth-submit');

  /** Only same-site paths: `?next=//evil.example` must not become an open redirect. */
  function nextPage() {
    var next = new URLSearchParams(global.location.search).get('next') || '';
    return /^\/(?![\/\\])[A-Za-z0-9._\-\/?=&%]*$/.test(next) && next.indexOf('/login.html') !== 0
      ? next : '/dashboard.html';
  }

  function show(text, kind) {
    status.textContent = text;
    status.className = 'form-status' + (kind ? ' is-' + kind : '');
  }

  function post(path, body) {
    return global.fetch(path, {
      method: 'POST',
      headers: { 'Content-Type': 'application/json', 'Accept': 'application/json' },
      body: JSON.stringify(body)
    }).then(function (response) {
      return response.text().then(function (text) {
        var data = null;
        try { data = text ? JSON.parse(text) : null; } catch (e) { data = null; }
        return { status: response.status, ok: response.ok, data: data, retryAfter: response.headers.get('Retry-After') };
      });
    }).catch(function () { return { status: 0, ok: false, data: null }; });
  }

  function failure(result) {
    var message = result.data && result.data.error && result.data.error.message;
    switch (result.status) {
      case 0: return 'The server cannot be reached. Try again in a moment.';
      case 401: return 'Wrong username or password.';
      case 403: return mode === 'signup' ? 'Sign-up is turned off on this server.' : (message || 'Not allowed.');
      case 409: return 'That username is taken.';
      case 429: return 'Too many attempts. Try again in ' + (result.retryAfter || 'a few') + ' seconds.';
      default: return message ? message.charAt(0).toUpperCase() + message.slice(1) : 'Something went wrong (' + result.status + ').';
    }
  }

  function login(credentials) {
    return post('/api/v1/auth/login', credentials).then(function (result) {
      if (!result.ok || !result.data || typeof result.data.token !== 'string') {
        show(failure(result), 'error');
        return false;
      }
      try { global.localStorage.setItem('token', result.data.token); } catch (e) {
        show('This browser does not allow storing the session.', 'error');
        return false;
      }
      show('Logged in. Opening the dashboard…', 'ok');
      global.location.assign(nextPage());
      return true;
    });
  }

  form.addEventListener('submit', function (event) {
    event.preventDefault();
    var credentials = {
      username: form.elements.username.value.trim(),
      password: form.elements.password.value
    };
    form.elements.username.setAttribute('aria-invalid', credentials.username ? 'false' : 'true');
    form.elements.password.setAttribute('aria-invalid', credentials.password ? 'false' : 'true');
    if (!credentials.username || !credentials.password) {
      show('Enter a username and a password.', 'error');
      (credentials.username ? form.elements.password : form.elements.username).focus();
      return;
    }
    submit.disabled = true;
    show(mode === 'signup' ? 'Creating your account…' : 'Logging in…');
    var done = function () { submit.disabled = false; };
    if (mode === 'login') {
      login(credentials).then(done);
      return;
    }
    post('/api/v1/auth/signup', credentials).then(function (result) {
      if (!result.ok) {
        show(failure(result), 'error');
        return false;
      }
      return login(credentials);
    }).then(done);
  });
})(window);
