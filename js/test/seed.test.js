// Seed framing: the seed tutorial's own Node.js server (tests/interop/seed_server.js: no
// hello, no ids, bare values, a bare HeartBeat token), and a heartbeatd daemon in seed framing.

import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { join } from 'node:path';
import { after, it } from 'node:test';

import { connect } from '../index.js';
import { REPO, tempDir } from './helpers/daemon.js';
import { daemonFor, QUICK } from './helpers/transports.js';

const tmp = tempDir();
after(() => tmp.cleanup());

it('talks to the seed tutorial\'s server: bare values matched in order, tokens survive', async () => {
  const server = spawn(process.execPath, [join(REPO, 'tests', 'interop', 'seed_server.js'), '100'], {
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  try {
    const line = await new Promise((resolve, reject) => {
      server.stdout.once('data', (chunk) => resolve(String(chunk)));
      server.once('exit', () => reject(new Error('seed_server.js exited')));
    });
    const { port } = JSON.parse(line);
    const client = await connect(`tcp://127.0.0.1:${port}`, { ...QUICK, framing: 'seed' });
    try {
      assert.equal(client.hello, null); // a seed server says no hello
      const replies = await Promise.all([client.requestValue('Thu, 01 Jan 2026 00:00:00 GMT'), client.requestValue([1, 2])]);
      assert.deepEqual(replies, ['服务端的数据数据:"Thu, 01 Jan 2026 00:00:00 GMT"', '服务端的数据数据:[1,2]']);
      // The server's HeartBeat tokens (every 100 ms) arrive between the frames of 350 ms of
      // round trips, and every reply still matches its value.
      const t0 = performance.now();
      for (let n = 0; performance.now() - t0 < 350; n++) {
        assert.equal(await client.requestValue({ n }), `服务端的数据数据:{"n":${n}}`);
      }
      assert.equal(client.state, 'connected');
    } finally {
      await client.close();
    }
  } finally {
    server.kill();
  }
});

it('speaks envelopes to a heartbeatd daemon in seed framing, and adopts its hello', async () => {
  const daemon = daemonFor(false, { framing: 'seed' }, { dir: tmp.path });
  await daemon.start();
  try {
    const client = await connect(daemon.url, { ...QUICK, framing: 'seed' });
    try {
      assert.deepEqual(await client.request('echo', { a: 1 }), { a: 1 });
      assert.deepEqual(await client.request('echo', [1, 'two']), [1, 'two']);
      assert.equal(await client.requestValue('a bare value'), 'a bare value'); // the built-in message handler echoes
      assert.equal(client.hello?.framing, 'seed');
    } finally {
      await client.close();
    }
  } finally {
    await daemon.kill();
  }
});
