// The resumable client (`resumable: true`) against a scripted server of the session contract
// (helpers/session_server.js): the test decides when the connection drops, what is lost on
// the wire and when replies come, so every path of the client's session runs the same way
// each time.  The end-to-end tests against heartbeatd are in resumable_daemon.test.js.

import assert from 'node:assert/strict';
import { afterEach, beforeEach, it } from 'node:test';

import {
  Client,
  connect,
  ConnectionError,
  DEFAULTS,
  QueueFullError,
  ServerError,
  SessionLost,
  SessionUnavailableError,
  SubscriptionUnavailableError,
  TimeoutError,
} from '../index.js';
import { nextEvent, until } from './helpers/daemon.js';
import { SessionServer } from './helpers/session_server.js';

const QUICK = { minReconnectDelay: 10, maxReconnectDelay: 50, timeout: 5000, resumable: true };

let server;
beforeEach(async () => {
  server = await new SessionServer().start();
});
afterEach(async () => {
  await server.stop();
});

/** The messages the server received on connection `conn` (all when omitted), as [type, seq]. */
const received = (conn) => server.log.filter((e) => conn === undefined || e.conn === conn).map((e) => [e.message.type, e.message.seq]);

it('starts a session after connecting and numbers its requests from 1', async () => {
  const client = new Client(server.url, QUICK);
  const started = nextEvent(client, 'session');
  await client.open();
  try {
    const event = await started;
    assert.equal(event.session, server.session.id);
    assert.equal(event.expiry, 120);
    assert.equal(client.session, server.session.id);
    assert.equal(await client.request('echo', 'a'), 'a');
    assert.equal(await client.request('echo', 'b'), 'b');
    assert.deepEqual(received(1), [['session', undefined], ['echo', 1], ['echo', 2]]);
    // The piggybacked acks emptied the resend buffer.
    assert.deepEqual(client._session.buffer, []);
  } finally {
    await client.close();
  }
});

it('sessionExpiry is asked for; bad values are refused up front', async () => {
  const client = await connect(server.url, { ...QUICK, sessionExpiry: 30 });
  try {
    assert.equal(server.session.expiry, 30);
  } finally {
    await client.close();
  }
  assert.throws(() => new Client(server.url, { resumable: 'yes' }), TypeError);
  assert.throws(() => new Client(server.url, { resumable: true, sessionExpiry: 0 }), RangeError);
});

it('a pending request survives a reconnect; a push sent meanwhile arrives once, after resumed', async () => {
  const client = await connect(server.url, QUICK);
  try {
    const events = [];
    client.on('news', (data) => events.push(['news', data]));
    client.on('resumed', (event) => events.push(['resumed', event.replayed]));
    server.push(server.session, 'news', 1);
    await until(() => events.length === 1, client, ['news']);
    const pending = client.request('later', 'x');
    await waitFor(() => server.session.later.length === 1);
    const lost = nextEvent(client, 'disconnected');
    server.cut();
    await lost;
    server.answerLater(server.session); // while detached: kept for the replay
    server.push(server.session, 'news', 2);
    assert.equal(await pending, 'x');
    await until(() => events.length === 3, client, ['news']);
    assert.deepEqual(events, [['news', 1], ['resumed', 2], ['news', 2]]);
    // Not subscribed again, not started again: resumed with the ack of what arrived.
    const resume = server.log.find((e) => e.message.type === 'resume');
    assert.equal(resume.message.data.ack, 1);
    assert.equal(server.sessions.size, 1);
  } finally {
    await client.close();
  }
});

it('a pending request waits across reconnects until its own timeout; its late reply is dropped', async () => {
  const client = await connect(server.url, QUICK);
  try {
    const pushes = [];
    client.onPush((type) => pushes.push(type));
    const started = Date.now();
    const pending = client.request('later', 'x', { timeout: 400 });
    await waitFor(() => server.session.later.length === 1);
    server.cut();
    await nextEvent(client, 'resumed');
    await assert.rejects(pending, TimeoutError);
    assert.ok(Date.now() - started >= 390);
    server.answerLater(server.session);
    assert.equal(await client.request('echo', 'next'), 'next');
    assert.deepEqual(pushes, []); // the late reply is not a push
  } finally {
    await client.close();
  }
});

it('a request that failed before it left is never sent: not connected in time, or a write that threw', async () => {
  const client = await connect(server.url, { ...QUICK, minReconnectDelay: 300, maxReconnectDelay: 300 });
  try {
    assert.equal(await client.request('echo', 1), 1);
    const lost = nextEvent(client, 'disconnected');
    server.cut();
    await lost;
    // No connection within its timeout: the application is told, and may retry it.
    await assert.rejects(client.request('transfer', { amount: 100 }, { timeout: 20 }), TimeoutError);
    await nextEvent(client, 'resumed');
    // The connection closes under a write: that request fails, its seq is not spent.
    const conn = client.connection;
    const sendText = conn.sendText;
    conn.sendText = () => {
      throw new ConnectionError('the connection is closed');
    };
    await assert.rejects(client.request('transfer', { amount: 200 }), ConnectionError);
    conn.sendText = sendText;
    assert.equal(await client.request('echo', 2), 2);
    server.cut();
    await nextEvent(client, 'resumed');
    assert.equal(await client.request('echo', 3), 3);
    assert.deepEqual(
      received().filter(([type]) => type !== 'ack'),
      [['session', undefined], ['echo', 1], ['resume', undefined], ['echo', 2], ['resume', undefined], ['echo', 3]],
    );
  } finally {
    await client.close();
  }
});

it('maxBuffered bounds what waits for the server\'s ack: past it a request rejects, send throws', async () => {
  const client = await connect(server.url, { ...QUICK, maxBuffered: 2 });
  try {
    assert.equal(client.options.maxBuffered, 2);
    const held = [client.request('later', 1), client.request('later', 2)]; // run, not acked yet
    await waitFor(() => server.session.later.length === 2);
    const full = await client.request('echo', 3).catch((error) => error);
    assert.ok(full instanceof QueueFullError, String(full));
    assert.equal(full.option, 'maxBuffered');
    assert.equal(full.limit, 2);
    assert.throws(() => client.send('note', 'x'), QueueFullError);
    assert.equal(client._session.buffer.length, 2);
    server.answerLater(server.session); // the replies carry the server's ack: room again
    assert.deepEqual(await Promise.all(held), [1, 2]);
    assert.equal(await client.request('echo', 3), 3);
    assert.deepEqual(
      received().filter(([type]) => type !== 'ack'),
      [['session', undefined], ['later', 1], ['later', 2], ['echo', 3]],
    );
  } finally {
    await client.close();
  }
  assert.equal(DEFAULTS.maxBuffered, 10_000);
  assert.throws(() => new Client(server.url, { resumable: true, maxBuffered: 0 }), RangeError);
  assert.throws(() => new Client(server.url, { resumable: true, maxBuffered: 1.5 }), RangeError);
});

it('a request lost on the wire is resent with the same seq after the resume, and answered once', async () => {
  const client = await connect(server.url, QUICK);
  try {
    assert.equal(await client.request('echo', 1), 1);
    server.loseOnWire.add('echo');
    const pending = [client.request('echo', 2), client.request('echo', 3)];
    await waitFor(() => received().filter(([t]) => t === 'echo').length === 3);
    server.loseOnWire.clear();
    server.cut();
    assert.deepEqual(await Promise.all(pending), [2, 3]);
    assert.equal(await client.request('echo', 4), 4);
    const conn2 = server.log.at(-1).conn;
    assert.deepEqual(received(conn2), [['resume', undefined], ['echo', 2], ['echo', 3], ['echo', 4]]);
  } finally {
    await client.close();
  }
});

it('a replay of what already arrived is dropped: every push exactly once, in order', async () => {
  server.replayAll = true; // a server that replays from the start, ignoring the resume's ack
  const client = await connect(server.url, QUICK);
  try {
    const got = [];
    client.on('n', (n) => got.push(n));
    for (let n = 1; n <= 5; n++) server.push(server.session, 'n', n);
    await until(() => got.length === 5, client, ['n']);
    server.cut();
    await nextEvent(client, 'resumed');
    for (let n = 6; n <= 7; n++) server.push(server.session, 'n', n);
    await until(() => got.length === 7, client, ['n']);
    assert.deepEqual(got, [1, 2, 3, 4, 5, 6, 7]);
  } finally {
    await client.close();
  }
});

it('acks: batched by 32, then 200 ms after the first unacked push; and on close', async () => {
  const client = await connect(server.url, QUICK);
  const session = server.session;
  const got = [];
  client.on('n', (n) => got.push(n));
  for (let n = 1; n <= 40; n++) server.push(session, 'n', n);
  await until(() => got.length === 40, client, ['n']);
  await waitFor(() => session.acks.length === 2);
  assert.deepEqual(session.acks, [32, 40]);
  server.push(session, 'n', 41);
  await until(() => got.length === 41, client, ['n']);
  await client.close(); // before the 200 ms: the final ack goes out with the close
  await waitFor(() => server.log.some((e) => e.message.type === 'session_end'));
  assert.deepEqual(session.acks, [32, 40, 41]);
  assert.equal(server.sessions.size, 0); // session_end: the server forgets it now
});

it('resumed: false: pending requests fail with SessionLost, a new session, subscriptions again', async () => {
  const client = await connect(server.url, QUICK);
  try {
    const order = [];
    client.on('session_lost', (event) => order.push(['session_lost', event.reason]));
    client.on('session', () => order.push(['session']));
    const sub = client.subscribe('room');
    await sub.ready();
    const first = server.session.id;
    const pending = client.request('later', 'never answered');
    await waitFor(() => server.session.later.length === 1);
    server.forget(); // a daemon restart
    server.cut();
    await assert.rejects(pending, (e) => e instanceof SessionLost && e instanceof ConnectionError && e.reason === 'unknown_session');
    await nextEvent(sub, 'subscribed');
    assert.deepEqual(order, [['session_lost', 'unknown_session'], ['session']]);
    assert.notEqual(server.session.id, first);
    assert.equal(client.session, server.session.id);
    const conn2 = server.log.at(-1).conn;
    assert.deepEqual(received(conn2), [['resume', undefined], ['session', undefined], ['subscribe', 1]]);
    assert.equal(await client.request('echo', 'on'), 'on');
  } finally {
    await client.close();
  }
});

it('session_taken_over: session_lost, never resumed again, a fresh session', async () => {
  const client = await connect(server.url, QUICK);
  try {
    const pending = client.request('later', 'x');
    await waitFor(() => server.session.later.length === 1);
    const lost = nextEvent(client, 'session_lost');
    const fresh = nextEvent(client, 'session', 5000);
    const taken = server.session;
    server.takeOver(taken);
    assert.deepEqual(await lost, { session: taken.id, reason: 'session_taken_over' });
    await assert.rejects(pending, (e) => e instanceof SessionLost && e.reason === 'session_taken_over');
    await fresh;
    assert.equal(server.log.filter((e) => e.message.type === 'resume').length, 0);
  } finally {
    await client.close();
  }
});

it('subscription_lost after a resume: the client subscribes again from its last offset', async () => {
  const client = await connect(server.url, QUICK);
  try {
    const errors = [];
    const sub = client.subscribe('room', { onError: (e) => errors.push(e.code) });
    await sub.ready();
    server.cut();
    await nextEvent(client, 'resumed');
    const again = nextEvent(sub, 'subscribed');
    server.push(server.session, 'subscription_lost', { channel: 'room', reason: 'unavailable' });
    const context = await again;
    assert.equal(context.wasRecovering, true);
    assert.deepEqual(errors, ['unavailable']);
    assert.deepEqual(
      server.log.filter((e) => e.message.type === 'subscribe').map((e) => e.message.data),
      [{ channel: 'room' }, { channel: 'room', since: { epoch: 'e1', offset: 0 } }],
    );
  } finally {
    await client.close();
  }
});

it('a resume answer acknowledging seqs never sent: session lost (out_of_sync), a new one', async () => {
  const client = await connect(server.url, QUICK);
  try {
    assert.equal(await client.request('echo', 1), 1);
    const lost = nextEvent(client, 'session_lost');
    const fresh = nextEvent(client, 'session');
    server.session.inHigh = 99; // a server that lost track: our next messages would be "duplicates"
    server.cut();
    assert.equal((await lost).reason, 'out_of_sync');
    await fresh;
    assert.equal(await client.request('echo', 2), 2);
  } finally {
    await client.close();
  }
});

it('a seq skipped by the server: the client drops the connection and resumes again', async () => {
  const client = await connect(server.url, QUICK);
  try {
    const got = [];
    client.on('n', (n) => got.push(n));
    client.on('bogus', () => got.push('bogus'));
    server.push(server.session, 'n', 1);
    await until(() => got.length === 1, client, ['n']);
    server.gapOnce = true;
    server.cut();
    await nextEvent(client, 'resumed');
    await waitFor(() => server.log.filter((e) => e.message.type === 'resume').length === 2);
    server.push(server.session, 'n', 2);
    await until(() => got.length === 2, client, ['n']);
    assert.deepEqual(got, [1, 2]);
    assert.equal(await client.request('echo', 'fine'), 'fine');
  } finally {
    await client.close();
  }
});

it('goaway: the session requests in flight are answered before the client closes', async () => {
  const client = await connect(server.url, QUICK);
  try {
    const pending = client.request('later', 'drained');
    await waitFor(() => server.session.later.length === 1);
    const disconnected = [];
    client.on('disconnected', () => disconnected.push(server.session.later.length));
    server.goaway(server.session);
    await nextEvent(client, 'goaway');
    const queued = client.request('echo', 'queued'); // waits for the next connection
    // The connection is still up, waiting for the reply: it answers a ping.
    server._write(server.session.socket, { type: 'ping', id: 'probe' });
    await waitFor(() => server.log.some((e) => e.message.type === 'pong') || server.connections > 1);
    assert.deepEqual(server.log.filter((e) => e.message.type === 'pong').map((e) => e.conn), [1]);
    server.answerLater(server.session);
    assert.equal(await pending, 'drained');
    assert.equal(await queued, 'queued');
    // The client closed only after the reply had come (later was empty then).
    assert.deepEqual(disconnected, [0]);
    assert.equal(server.log.filter((e) => e.message.type === 'later').length, 1);
    assert.equal(await client.request('echo', 'after'), 'after');
  } finally {
    await client.close();
  }
});

it('session start refused as unavailable: the attempt fails and the next one gets a session', async () => {
  server.unavailable = 2;
  const client = new Client(server.url, QUICK);
  const errors = [];
  client.on('error', (e) => errors.push(e.code));
  await client.open();
  try {
    assert.deepEqual(errors, ['unavailable', 'unavailable']);
    assert.equal(client.session, server.session.id);
    assert.equal(server.connections, 3);
  } finally {
    await client.close();
  }
  server.unavailable = 1;
  await assert.rejects(connect(server.url, QUICK), (e) => e.code === 'unavailable'); // fail fast
});

// A node whose session store never comes back must not hold open() or the session's requests
// for ever: after sessionRetryTimeout ms of `unavailable` the client gives up, with a reason.
// (A deadline of 300 ms and reconnect delays of 10-50 ms keep these fast; no sleeps.)

it('resumes answered unavailable for sessionRetryTimeout: session_lost and a typed error, no more tries', { timeout: 10_000 }, async () => {
  const client = await connect(server.url, { ...QUICK, sessionRetryTimeout: 300 });
  try {
    assert.equal(await client.request('echo', 1), 1);
    const pending = client.request('later', 'never answered', { timeout: 10_000 });
    await waitFor(() => server.session.later.length === 1);
    server.resumeUnavailable = Infinity; // the store is down for good
    const errors = [];
    client.on('error', (e) => errors.push(e));
    const lost = nextEvent(client, 'session_lost', 5000);
    const started = Date.now();
    server.cut();
    const event = await lost;
    const elapsed = Date.now() - started;
    assert.equal(event.reason, 'unavailable');
    assert.ok(event.error instanceof SessionUnavailableError);
    assert.ok(event.error instanceof ConnectionError);
    assert.equal(event.error.reason, 'unavailable');
    assert.equal(event.error.limit, 300);
    assert.ok(event.error.attempts >= 2, `only ${event.error.attempts} attempts`);
    assert.ok(event.error.elapsed >= 300, `gave up after ${event.error.elapsed} ms`);
    assert.ok(elapsed >= 300 && elapsed < 3000, `gave up ${elapsed} ms after the cut`);
    assert.match(event.error.message, /unavailable.*sessionRetryTimeout is 300 ms/);
    // The request that waited in the session fails, saying why; the client stopped trying.
    await assert.rejects(pending, (e) => e instanceof SessionLost && e.reason === 'unavailable');
    assert.equal(client.state, 'disconnected');
    assert.equal(client.session, null);
    assert.ok(client.lastError instanceof SessionUnavailableError);
    assert.ok(errors.at(-1) instanceof SessionUnavailableError);
    const resumes = server.log.filter((e) => e.message.type === 'resume').length;
    assert.equal(resumes, event.error.attempts);
    await assert.rejects(client.request('echo', 2), (e) => e instanceof ConnectionError && e.cause === client.lastError);
    // open() starts again: the store is back, a new session.
    server.resumeUnavailable = 0;
    const fresh = nextEvent(client, 'session');
    await client.open();
    await fresh;
    assert.equal(await client.request('echo', 3), 3);
    assert.equal(server.log.filter((e) => e.message.type === 'resume').length, resumes);
  } finally {
    await client.close();
  }
});

it('session starts answered unavailable for sessionRetryTimeout: open() rejects with SessionUnavailableError', { timeout: 10_000 }, async () => {
  server.unavailable = Infinity;
  const client = new Client(server.url, { ...QUICK, sessionRetryTimeout: 200 });
  const queued = client.request('echo', 'queued', { timeout: 10_000 });
  const started = Date.now();
  try {
    const error = await client.open().then(
      () => assert.fail('open() resolved'),
      (e) => e,
    );
    assert.ok(error instanceof SessionUnavailableError, String(error));
    assert.ok(Date.now() - started < 3000);
    assert.ok(error.attempts >= 2);
    assert.equal(error.cause?.code, 'unavailable'); // the server's last answer
    await assert.rejects(queued, (e) => e === error);
    assert.equal(server.connections, error.attempts);
  } finally {
    await client.close();
  }
});

it('an unavailable spell shorter than sessionRetryTimeout: the session resumes, nothing lost', { timeout: 10_000 }, async () => {
  const client = await connect(server.url, { ...QUICK, sessionRetryTimeout: 5000 });
  try {
    const lost = [];
    client.on('session_lost', ({ reason }) => lost.push(reason));
    assert.equal(await client.request('echo', 1), 1);
    server.resumeUnavailable = 3;
    const resumed = nextEvent(client, 'resumed');
    server.cut();
    await resumed;
    assert.equal(await client.request('echo', 2), 2);
    assert.deepEqual(lost, []);
    assert.equal(server.log.filter((e) => e.message.type === 'resume').length, 4);
  } finally {
    await client.close();
  }
});

it('past sessionRetryTimeout, attempts that fail otherwise back off as usual (no busy loop)', { timeout: 10_000 }, async () => {
  const client = await connect(server.url, { ...QUICK, minReconnectDelay: 50, maxReconnectDelay: 60, sessionRetryTimeout: 100 });
  try {
    server.resumeUnavailable = 1;
    const refused = nextEvent(client, 'error');
    server.cut();
    assert.match((await refused).message, /unavailable/);
    const deadline = performance.now() + 100;
    await server.stop(); // from now on every connect is refused: no unavailable answer ends it
    const attempts = [];
    client.on('connecting', () => attempts.push(performance.now()));
    const after = () => attempts.filter((t) => t > deadline);
    await until(() => after().length >= 4, client, ['connecting'], 5000);
    const late = after();
    for (let i = 1; i < late.length; i++) assert.ok(late[i] - late[i - 1] >= 45, `attempts ${Math.round(late[i] - late[i - 1])} ms apart`);
  } finally {
    await client.close();
  }
});

it('sessionRetryTimeout is checked: a number of ms, or Infinity', () => {
  assert.equal(DEFAULTS.sessionRetryTimeout, 60_000);
  for (const bad of [0, -1, NaN, '5', 2 ** 31]) {
    assert.throws(() => new Client(server.url, { ...QUICK, sessionRetryTimeout: bad }), RangeError);
  }
  new Client(server.url, { ...QUICK, sessionRetryTimeout: Infinity }); // never gives up
});

// Every wait of a subscription has a deadline: a subscribe answered `unavailable` (the
// cluster's broker is down) is retried for subscribeRetryTimeout ms, not for ever; a subscribe
// in a session gets `timeout` ms on each connection, and a resume in the middle is no timeout.

for (const resumable of [false, true]) {
  it(`subscribes answered unavailable for subscribeRetryTimeout: the subscription fails, typed, no more tries (resumable: ${resumable})`, { timeout: 10_000 }, async () => {
    const client = await connect(server.url, { ...QUICK, resumable, subscribeRetryTimeout: 300 });
    try {
      server.subscribeUnavailable = Infinity; // the broker is down for good
      const errors = [];
      const started = Date.now();
      const sub = client.subscribe('room', { onError: (e) => errors.push(e) });
      const error = await sub.ready().then(
        () => assert.fail('ready() resolved'),
        (e) => e,
      );
      const elapsed = Date.now() - started;
      assert.ok(error instanceof SubscriptionUnavailableError, String(error));
      assert.ok(error instanceof ServerError); // as a refused subscribe is
      assert.equal(error.code, 'unavailable');
      assert.equal(error.channel, 'room');
      assert.equal(error.limit, 300);
      assert.ok(error.attempts >= 2, `only ${error.attempts} attempts`);
      assert.ok(error.elapsed >= 300, `gave up after ${error.elapsed} ms`);
      assert.ok(elapsed >= 300 && elapsed < 3000, `gave up ${elapsed} ms after subscribing`);
      assert.equal(error.cause?.code, 'unavailable'); // the server's last answer
      assert.match(error.message, /unavailable.*room.*subscribeRetryTimeout is 300 ms/);
      assert.equal(sub.state, 'failed');
      await assert.rejects(sub.ready(), (e) => e === error);
      // Each refusal was an error event; the last one is the typed error.
      assert.equal(errors.length, error.attempts);
      assert.ok(errors.slice(0, -1).every((e) => e.code === 'unavailable' && !(e instanceof SubscriptionUnavailableError)));
      assert.equal(errors.at(-1), error);
      // No retry is planned, none was sent after the last refusal; the connection is fine.
      assert.equal(sub._retryTimer, null);
      const subscribes = () => server.log.filter((e) => e.message.type === 'subscribe').length;
      assert.equal(subscribes(), error.attempts);
      assert.equal(await client.request('echo', 'still up'), 'still up');
      assert.equal(subscribes(), error.attempts);
      assert.equal(client.state, 'connected');
      // Subscribing again is the application's call: the broker is back, it works.
      server.subscribeUnavailable = 0;
      const again = client.subscribe('room');
      assert.equal((await again.ready()).channel, 'room');
      assert.equal(subscribes(), error.attempts + 1);
    } finally {
      await client.close();
    }
  });
}

it('an unavailable spell shorter than subscribeRetryTimeout: subscribed, and the count starts afresh', { timeout: 10_000 }, async () => {
  const client = await connect(server.url, { ...QUICK, resumable: false, subscribeRetryTimeout: 5000 });
  try {
    const errors = [];
    server.subscribeUnavailable = 3;
    const sub = client.subscribe('room', { onError: (e) => errors.push(e.code) });
    await sub.ready();
    assert.deepEqual(errors, ['unavailable', 'unavailable', 'unavailable']);
    assert.equal(sub._unavailableSince, null);
    assert.equal(sub._refusals, null); // the counts of each kind of refusal
  } finally {
    await client.close();
  }
});

it('a subscribe answered unavailable, then a resume before its retry: it is subscribed on the resumed connection', { timeout: 10_000 }, async () => {
  // The retry (after 155 ms) falls while the client is away (a goaway: back after 500 ms);
  // the resumed session does not hold the subscription, so the resume must subscribe it.
  const client = await connect(server.url, { ...QUICK, minReconnectDelay: 150, maxReconnectDelay: 160, random: () => 0.5 });
  try {
    server.subscribeUnavailable = 1;
    const sub = client.subscribe('room');
    const refused = nextEvent(sub, 'error');
    sub.on('error', () => server.goaway(server.session, 1));
    assert.equal((await refused).code, 'unavailable');
    await nextEvent(client, 'resumed', 5000);
    const context = await nextEvent(sub, 'subscribed', 5000);
    assert.equal(context.channel, 'room');
    const subscribes = server.log.filter((e) => e.message.type === 'subscribe').map((e) => e.conn);
    assert.deepEqual(subscribes, [1, 2]);
  } finally {
    await client.close();
  }
});

it('a subscribe in a session the server never answers: TimeoutError, a new connection, unsubscribed and subscribed again', { timeout: 10_000 }, async () => {
  const client = await connect(server.url, { ...QUICK, timeout: 300 });
  try {
    server.subscribeSilent = 1; // taken, never answered
    const errors = [];
    const sub = client.subscribe('room', { onError: (e) => errors.push(e) });
    const started = Date.now();
    const timedOut = nextEvent(sub, 'error', 5000);
    const resumed = nextEvent(client, 'resumed', 5000);
    const error = await timedOut;
    assert.ok(error instanceof TimeoutError, String(error));
    assert.ok(Date.now() - started >= 290);
    await resumed;
    await nextEvent(sub, 'subscribed', 5000);
    assert.equal(sub.state, 'subscribed');
    assert.deepEqual(errors, [error]); // no already_subscribed: the server had it
    // The same session, resumed; the server holds one subscription to room.
    assert.equal(server.sessions.size, 1);
    assert.deepEqual([...server.session.channels], ['room']);
    assert.deepEqual(
      server.log.filter((e) => !['ack', 'ping'].includes(e.message.type)).map((e) => [e.conn, e.message.type]),
      [[1, 'session'], [1, 'subscribe'], [2, 'resume'], [2, 'unsubscribe'], [2, 'subscribe']],
    );
  } finally {
    await client.close();
  }
});

it('a session subscribe across a reconnect longer than timeout: no false timeout, subscribed once', { timeout: 10_000 }, async () => {
  // Away 400 ms with a timeout of 300: the deadline counts only while the session is attached.
  const client = await connect(server.url, { ...QUICK, timeout: 300, minReconnectDelay: 400, maxReconnectDelay: 400 });
  try {
    server.subscribeSilent = 1;
    const errors = [];
    const sub = client.subscribe('room', { onError: (e) => errors.push(e) });
    await waitFor(() => server.session.heldSubscribes.length === 1);
    const resumed = nextEvent(client, 'resumed', 5000);
    server.cut();
    await resumed;
    server.answerSubscribes(server.session); // the answer comes on the resumed connection
    await nextEvent(sub, 'subscribed', 5000);
    assert.deepEqual(errors, []);
    assert.deepEqual(
      server.log.filter((e) => ['subscribe', 'unsubscribe', 'resume'].includes(e.message.type)).map((e) => [e.conn, e.message.type]),
      [[1, 'subscribe'], [2, 'resume']],
    );
  } finally {
    await client.close();
  }
});

it('a session subscribe the server dropped when the connection went (not_subscribed in the replay): subscribed again', { timeout: 10_000 }, async () => {
  // heartbeatd answers a subscribe still locating its channel when the session detaches with
  // not_subscribed ("unsubscribed meanwhile"), replayed on resume: not a refusal.
  const client = await connect(server.url, QUICK);
  try {
    server.subscribeSilent = 1;
    const errors = [];
    const sub = client.subscribe('room', { onError: (e) => errors.push(e.code) });
    await waitFor(() => server.session.heldSubscribes.length === 1);
    const lost = nextEvent(client, 'disconnected');
    server.cut();
    await lost;
    server.failSubscribes(server.session, 'not_subscribed'); // kept for the replay
    const context = await nextEvent(sub, 'subscribed', 5000);
    assert.equal(context.channel, 'room');
    assert.equal(sub.state, 'subscribed');
    assert.deepEqual(errors, []);
    assert.deepEqual(
      server.log.filter((e) => ['subscribe', 'unsubscribe', 'resume'].includes(e.message.type)).map((e) => [e.conn, e.message.type]),
      [[1, 'subscribe'], [2, 'resume'], [2, 'subscribe']],
    );
  } finally {
    await client.close();
  }
});

it('not_subscribed to a subscribe on its own connection is a refusal: the subscription fails', { timeout: 10_000 }, async () => {
  const client = await connect(server.url, QUICK);
  try {
    server.subscribeSilent = 1;
    const sub = client.subscribe('room');
    await waitFor(() => server.session.heldSubscribes.length === 1);
    server.failSubscribes(server.session, 'not_subscribed');
    await assert.rejects(sub.ready(), (e) => e instanceof ServerError && e.code === 'not_subscribed');
    assert.equal(sub.state, 'failed');
    assert.equal(server.log.filter((e) => e.message.type === 'subscribe').length, 1);
  } finally {
    await client.close();
  }
});

it('subscribeRetryTimeout is checked: a number of ms, or Infinity', () => {
  assert.equal(DEFAULTS.subscribeRetryTimeout, 60_000);
  for (const bad of [0, -1, NaN, '5', 2 ** 31]) {
    assert.throws(() => new Client(server.url, { ...QUICK, subscribeRetryTimeout: bad }), RangeError);
  }
  new Client(server.url, { ...QUICK, subscribeRetryTimeout: Infinity }); // never gives up
});

it('a server without sessions: the client goes on as a plain one', async () => {
  await server.stop();
  server = await new SessionServer({ sessions: false }).start();
  const client = new Client(server.url, QUICK);
  const errors = [];
  client.on('error', (e) => errors.push(e.code));
  await client.open();
  try {
    assert.equal(client.session, null);
    assert.equal(await client.request('echo', 'plain'), 'plain');
    assert.deepEqual(errors, ['unknown_type']);
  } finally {
    await client.close();
  }
});

/** Poll a condition of the fake server (its state changes on socket events we do not see). */
async function waitFor(predicate, timeout = 5000) {
  const deadline = Date.now() + timeout;
  while (!predicate()) {
    if (Date.now() > deadline) throw new Error('condition not met in time');
    await new Promise((resolve) => setImmediate(resolve));
  }
}
