// A `rate_limited` answer's `retry_after` (seconds; heartbeatd sends it from its per-connection
// subscribe bucket, docs/protocol.md "Errors") is the least wait before the subscription asks
// again; a value that is not a number from 0 to 60 is ignored (a hostile server must not stall
// the client), and a wait that ends past subscribeRetryTimeout fails the subscription at the
// deadline without a pointless try.  A given-up subscription's error counts its `unavailable`
// and `rate_limited` refusals apart.

import assert from 'node:assert/strict';
import { afterEach, beforeEach, describe, it } from 'node:test';

import { connect, ServerError, SubscriptionRateLimitedError, SubscriptionUnavailableError } from '../index.js';
import { MAX_RETRY_AFTER, retryAfterDelay } from '../src/backoff.js';
import { serverError } from '../src/connection.js';
import { suiteDaemon } from './helpers/daemon.js';
import { SessionServer } from './helpers/session_server.js';

const FAST = { minReconnectDelay: 10, maxReconnectDelay: 20, timeout: 5000 };

/** `retry_after` values a hostile or broken server might send: each must be ignored. */
const IGNORED = [-1, -0.001, 60.001, 1e9, 1e308, '0.5', null, true, [1], { s: 1 }];

it('retryAfterDelay: a finite number of seconds from 0 to 60, in ms; anything else null', () => {
  assert.equal(MAX_RETRY_AFTER, 60);
  assert.equal(retryAfterDelay(0.25), 250);
  assert.equal(retryAfterDelay(0), 0);
  assert.equal(retryAfterDelay(60), 60_000);
  assert.equal(retryAfterDelay(0.001), 1);
  for (const value of [...IGNORED, undefined, NaN, Infinity, -Infinity]) {
    assert.equal(retryAfterDelay(value), null, `${JSON.stringify(value)} was honoured`);
  }
});

it('a ServerError carries the error object\'s retry_after in ms, or null', () => {
  const limited = serverError({ code: 'rate_limited', message: 'slow down', retry_after: 0.25 });
  assert.ok(limited instanceof ServerError);
  assert.deepEqual([limited.code, limited.message, limited.retryAfter], ['rate_limited', 'slow down', 250]);
  assert.equal(serverError({ code: 'nope', message: 'x' }).retryAfter, null);
  for (const value of IGNORED) {
    assert.equal(serverError({ code: 'rate_limited', message: '', retry_after: value }).retryAfter, null);
  }
  assert.equal(new ServerError('x', 'y').retryAfter, null); // the two-argument form still works
});

it('the given-up errors count each kind of refusal; a number is all of the one kind', () => {
  const cause = new ServerError('rate_limited', 'slow down', 500);
  const mixed = new SubscriptionRateLimitedError('news', 900, { unavailable: 2, rate_limited: 3 }, 800, cause);
  assert.deepEqual([mixed.attempts, mixed.unavailableAttempts, mixed.rateLimitedAttempts], [5, 2, 3]);
  assert.match(mixed.message, /5 attempts: 2 unavailable, 3 rate_limited/);
  assert.equal(mixed.retryAfter, 500);
  const old = new SubscriptionUnavailableError('news', 900, 4, 800, new ServerError('unavailable', 'down'));
  assert.deepEqual([old.attempts, old.unavailableAttempts, old.rateLimitedAttempts], [4, 4, 0]);
  const limited = new SubscriptionRateLimitedError('news', 900, 2, 800, cause);
  assert.deepEqual([limited.attempts, limited.unavailableAttempts, limited.rateLimitedAttempts], [2, 0, 2]);
});

describe('against the scripted server', () => {
  let server;
  beforeEach(async () => {
    server = await new SessionServer({ sessions: false }).start();
  });
  afterEach(async () => {
    await server.stop();
  });

  /** The times (performance.now()) the server received each subscribe to `channel`. */
  const subscribes = (channel) => server.log.filter((e) => e.message.type === 'subscribe' && e.message.data?.channel === channel).map((e) => e.at);

  it('the next subscribe waits at least retry_after, though the backoff is shorter', { timeout: 10_000 }, async () => {
    const client = await connect(server.url, FAST);
    try {
      server.subscribeRateLimited = [0.3, 0.2];
      const refusals = [];
      const sub = client.subscribe('news', { onError: (e) => refusals.push(e) });
      const context = await sub.ready();
      assert.equal(context.channel, 'news');
      assert.deepEqual(refusals.map((e) => [e.code, e.retryAfter]), [['rate_limited', 300], ['rate_limited', 200]]);
      const [first, second, third] = subscribes('news');
      // The refusal left the server at once; 1 ms for the timers' rounding.
      assert.ok(second - first >= 299, `asked again after ${second - first} ms`);
      assert.ok(third - second >= 199, `asked again after ${third - second} ms`);
      assert.equal(subscribes('news').length, 3);
    } finally {
      await client.close();
    }
  });

  it('a retry_after that is not a number from 0 to 60 is ignored: the backoff decides', { timeout: 10_000 }, async () => {
    const client = await connect(server.url, FAST);
    try {
      server.subscribeRateLimited = [...IGNORED];
      const refusals = [];
      const started = performance.now();
      const sub = client.subscribe('news', { onError: (e) => refusals.push(e) });
      await sub.ready();
      assert.equal(refusals.length, IGNORED.length);
      for (const e of refusals) assert.equal(e.retryAfter, null);
      // Ten tries at 10..20 ms each: nowhere near the 1e9 s (or 60 s) asked for.
      const elapsed = performance.now() - started;
      assert.ok(elapsed < 3000, `took ${elapsed} ms`);
    } finally {
      await client.close();
    }
  });

  it('without retry_after (an older server) the backoff decides, as before', { timeout: 10_000 }, async () => {
    const client = await connect(server.url, FAST);
    try {
      server.subscribeRateLimited = [undefined, undefined];
      const refusals = [];
      await client.subscribe('news', { onError: (e) => refusals.push(e) }).ready();
      assert.deepEqual(refusals.map((e) => [e.code, e.retryAfter]), [['rate_limited', null], ['rate_limited', null]]);
      const [first, , third] = subscribes('news');
      assert.ok(third - first < 1000, `two retries took ${third - first} ms`);
    } finally {
      await client.close();
    }
  });

  it('a retry_after past subscribeRetryTimeout fails the subscription at the deadline, with no more tries', { timeout: 10_000 }, async () => {
    const client = await connect(server.url, { ...FAST, subscribeRetryTimeout: 200 });
    try {
      server.subscribeUnavailable = 2;
      server.subscribeRateLimited = [5];
      const refusals = [];
      const started = performance.now();
      const sub = client.subscribe('news', { onError: (e) => refusals.push(e) });
      const error = await sub.ready().then(
        () => assert.fail('subscribed'),
        (e) => e,
      );
      const elapsed = performance.now() - started;
      assert.ok(error instanceof SubscriptionRateLimitedError, String(error));
      assert.equal(error.code, 'rate_limited');
      assert.equal(error.cause.retryAfter, 5000);
      assert.deepEqual([error.attempts, error.unavailableAttempts, error.rateLimitedAttempts], [3, 2, 1]);
      assert.ok(elapsed >= 195 && elapsed < 2000, `gave up after ${elapsed} ms`);
      assert.ok(error.elapsed >= 195, `error.elapsed ${error.elapsed}`);
      assert.equal(sub.state, 'failed');
      assert.deepEqual(refusals.map((e) => e.code), ['unavailable', 'unavailable', 'rate_limited', 'rate_limited']);
      assert.equal(refusals.at(-1), error);
      assert.equal(subscribes('news').length, 3); // none after the 5 s wait began
      assert.equal(sub._retryTimer, null);
      assert.equal(await client.request('echo', 'still here'), 'still here');
    } finally {
      await client.close();
    }
  });

  it('a reconnect asks again at once: the wait was for the old connection\'s budget', { timeout: 10_000 }, async () => {
    const client = await connect(server.url, FAST);
    try {
      server.subscribeRateLimited = [30];
      const refusals = [];
      const sub = client.subscribe('news', { onError: (e) => refusals.push(e) });
      while (refusals.length === 0) await new Promise((resolve) => setTimeout(resolve, 5));
      assert.equal(refusals[0].retryAfter, 30_000);
      server.cut();
      assert.equal((await sub.ready()).channel, 'news');
      assert.equal(subscribes('news').length, 2);
    } finally {
      await client.close();
    }
  });
});

describe('against heartbeatd (channels.subscribe_rate 2/s, burst 1)', () => {
  const suite = suiteDaemon({ channels: { subscribe_rate: 2.0, subscribe_burst: 1 } });

  it('the daemon\'s retry_after is the wait: one refusal, then subscribed', { timeout: 20_000 }, async () => {
    const client = await connect(suite.daemon.url, FAST);
    try {
      await client.subscribe('first').ready(); // the bucket's only token
      const refusals = [];
      const sub = client.subscribe('second', { onError: (e) => refusals.push(e) });
      assert.equal((await sub.ready()).channel, 'second');
      assert.equal(refusals.length, 1, refusals.map(String).join('; '));
      const { code, retryAfter } = refusals[0];
      assert.equal(code, 'rate_limited');
      // 500 ms at 2/s, less the few ms between the two subscribes; whole ms.
      assert.ok(retryAfter > 300 && retryAfter <= 500 && Number.isInteger(retryAfter), String(retryAfter));
    } finally {
      await client.close();
    }
  });
});
