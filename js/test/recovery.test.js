// Channel recovery across a daemon restart, in a cluster (cluster.redis) so history outlives
// the daemon: subscribers on node A (over tcp and ws) lose it, publications go on through
// node B, and when A is back each subscriber gets exactly what it missed, with
// `recovered: true`, and never an offset twice.

import assert from 'node:assert/strict';
import { after, before, it } from 'node:test';

import { connect } from '../index.js';
import { nextEvent, startRedis, tempDir, until } from './helpers/daemon.js';
import { daemonFor, endpoint, WEBSOCKET } from './helpers/transports.js';

const tmp = tempDir();
let redis;
let nodeA;
let nodeB;

before(async () => {
  redis = await startRedis(tmp.path);
  const cluster = (id) => ({
    handlers: ['jstest_handlers'],
    channels: { client_publish: true },
    cluster: { redis: redis.url, node_id: id },
  });
  nodeA = daemonFor(false, cluster('node-a'), { dir: tmp.path });
  nodeB = daemonFor(false, cluster('node-b'), { dir: tmp.path });
  await Promise.all([nodeA.start(), nodeB.start()]);
});

after(async () => {
  await Promise.all([nodeA?.kill(), nodeB?.kill()]);
  await redis?.stop();
  tmp.cleanup();
});

it('recovers every missed publication once, across a restart of its daemon', async () => {
  const channel = 'scores';
  const transports = WEBSOCKET ? ['tcp', 'ws'] : ['tcp'];
  const subscribers = await Promise.all(transports.map((t) => connect(...endpoint(t, nodeA, null))));
  const publisher = await connect(...endpoint('tcp', nodeB, null));
  try {
    const seen = subscribers.map(() => []);
    const answers = subscribers.map(() => []);
    const subs = subscribers.map((client, i) =>
      client.subscribe(channel, {
        onPublication: ({ offset, data }) => seen[i].push([offset, data]),
        onSubscribed: (context) => answers[i].push(context),
      }),
    );
    await Promise.all(subs.map((s) => s.ready()));
    for (let n = 1; n <= 3; n++) await publisher.publish(channel, `before ${n}`);
    await Promise.all(subs.map((s, i) => until(() => seen[i].length === 3, s, ['publication'])));

    const lost = subscribers.map((c) => nextEvent(c, 'disconnected'));
    await nodeA.kill();
    await Promise.all(lost);
    for (let n = 1; n <= 4; n++) await publisher.publish(channel, `missed ${n}`);

    const resubscribed = subs.map((s) => nextEvent(s, 'subscribed'));
    await nodeA.restart();
    for (const context of await Promise.all(resubscribed)) {
      assert.equal(context.recovered, true);
      assert.equal(context.wasRecovering, true);
    }
    await Promise.all(subs.map((s, i) => until(() => seen[i].length === 7, s, ['publication'])));
    await publisher.publish(channel, 'after');
    await Promise.all(subs.map((s, i) => until(() => seen[i].length === 8, s, ['publication'])));

    const expected = [
      ...[1, 2, 3].map((n) => [n, `before ${n}`]),
      ...[1, 2, 3, 4].map((n) => [n + 3, `missed ${n}`]),
      [8, 'after'],
    ];
    for (let i = 0; i < subs.length; i++) {
      assert.deepEqual(seen[i], expected, `subscriber over ${transports[i]}`);
      assert.deepEqual(answers[i].map((a) => a.recovered), [false, true]);
      assert.equal(subs[i].offset, 8);
    }
  } finally {
    await Promise.all([...subscribers, publisher].map((c) => c.close()));
  }
});

it('a position the history no longer holds: recovered false, continue from the answer', async () => {
  const client = await connect(...endpoint('tcp', nodeB, null));
  try {
    const got = [];
    const sub = client.subscribe('scores', {
      since: { epoch: 'an-old-epoch', offset: 2 },
      onPublication: ({ offset }) => got.push(offset),
    });
    const context = await sub.ready();
    assert.equal(context.recovered, false);
    assert.equal(context.wasRecovering, true);
    assert.deepEqual(sub.position, { epoch: context.epoch, offset: context.offset });
    const offset = await client.publish('scores', 'next');
    await until(() => got.length === 1, sub, ['publication']);
    assert.deepEqual(got, [offset]);
  } finally {
    await client.close();
  }
});
