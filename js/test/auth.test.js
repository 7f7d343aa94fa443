// Authentication (auth.mode: token) over every transport family: the token is sent on every
// connect, getToken() is asked again on every reconnect, and refusals are ServerErrors.

import assert from 'node:assert/strict';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';

import { connect, ServerError } from '../index.js';
import { nextEvent, tempDir } from './helpers/daemon.js';
import { daemonFor, endpoint, makeCerts, WEBSOCKET } from './helpers/transports.js';

const tmp = tempDir();
const certs = makeCerts(tmp.path);
const tokens = join(tmp.path, 'tokens');
writeFileSync(tokens, '# identity:token\nalice:alice-token\nbob:bob-token\n');
let daemon;

before(async () => {
  daemon = daemonFor(true, { handlers: ['jstest_handlers'], auth: { mode: 'token', tokens_file: tokens } }, { certs, dir: tmp.path });
  await daemon.start();
});
after(async () => {
  await daemon.kill();
  tmp.cleanup();
});

for (const transport of WEBSOCKET ? ['tls', 'wss'] : ['tls']) {
  describe(`auth over ${transport}`, () => {
    it('a good token: the server tells who we are', async () => {
      const client = await connect(...endpoint(transport, daemon, certs, { token: 'alice-token' }));
      try {
        assert.equal(client.hello.auth, 'required');
        assert.equal(client.identity, 'alice');
        assert.equal((await client.request('whoami')).identity, 'alice');
      } finally {
        await client.close();
      }
    });

    it('a wrong token, or none: connect() rejects with the server\'s code', async () => {
      await assert.rejects(
        connect(...endpoint(transport, daemon, certs, { token: 'guess' })),
        (e) => e instanceof ServerError && e.code === 'auth_failed',
      );
      await assert.rejects(
        connect(...endpoint(transport, daemon, certs)),
        (e) => e instanceof ServerError && e.code === 'unauthenticated',
      );
    });
  });
}

describe('getToken', () => {
  it('is asked on every (re)connect, so a renewed token is used', async () => {
    const asked = [];
    const handed = ['alice-token', 'bob-token'];
    const getToken = async () => {
      asked.push(Date.now());
      return handed[Math.min(asked.length - 1, handed.length - 1)];
    };
    const client = await connect(...endpoint('tls', daemon, certs, { getToken }));
    try {
      assert.equal((await client.request('whoami')).identity, 'alice');
      const back = nextEvent(client, 'connected');
      await daemon.restart();
      const event = await back;
      assert.equal(event.identity, 'bob');
      assert.equal((await client.request('whoami')).identity, 'bob');
      assert.ok(asked.length >= 2);
    } finally {
      await client.close();
    }
  });
});
