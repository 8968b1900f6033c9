// The browser-test harness: a real agentcast server (the debug binary) on a free
// loopback port with its own DATA_DIR, tokens minted by `agentcast token`, and
// Debian's chromium driven by playwright-core with a fresh profile per test.
//
// Every wait is bounded and waits for an event (a health answer, an element, a
// text), never a fixed time, so a loaded machine makes tests slower, not flaky.

'use strict';

const { spawn, execFileSync } = require('node:child_process');
const fs = require('node:fs');
const net = require('node:net');
const os = require('node:os');
const path = require('node:path');
const { chromium } = require('playwright-core');

const ROOT = path.resolve(__dirname, '..', '..');
/** The debug binary of `cargo build` (which honours CARGO_TARGET_DIR), or AGENTCAST_BIN. */
const TARGET = process.env.CARGO_TARGET_DIR ? path.resolve(ROOT, process.env.CARGO_TARGET_DIR) : path.join(ROOT, 'target');
const BIN = process.env.AGENTCAST_BIN || path.join(TARGET, 'debug', 'agentcast');
const CHROMIUM = process.env.CHROMIUM_PATH || '/usr/bin/chromium';
const SCREENSHOTS = path.join(__dirname, 'screenshots');
/** The longest a single expected event may take on a loaded 2-core machine. */
const WAIT_MS = 15000;
const JWT_SECRET = 'e2e-secret-' + Math.random().toString(36).slice(2) + '-0123456789';
const ADMIN_PASSWORD = 'e2e-admin-password-' + Math.random().toString(36).slice(2);

/** What Chrome logs for a connection to a server that is down, or while offline. */
const NETWORK_DOWN = /WebSocket connection to '[^']*' failed|net::ERR_(CONNECTION_REFUSED|CONNECTION_RESET|CONNECTION_CLOSED|EMPTY_RESPONSE|INTERNET_DISCONNECTED)/;

function freePort() {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.unref();
    server.on('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
  });
}

async function until(check, what, limitMs = WAIT_MS) {
  const deadline = Date.now() + limitMs;
  for (;;) {
    try {
      if (await check()) return;
    } catch (e) { /* not yet */ }
    if (Date.now() > deadline) throw new Error('timed out waiting for ' + what);
    await new Promise((r) => setTimeout(r, 100));
  }
}

/** One agentcast process; `restart()` keeps the port and DATA_DIR. `env`: extra settings. */
class Server {
  constructor({ env = {} } = {}) {
    this.env = env;
    this.dataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'agentcast-e2e-'));
    this.port = null;
    this.child = null;
    this.log = '';
  }

  get base() { return 'http://127.0.0.1:' + this.port; }

  async start() {
    if (!fs.existsSync(BIN)) throw new Error(BIN + ' is missing: run `cargo build` first');
    if (this.port === null) this.port = await freePort();
    const child = spawn(BIN, ['serve', '--bind', '127.0.0.1', '--port', String(this.port)], {
      env: Object.assign({}, process.env, this.env, {
        DATA_DIR: this.dataDir,
        JWT_SECRET,
        ADMIN_PASSWORD,
        RUST_LOG: process.env.RUST_LOG || 'info',
        LOG_FORMAT: 'pretty'
      }),
      stdio: ['ignore', 'pipe', 'pipe']
    });
    this.child = child;
    const keep = (chunk) => { this.log = (this.log + chunk.toString()).slice(-20000); };
    child.stdout.on('data', keep);
    child.stderr.on('data', keep);
    child.exited = new Promise((resolve) => child.on('exit', (code, signal) => resolve({ code, signal })));
    await until(async () => {
      if (child.exitCode !== null) throw new Error('server exited: ' + this.log);
      const response = await fetch(this.base + '/health');
      return response.ok;
    }, 'the server to answer /health').catch((e) => {
      throw new Error(e.message + '\n--- server log ---\n' + this.log);
    });
  }

  /** SIGTERM and wait for the drain (SPEC §1: exit 0 within SHUTDOWN_TIMEOUT). */
  async stop() {
    const child = this.child;
    if (!child || child.exitCode !== null) return;
    child.kill('SIGTERM');
    const result = await Promise.race([
      child.exited,
      new Promise((r) => setTimeout(() => r(null), WAIT_MS))
    ]);
    if (result === null) {
      child.kill('SIGKILL');
      throw new Error('server did not exit within ' + WAIT_MS + ' ms of SIGTERM');
    }
    this.child = null;
    return result;
  }

  async restart() {
    await this.stop();
    await this.start();
  }

  async dispose() {
    try { await this.stop(); } finally { fs.rmSync(this.dataDir, { recursive: true, force: true }); }
  }

  /** `agentcast token` with this server's secret. */
  token(sub, role = 'user', extra = []) {
    return execFileSync(BIN, ['token', '--sub', sub, '--role', role].concat(extra), {
      env: Object.assign({}, process.env, { JWT_SECRET, DATA_DIR: this.dataDir })
    }).toString().trim();
  }

  /** A token signed with another secret: well-formed, unexpired, refused. */
  forgedToken(sub) {
    return execFileSync(BIN, ['token', '--sub', sub, '--role', 'admin'], {
      env: Object.assign({}, process.env, { JWT_SECRET: 'not-the-server-secret-0123456789', DATA_DIR: this.dataDir })
    }).toString().trim();
  }

  async request(method, urlPath, token, body) {
    const headers = {};
    if (token) headers.Authorization = 'Bearer ' + token;
    if (body !== undefined) headers['Content-Type'] = 'application/json';
    const response = await fetch(this.base + urlPath, {
      method, headers, body: body === undefined ? undefined : JSON.stringify(body)
    });
    const text = await response.text();
    let json = null;
    try { json = JSON.parse(text); } catch (e) { json = null; }
    return { status: response.status, body: json, text };
  }

  /** A broadcast that must be accepted (202). */
  async broadcast(token, type, data) {
    const result = await this.request('POST', '/api/v1/ws/broadcast', token, { type, data });
    if (result.status !== 202) throw new Error('broadcast refused: ' + result.status + ' ' + result.text);
    return result.body;
  }

  /** A message to the subscribers of one channel (POST /api/v1/ws/channel/:channel) that must be accepted. */
  async publish(token, channel, type, data) {
    const result = await this.request('POST', '/api/v1/ws/channel/' + channel, token, { type, data });
    if (result.status !== 202) throw new Error('channel publish refused: ' + result.status + ' ' + result.text);
    return result.body;
  }

  /** A real login (POST /api/v1/auth/login): the whole answer, {token, expires_at, expires_in, user}. */
  async login(username, password) {
    const result = await this.request('POST', '/api/v1/auth/login', null, { username, password });
    if (result.status !== 200) throw new Error('login refused: ' + result.status + ' ' + result.text);
    return result.body;
  }
}

/**
 * A fresh browser profile with checks on every page it opens: console errors,
 * uncaught exceptions, CSP violations, requests to anything but 127.0.0.1, and
 * a token in a WebSocket URL all end up in `problems`.
 */
async function openBrowser(server) {
  const profile = fs.mkdtempSync(path.join(os.tmpdir(), 'agentcast-chromium-'));
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: CHROMIUM,
    headless: true,
    args: [
      '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'
    ],
    viewport: { width: 1280, height: 800 }
  });
  const problems = [];
  const state = { serverDown: false, refusals: [] };
  await context.addInitScript(() => {
    document.addEventListener('securitypolicyviolation', (e) => {
      console.error('CSP violation: ' + e.violatedDirective + ' blocked ' + e.blockedURI);
    });
  });
  const watch = (page) => {
    page.on('console', (msg) => {
      if (msg.type() !== 'error') return;
      const url = msg.location() && msg.location().url ? new URL(msg.location().url) : null;
      // Chrome also logs each failed connection attempt while a test holds the server down.
      if (state.serverDown && NETWORK_DOWN.test(msg.text())) return;
      // A refusal the test provokes on purpose (a wrong password) is logged by Chrome too.
      if (url && state.refusals.some((r) => r.path === url.pathname && msg.text().includes('status of ' + r.status))) return;
      problems.push('console error on ' + page.url() + ': ' + msg.text());
    });
    page.on('pageerror', (error) => problems.push('uncaught exception on ' + page.url() + ': ' + error.message));
    page.on('request', (request) => {
      const url = new URL(request.url());
      if (url.protocol !== 'data:' && url.hostname !== '127.0.0.1') problems.push('request left the server: ' + request.url());
    });
    page.on('websocket', (ws) => {
      const url = new URL(ws.url());
      if (url.hostname !== '127.0.0.1') problems.push('websocket left the server: ' + ws.url());
      if (url.searchParams.has('token')) problems.push('token in a WebSocket URL');
    });
  };
  context.on('page', watch);
  context.pages().forEach(watch);
  const page = context.pages()[0] || await context.newPage();
  page.setDefaultTimeout(WAIT_MS);

  return {
    context,
    page,
    problems,
    /**
     * While true, the browser's own logs of failed connections (the server is
     * stopped on purpose) are expected, not problems.
     */
    set serverDown(value) { state.serverDown = value; },
    /** The test provokes `status` from `path` on purpose: Chrome's log of it is expected. */
    expectRefusal(path, status) { state.refusals.push({ path, status }); },
    /** Stores `token` like a login would, then opens `urlPath`. */
    async login(token, urlPath) {
      await page.goto(server.base + '/login.html');
      await page.evaluate((t) => localStorage.setItem('token', t), token);
      if (urlPath) await page.goto(server.base + urlPath);
    },
    /** Lets the page write and the test read the clipboard (the copy button). */
    async allowClipboard() {
      await context.grantPermissions(['clipboard-read', 'clipboard-write'], { origin: server.base });
    },
    async screenshot(name) {
      fs.mkdirSync(SCREENSHOTS, { recursive: true });
      await page.screenshot({ path: path.join(SCREENSHOTS, name + '.png'), fullPage: true });
    },
    async close() {
      await context.close();
      fs.rmSync(profile, { recursive: true, force: true });
    }
  };
}

/** Waits until the status indicator's text matches `pattern`. */
async function indicator(page, pattern) {
  await page.waitForFunction((source) => {
    const text = document.getElementById('ws-status-text');
    return text && new RegExp(source).test(text.textContent);
  }, pattern.source, { timeout: WAIT_MS });
}

module.exports = { Server, openBrowser, indicator, until, WAIT_MS, ADMIN_PASSWORD };
