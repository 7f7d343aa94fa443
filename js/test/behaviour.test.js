// One behaviour suite over every transport (tcp, tls, ws, wss) against a real daemon:
// request/reply, pipelining, ServerError, timeouts, pushes, send, channels, size limits.

import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';

import { connect, ConnectionError, MessageTooLargeError, ServerError, TimeoutError } from '../index.js';
import { nextEvent, tempDir, until } from './helpers/daemon.js';
import { daemonFor, endpoint, makeCerts, TRANSPORTS } from './helpers/transports.js';

const CONFIG = {
  handlers: ['jstest_handlers'],
  channels: { client_publish: true },
  max_frame_bytes: 65536,
};

const tmp = tempDir();
const certs = makeCerts(tmp.path);
const daemons = {};

before(async () => {
  daemons.plain = daemonFor(false, CONFIG, { dir: tmp.path });
  daemons.tls = daemonFor(true, CONFIG, { certs, dir: tmp.path });
  await Promise.all([daemons.plain.start(), daemons.tls.start()]);
});

after(async () => {
  await Promise.all(Object.values(daemons).map((d) => d.kill()));
  tmp.cleanup();
});

for (const transport of TRANSPORTS) {
  describe(`over ${transport.name}`, { skip: transport.skip }, () => {
    const open = (extra) => {
      const daemon = transport.secure ? daemons.tls : daemons.plain;
      const [url, options] = endpoint(transport.name, daemon, certs, extra);
      return connect(url, options);
    };

    it('answers requests, in order when pipelined, with the hello known', async () => {
      const client = await open();
      try {
        assert.equal(client.state, 'connected');
        assert.equal(client.hello.server, 'heartbeatd');
        assert.equal(client.hello.max_frame_bytes, 65536);
        assert.deepEqual(await client.request('echo', { hi: 'ünïcode ✓' }), { hi: 'ünïcode ✓' });
        const replies = await Promise.all(Array.from({ length: 200 }, (_, i) => client.request('echo', i)));
        assert.deepEqual(replies, Array.from({ length: 200 }, (_, i) => i));
        assert.equal(await client.request('ping'), undefined);
      } finally {
        await client.close();
      }
    });

    it('rejects with a ServerError carrying the code, and stays connected', async () => {
      const client = await open();
      try {
        await assert.rejects(client.request('nope'), (e) => e instanceof ServerError && e.code === 'unknown_type' && e.message.includes('nope'));
        await assert.rejects(client.request('fail'), { name: 'ServerError', code: 'not_today', message: 'this handler always refuses' });
        await assert.rejects(client.subscribe('no spaces').ready(), { code: 'bad_channel' });
        assert.equal(await client.request('echo', 'still here'), 'still here');
        assert.equal(client.state, 'connected');
      } finally {
        await client.close();
      }
    });

    it('times out a slow reply, and ignores it when it comes', async () => {
      const client = await open();
      try {
        const started = performance.now();
        await assert.rejects(client.request('slow', 0.4, { timeout: 100 }), TimeoutError);
        assert.ok(performance.now() - started < 350);
        // Replies come in order: this one waits for the slow one, which is then ignored.
        assert.equal(await client.request('echo', 'after'), 'after');
        assert.equal(client.state, 'connected');
      } finally {
        await client.close();
      }
    });

    it('delivers pushes to on(type) and onPush, and send() gets no reply', async () => {
      const client = await open();
      try {
        const pushed = [];
        const any = [];
        client.on('news', (data) => pushed.push(data));
        client.onPush((type, data) => any.push(type));
        assert.equal(await client.request('push_me', { type: 'news', data: { n: 1 }, count: 3 }), 'pushed');
        assert.deepEqual(pushed, [{ n: 1 }, { n: 1 }, { n: 1 }]); // pushes precede the reply
        client.send('push_me', { type: 'news', data: 'sent' });
        await until(() => any.length === 5, client, ['push_me']);
        assert.equal(pushed[3], 'sent');
        // A message sent without an id still gets its reply, without an id: a push.
        assert.deepEqual(any, ['news', 'news', 'news', 'news', 'push_me']);
      } finally {
        await client.close();
      }
    });

    it('subscribes, publishes, tells presence, join and leave, and unsubscribes', async () => {
      const channel = `news.${transport.name}`;
      const a = await open();
      const b = await open();
      try {
        const got = [];
        const joins = [];
        const leaves = [];
        const sub = a.subscribe(channel, {
          joinLeave: true,
          onPublication: (p) => got.push(p),
          onJoin: (j) => joins.push(j),
          onLeave: (l) => leaves.push(l),
        });
        const answer = await sub.ready();
        assert.equal(answer.recovered, false);
        assert.equal(answer.wasRecovering, false);
        assert.equal(typeof answer.epoch, 'string');
        const subB = b.subscribe(channel);
        await subB.ready();
        await until(() => joins.length === 1, sub, ['join']);
        assert.equal(joins[0].session, b.hello.session);
        const offset = await b.publish(channel, { title: 'hello' });
        assert.equal(offset, answer.offset + 1);
        await until(() => got.length === 1, sub, ['publication']);
        assert.deepEqual(got[0], { channel, epoch: answer.epoch, offset, data: { title: 'hello' } });
        const present = await a.presence(channel);
        assert.deepEqual(present.map((c) => c.session).sort(), [a.hello.session, b.hello.session].sort());
        await subB.unsubscribe();
        assert.equal(subB.state, 'unsubscribed');
        await until(() => leaves.length === 1, sub, ['leave']);
        assert.deepEqual((await a.presence(channel)).map((c) => c.session), [a.hello.session]);
        assert.throws(() => a.subscribe(channel), /already subscribed/);
      } finally {
        await Promise.all([a.close(), b.close()]);
      }
    });

    it('refuses to send a message over the server\'s max_frame_bytes', async () => {
      const client = await open();
      try {
        await assert.rejects(client.request('echo', 'x'.repeat(70_000)), MessageTooLargeError);
        assert.throws(() => client.send('echo', 'é'.repeat(40_000)), MessageTooLargeError);
        assert.equal(await client.request('echo', 'x'.repeat(60_000)), 'x'.repeat(60_000));
      } finally {
        await client.close();
      }
    });

    it('drops a connection whose server sends a frame over maxFrameBytes, then reconnects', async () => {
      const client = await open({ maxFrameBytes: 2048 });
      try {
        const lost = nextEvent(client, 'disconnected');
        const back = nextEvent(client, 'connected');
        await assert.rejects(client.request('push_me', { type: 'big', data: 'y'.repeat(3000) }), ConnectionError);
        assert.match((await lost).reason, /2048/);
        await back;
        assert.equal(await client.request('echo', 'small'), 'small');
      } finally {
        await client.close();
      }
    });
  });
}
