// The pure parts: reconnect delays, heartbeat terms from a hello, the envelope, the emitter,
// and a subscription's exactly-once bookkeeping.  No socket, no timer.

import assert from 'node:assert/strict';
import { test } from 'node:test';

import { Client, connect, ConnectionError, TimeoutError } from '../index.js';
import { goawayDelay, heartbeatTerms, MIN_HEARTBEAT_INTERVAL, reconnectDelay } from '../src/backoff.js';
import { Emitter } from '../src/emitter.js';
import { decodeMessage, encodeMessage, MalformedMessage } from '../src/envelope.js';
import { ServerError } from '../src/errors.js';
import { Subscription } from '../src/subscription.js';
import { parseUrl } from '../src/transport.js';

test('reconnect delays: full jitter between min and min(max, min * 2^attempt)', () => {
  assert.equal(reconnectDelay(1, 500, 20_000, () => 0), 500);
  assert.equal(reconnectDelay(1, 500, 20_000, () => 0.5), 750);
  assert.equal(reconnectDelay(3, 500, 20_000, () => 1), 4000);
  assert.equal(reconnectDelay(10, 500, 20_000, () => 1), 20_000);
  assert.equal(reconnectDelay(10_000, 500, 20_000, () => 1), 20_000); // no overflow
  assert.equal(reconnectDelay(0, 500, 20_000, () => 1), 1000); // attempt 0 counts as 1
  const seen = new Set(Array.from({ length: 200 }, () => Math.floor(reconnectDelay(6, 100, 10_000) / 100)));
  assert.ok(seen.size > 30, 'delays are spread, not in lockstep');
});

test('heartbeat terms from the hello are clamped: no flood, no timer overflow', () => {
  assert.deepEqual(heartbeatTerms({ interval: 10, timeout: 30 }), { interval: 10_000, timeout: 30_000 });
  // A hostile or misconfigured server cannot make the client ping a thousand times a second.
  assert.deepEqual(heartbeatTerms({ interval: 0.001, timeout: 0.002 }), {
    interval: MIN_HEARTBEAT_INTERVAL,
    timeout: 2 * MIN_HEARTBEAT_INTERVAL,
  });
  assert.equal(MIN_HEARTBEAT_INTERVAL, 1000);
  // The timeout leaves room for one ping.
  assert.deepEqual(heartbeatTerms({ interval: 5, timeout: 1 }), { interval: 5000, timeout: 10_000 });
  assert.deepEqual(heartbeatTerms({ interval: 4 }), { interval: 4000, timeout: 12_000 });
  // setInterval fires at once past 2**31 - 1 ms: huge intervals stop at a day.
  assert.equal(heartbeatTerms({ interval: 1e12, timeout: 1e13 }).interval, 86_400_000);
  assert.ok(heartbeatTerms({ interval: 1e12, timeout: 1e13 }).timeout < 2 ** 31);
  for (const bad of [undefined, null, {}, { interval: 0 }, { interval: -1 }, { interval: 'x' }, { interval: NaN }, { interval: Infinity }]) {
    assert.equal(heartbeatTerms(bad), null, JSON.stringify(bad));
    assert.deepEqual(heartbeatTerms(bad, { interval: 1, timeout: 2 }), { interval: 1, timeout: 2 });
  }
});

test('goaway delay: a random moment within reconnect_after, bounded', () => {
  assert.equal(goawayDelay({ reconnect_after: 5 }, () => 0.5), 2500);
  assert.equal(goawayDelay({ reconnect_after: 1e9 }, () => 1), 300_000);
  assert.equal(goawayDelay({}, () => 1), 0);
  assert.equal(goawayDelay({ reconnect_after: 'soon' }, () => 1), 0);
});

test('envelopes: encode, decode, and what is not one', () => {
  assert.equal(encodeMessage('echo', { a: 1 }, 7), '{"type":"echo","id":7,"data":{"a":1}}');
  assert.equal(encodeMessage('ping'), '{"type":"ping"}');
  assert.deepEqual(decodeMessage(new TextEncoder().encode('{"type":"x","id":"hb-1","data":[1]}')), {
    type: 'x', id: 'hb-1', data: [1], error: undefined, bare: false,
  });
  assert.equal(decodeMessage('{"type":"x","id":1.5}').id, undefined); // ids are strings or integers
  for (const bad of ['', 'nope', '[1]', '{"type":""}', '{"type":3}', 'null']) {
    assert.throws(() => decodeMessage(bad), MalformedMessage, bad);
  }
  assert.throws(() => decodeMessage(Uint8Array.of(0x22, 0xff, 0x22)), /UTF-8/);
  assert.deepEqual(decodeMessage('"a date"', true), { type: 'message', id: undefined, data: 'a date', error: undefined, bare: true });
});

test('the emitter: a throwing listener reaches "error", never the caller', () => {
  const e = new Emitter();
  const seen = [];
  e.on('x', () => {
    throw new Error('boom');
  });
  e.on('x', (v) => seen.push(v));
  e.emit('x', 1); // no error listener: dropped
  e.on('error', (err) => seen.push(err.message));
  e.on('error', () => {
    throw new Error('ignored');
  });
  e.emit('x', 2);
  const off = e.once('y', (v) => seen.push(`y${v}`));
  e.emit('y', 1);
  e.emit('y', 2);
  off();
  assert.deepEqual(seen, [1, 'boom', 2, 'y1']);
  assert.equal(e.listenerCount('y'), 0);
});

test('urls: tcp, tls, ws, wss; anything else is a TypeError', () => {
  assert.deepEqual(parseUrl('tcp://127.0.0.1:9000'), { kind: 'stream', secure: false, host: '127.0.0.1', port: 9000, href: 'tcp://127.0.0.1:9000' });
  assert.equal(parseUrl('tls://[::1]:9443').host, '::1');
  assert.equal(parseUrl('wss://example.org/hb').kind, 'websocket');
  for (const bad of ['http://x:1', 'tcp://nohost', 'tcp://h:0', 'nonsense', 'tcp://h:99999']) {
    assert.throws(() => parseUrl(bad), TypeError, bad);
  }
  assert.throws(() => new Client('tcp://h:1', { timeout: 0 }), RangeError);
  assert.throws(() => new Client('tcp://h:1', { framing: 'xml' }), RangeError);
  assert.throws(() => new Client('tcp://h:1', { maxReconnectDelay: 1, minReconnectDelay: 2 }), RangeError);
  assert.throws(() => new Client('tcp://h:1', { maxQueuedRequests: 1.5 }), RangeError);
  assert.throws(() => new Client('tcp://h:1', { getToken: 'token' }), TypeError);
});

test('request timeouts are checked before anything is queued or sent', async () => {
  const client = new Client('tcp://127.0.0.1:1');
  for (const timeout of [0, -1, NaN, 2 ** 31, 'soon']) {
    await assert.rejects(client.request('echo', 1, { timeout }), RangeError);
    await assert.rejects(client.requestValue(1, { timeout }), RangeError);
  }
  await assert.rejects(client.request('', 1), TypeError);
  assert.equal(client.state, 'idle'); // nothing was started
  await client.close();
});

function subscription(options) {
  const seen = [];
  const sub = new Subscription({}, 'news', {
    ...options,
    onPublication: (p) => seen.push(p.offset),
    onSubscribed: (c) => seen.push(`sub:${c.recovered}`),
    onResync: (c) => seen.push(`resync:${c.reason}@${c.offset}`),
  });
  return { sub, seen };
}

test('a subscription never hands the same offset twice, and says what it lost', () => {
  const { sub, seen } = subscription();
  sub._request();
  sub._publication(1, 'early'); // held until the answer
  assert.equal(sub._answered({ epoch: 'e1', offset: 0 }), true);
  sub._publication(2, 'b');
  sub._publication(2, 'again');
  sub._publication(1, 'old');
  sub._publication(5, 'after a gap');
  assert.deepEqual(seen, ['sub:false', 1, 2, 'resync:gap@2', 5]);
  // Reconnect: asks since its position; recovered, and a repeat of 5 is dropped.
  sub._disconnected();
  assert.deepEqual(sub._request(), { channel: 'news', since: { epoch: 'e1', offset: 5 } });
  sub._answered({ epoch: 'e1', offset: 7, recovered: true });
  for (const offset of [5, 6, 7, 7]) sub._publication(offset, offset);
  assert.deepEqual(seen.slice(5), ['sub:true', 6, 7]);
  // A new epoch: not recovered, continue from the answered offset.
  sub._request();
  sub._answered({ epoch: 'e2', offset: 3, recovered: false });
  sub._publication(3, 'old epoch number');
  sub._publication(4, 'new');
  assert.deepEqual(seen.slice(8), ['sub:false', 4]);
  assert.deepEqual(sub.position, { epoch: 'e2', offset: 4 });
  sub._resync({ channel: 'news', epoch: 'e3', offset: 10, reason: 'stream_lost' });
  assert.deepEqual(seen.slice(10), ['resync:stream_lost@10']);
});

test('since, join_leave, and bad options', () => {
  const { sub } = subscription({ since: { epoch: 'e', offset: 4 }, joinLeave: true });
  assert.deepEqual(sub._request(), { channel: 'news', since: { epoch: 'e', offset: 4 }, join_leave: true });
  assert.throws(() => new Subscription({}, 'x', { since: { epoch: 'e' } }), TypeError);
  assert.throws(() => new Subscription({}, '', {}), TypeError);
});

test('connect() to nothing rejects with a ConnectionError; the client is closed', async () => {
  const net = await import('node:net');
  const server = net.createServer();
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address();
  await new Promise((resolve) => server.close(resolve)); // a port nobody listens on
  await assert.rejects(connect(`tcp://127.0.0.1:${port}`, { timeout: 2000 }), ConnectionError);
});

test('a getToken() that never settles times out: an error event, then a retry after backoff', { timeout: 5000 }, async () => {
  const net = await import('node:net');
  const server = net.createServer((s) => s.destroy());
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  let asked = 0;
  const getToken = () => {
    asked += 1;
    return asked === 1 ? new Promise(() => {}) : Promise.reject(new Error('login service down'));
  };
  const client = new Client(`tcp://127.0.0.1:${server.address().port}`, {
    getToken,
    timeout: 200,
    minReconnectDelay: 10,
    maxReconnectDelay: 20,
  });
  const errors = [];
  const twoErrors = new Promise((resolve) => {
    client.on('error', (error) => {
      errors.push(error);
      if (errors.length === 2) resolve();
    });
  });
  try {
    const started = performance.now();
    client.open().catch(() => {});
    await twoErrors;
    assert.ok(performance.now() - started < 2000);
    assert.ok(errors[0] instanceof TimeoutError, String(errors[0]));
    assert.match(errors[0].message, /getToken\(\) gave no token within 200 ms/);
    assert.equal(errors[1].message, 'login service down'); // a rejection: the same path
    assert.equal(asked, 2);
    assert.notEqual(client.state, 'connected');
  } finally {
    await client.close();
    await new Promise((resolve) => server.close(resolve));
  }
});

test('a server that never says hello: connect() times out', async () => {
  const net = await import('node:net');
  const sockets = [];
  const server = net.createServer((s) => sockets.push(s));
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  try {
    const started = performance.now();
    await assert.rejects(connect(`tcp://127.0.0.1:${server.address().port}`, { timeout: 300 }), TimeoutError);
    assert.ok(performance.now() - started < 2000);
  } finally {
    for (const s of sockets) s.destroy();
    await new Promise((resolve) => server.close(resolve));
  }
});

test('a ServerError keeps code and message apart', () => {
  const e = new ServerError('unknown_type', "no handler for type 'nope'");
  assert.equal(e.code, 'unknown_type');
  assert.equal(e.message, "no handler for type 'nope'");
  assert.equal(String(e), "ServerError: unknown_type: no handler for type 'nope'");
});
