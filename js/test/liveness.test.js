// Heartbeats: the client answers the server's pings, finds a silent server from the hello's
// terms, and cannot be made to flood by absurd terms.  Fake servers (net) play the hostile or
// dead server; one real daemon with a fast heartbeat checks that an idle client is kept.

import assert from 'node:assert/strict';
import net from 'node:net';
import { after, it } from 'node:test';

import { connect, ConnectionError, encodeInt32, Int32Decoder } from '../index.js';
import { nextEvent, tempDir } from './helpers/daemon.js';
import { daemonFor, endpoint } from './helpers/transports.js';

const tmp = tempDir();
after(() => tmp.cleanup());

/** A fake int32 server: sends `hello` on connect; `received` holds what clients send. */
async function fakeServer(hello, onMessage = () => {}) {
  const received = [];
  const waiters = [];
  const sockets = new Set();
  const server = net.createServer((socket) => {
    sockets.add(socket);
    const decoder = new Int32Decoder(1 << 20);
    socket.on('data', (chunk) => {
      for (const body of decoder.feed(chunk)) {
        const message = JSON.parse(new TextDecoder().decode(body));
        received.push({ at: performance.now(), message });
        for (const w of waiters.filter((w) => received.length >= w.count)) {
          waiters.splice(waiters.indexOf(w), 1);
          w.resolve();
        }
        onMessage(message, (reply) => socket.write(encodeInt32(JSON.stringify(reply))));
      }
    });
    socket.on('error', () => {});
    socket.on('close', () => sockets.delete(socket));
    socket.write(encodeInt32(JSON.stringify({ type: 'hello', data: hello })));
  });
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  return {
    url: `tcp://127.0.0.1:${server.address().port}`,
    received,
    /** Resolves once `count` messages were received. */
    receivedCount: (count) =>
      received.length >= count ? Promise.resolve() : new Promise((resolve) => waiters.push({ count, resolve })),
    send: (message) => {
      for (const s of sockets) s.write(encodeInt32(JSON.stringify(message)));
    },
    close: async () => {
      for (const s of sockets) s.destroy();
      await new Promise((resolve) => server.close(resolve));
    },
  };
}

it('answers the server\'s pings with pongs carrying the same id', async () => {
  const server = await fakeServer({ heartbeat: { interval: 60, timeout: 180 } });
  const client = await connect(server.url, { reconnect: false });
  try {
    server.send({ type: 'ping', id: 'hb-7' });
    server.send({ type: 'ping' });
    await server.receivedCount(2);
    assert.deepEqual(server.received.map((r) => r.message), [{ type: 'pong', id: 'hb-7' }, { type: 'pong' }]);
  } finally {
    await client.close();
    await server.close();
  }
});

it('a silent server is dropped; absurd heartbeat terms are clamped so the client never floods', async () => {
  // A hello asking for a ping every millisecond, and death after two: the client pings at
  // most once a second and waits two seconds of silence.
  const server = await fakeServer({ heartbeat: { interval: 0.001, timeout: 0.002 } });
  const client = await connect(server.url, { reconnect: false });
  try {
    const opened = performance.now();
    const event = await nextEvent(client, 'disconnected', 6000);
    const after = performance.now() - opened;
    assert.ok(event.error instanceof ConnectionError);
    assert.match(event.reason, /silent for \d+\.\d s \(heartbeat timeout 2 s\)/);
    assert.ok(after >= 1900 && after < 4500, `dropped after ${after} ms`);
    const pings = server.received.filter((r) => r.message.type === 'ping');
    assert.ok(pings.length >= 1 && pings.length <= 3, `${pings.length} pings in ${after} ms`);
  } finally {
    await client.close();
    await server.close();
  }
});

it('an idle client of a daemon with a fast heartbeat is kept (it answers every ping)', async () => {
  const daemon = daemonFor(false, { heartbeat: { interval: 0.2, timeout: 0.6 } }, { dir: tmp.path });
  await daemon.start();
  const client = await connect(...endpoint('tcp', daemon, null));
  try {
    let lost = false;
    client.on('disconnected', () => {
      lost = true;
    });
    // Idle for well past the server's timeout: it pings, we pong; nobody is evicted.
    await assert.rejects(nextEvent(client, 'disconnected', 1200), /no disconnected event/);
    assert.equal(lost, false);
    assert.equal(await client.request('echo', 'alive'), 'alive');
  } finally {
    await client.close();
    await daemon.kill();
  }
  assert.ok(!daemon.log.lines.some((l) => l.includes('heartbeat_timeout')), daemon.log.lines.join('\n'));
});
