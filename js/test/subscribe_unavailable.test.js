// A cluster node whose Redis is gone answers every subscribe `unavailable`: the client asks
// again with backoff for subscribeRetryTimeout ms, then the subscription fails with a typed
// error, and the client sends no more subscribes for it (the fake-server side of this, and the
// session's subscribe deadline, are in resumable.test.js).

import assert from 'node:assert/strict';
import { after, before, it } from 'node:test';

import { connect, ServerError, SubscriptionUnavailableError } from '../index.js';
import { Daemon, startRedis, tempDir } from './helpers/daemon.js';
import { QUICK } from './helpers/transports.js';

const tmp = tempDir();
let redis;
let node;

before(async () => {
  redis = await startRedis(tmp.path);
  node = new Daemon({ cluster: { redis: redis.url, node_id: 'node-a' } }, { dir: tmp.path });
  await node.start();
  await node.log.waitFor(/Redis link up/);
  await redis.stop(); // and it stays down
  await node.log.waitFor(/Redis link down/);
});

after(async () => {
  await node?.kill();
  await redis?.stop();
  tmp.cleanup();
});

it('a node without its Redis: subscribes answered unavailable for subscribeRetryTimeout, then SubscriptionUnavailableError', { timeout: 30_000 }, async () => {
  const client = await connect(node.url, { ...QUICK, minReconnectDelay: 20, maxReconnectDelay: 100, subscribeRetryTimeout: 500 });
  try {
    const refusals = [];
    const started = Date.now();
    const sub = client.subscribe('news', { onError: (e) => refusals.push(e) });
    const error = await sub.ready().then(
      () => assert.fail('subscribed to a node without its Redis'),
      (e) => e,
    );
    const elapsed = Date.now() - started;
    assert.ok(error instanceof SubscriptionUnavailableError, String(error));
    assert.ok(error instanceof ServerError);
    assert.equal(error.code, 'unavailable');
    assert.equal(error.cause?.code, 'unavailable'); // the daemon's own answer
    assert.ok(error.attempts >= 2, `only ${error.attempts} attempts`);
    assert.ok(elapsed >= 500 && elapsed < 10_000, `gave up ${elapsed} ms after subscribing`);
    assert.equal(sub.state, 'failed');
    assert.equal(refusals.length, error.attempts);
    assert.equal(refusals.at(-1), error);
    // The connection is fine, and nothing retries behind the application's back.
    assert.equal(await client.request('echo', 'still here'), 'still here');
    assert.equal(sub._retryTimer, null);
    assert.equal(refusals.length, error.attempts);
  } finally {
    await client.close();
  }
});
