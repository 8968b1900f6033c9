// Unit tests of websocket.js's channel bookkeeping (SPEC §4.4, §7) in node, over a
// scripted fake WebSocket: what it sends after each connect, which frames reach
// which handler, and that channel seqs and the tenant resume position stay apart.
// The browser tests (pages.test.js) run the same code against the real server.

'use strict';

const { test } = require('node:test');
const assert = require('node:assert/strict');
const fs = require('node:fs');
const path = require('node:path');
const vm = require('node:vm');

const SOURCE = fs.readFileSync(path.join(__dirname, '..', '..', 'static', 'js', 'websocket.js'), 'utf8');

/** A token websocket.js accepts (it only reads `exp`). */
function token() {
  const part = (o) => Buffer.from(JSON.stringify(o)).toString('base64url');
  return part({ alg: 'HS256' }) + '.' + part({ sub: 'u', exp: Math.floor(Date.now() / 1000) + 3600 }) + '.sig';
}

/** websocket.js in a fresh fake window; returns the client and its sockets. */
function load() {
  const sockets = [];
  class FakeSocket {
    constructor(url, protocols) {
      this.url = url;
      this.protocols = protocols;
      this.readyState = 1;
      this.sent = [];
      sockets.push(this);
    }
    send(text) { this.sent.push(JSON.parse(text)); }
    close() { this.readyState = 3; }
    /** The server sends a frame. */
    deliver(frame) { this.onmessage({ data: JSON.stringify(frame) }); }
    /** The server closes the connection. */
    drop(code) { this.readyState = 3; this.onclose({ code, reason: '' }); }
  }
  const timers = [];
  const window = {
    WebSocket: FakeSocket,
    location: { protocol: 'http:', host: 'test', pathname: '/', search: '', assign() {} },
    localStorage: { getItem: () => token(), setItem() {} },
    document: { addEventListener() {}, getElementById: () => null },
    addEventListener() {},
    setTimeout: (fn, ms) => { timers.push({ fn, ms }); return timers.length; },
    clearTimeout: (id) => { if (timers[id - 1]) timers[id - 1].fn = null; },
    atob: (b64) => Buffer.from(b64, 'base64').toString('binary'),
    fetch: () => Promise.resolve({ ok: false })
  };
  vm.runInNewContext(SOURCE, { window, Promise, JSON, Math, Date, Map, Object, Array, String, TypeError });
  const client = window.Agentcast.connect({ indicator: false, notifications: false, loginUrl: null });
  return { client, sockets, timers };
}

const connected = (seq = 10) => ({ type: 'connected', data: { connection_id: 'c', epoch: 'T1', seq, heartbeat_s: 25 } });
const frame = (channel, seq, type = 'log', data = {}) => ({ type, data, id: 'id' + seq, seq, ts: '2026-12-03T00:00:00.000Z', channel });
const subscribes = (socket) => socket.sent.filter((f) => f.type === 'subscribe').map((f) => f.data);

test('subscribe is sent after connected, with since/epoch, and again after a reconnect from the last seq', () => {
  const { client, sockets } = load();
  const got = [];
  client.subscribe('task:a', (msg) => got.push(msg.seq), { since: 3, epoch: 'E' });
  client.subscribe('run:1', () => {});
  assert.deepEqual(subscribes(sockets[0]), [], 'nothing before `connected`');
  sockets[0].deliver(connected());
  assert.deepEqual(subscribes(sockets[0]), [{ channel: 'task:a', since: 3, epoch: 'E' }, { channel: 'run:1' }]);

  sockets[0].deliver(frame('task:a', 4));
  sockets[0].deliver({ type: 'subscribed', data: { channel: 'task:a', epoch: 'E', from: 3, to: 4, count: 1, complete: true } });
  sockets[0].deliver({ type: 'subscribed', data: { channel: 'run:1', epoch: 'R', from: 7, to: 7, count: 0, complete: true } });
  sockets[0].deliver(frame('task:a', 5));
  assert.deepEqual(got, [4, 5]);
  assert.deepEqual({ ...client.channel('task:a') }, { seq: 5, epoch: 'E', subscribed: true });

  sockets[0].drop(1012);
  client.connect(); // what the retry timer does
  sockets[1].deliver(connected());
  assert.deepEqual(subscribes(sockets[1]), [{ channel: 'task:a', since: 5, epoch: 'E' }, { channel: 'run:1', since: 7, epoch: 'R' }]);
  // A replay overlapping what was seen delivers nothing twice.
  sockets[1].deliver(frame('task:a', 5));
  sockets[1].deliver(frame('task:a', 6));
  sockets[1].deliver(frame('task:a', 6));
  assert.deepEqual(got, [4, 5, 6]);
});

test('channel frames reach their handler only, and never move the tenant resume position', () => {
  const { client, sockets } = load();
  const byType = [];
  const any = [];
  const a = [];
  const b = [];
  client.on('log', (m) => byType.push(m));
  client.on('*', (m) => any.push(m));
  client.subscribe('task:a', (m) => a.push(m.seq));
  client.subscribe('task:b', (m) => b.push(m.seq));
  sockets[0].deliver(connected(10));
  sockets[0].deliver(frame('task:a', 500));
  sockets[0].deliver(frame('task:b', 1));
  sockets[0].deliver(frame('nobody:x', 2));
  assert.deepEqual([a, b], [[500], [1]]);
  assert.deepEqual([byType.length, any.length], [0, 0], 'no type handler sees a channel frame');
  assert.equal(client.lastSeq, 10, 'the tenant since is untouched');
  // A tenant message with a seq lower than any channel's still arrives.
  sockets[0].deliver({ type: 'log', data: {}, id: 't', seq: 11, ts: '2026-12-03T00:00:00.000Z' });
  assert.equal(byType.length, 1);
  assert.equal(client.lastSeq, 11);
  assert.deepEqual(a, [500]);
});

test('complete:false calls onReset with the subscribed data; the resume goes on from its head', () => {
  const { client, sockets } = load();
  const resets = [];
  client.subscribe('task:a', () => {}, { since: 40, epoch: 'old', onReset: (ch, data) => resets.push([ch, data.epoch, data.to]) });
  sockets[0].deliver(connected());
  sockets[0].deliver({ type: 'subscribed', data: { channel: 'task:a', epoch: 'new', from: 40, to: 2, count: 0, complete: false } });
  assert.deepEqual(resets, [['task:a', 'new', 2]]);
  assert.deepEqual({ ...client.channel('task:a') }, { seq: 2, epoch: 'new', subscribed: true });
});

test('unsubscribe sends the frame and drops the channel\'s later frames; errors go to onError', () => {
  const { client, sockets } = load();
  const got = [];
  const errors = [];
  const onError = (ch, data) => errors.push([ch, data.code]);
  client.subscribe('task:a', (m) => got.push(m.seq), { onError });
  client.subscribe('task:secret', () => {}, { onError });
  sockets[0].deliver(connected());
  sockets[0].deliver({ type: 'error', data: { code: 'forbidden', message: 'no', channel: 'task:secret' } });
  sockets[0].deliver({ type: 'error', data: { code: 'too_many_subscriptions', message: 'max 64', channel: 'task:a' } });
  assert.deepEqual(errors, [['task:secret', 'forbidden'], ['task:a', 'too_many_subscriptions']]);
  assert.equal(client.channel('task:secret'), null, 'a forbidden channel is not asked for again');

  client.unsubscribe('task:a');
  assert.deepEqual(sockets[0].sent.at(-1), { type: 'unsubscribe', data: { channel: 'task:a' } });
  sockets[0].deliver(frame('task:a', 9));
  assert.deepEqual(got, []);
  assert.throws(() => client.subscribe('task:*', () => {}), TypeError);
});

test('many channels are subscribed in paced batches, within the frame-rate burst', () => {
  const { client, sockets, timers } = load();
  for (let i = 0; i < 64; i++) client.subscribe('task:t' + i, () => {});
  sockets[0].deliver(connected());
  const first = subscribes(sockets[0]).length;
  assert.ok(first > 0 && first < 50, first + ' at once');
  // Let the pacer run (its timers, at least one allowance apart).
  const realNow = Date.now;
  let now = realNow();
  try {
    Date.now = () => now;
    for (let round = 0; round < 100 && subscribes(sockets[0]).length < 64; round++) {
      const timer = timers.filter((t) => t.fn && t.ms < 1000).at(-1);
      if (!timer) break;
      const fn = timer.fn;
      timer.fn = null;
      now += timer.ms;
      fn();
    }
  } finally {
    Date.now = realNow;
  }
  assert.equal(new Set(subscribes(sockets[0]).map((d) => d.channel)).size, 64);
});
