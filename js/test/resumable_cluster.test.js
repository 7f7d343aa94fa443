// The resumable client in a cluster (cluster.redis: sessions live in Redis): the node holding
// the session is killed (-9), the client comes back through the same address to another
// node and resumes there: the request in flight is answered (run again there, flagged
// redelivered), publications made meanwhile arrive once and in order, nothing is subscribed
// again and no session is lost.

import assert from 'node:assert/strict';
import { after, before, it } from 'node:test';

import { connect } from '../index.js';
import { CutProxy } from './helpers/cut_proxy.js';
import { nextEvent, startRedis, tempDir, until } from './helpers/daemon.js';
import { daemonFor, endpoint } from './helpers/transports.js';

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

it('kill -9 of the node holding the session: resumed on another node, nothing lost or doubled', async () => {
  const proxy = await new CutProxy(nodeA.port).start();
  const [url, options] = endpoint('tcp', { port: proxy.port }, null, {
    resumable: true,
    minReconnectDelay: 20,
    maxReconnectDelay: 100,
  });
  const client = await connect(url, options);
  const publisher = await connect(...endpoint('tcp', nodeB, null));
  try {
    const events = [];
    client.on('resumed', () => events.push('resumed'));
    client.on('session_lost', ({ reason }) => events.push(`session_lost ${reason}`));
    const seen = [];
    const subscribed = [];
    const sub = client.subscribe('moving', {
      onPublication: ({ offset, data }) => seen.push([offset, data]),
      onSubscribed: (context) => subscribed.push(context),
    });
    await sub.ready();
    await publisher.publish('moving', 'before');
    await until(() => seen.length === 1, sub, ['publication']);
    assert.equal(await client.request('echo', 'on A'), 'on A');

    const started = nextEvent(client, 'slow_started');
    const pending = client.request('slow', 0.2, { timeout: 8000 });
    await started;
    const lost = nextEvent(client, 'disconnected');
    proxy.targetPort = nodeB.port; // the address now leads to node B
    await nodeA.kill();
    await lost;
    for (let n = 1; n <= 3; n++) await publisher.publish('moving', `missed ${n}`);

    assert.equal(await pending, 'finally'); // run again on B: A died before it answered
    await until(() => seen.length === 4, sub, ['publication']);
    await publisher.publish('moving', 'after');
    await until(() => seen.length === 5, sub, ['publication']);
    assert.deepEqual(seen, [[1, 'before'], [2, 'missed 1'], [3, 'missed 2'], [4, 'missed 3'], [5, 'after']]);
    assert.deepEqual(events, ['resumed']);
    assert.equal(subscribed.length, 1);
    assert.equal(await client.request('echo', 'on B'), 'on B');
  } finally {
    await Promise.all([client.close(), publisher.close()]);
    await proxy.stop();
  }
});
