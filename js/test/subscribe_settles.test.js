// A subscription's ready() always settles, and its state says how: with `reconnect: false` a
// lost connection (or a failed attempt) fails it with a ConnectionError; a session subscribe
// refused by `maxBuffered` fails with the QueueFullError; a subscribe answered `rate_limited`
// (the daemon's per-connection token bucket, channels.subscribe_rate) is asked again with the
// reconnect backoff, never before its retry_after, for subscribeRetryTimeout ms, then fails
// with SubscriptionRateLimitedError.

import assert from 'node:assert/strict';
import { afterEach, beforeEach, describe, it } from 'node:test';

import {
  Client,
  connect,
  ConnectionError,
  QueueFullError,
  ServerError,
  SessionUnavailableError,
  SubscriptionRateLimitedError,
} from '../index.js';
import { suiteDaemon } from './helpers/daemon.js';
import { SessionServer } from './helpers/session_server.js';

const QUICK = { minReconnectDelay: 10, maxReconnectDelay: 50, timeout: 5000 };

/** The outcome of `promise` within `ms`: `{value}`, `{error}`, or a failed assertion (still pending). */
function settles(promise, what, ms = 3000) {
  let timer;
  const deadline = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new assert.AssertionError({ message: `${what}: still pending after ${ms} ms` })), ms);
  });
  return Promise.race([promise.then((value) => ({ value }), (error) => ({ error })), deadline]).finally(() => clearTimeout(timer));
}

async function waitFor(predicate, ms = 5000) {
  const end = Date.now() + ms;
  while (!predicate()) {
    if (Date.now() > end) throw new Error(`condition not met within ${ms} ms: ${predicate}`);
    await new Promise((resolve) => setImmediate(resolve));
  }
}

describe('against the scripted server', () => {
  let server;
  beforeEach(async () => {
    server = await new SessionServer().start();
  });
  afterEach(async () => {
    await server.stop();
  });

  it('reconnect: false: a lost connection fails every subscription (ConnectionError, state failed)', async () => {
    const client = await connect(server.url, { ...QUICK, reconnect: false });
    try {
      const errors = [];
      const sub = client.subscribe('news', { onError: (e) => errors.push(e) });
      await sub.ready();
      const lost = new Promise((resolve) => client.once('disconnected', resolve));
      server.cut();
      await lost;
      assert.equal(sub.state, 'failed');
      const { error } = await settles(sub.ready(), 'ready() after the connection was lost');
      assert.ok(error instanceof ConnectionError, String(error));
      assert.equal(errors.at(-1), error);
      // A subscribe while disconnected, with nothing that would reconnect: fails at once.
      const late = client.subscribe('late');
      assert.equal(late.state, 'failed');
      const refused = await settles(late.ready(), 'ready() of a subscribe made while disconnected');
      assert.ok(refused.error instanceof ConnectionError, String(refused.error));
      // open() connects again, and a new subscription goes out on it.
      await client.open();
      const again = client.subscribe('news');
      assert.equal((await settles(again.ready(), 'ready() after open()')).value?.channel, 'news');
    } finally {
      await client.close();
    }
  });

  it('reconnect: false, resumable: a subscribe in flight when the connection goes fails', async () => {
    const client = await connect(server.url, { ...QUICK, reconnect: false, resumable: true });
    try {
      server.subscribeSilent = 1; // taken, never answered
      const sub = client.subscribe('news');
      await waitFor(() => server.session.heldSubscribes.length === 1);
      server.cut();
      const { error } = await settles(sub.ready(), 'ready() of a subscribe in flight');
      assert.ok(error instanceof ConnectionError, String(error));
      assert.equal(sub.state, 'failed');
    } finally {
      await client.close();
    }
  });

  it('reconnect: false, resumable: after open() resumes, failed subscriptions are unsubscribed; subscribing again works', async () => {
    const client = await connect(server.url, { ...QUICK, reconnect: false, resumable: true });
    try {
      const news = client.subscribe('news');
      const other = client.subscribe('other');
      await Promise.all([news.ready(), other.ready()]);
      const lost = new Promise((resolve) => client.once('disconnected', resolve));
      server.cut();
      await lost;
      for (const sub of [news, other]) {
        const { error } = await settles(sub.ready(), `ready() of ${sub.channel} after the cut`);
        assert.ok(error instanceof ConnectionError, String(error));
      }
      // The session (and its subscriptions, on the server) lives on: open() resumes it.
      const resumed = new Promise((resolve) => client.once('resumed', resolve));
      const opened = client.open();
      const again = client.subscribe('news'); // while connecting: sent once resumed
      await opened;
      await resumed;
      const { value, error } = await settles(again.ready(), 'ready() of the new subscription');
      assert.equal(error, undefined, String(error)); // not already_subscribed: unsubscribed first
      assert.equal(value.channel, 'news');
      await waitFor(() => !server.session.channels.has('other')); // not resubscribed: unsubscribed
      const sent = server.log.filter((e) => e.conn === 2).map((e) => [e.message.type, e.message.data?.channel]);
      assert.deepEqual(
        sent.filter(([type]) => type === 'unsubscribe' || type === 'subscribe'),
        [['unsubscribe', 'news'], ['subscribe', 'news'], ['unsubscribe', 'other']],
      );
    } finally {
      await client.close();
    }
  });

  it('reconnect: false: a subscribe whose connection attempt fails fails too', async () => {
    const gone = server.url;
    await server.stop();
    server = await new SessionServer().start(); // for afterEach; `gone` refuses connections
    const client = new Client(gone, { ...QUICK, reconnect: false });
    try {
      const sub = client.subscribe('news'); // starts the attempt
      const { error } = await settles(sub.ready(), 'ready() of a subscribe whose attempt failed');
      assert.ok(error instanceof ConnectionError, String(error));
      assert.equal(sub.state, 'failed');
    } finally {
      await client.close();
    }
  });

  it('gave up on an unavailable session store (sessionRetryTimeout): subscriptions fail with its error', { timeout: 10_000 }, async () => {
    server.unavailable = Infinity;
    const client = new Client(server.url, { ...QUICK, resumable: true, sessionRetryTimeout: 200 });
    try {
      const sub = client.subscribe('news'); // starts the attempts
      const opened = await settles(client.open(), 'open()', 5000);
      assert.ok(opened.error instanceof SessionUnavailableError, String(opened.error));
      const { error } = await settles(sub.ready(), 'ready() once the client gave up', 5000);
      assert.equal(error, opened.error);
      assert.equal(sub.state, 'failed');
      const late = client.subscribe('late'); // nothing would send it before open()
      assert.ok((await settles(late.ready(), 'ready() while given up')).error instanceof ConnectionError);
    } finally {
      await client.close();
    }
  });

  it('maxBuffered: a session subscribe that finds the buffer full fails with QueueFullError', async () => {
    const client = await connect(server.url, { ...QUICK, resumable: true, maxBuffered: 2 });
    try {
      const held = [client.request('later', 1), client.request('later', 2)]; // run, not acked yet
      await waitFor(() => server.session.later.length === 2);
      const errors = [];
      const sub = client.subscribe('news', { onError: (e) => errors.push(e) });
      const { error } = await settles(sub.ready(), 'ready() of a subscribe past maxBuffered');
      assert.ok(error instanceof QueueFullError, String(error));
      assert.equal(error.option, 'maxBuffered');
      assert.equal(sub.state, 'failed');
      assert.equal(errors.at(-1), error);
      assert.ok(!server.log.some((e) => e.message.type === 'subscribe'), 'a subscribe went out');
      // Room again once the server acks: subscribing again works.
      server.answerLater(server.session);
      assert.deepEqual(await Promise.all(held), [1, 2]);
      const again = client.subscribe('news');
      assert.equal((await settles(again.ready(), 'ready() once there is room')).value?.channel, 'news');
    } finally {
      await client.close();
    }
  });
});

describe('against heartbeatd (channels.subscribe_rate 2/s, burst 1)', () => {
  const suite = suiteDaemon({ channels: { subscribe_rate: 2.0, subscribe_burst: 1 } });

  it('a subscribe answered rate_limited is asked again after a backoff, and subscribes', { timeout: 20_000 }, async () => {
    const client = await connect(suite.daemon.url, { ...QUICK, minReconnectDelay: 50, maxReconnectDelay: 200 });
    try {
      await client.subscribe('first').ready(); // the bucket's only token
      const refusals = [];
      const sub = client.subscribe('second', { onError: (e) => refusals.push(e) });
      const { value, error } = await settles(sub.ready(), 'ready() after rate_limited', 10_000);
      assert.equal(error, undefined, String(error));
      assert.equal(value.channel, 'second');
      assert.equal(sub.state, 'subscribed');
      assert.ok(refusals.length >= 1, 'the first subscribe was not refused');
      for (const e of refusals) assert.equal(e.code, 'rate_limited'); // what the daemon answers
    } finally {
      await client.close();
    }
  });

  it('rate_limited for subscribeRetryTimeout: SubscriptionRateLimitedError, no more tries', { timeout: 20_000 }, async () => {
    // The token comes back after 500 ms (the refusal's retry_after says so); the client gives
    // up after 100, at the deadline, without asking again before the token is back.
    const client = await connect(suite.daemon.url, { ...QUICK, minReconnectDelay: 10, maxReconnectDelay: 20, subscribeRetryTimeout: 100 });
    try {
      await client.subscribe('first').ready();
      const refusals = [];
      const sub = client.subscribe('second', { onError: (e) => refusals.push(e) });
      const { error } = await settles(sub.ready(), 'ready() of a subscribe refused rate_limited', 10_000);
      assert.ok(error instanceof SubscriptionRateLimitedError, String(error));
      assert.ok(error instanceof ServerError);
      assert.equal(error.code, 'rate_limited');
      assert.equal(error.channel, 'second');
      assert.equal(error.cause?.code, 'rate_limited');
      assert.equal(error.limit, 100);
      assert.equal(error.attempts, 1);
      assert.equal(error.rateLimitedAttempts, 1);
      assert.equal(error.unavailableAttempts, 0);
      assert.ok(error.cause.retryAfter > 300 && error.cause.retryAfter <= 500, String(error.cause.retryAfter));
      assert.ok(error.elapsed >= 95, `gave up after ${error.elapsed} ms`);
      assert.equal(sub.state, 'failed');
      // The answer's own event, then (no answer at the deadline) the error it failed with.
      assert.equal(refusals.length, error.attempts + 1);
      assert.equal(refusals[0], error.cause);
      assert.equal(refusals.at(-1), error);
      assert.equal(sub._retryTimer, null);
      assert.equal(await client.request('echo', 'still here'), 'still here');
    } finally {
      await client.close();
    }
  });
});
