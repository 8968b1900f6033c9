// Browser tests of the pages and websocket.js (SPEC §7) against a real server:
// the real accounts, API keys, views and analytics endpoints, nothing stubbed.
// Run: `npm test` here (after `cargo build`), or ./scripts/test.sh from the root.
// Every endpoint a page uses must answer: a missing one fails a test (Chrome's
// log of the 404 is a console error), no test skips.

'use strict';

const { test, before, after } = require('node:test');
const assert = require('node:assert/strict');
const { Server, openBrowser, indicator, until, WAIT_MS, ADMIN_PASSWORD } = require('./harness');

/** Waits for the answer to `GET <pathname>` a page is about to ask for. */
function answerTo(page, pathname) {
  return page.waitForResponse((r) => new URL(r.url()).pathname === pathname && r.request().method() === 'GET');
}

const AUTH_PAGES = ['dashboard', 'tasks', 'agents', 'analytics', 'settings', 'api-keys'];

let server;
let admin;
/** The current test's browser (see `it`). */
let browser;

before(async () => {
  server = new Server();
  await server.start();
  admin = server.token('alice', 'admin', ['--name', 'Alice Admin']);
});

after(async () => {
  if (server) await server.dispose();
});

/** Each test gets this long; every wait inside is bounded by WAIT_MS anyway. */
const TEST_TIMEOUT_MS = 120000;

/**
 * A test with its own fresh browser, closed whatever happens; at the end no
 * console error, CSP violation or request to another host may have happened.
 */
function it(name, fn) {
  test(name, { timeout: TEST_TIMEOUT_MS }, async (t) => {
    const opened = await openBrowser(server);
    browser = opened;
    try {
      await fn(t);
    } finally {
      browser = null;
      await opened.close();
    }
    assert.deepEqual(opened.problems, [], 'no console error, CSP violation or foreign request');
  });
}

it('every authenticated page reaches Connected, with the shared chrome', async () => {
  const { page } = browser;
  await browser.login(admin, '/dashboard.html');
  for (const name of AUTH_PAGES) {
    await page.goto(server.base + '/' + name + '.html');
    await indicator(page, /^Connected$/);
    assert.equal(await page.locator('#ws-status').getAttribute('data-state'), 'connected');
    assert.equal(await page.locator('#ws-status-indicator').count(), 1);
    assert.equal(await page.locator('nav[aria-label="Main"] a[aria-current="page"]').getAttribute('href'), '/' + name + '.html');
    assert.match(await page.locator('#current-user').innerText(), /Alice Admin/);
    assert.equal(await page.locator('#notifications[aria-live="polite"]').count(), 1);
  }
});

it('a broadcast posted over HTTP appears as a notification', async () => {
  const { page } = browser;
  await browser.login(admin, '/dashboard.html');
  await indicator(page, /^Connected$/);
  await server.broadcast(admin, 'system', { message: 'Maintenance at 22:00 UTC', level: 'warning' });
  const toast = page.locator('#notifications .toast--warning', { hasText: 'Maintenance at 22:00 UTC' });
  await toast.waitFor();
  await page.locator('#feed li[data-type="system"]', { hasText: 'Maintenance at 22:00 UTC' }).waitFor();
  // The settings page lists the system messages of the session.
  await page.goto(server.base + '/settings.html');
  await page.locator('#system-list li', { hasText: 'Maintenance at 22:00 UTC' }).waitFor();
});

it('an admin broadcasts a system message from the settings page', async () => {
  const { page } = browser;
  await browser.login(admin, '/settings.html');
  await indicator(page, /^Connected$/);
  await page.getByLabel('Message', { exact: true }).fill('Deploy finished');
  await page.getByLabel('Level', { exact: true }).selectOption('success');
  await page.getByRole('button', { name: 'Send broadcast' }).click();
  await page.locator('#broadcast-status', { hasText: /Sent to 1 connection/ }).waitFor();
  await page.locator('#notifications .toast--success', { hasText: 'Deploy finished' }).waitFor();
  await page.locator('#system-list li', { hasText: 'Deploy finished' }).waitFor();
});

it('a task row appears and changes status and progress live', async () => {
  const { page } = browser;
  await browser.login(admin, '/tasks.html');
  await indicator(page, /^Connected$/);
  const row = page.locator('tr[data-task-id="e2e-task-1"]');

  await server.broadcast(admin, 'task_update', { task_id: 'e2e-task-1', status: 'queued', query: 'Summarise the logs' });
  await row.waitFor();
  await row.locator('.badge', { hasText: 'queued' }).waitFor();
  assert.match(await row.innerText(), /Summarise the logs/);

  await server.broadcast(admin, 'task_update', { task_id: 'e2e-task-1', status: 'running', progress: 40 });
  await row.locator('.badge', { hasText: 'running' }).waitFor();
  await until(async () => (await row.locator('progress').evaluate((p) => p.value)) === 40, 'progress 40');
  assert.match(await row.locator('.task-progress').innerText(), /40%/);

  await server.broadcast(admin, 'task_update', { task_id: 'e2e-task-1', status: 'completed', progress: 100 });
  await row.locator('.badge', { hasText: 'completed' }).waitFor();
  await page.locator('#notifications .toast--success', { hasText: 'Summarise the logs' }).waitFor();
  assert.equal(await page.locator('tr[data-task-id="e2e-task-1"]').count(), 1, 'updated in place, not appended');

  await server.broadcast(admin, 'task_update', { task_id: 'e2e-task-2', status: 'failed', query: 'Broken job' });
  await page.locator('#notifications .toast--error', { hasText: 'Broken job' }).waitFor();

  // The status filter hides the other rows, and says so when nothing matches.
  await page.locator('#task-filter').selectOption('failed');
  assert.equal(await page.locator('tr[data-task-id="e2e-task-1"]').isHidden(), true);
  assert.equal(await page.locator('tr[data-task-id="e2e-task-2"]').isVisible(), true);
  await page.locator('#task-filter').selectOption('queued');
  await page.locator('#tasks-nomatch').waitFor();
});

it('an agent appears and disappears live, with notifications', async () => {
  const { page } = browser;
  await browser.login(admin, '/agents.html');
  await indicator(page, /^Connected$/);
  const row = page.locator('tr[data-agent-id="e2e-agent-1"]');

  await server.broadcast(admin, 'agent_update', { agent_id: 'e2e-agent-1', action: 'registered', name: 'Crawler' });
  await row.waitFor();
  assert.match(await row.innerText(), /Crawler/);
  await page.locator('#notifications .toast', { hasText: 'Crawler registered' }).waitFor();

  await server.broadcast(admin, 'agent_update', { agent_id: 'e2e-agent-1', action: 'updated', name: 'Crawler v2' });
  await row.locator('.agent-name', { hasText: 'Crawler v2' }).waitFor();

  await server.broadcast(admin, 'agent_update', { agent_id: 'e2e-agent-1', action: 'deleted' });
  await row.waitFor({ state: 'detached' });
  await page.locator('#notifications .toast', { hasText: 'Crawler v2 was removed' }).waitFor();
  assert.equal(await page.locator('#agents-empty').isVisible(), true);
});

it('after a server restart the page shows Reconnecting, then Connected, and what it missed', async () => {
  const { page, context } = browser;
  await browser.login(admin, '/tasks.html');
  await indicator(page, /^Connected$/);
  const epochBefore = await page.evaluate(() => {
    window.replays = [];
    window.Agentcast.page.client.on('@replay', (data) => window.replays.push(data));
    return window.Agentcast.page.client.epoch;
  });

  browser.serverDown = true;
  await server.stop(); // SIGTERM: sockets closed with 1012, the log flushed
  await indicator(page, /^Reconnecting… \(attempt \d\/5\)$/);
  // Keep the page away while the server comes back and a message is published.
  await context.setOffline(true);
  await server.start(); // same port, same DATA_DIR
  const published = await server.broadcast(admin, 'task_update', { task_id: 'e2e-away', status: 'running', query: 'Published while away', progress: 30 });
  // Offline, the page cannot have reconnected: the message is really missed.
  assert.notEqual(await page.evaluate(() => window.Agentcast.page.client.state), 'connected');
  assert.equal(await page.locator('tr[data-task-id="e2e-away"]').count(), 0);
  await context.setOffline(false); // the `online` event reconnects at once

  await indicator(page, /^Connected$/);
  browser.serverDown = false;
  // The durable log kept its epoch: the resume is complete and the missed
  // message arrives by replay, not by a reload of the view.
  assert.equal(await page.evaluate(() => window.Agentcast.page.client.epoch), epochBefore, 'same epoch after the restart');
  await page.waitForFunction(() => window.replays.length > 0);
  const replay = (await page.evaluate(() => window.replays))[0];
  assert.equal(replay.complete, true);
  assert.ok(replay.count >= 1 && replay.to >= published.seq, 'the replay reaches the message: ' + JSON.stringify(replay));
  const away = page.locator('tr[data-task-id="e2e-away"]');
  await away.waitFor();
  assert.match(await away.innerText(), /Published while away/);
  await away.locator('.badge', { hasText: 'running' }).waitFor();

  // And live again after the resume.
  await server.broadcast(admin, 'task_update', { task_id: 'e2e-after', status: 'queued', query: 'After the restart' });
  await page.locator('tr[data-task-id="e2e-after"]').waitFor();
});

it('the Reconnect button appears after the last attempt and reconnects', async () => {
  const { page } = browser;
  await browser.login(admin, '/dashboard.html');
  await indicator(page, /^Connected$/);
  // Make backoff fast for this page only, then drop the server for good.
  await page.evaluate(() => {
    const o = window.Agentcast.page.client.options;
    o.baseDelayMs = 50; o.maxDelayMs = 100; o.slowRetryMs = 600000;
  });
  browser.serverDown = true;
  await server.stop();
  await indicator(page, /^Disconnected/);
  const button = page.locator('#ws-status-reconnect');
  await button.waitFor({ state: 'visible' });
  await server.start();
  await button.click();
  await indicator(page, /^Connected$/);
  browser.serverDown = false;
  assert.equal(await button.isHidden(), true);
});

it('the token is refreshed in-band with POST /api/v1/auth/refresh, without reconnecting', async () => {
  const { page } = browser;
  // A real session: `agentcast token` tokens are no account, and refresh refuses them.
  const session = await server.login('admin', ADMIN_PASSWORD);
  const first = JSON.parse(Buffer.from(session.token.split('.')[1], 'base64url').toString());
  await browser.login(session.token, '/settings.html');
  await indicator(page, /^Connected$/);
  const connection = await page.evaluate(() => window.Agentcast.page.client.connection.connection_id);
  // The server takes only a token that expires later: exp has a one-second grain.
  await until(() => Math.floor(Date.now() / 1000) > first.iat, 'the clock to pass the first token\'s second');
  const refreshes = [];
  page.on('response', (r) => { if (new URL(r.url()).pathname === '/api/v1/auth/refresh') refreshes.push(r.status()); });
  const exp = await page.evaluate(() => new Promise((resolve, reject) => {
    const client = window.Agentcast.page.client;
    client.on('@refreshed', (data) => resolve(data.exp));
    client.on('@error', (data) => reject(new Error(JSON.stringify(data))));
    client.refresh(); // what the timer does `refreshLeadS` before exp
  }));
  assert.deepEqual(refreshes, [200], 'the page asked the real endpoint once');
  const stored = await page.evaluate(() => localStorage.getItem('token'));
  assert.notEqual(stored, session.token, 'a fresh token is stored');
  const claims = JSON.parse(Buffer.from(stored.split('.')[1], 'base64url').toString());
  assert.equal(exp, claims.exp, 'the connection took the fresh token');
  assert.ok(claims.exp > first.exp);
  assert.equal(claims.sub, first.sub);
  assert.equal(await page.evaluate(() => window.Agentcast.page.client.connection.connection_id), connection, 'same connection');
});

it('a missing pong is a dead link: the page reconnects and resumes', async () => {
  const { page } = browser;
  await browser.login(admin, '/tasks.html');
  await indicator(page, /^Connected$/);
  const before = await page.evaluate(() => window.Agentcast.page.client.connection.connection_id);
  // Swallow every ping on this socket (as a dead NAT would), with short timers
  // for the test. Each state change and each indicator text is recorded, as the
  // reconnect may take less than a polling interval (its jittered delay is
  // anywhere in [0, 1 s]).
  await page.evaluate(() => {
    const client = window.Agentcast.page.client;
    const dead = client.socket;
    const send = client.send;
    window.seenStates = [];
    window.seenTexts = [];
    client.on('@state', (state) => window.seenStates.push(state));
    new MutationObserver(() => {
      window.seenTexts.push(document.getElementById('ws-status-text').textContent);
    }).observe(document.getElementById('ws-status-text'), { childList: true, characterData: true, subtree: true });
    client.options.pongTimeoutMs = 300;
    client.send = function (frame) {
      if (frame.type === 'ping' && client.socket === dead) return true;
      return send.call(client, frame);
    };
    client.heartbeatMs = 100;
    client.schedulePing();
  });
  await page.waitForFunction(() => {
    const states = window.seenStates;
    const reconnecting = states.indexOf('reconnecting');
    return reconnecting >= 0 && states.indexOf('connected', reconnecting) > reconnecting;
  }, null, { timeout: WAIT_MS });
  const texts = await page.evaluate(() => window.seenTexts);
  assert.ok(texts.some((text) => /^Reconnecting/.test(text)), 'the indicator said Reconnecting: ' + JSON.stringify(texts));
  await indicator(page, /^Connected$/);
  const after = await page.evaluate(() => window.Agentcast.page.client.connection.connection_id);
  assert.notEqual(after, before, 'a new connection');
  await server.broadcast(admin, 'task_update', { task_id: 'e2e-after-dead-link', status: 'running' });
  await page.locator('tr[data-task-id="e2e-after-dead-link"]').waitFor();
});

it('a user who signs up sees no admin controls, and the server refuses them', async () => {
  const { page } = browser;
  const username = 'bob-' + Math.random().toString(36).slice(2, 8);
  await page.goto(server.base + '/signup.html');
  await page.getByLabel('Username').fill(username);
  await page.getByLabel('Password').fill('a long enough password');
  await page.getByRole('button', { name: 'Create an account' }).click();
  await page.waitForURL(/\/dashboard\.html$/);
  await indicator(page, /^Connected$/);
  assert.match(await page.locator('#current-user').innerText(), new RegExp(username));
  assert.match(await page.locator('#current-user .user__role').innerText(), /^user$/);
  assert.equal(await page.locator('nav a[href="/api-keys.html"]').count(), 0, 'no API keys link');

  await page.goto(server.base + '/settings.html');
  await indicator(page, /^Connected$/);
  assert.equal(await page.locator('#broadcast-form').count(), 0, 'no broadcast form');
  assert.equal(await page.locator('#prefs-form').count(), 1, 'preferences are for everyone');
  await page.goto(server.base + '/api-keys.html');
  await indicator(page, /^Connected$/);
  assert.equal(await page.locator('#key-form').count(), 0, 'no key form');
  assert.equal(await page.locator('#keys-body').count(), 0, 'no key list');
  await page.getByText("API keys are managed by your tenant's admins.").waitFor();
  await browser.screenshot('api-keys-user');

  // And the server refuses them anyway, with the page's own token.
  const token = await page.evaluate(() => localStorage.getItem('token'));
  const me = await server.request('GET', '/api/v1/auth/me', token);
  assert.equal(me.status, 200);
  assert.deepEqual([me.body.user.username, me.body.user.role, me.body.user.tenant], [username, 'user', 'default']);
  for (const [method, path, body] of [
    ['POST', '/api/v1/ws/broadcast', { type: 'system', data: { message: 'x' } }],
    ['POST', '/api/v1/ws/user/alice', { type: 'system', data: { message: 'x' } }],
    ['GET', '/api/v1/api-keys'],
    ['POST', '/api/v1/api-keys', { name: 'sneaky' }]
  ]) {
    const refused = await server.request(method, path, token, body);
    assert.equal(refused.status, 403, method + ' ' + path);
    assert.equal(refused.body.error.code, 'forbidden', method + ' ' + path);
  }
});

it('notification preferences are kept and respected', async () => {
  const { page } = browser;
  await browser.login(admin, '/settings.html');
  await indicator(page, /^Connected$/);
  await page.getByLabel('System messages').uncheck();
  await page.locator('#prefs-status', { hasText: 'Saved.' }).waitFor();
  await page.reload();
  await indicator(page, /^Connected$/);
  assert.equal(await page.getByLabel('System messages').isChecked(), false);
  await server.broadcast(admin, 'system', { message: 'Quiet please', level: 'info' });
  // Listed on the page, but no toast.
  await page.locator('#system-list li', { hasText: 'Quiet please' }).waitFor();
  assert.equal(await page.locator('#notifications .toast', { hasText: 'Quiet please' }).count(), 0);
});

it('a refused token (4401) sends the page to login, keeping where it was', async () => {
  const { page } = browser;
  // settings.html calls no REST endpoint, so the only refusal is the socket's.
  await browser.login(server.forgedToken('mallory'), '/settings.html');
  await page.waitForURL(/\/login\.html\?next=%2Fsettings\.html$/);
  await page.locator('form#auth-form input[name="username"]').waitFor();
});

it('without a token the authenticated pages go to login and open no socket', async () => {
  const { page } = browser;
  let sockets = 0;
  page.on('websocket', () => { sockets++; });
  await page.goto(server.base + '/agents.html');
  await page.waitForURL(/\/login\.html\?next=%2Fagents\.html$/);
  assert.equal(sockets, 0);
});

it('the login form checks its fields and explains a refusal', async () => {
  const { page } = browser;
  browser.expectRefusal('/api/v1/auth/login', 401);
  await page.goto(server.base + '/login.html');
  await page.getByRole('button', { name: 'Log in' }).click();
  await page.locator('#auth-status.is-error', { hasText: 'Enter a username and a password.' }).waitFor();
  assert.equal(await page.getByLabel('Username').getAttribute('aria-invalid'), 'true');
  assert.equal(await page.evaluate(() => document.activeElement.id), 'username');
  await page.getByLabel('Username').fill('nobody');
  await page.getByLabel('Password').fill('not-the-password');
  await page.getByRole('button', { name: 'Log in' }).click();
  await page.locator('#auth-status.is-error', { hasText: 'Wrong username or password.' }).waitFor();
  assert.equal(await page.evaluate(() => localStorage.getItem('token')), null);
  assert.match(page.url(), /\/login\.html$/);
});

it('the login form logs in as the admin (ADMIN_PASSWORD) and opens the dashboard', async () => {
  const { page } = browser;
  browser.expectRefusal('/api/v1/auth/login', 401);
  await page.goto(server.base + '/login.html');
  await page.getByLabel('Username').fill('admin');
  await page.getByLabel('Password').fill('wrong-password');
  await page.getByRole('button', { name: 'Log in' }).click();
  await page.locator('#auth-status.is-error', { hasText: 'Wrong username or password.' }).waitFor();
  await page.getByLabel('Password').fill(ADMIN_PASSWORD);
  await page.getByRole('button', { name: 'Log in' }).click();
  await page.waitForURL(/\/dashboard\.html$/);
  await indicator(page, /^Connected$/);
  assert.match(await page.locator('#current-user').innerText(), /admin/);
  assert.equal(await page.locator('nav a[href="/api-keys.html"]').count(), 1, 'an admin sees the API keys link');
  const token = await page.evaluate(() => localStorage.getItem('token'));
  const me = await server.request('GET', '/api/v1/auth/me', token);
  assert.deepEqual([me.status, me.body.user.username, me.body.user.role], [200, 'admin', 'admin']);
});

it('an admin creates an API key (shown once, copied), lists it, publishes with it, revokes it, and sees the alerts', async () => {
  const { page } = browser;
  await browser.allowClipboard();
  await browser.login(admin, '/api-keys.html');
  await indicator(page, /^Connected$/);
  const listed = answerTo(page, '/api/v1/api-keys');
  await page.getByLabel('Name', { exact: true }).fill('e2e-publisher');
  await page.getByRole('button', { name: 'Create key' }).click();
  await page.locator('#key-secret').waitFor();
  await page.locator('#key-warning', { hasText: 'it will not be shown again' }).waitFor();
  const key = await page.locator('#key-value').inputValue();
  assert.match(key, /^ak_[0-9A-Za-z]{32,}$/);

  // The copy button puts the key on the clipboard.
  await page.getByRole('button', { name: 'Copy' }).click();
  await page.getByRole('button', { name: 'Copied' }).waitFor();
  assert.equal(await page.evaluate(() => navigator.clipboard.readText()), key);

  // Listed by name and prefix, never the key.
  assert.equal((await listed).status(), 200);
  const row = page.locator('#keys-body tr', { hasText: 'e2e-publisher' });
  await row.waitFor();
  const prefix = (await server.request('GET', '/api/v1/api-keys', admin)).body.api_keys.find((k) => k.name === 'e2e-publisher').prefix;
  assert.ok(key.startsWith(prefix));
  assert.match(await row.innerText(), new RegExp(prefix));
  assert.equal((await row.innerText()).includes(key), false, 'the list shows the prefix only');
  assert.match(await row.innerText(), /never/, 'not used yet');

  // SPEC §2: creating a key warns the tenant's admins (the security alerts feed).
  await page.locator('#alerts li', { hasText: 'API key "e2e-publisher"' }).filter({ hasText: 'was created by Alice Admin' }).waitFor();
  await page.locator('#notifications .toast--warning', { hasText: 'e2e-publisher' }).first().waitFor();
  // A warning that is not about keys is a notification, not a security alert.
  await server.broadcast(admin, 'system', { message: 'Disk almost full', level: 'warning' });

  // The key publishes (a backend would do this), and only until it is revoked.
  const published = await fetch(server.base + '/api/v1/ws/broadcast', {
    method: 'POST', headers: { Authorization: 'Bearer ' + key, 'Content-Type': 'application/json' },
    body: JSON.stringify({ type: 'notification', data: { text: 'from the key' } })
  });
  assert.equal(published.status, 202);

  await row.getByRole('button', { name: /^Revoke/ }).click();
  await row.getByRole('button', { name: /^Confirm: revoke/ }).click();
  await row.waitFor({ state: 'detached' });
  await page.locator('#alerts li', { hasText: 'was revoked by Alice Admin' }).waitFor();
  // The revoke alert came after the disk warning (seq order), so that one was seen and left out.
  assert.equal(await page.locator('#alerts li', { hasText: 'Disk almost full' }).count(), 0);
  const refused = await fetch(server.base + '/api/v1/ws/broadcast', {
    method: 'POST', headers: { Authorization: 'Bearer ' + key, 'Content-Type': 'application/json' },
    body: JSON.stringify({ type: 'notification', data: { text: 'after revoke' } })
  });
  assert.equal(refused.status, 401);

  // Shown once: after a reload the key itself is nowhere on the page; the alerts stay.
  await page.reload();
  await indicator(page, /^Connected$/);
  await page.locator('#alerts li', { hasText: 'was revoked by Alice Admin' }).waitFor();
  assert.equal((await page.content()).includes(key), false);
  assert.equal(await page.locator('#key-secret').isHidden(), true);
});

it('the tasks page loads existing tasks over REST, then applies live updates in place', async () => {
  const { page } = browser;
  await server.broadcast(admin, 'task_update', { task_id: 'rest-task-1', status: 'running', query: 'Loaded from the view', progress: 55 });
  await server.broadcast(admin, 'task_update', { task_id: 'rest-task-2', status: 'queued', query: 'Second one' });
  const view = (await server.request('GET', '/api/v1/tasks', admin)).body.tasks.find((t) => t.task_id === 'rest-task-1');
  await browser.login(admin);
  const loaded = answerTo(page, '/api/v1/tasks');
  await page.goto(server.base + '/tasks.html');
  assert.equal((await loaded).status(), 200);
  const row = page.locator('tr[data-task-id="rest-task-1"]');
  await row.waitFor();
  assert.match(await row.innerText(), /Loaded from the view/);
  await row.locator('.badge', { hasText: 'running' }).waitFor();
  assert.equal(await row.locator('progress').evaluate((p) => p.value), 55);
  assert.match(await row.locator('.task-updated time').getAttribute('datetime'), new RegExp('^' + view.updated_at.slice(0, 19)));
  await page.locator('tr[data-task-id="rest-task-2"] .badge', { hasText: 'queued' }).waitFor();
  await indicator(page, /^Connected$/);

  // A live update (higher seq) changes the row in place; the query the view knew stays.
  await server.broadcast(admin, 'task_update', { task_id: 'rest-task-1', status: 'completed', progress: 100 });
  await row.locator('.badge', { hasText: 'completed' }).waitFor();
  assert.equal(await row.locator('progress').evaluate((p) => p.value), 100);
  assert.match(await row.innerText(), /Loaded from the view/);
  assert.equal(await page.locator('tr[data-task-id="rest-task-1"]').count(), 1);
  await page.locator('#notifications .toast--success', { hasText: 'Loaded from the view' }).waitFor();
});

it('the agents page loads existing agents over REST, then adds and removes them live', async () => {
  const { page } = browser;
  await server.broadcast(admin, 'agent_update', { agent_id: 'rest-agent-1', action: 'registered', name: 'Indexer', model: 'small' });
  await server.broadcast(admin, 'agent_update', { agent_id: 'rest-agent-1', action: 'updated', name: 'Indexer v2', model: 'large' });
  await server.broadcast(admin, 'agent_update', { agent_id: 'rest-agent-gone', action: 'registered', name: 'Gone' });
  await server.broadcast(admin, 'agent_update', { agent_id: 'rest-agent-gone', action: 'deleted' });
  await browser.login(admin);
  const loaded = answerTo(page, '/api/v1/agents');
  await page.goto(server.base + '/agents.html');
  assert.equal((await loaded).status(), 200);
  const row = page.locator('tr[data-agent-id="rest-agent-1"]');
  await row.waitFor();
  await row.locator('.agent-name', { hasText: 'Indexer v2' }).waitFor();
  await row.locator('.badge', { hasText: 'updated' }).waitFor();
  assert.match(await row.locator('.agent-details').innerText(), /model: large/);
  assert.doesNotMatch(await row.locator('.agent-details').innerText(), /data:|seq:/, 'the view entry is shown like a live one');
  assert.equal(await page.locator('tr[data-agent-id="rest-agent-gone"]').count(), 0, 'a deleted agent is not in the view');
  await indicator(page, /^Connected$/);

  await server.broadcast(admin, 'agent_update', { agent_id: 'rest-agent-2', action: 'registered', name: 'Planner' });
  await page.locator('tr[data-agent-id="rest-agent-2"]').waitFor();
  await server.broadcast(admin, 'agent_update', { agent_id: 'rest-agent-1', action: 'deleted' });
  await row.waitFor({ state: 'detached' });
  await page.locator('#notifications .toast', { hasText: 'Indexer v2 was removed' }).waitFor();
});

it('the analytics page draws the last hour from GET /api/v1/analytics, then live', async () => {
  const { page } = browser;
  for (let i = 0; i < 3; i++) await server.broadcast(admin, 'deploy_event', { n: i });
  const hour = (await server.request('GET', '/api/v1/analytics', admin)).body;
  const total = hour.minutes.reduce((n, m) => n + m.messages_total, 0);
  await browser.login(admin);
  const loaded = answerTo(page, '/api/v1/analytics');
  await page.goto(server.base + '/analytics.html');
  assert.equal((await loaded).status(), 200);
  await indicator(page, /^Connected$/);
  // Counted by the server before this page opened: only the REST load can know it.
  await page.locator('#hour-summary', { hasText: /Last hour: \d+ messages? published/ }).waitFor();
  const shown = Number((await page.locator('#hour-summary').innerText()).match(/Last hour: (\d+)/)[1]);
  assert.ok(shown >= total, shown + ' >= ' + total);
  await page.locator('#chart-hour .u-legend', { hasText: 'deploy_event' }).waitFor();
  assert.equal(await page.locator('#chart-rate .u-legend', { hasText: 'deploy_event' }).count(), 0, 'not from live messages');
  assert.equal(await page.locator('#hour-note').innerText(), '');

  // Live: a new type gets a series on both charts.
  await server.broadcast(admin, 'live_probe', { ok: true });
  await page.locator('#chart-rate .u-legend', { hasText: 'live_probe' }).waitFor();
  await page.locator('#chart-hour .u-legend', { hasText: 'live_probe' }).waitFor();
});

// ---- the task page (/task.html?id=…): its state, and the timeline of task:<id> ----

/** Waits until the page's client is subscribed to `channel` (its `subscribed` frame came). */
async function subscribedTo(page, channel) {
  await page.waitForFunction((name) => {
    const c = window.Agentcast.page.client.channel(name);
    return c && c.subscribed;
  }, channel, { timeout: WAIT_MS });
}

/** The texts of the timeline's log lines, in order. */
function logLines(page) {
  return page.locator('#timeline li.event--log .log__message').allTextContents();
}

it('the task page renders a tool run and streamed output published live to its channel', async () => {
  const { page } = browser;
  const id = 'e2e-live-1';
  const channel = 'task:' + id;
  await server.broadcast(admin, 'task_update', { task_id: id, status: 'running', query: 'Find the cheapest flight', progress: 10 });
  await browser.login(admin, '/task.html?id=' + id);
  await indicator(page, /^Connected$/);
  await page.locator('#task-status .badge', { hasText: 'running' }).waitFor();
  assert.equal(await page.locator('#task-id').innerText(), id);
  await subscribedTo(page, channel);
  assert.equal(await page.locator('#timeline-empty').isVisible(), true, 'no event yet');

  await server.publish(admin, channel, 'tool_start', { tool: 'web_search', params: { q: 'flights to Lisbon' } });
  const step = page.locator('#timeline li.event--step[data-tool="web_search"]');
  await step.waitFor();
  await step.locator('.badge', { hasText: 'running' }).waitFor();
  assert.match(await step.locator('.step__params').innerText(), /flights to Lisbon/);
  assert.equal(await page.locator('#timeline-empty').isHidden(), true);

  await server.publish(admin, channel, 'tool_progress', { tool: 'web_search', message: 'page 2 of 4', progress: 0.5 });
  await step.locator('.step__message', { hasText: 'page 2 of 4' }).waitFor();
  await until(async () => (await step.locator('progress').evaluate((p) => p.value)) === 50, 'the step at 50%');

  await server.publish(admin, channel, 'tool_end', { tool: 'web_search', status: 'success', duration_s: 2.4, exit_code: 0 });
  await step.locator('.badge', { hasText: 'success' }).waitFor();
  assert.equal(await step.getAttribute('data-state'), 'success');
  assert.match(await step.locator('.step__duration').innerText(), /^2\.4 s · exit 0$/);
  assert.equal(await step.locator('progress').isHidden(), true);
  assert.equal(await page.locator('#timeline li.event--step').count(), 1, 'one step, updated in place');

  // Streamed model output: several frames grow one block.
  const chunks = ['The cheapest ', 'flight leaves ', 'on Tuesday ', 'at 06:40.'];
  for (const text of chunks) await server.publish(admin, channel, 'output', { text });
  const output = page.locator('#timeline li.event--output');
  await until(async () => (await output.locator('.output__text').textContent()) === chunks.join(''), 'the whole output in one block');
  assert.equal(await output.count(), 1, 'one growing block');

  // Log lines and other types; message text is text, never markup.
  await server.publish(admin, channel, 'log', { level: 'warning', message: 'rate limited <b>twice</b>' });
  const log = page.locator('#timeline li.event--log', { hasText: 'rate limited <b>twice</b>' });
  await log.waitFor();
  assert.equal(await log.getAttribute('data-level'), 'warning');
  assert.equal(await log.locator('b').count(), 0, 'no markup from message data');
  await server.publish(admin, channel, 'checkpoint', { step: 3 });
  await page.locator('#timeline li.event--other[data-type="checkpoint"]', { hasText: '{"step":3}' }).waitFor();
  assert.deepEqual(
    await page.locator('#timeline > li').evaluateAll((rows) => rows.map((r) => r.getAttribute('data-type'))),
    ['tool_start', 'output', 'log', 'checkpoint'],
    'in order, one row each'
  );

  // The header follows the tenant stream's task_update for this task only.
  await server.broadcast(admin, 'task_update', { task_id: 'e2e-other-task', status: 'failed' });
  await server.broadcast(admin, 'task_update', { task_id: id, status: 'completed', progress: 100 });
  await page.locator('#task-status .badge', { hasText: 'completed' }).waitFor();
  assert.equal(await page.locator('#task-progress-text').innerText(), '100%');
  assert.match(await page.locator('#task-query').innerText(), /Find the cheapest flight/, 'the view\'s query stays');
  assert.equal(await page.locator('#timeline li[data-type="task_update"]').count(), 0, 'tenant messages are not timeline rows');
});

it('the task page resumes its timeline across a server restart, each line once', async (t) => {
  const { page } = browser;
  const id = 'e2e-resume-1';
  const channel = 'task:' + id;
  await server.broadcast(admin, 'task_update', { task_id: id, status: 'running', query: 'Survives a restart' });
  await server.publish(admin, channel, 'log', { message: 'line 1' });
  await server.publish(admin, channel, 'log', { message: 'line 2' });
  await server.publish(admin, channel, 'tool_start', { tool: 'build' });
  const channelFrames = [];
  page.on('websocket', (ws) => {
    ws.on('framesent', (f) => { if (/"(un)?subscribe"/.test(f.payload)) channelFrames.push('> ' + f.payload); });
    ws.on('framereceived', (f) => { if (/"type":"(subscribed|unsubscribed|error)"/.test(f.payload)) channelFrames.push('< ' + f.payload); });
  });
  await browser.login(admin, '/task.html?id=' + id);
  await indicator(page, /^Connected$/);
  await subscribedTo(page, channel);
  assert.deepEqual(await logLines(page), ['line 1', 'line 2'], 'history first');
  await server.publish(admin, channel, 'log', { message: 'line 3' });
  await until(async () => (await logLines(page)).length === 3, 'line 3 live');
  const before = await page.evaluate((name) => window.Agentcast.page.client.channel(name), channel);

  browser.serverDown = true;
  await server.stop();
  await indicator(page, /^Reconnecting/);
  await server.start();
  // Published while the page is away (or just back): it gets them by replay or live.
  await server.publish(admin, channel, 'log', { message: 'line 4' });
  await server.publish(admin, channel, 'tool_end', { tool: 'build', status: 'completed_with_errors', duration_s: 75 });
  await server.publish(admin, channel, 'log', { message: 'line 5' });
  await indicator(page, /^Connected$/);
  await subscribedTo(page, channel);
  browser.serverDown = false;
  await server.publish(admin, channel, 'log', { message: 'line 6' });
  await until(async () => (await logLines(page)).includes('line 6'), 'line 6 live after the restart');

  assert.deepEqual(await logLines(page), ['line 1', 'line 2', 'line 3', 'line 4', 'line 5', 'line 6'], 'each line once, in order');
  const build = page.locator('#timeline li.event--step[data-tool="build"]');
  assert.equal(await build.count(), 1, 'the step that spans the restart is one step');
  assert.equal(await build.getAttribute('data-state'), 'completed_with_errors');
  assert.match(await build.locator('.step__duration').innerText(), /^1 min 15 s$/);
  const after = await page.evaluate((name) => window.Agentcast.page.client.channel(name), channel);
  const info = await server.request('GET', '/api/v1/ws/channel/' + channel, admin);
  assert.equal(info.status, 200, info.text);
  assert.equal(after.seq, info.body.seq, 'the client is at the channel\'s head');
  t.diagnostic('channel position before ' + JSON.stringify(before) + ', after ' + JSON.stringify(after) +
    ', info ' + info.text);
  t.diagnostic('channel frames: ' + channelFrames.join('\n'));
  // The resume asked for what came after the last seq seen, in the same epoch.
  assert.ok(channelFrames.some((f) => f.startsWith('> ') && f.includes('"since":' + before.seq)), channelFrames.join('\n'));
});

test('the task page marks what a resume could not bring back, and fills in the rest', { timeout: TEST_TIMEOUT_MS }, async () => {
  // A server of its own that keeps only 3 messages per channel.
  const small = new Server({ env: { CHANNEL_HISTORY: '3' } });
  await small.start();
  const opened = await openBrowser(small);
  try {
    const { page, context } = opened;
    const token = small.token('alice', 'admin');
    const channel = 'task:e2e-gap';
    await small.publish(token, channel, 'log', { message: 'line 1' });
    await small.publish(token, channel, 'log', { message: 'line 2' });
    await small.broadcast(token, 'task_update', { task_id: 'e2e-gap', status: 'running' });
    await opened.login(token, '/task.html?id=e2e-gap');
    await indicator(page, /^Connected$/);
    await subscribedTo(page, channel);
    assert.deepEqual(await logLines(page), ['line 1', 'line 2']);
    const resets = page.evaluate((name) => new Promise((resolve) => {
      window.Agentcast.page.client.on('@subscribed', (data) => { if (data.channel === name && data.complete === false) resolve(data); });
    }), channel);

    // Away while four lines are published: the channel keeps the last three.
    opened.serverDown = true;
    await small.stop();
    await indicator(page, /^Reconnecting/);
    await context.setOffline(true);
    await small.start();
    for (const n of [3, 4, 5, 6]) await small.publish(token, channel, 'log', { message: 'line ' + n });
    await context.setOffline(false);
    await indicator(page, /^Connected$/);
    opened.serverDown = false;
    const reset = await resets;
    assert.deepEqual([reset.from, reset.to, reset.complete], [2, 6, false], JSON.stringify(reset));
    await page.locator('#timeline li.event--divider', { hasText: 'Some events were missed' }).waitFor();
    await small.publish(token, channel, 'log', { message: 'line 7' });
    await until(async () => (await logLines(page)).includes('line 7'), 'line 7 live');
    assert.deepEqual(await logLines(page), ['line 1', 'line 2', 'line 4', 'line 5', 'line 6', 'line 7'], 'line 3 is gone, nothing twice');
    // The gap is marked where it is: between line 2 and line 4.
    const rows = await page.locator('#timeline > li').evaluateAll((lis) => lis.map((li) =>
      li.classList.contains('event--divider') ? '--' : li.querySelector('.log__message').textContent));
    assert.deepEqual(rows, ['line 1', 'line 2', '--', 'line 4', 'line 5', 'line 6', 'line 7']);
  } finally {
    await opened.close();
    await small.dispose();
  }
  assert.deepEqual(opened.problems, [], 'no console error, CSP violation or foreign request');
});

it('a tasks table row links to the task page, which shows the task\'s state', async () => {
  const { page } = browser;
  const id = 'e2e-link:a=b@c'; // characters a URL encodes, all fine in a channel name
  await server.broadcast(admin, 'task_update', { task_id: id, status: 'running', query: 'Linked from the table', progress: 25 });
  await browser.login(admin, '/tasks.html');
  await indicator(page, /^Connected$/);
  const link = page.locator('tr[data-task-id="' + id + '"] a.task-link');
  await link.waitFor();
  assert.equal(await link.getAttribute('href'), '/task.html?id=' + encodeURIComponent(id));
  const loaded = answerTo(page, '/api/v1/tasks/' + encodeURIComponent(id));
  await link.click();
  await page.waitForURL(/\/task\.html\?id=/);
  assert.equal((await loaded).status(), 200);
  await indicator(page, /^Connected$/);
  assert.equal(await page.locator('#task-id').innerText(), id);
  await page.locator('#task-status .badge', { hasText: 'running' }).waitFor();
  assert.equal(await page.locator('#task-query').innerText(), 'Linked from the table');
  assert.equal(await page.locator('#task-progress').evaluate((p) => p.value), 25);
  assert.equal(await page.locator('#task-progress-text').innerText(), '25%');
  assert.equal(await page.locator('#task-missing').isHidden(), true);
  assert.match(await page.title(), /e2e-link:a=b@c/);
  await subscribedTo(page, 'task:' + id);
  await server.publish(admin, 'task:' + id, 'log', { message: 'hello from the linked task' });
  await page.locator('#timeline li.event--log', { hasText: 'hello from the linked task' }).waitFor();

  // A task that is not in the view: a clear message, and the timeline still works.
  browser.expectRefusal('/api/v1/tasks/e2e-nope', 404);
  await page.goto(server.base + '/task.html?id=e2e-nope');
  await page.locator('#task-missing', { hasText: 'was not found' }).waitFor();
  await subscribedTo(page, 'task:e2e-nope');
  await server.publish(admin, 'task:e2e-nope', 'log', { message: 'events without a task entry' });
  await page.locator('#timeline li.event--log', { hasText: 'events without a task entry' }).waitFor();
  // Once the task is published, the header fills in live.
  await server.broadcast(admin, 'task_update', { task_id: 'e2e-nope', status: 'queued' });
  await page.locator('#task-status .badge', { hasText: 'queued' }).waitFor();
  assert.equal(await page.locator('#task-missing').isHidden(), true);
});

it('a user whose token allows no channel sees the task, and is told the timeline is not theirs', async () => {
  const { page } = browser;
  const id = 'e2e-closed';
  await server.broadcast(admin, 'task_update', { task_id: id, status: 'queued', query: 'Visible, but not its stream' });
  await server.publish(admin, 'task:' + id, 'log', { message: 'not for carol' });
  const carol = server.token('carol', 'user', ['--channels', '']);
  browser.expectRefusal('/api/v1/channels/task:' + id + '/history', 403);
  await browser.login(carol, '/task.html?id=' + id);
  await indicator(page, /^Connected$/);
  await page.locator('#task-status .badge', { hasText: 'queued' }).waitFor();
  assert.equal(await page.locator('#task-query').innerText(), 'Visible, but not its stream');
  await page.locator('#timeline-note', { hasText: 'You may not watch this task\'s timeline.' }).waitFor();
  assert.equal(await page.locator('#timeline li').count(), 0);
  assert.equal(await page.evaluate((name) => window.Agentcast.page.client.channel(name), 'task:' + id), null, 'not subscribed');
});

it('the task page fits a 390 px wide screen', async () => {
  const { page } = browser;
  const id = 'e2e-narrow-' + 'x'.repeat(60);
  const channel = 'task:' + id;
  await server.broadcast(admin, 'task_update', { task_id: id, status: 'running', progress: 60, query: 'A long query '.repeat(12) });
  await server.publish(admin, channel, 'tool_start', { tool: 'shell_' + 'y'.repeat(50), params: { cmd: 'z'.repeat(300) } });
  await server.publish(admin, channel, 'tool_progress', { tool: 'shell_' + 'y'.repeat(50), message: 'm'.repeat(200), progress: 0.3 });
  await server.publish(admin, channel, 'log', { level: 'error', message: 'e'.repeat(400) });
  await server.publish(admin, channel, 'output', { text: 'o'.repeat(500) + '\n  indented line' });
  await server.publish(admin, channel, 'custom_event', { blob: 'b'.repeat(400) });
  await page.setViewportSize({ width: 390, height: 844 });
  await browser.login(admin, '/task.html?id=' + id);
  await indicator(page, /^Connected$/);
  await page.locator('#task-status .badge', { hasText: 'running' }).waitFor();
  await page.locator('#timeline li.event--other[data-type="custom_event"]').waitFor();
  await subscribedTo(page, channel);
  const widths = await page.evaluate(() => ({
    viewport: document.documentElement.clientWidth,
    page: document.documentElement.scrollWidth,
    body: document.body.scrollWidth
  }));
  assert.ok(widths.page <= widths.viewport && widths.body <= widths.viewport, 'no horizontal overflow: ' + JSON.stringify(widths));
  await page.evaluate(() => document.querySelectorAll('#notifications .toast').forEach((t) => t.remove()));
  await browser.screenshot('task-mobile');
  await page.setViewportSize({ width: 1280, height: 800 });
  await browser.screenshot('task');
});

it('screenshots of every page, with live data', async () => {
  const { page } = browser;
  // A tenant of its own, so the pictures show this data and not the other tests'.
  const ops = server.token('dana', 'admin', ['--name', 'Dana Ops', '--tenant', 'acme']);
  const tasks = [
    ['task-1001', 'queued', 0, 'Index new documents'],
    ['task-1002', 'running', 35, 'Summarise incident #42'],
    ['task-1003', 'running', 80, 'Crawl docs site'],
    ['task-1004', 'completed', 100, 'Nightly report'],
    ['task-1005', 'failed', 60, 'Resize images']
  ];
  // Some state exists before any page opens: the pages load it over REST.
  for (const [id, status, progress, query] of tasks.slice(0, 3)) {
    await server.broadcast(ops, 'task_update', { task_id: id, status, progress, query });
  }
  await server.broadcast(ops, 'agent_update', { agent_id: 'agent-7', action: 'registered', name: 'Research agent', model: 'small', region: 'eu' });
  await server.request('POST', '/api/v1/api-keys', ops, { name: 'billing-backend' });

  await browser.login(ops, '/dashboard.html');
  await indicator(page, /^Connected$/);
  // The rest arrives live.
  for (const [id, status, progress, query] of tasks.slice(3)) {
    await server.broadcast(ops, 'task_update', { task_id: id, status, progress, query });
  }
  await server.broadcast(ops, 'agent_update', { agent_id: 'agent-9', action: 'registered', name: 'Billing agent', model: 'large', region: 'us' });
  const created = await server.request('POST', '/api/v1/api-keys', ops, { name: 'ci-publisher' });
  assert.equal(created.status, 201);
  await server.broadcast(ops, 'system', { message: 'Maintenance window tonight at 22:00 UTC', level: 'info' });
  await server.broadcast(ops, 'custom_event', { build: 812, ok: true });
  await page.locator('#feed li[data-type="custom_event"]').waitFor();
  await until(async () => (await page.locator('#stat-tasks').innerText()) === '5', 'five tasks counted');
  await until(async () => (await page.locator('#stat-agents').innerText()) === '2', 'two agents counted');
  await page.evaluate(() => document.querySelectorAll('#notifications .toast').forEach((t) => t.remove()));
  await browser.screenshot('dashboard');

  for (const name of AUTH_PAGES.slice(1)) {
    await page.goto(server.base + '/' + name + '.html');
    await indicator(page, /^Connected$/);
    if (name === 'tasks') await page.locator('tr[data-task-id="task-1005"]').waitFor();
    if (name === 'agents') await page.locator('tr[data-agent-id="agent-9"]').waitFor();
    if (name === 'analytics') {
      await page.locator('#hour-summary', { hasText: 'Last hour:' }).waitFor();
      await page.evaluate(() => { window.seen = 0; window.Agentcast.page.client.on('*', () => { window.seen++; }); });
      for (let i = 0; i < 6; i++) await server.broadcast(ops, i % 2 ? 'task_update' : 'notification', i % 2 ? { task_id: 'task-1002', status: 'running', progress: 35 + 5 * i } : { text: 'hello ' + i });
      await page.waitForFunction(() => window.seen >= 6);
      await page.evaluate(() => new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r))));
    }
    if (name === 'settings') await page.locator('#system-list li').first().waitFor();
    if (name === 'api-keys') {
      await page.locator('#keys-body tr', { hasText: 'ci-publisher' }).waitFor();
      await page.locator('#alerts li', { hasText: 'ci-publisher' }).waitFor();
      await page.getByLabel('Name', { exact: true }).fill('deploy-bot');
      await page.getByRole('button', { name: 'Create key' }).click();
      await page.locator('#keys-body tr', { hasText: 'deploy-bot' }).waitFor();
      await page.locator('#alerts li', { hasText: 'deploy-bot' }).waitFor();
    }
    // Let row highlights fade and drop the toasts before the picture.
    await page.waitForFunction(() => document.getAnimations().every((a) => a.playState !== 'running'), null, { timeout: WAIT_MS });
    await page.evaluate(() => document.querySelectorAll('#notifications .toast').forEach((t) => t.remove()));
    await browser.screenshot(name);
  }

  await page.setViewportSize({ width: 390, height: 844 });
  for (const name of ['dashboard', 'tasks']) {
    await page.goto(server.base + '/' + name + '.html');
    await indicator(page, /^Connected$/);
    if (name === 'tasks') await page.locator('tr[data-task-id="task-1005"]').waitFor();
    else await until(async () => (await page.locator('#stat-tasks').innerText()) === '5', 'five tasks counted');
    await browser.screenshot(name + '-mobile');
  }
  await page.setViewportSize({ width: 1280, height: 800 });

  for (const name of ['index', 'login', 'signup']) {
    await page.goto(server.base + (name === 'index' ? '/' : '/' + name + '.html'));
    await page.locator('h1').waitFor();
    assert.equal(await page.locator('#ws-status').count(), 0, name + ' has no WebSocket indicator');
    await browser.screenshot(name);
  }
});
