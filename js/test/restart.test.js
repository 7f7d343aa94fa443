// Server restarts and drains, over every transport family: the client comes back by itself.
// A kill (a crash: no goaway) and a SIGTERM (goaway, in-flight requests finish, then the
// client reconnects within reconnect_after) of a real daemon, restarted on the same port(s).

import assert from 'node:assert/strict';
import { after, describe, it } from 'node:test';

import { Client, connect, ConnectionError, TimeoutError } from '../index.js';
import { nextEvent, tempDir } from './helpers/daemon.js';
import { daemonFor, endpoint, makeCerts, WEBSOCKET } from './helpers/transports.js';

const tmp = tempDir();
const certs = makeCerts(tmp.path);
const started = [];
after(async () => {
  await Promise.all(started.map((d) => d.kill()));
  tmp.cleanup();
});

const FAMILIES = [
  { name: 'plain', secure: false, transports: WEBSOCKET ? ['tcp', 'ws'] : ['tcp'] },
  { name: 'tls', secure: true, transports: WEBSOCKET ? ['tls', 'wss'] : ['tls'] },
];

async function startDaemon(secure, config = {}) {
  const daemon = daemonFor(secure, { handlers: ['jstest_handlers'], ...config }, { certs, dir: tmp.path });
  started.push(daemon);
  return daemon.start();
}

for (const family of FAMILIES) {
  describe(`${family.name} daemon (${family.transports.join(', ')})`, () => {
    it('a killed daemon: clients reconnect when it is back, and queued requests go through', async () => {
      const daemon = await startDaemon(family.secure);
      const clients = await Promise.all(
        family.transports.map((t) => connect(...endpoint(t, daemon, certs))),
      );
      try {
        const sessions = clients.map((c) => c.hello.session);
        const lost = clients.map((c) => nextEvent(c, 'disconnected'));
        await daemon.kill();
        for (const event of await Promise.all(lost)) {
          assert.equal(event.goaway, false);
          assert.ok(event.error instanceof Error);
        }
        // While it is down, a request waits at most its timeout...
        const t0 = performance.now();
        await assert.rejects(clients[0].request('echo', 1, { timeout: 150 }), TimeoutError);
        assert.ok(performance.now() - t0 < 1000);
        // ...and one with time enough goes through once the daemon is back.
        const queued = clients.map((c, i) => c.request('echo', `queued ${i}`, { timeout: 8000 }));
        const back = clients.map((c) => nextEvent(c, 'connected'));
        await daemon.restart();
        await Promise.all(back);
        assert.deepEqual(await Promise.all(queued), clients.map((_, i) => `queued ${i}`));
        clients.forEach((c, i) => assert.notEqual(c.hello.session, sessions[i]));
        assert.deepEqual(await Promise.all(clients.map((c) => c.request('echo', 'again'))), clients.map(() => 'again'));
      } finally {
        await Promise.all(clients.map((c) => c.close()));
        await daemon.kill();
      }
    });

    it('SIGTERM: goaway, what is in flight finishes, then the clients reconnect', async () => {
      const shutdown = { drain_timeout: 5, reconnect_after: 0.3, close_timeout: 1 };
      const daemon = await startDaemon(family.secure, { shutdown });
      const clients = await Promise.all(
        family.transports.map((t) => connect(...endpoint(t, daemon, certs))),
      );
      try {
        const goaways = clients.map((c) => nextEvent(c, 'goaway'));
        const lost = clients.map((c) => nextEvent(c, 'disconnected'));
        const slowStarted = clients.map((c) => nextEvent(c, 'slow_started'));
        const slow = clients.map((c) => c.request('slow', 0.4));
        await Promise.all(slowStarted);
        const exited = daemon.stop('SIGTERM');
        for (const data of await Promise.all(goaways)) {
          assert.deepEqual(data, { reason: 'shutdown', reconnect_after: 0.3 });
        }
        // A request made now waits for the next connection, not this draining one.
        const later = clients.map((c) => c.request('echo', 'next daemon', { timeout: 8000 }));
        assert.deepEqual(await Promise.all(slow), clients.map(() => 'finally'));
        for (const event of await Promise.all(lost)) assert.equal(event.goaway, true);
        assert.equal(await exited, 0); // every client left by itself, so the drain ended
        await daemon.log.waitFor(/Drain over; every client has left/);
        const back = clients.map((c) => nextEvent(c, 'connected'));
        await daemon.restart();
        await Promise.all(back);
        assert.deepEqual(await Promise.all(later), clients.map(() => 'next daemon'));
      } finally {
        await Promise.all(clients.map((c) => c.close()));
        await daemon.kill();
      }
    });
  });
}

describe('reconnect: false', () => {
  it('a lost connection stays lost; requests fail at once', async () => {
    const daemon = await startDaemon(false);
    const client = await connect(...endpoint('tcp', daemon, certs, { reconnect: false }));
    try {
      const lost = nextEvent(client, 'disconnected');
      await daemon.kill();
      await lost;
      assert.equal(client.state, 'disconnected');
      await assert.rejects(client.request('echo', 1), ConnectionError);
    } finally {
      await client.close();
    }
  });
});

describe('the queue of requests waiting for a connection', () => {
  it('is bounded, each request waits at most its timeout, and close() fails them', async () => {
    const daemon = await startDaemon(false);
    const [url, options] = endpoint('tcp', daemon, certs, { maxQueuedRequests: 2 });
    await daemon.kill(); // nobody listens there now
    const client = new Client(url, options);
    const errors = [];
    client.on('error', (e) => errors.push(e));
    client.open().catch(() => {});
    const first = client.request('echo', 1, { timeout: 200 });
    const second = client.request('echo', 2, { timeout: 60_000 });
    await assert.rejects(client.request('echo', 3), { name: 'QueueFullError', limit: 2 });
    await assert.rejects(first, (e) => e instanceof TimeoutError && /not connected within 200 ms/.test(e.message));
    assert.ok(errors.length >= 1 && errors.every((e) => e instanceof ConnectionError));
    await client.close();
    await assert.rejects(second, ConnectionError);
    await assert.rejects(client.request('echo', 4), ConnectionError);
  });
});
