// The resumable client against a real heartbeatd, over tcp and ws, through a proxy that cuts
// the connection mid-stream: requests in flight are answered once, pushes and publications
// arrive exactly once and in order, no handler runs twice, nothing is subscribed again; and
// when the daemon restarts (sessions in memory are gone) the session_lost path.  Then a
// small chaos run: cuts at random while messages flow both ways.

import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';

import { Client, connect, SessionLost } from '../index.js';
import { CutProxy } from './helpers/cut_proxy.js';
import { nextEvent, tempDir, until } from './helpers/daemon.js';
import { daemonFor, endpoint, WEBSOCKET } from './helpers/transports.js';

const tmp = tempDir();
let daemon;

before(async () => {
  // History long enough that a resumed subscription always recovers what it missed (a
  // shorter one gives a `resync`, as the contract says; the chaos test would count a gap).
  const channels = { client_publish: true, history_size: 100_000 };
  daemon = daemonFor(false, { handlers: ['jstest_handlers'], channels }, { dir: tmp.path });
  await daemon.start();
});

after(async () => {
  await daemon?.kill();
  tmp.cleanup();
});

/** A resumable client reaching the daemon over `transport` through a CutProxy. */
async function throughProxy(transport, extra = {}) {
  const port = transport === 'tcp' ? daemon.port : daemon.wsPort;
  const proxy = await new CutProxy(port).start();
  const [url, options] = endpoint(transport, { port: proxy.port, wsPort: proxy.port }, null, {
    resumable: true,
    minReconnectDelay: 20,
    maxReconnectDelay: 100,
    ...extra,
  });
  const client = await connect(url, options);
  return { proxy, client };
}

const TRANSPORTS = WEBSOCKET ? ['tcp', 'ws'] : ['tcp'];

for (const transport of TRANSPORTS) {
  describe(`over ${transport}`, () => {
    it('a cut mid-stream: replies, pushes and publications exactly once, in order; no handler twice', async () => {
      const { proxy, client } = await throughProxy(transport);
      const publisher = await connect(...endpoint('tcp', daemon, null));
      try {
        const events = [];
        client.on('resumed', ({ replayed }) => events.push(['resumed', replayed]));
        client.on('session_lost', ({ reason }) => events.push(['session_lost', reason]));
        const started = [];
        client.on('slow_started', (data) => started.push(data));
        const pushes = [];
        client.on('p', (n) => pushes.push(n));
        const channel = `feed-${transport}`;
        const seen = [];
        const subscribed = [];
        const sub = client.subscribe(channel, {
          onPublication: ({ offset, data }) => seen.push([offset, data]),
          onSubscribed: (context) => subscribed.push(context),
        });
        await sub.ready();

        // In flight at the cut: slow handlers (they answer while we are away), echoes, pushes.
        const slow = [0.3, 0.4].map((s) => client.request('slow', s));
        const echoes = Array.from({ length: 20 }, (_, i) => client.request('echo', i));
        const pushed = client.request('push_me', { type: 'p', data: 'x', count: 30 });
        await until(() => started.length === 2, client, ['slow_started']);
        const lost = nextEvent(client, 'disconnected');
        assert.ok(proxy.cut() >= 1);
        await lost;
        for (let n = 1; n <= 5; n++) await publisher.publish(channel, `missed ${n}`);

        assert.deepEqual(await Promise.all(slow), ['finally', 'finally']);
        assert.deepEqual(await Promise.all(echoes), Array.from({ length: 20 }, (_, i) => i));
        assert.equal(await pushed, 'pushed');
        await until(() => seen.length === 5, sub, ['publication']);
        await publisher.publish(channel, 'after');
        await until(() => seen.length === 6, sub, ['publication']);

        assert.equal(events.length, 1, JSON.stringify(events));
        assert.equal(events[0][0], 'resumed');
        assert.deepEqual(started, [0.3, 0.4]); // each slow handler ran once
        assert.deepEqual(pushes, Array(30).fill('x'));
        assert.deepEqual(seen, [...[1, 2, 3, 4, 5].map((n) => [n, `missed ${n}`]), [6, 'after']]);
        assert.equal(subscribed.length, 1); // resumed, not subscribed again
        assert.equal(proxy.accepted, 2);
      } finally {
        await Promise.all([client.close(), publisher.close()]);
        await proxy.stop();
      }
    });
  });
}

it('the daemon restarts: pending requests fail with SessionLost, a new session, subscribed again', async () => {
  const { proxy, client } = await throughProxy('tcp');
  try {
    const order = [];
    client.on('session_lost', ({ reason }) => order.push(`session_lost ${reason}`));
    client.on('session', () => order.push('session'));
    client.on('resumed', () => order.push('resumed'));
    const subscribed = [];
    const sub = client.subscribe('restart', { onSubscribed: (context) => subscribed.push(context) });
    await sub.ready();
    const first = client.session;
    const started = nextEvent(client, 'slow_started');
    const pending = client.request('slow', 30);
    await started;
    const lost = nextEvent(client, 'disconnected');
    await daemon.restart();
    proxy.cut();
    await lost;
    await assert.rejects(pending, (e) => e instanceof SessionLost && typeof e.reason === 'string');
    await until(() => subscribed.length === 2, sub, ['subscribed']);
    assert.equal(order[0].startsWith('session_lost '), true, JSON.stringify(order));
    assert.equal(order[1], 'session');
    assert.notEqual(client.session, first);
    assert.equal(subscribed[1].wasRecovering, true);
    assert.equal(await client.request('echo', 'again'), 'again');
  } finally {
    await client.close();
    await proxy.stop();
  }
});

it('half-open: the server still holds the old connection; the resume takes the session over', async () => {
  const { proxy, client } = await throughProxy('tcp');
  try {
    const lost = [];
    client.on('session_lost', (e) => lost.push(e));
    const started = nextEvent(client, 'slow_started');
    const pending = client.request('slow', 0.2);
    await started;
    const resumed = nextEvent(client, 'resumed');
    assert.equal(proxy.freeze(), 1); // the daemon's side stays open, silent
    assert.equal(await pending, 'finally');
    await resumed;
    assert.equal(await client.request('echo', 'on'), 'on');
    assert.deepEqual(lost, []);
  } finally {
    await client.close();
    await proxy.stop();
  }
});

it('session_taken_over on a live connection: the client is told and starts afresh', async () => {
  const { proxy, client } = await throughProxy('tcp');
  const [url, options] = endpoint('tcp', daemon, null, { resumable: true });
  const thief = new Client(url, options);
  try {
    assert.equal(await client.request('echo', 1), 1);
    const lost = nextEvent(client, 'session_lost');
    const fresh = nextEvent(client, 'session');
    // Another client holding the session's id and key (as after a half-open connection).
    thief._session.start({ session: client.session, key: client._session.key, expiry: 120 });
    Object.assign(thief._session, { nextSeq: client._session.nextSeq, received: client._session.received });
    thief._session.detach();
    const resumed = nextEvent(thief, 'resumed');
    await thief.open();
    await resumed;
    const { session, reason } = await lost;
    assert.equal(reason, 'session_taken_over');
    assert.equal(session, thief.session);
    await fresh;
    assert.notEqual(client.session, thief.session);
    assert.equal(await client.request('echo', 2), 2);
    assert.equal(await thief.request('echo', 3), 3);
  } finally {
    await Promise.all([client.close(), thief.close()]);
    await proxy.stop();
  }
});

for (const transport of TRANSPORTS) {
  it(`chaos over ${transport}: random cuts while requests, pushes and publications flow: each once, in order`, async () => {
    const { proxy, client } = await throughProxy(transport);
    const publisher = await connect(...endpoint('tcp', daemon, null));
    let cutter = null;
    try {
      const seen = [];
      const sub = client.subscribe(`chaos-${transport}`, { onPublication: ({ offset }) => seen.push(offset) });
      const resyncs = [];
      sub.on('resync', (r) => resyncs.push(r));
      const pushes = [];
      client.on('p', (n) => pushes.push(n));
      await sub.ready();
      const lostSessions = [];
      client.on('session_lost', (e) => lostSessions.push(e.reason));
      let cuts = 0;
      const cutLater = () => {
        cutter = setTimeout(() => {
          cuts += proxy.cut() > 0 ? 1 : 0;
          cutLater();
        }, 20 + Math.random() * 130);
      };
      cutLater();
      let stop = false;
      const publishing = (async () => {
        let n = 0;
        while (!stop) await publisher.publish(`chaos-${transport}`, ++n);
        return n;
      })();
      // Requests in windows of 20 in flight, each window with 5 pushes from the server, until
      // enough cuts happened: each answered once, with its own data.
      const replies = [];
      let sent = 0;
      let windows = 0;
      while (sent < 400 || cuts < 5) {
        const batch = Array.from({ length: 20 }, (_, i) => client.request('once', `${transport} ${sent + i}`));
        const pushed = client.request('push_me', { type: 'p', data: windows, count: 5 });
        sent += 20;
        windows += 1;
        replies.push(...(await Promise.all(batch)));
        assert.equal(await pushed, 'pushed');
      }
      stop = true;
      const published = await publishing;
      clearTimeout(cutter);
      cutter = null;
      await until(() => seen.length >= published, sub, ['publication'], 20_000);
      assert.deepEqual(replies, Array(sent).fill(1)); // every handler ran exactly once
      assert.deepEqual(seen, Array.from({ length: published }, (_, i) => i + 1));
      assert.deepEqual(pushes, Array.from({ length: windows * 5 }, (_, i) => Math.floor(i / 5)));
      assert.deepEqual(resyncs, []);
      assert.deepEqual(lostSessions, []);
    } finally {
      clearTimeout(cutter);
      await Promise.all([client.close(), publisher.close()]);
      await proxy.stop();
    }
  });
}
