// auth.mode: jwt. The server pushes {"type": "refresh"} before the token expires; the client
// answers with getToken()'s new token and stays connected past the first token's exp.

import assert from 'node:assert/strict';
import { createHmac } from 'node:crypto';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';

import { connect } from '../index.js';
import { tempDir } from './helpers/daemon.js';
import { daemonFor, endpoint } from './helpers/transports.js';

const SECRET = 'js-test-secret-0123456789-0123456789-0123456789';
const tmp = tempDir();
writeFileSync(join(tmp.path, 'secret'), SECRET);
let daemon;

/** An HS256 JWT (what an application's login service would issue). */
function jwt(claims) {
  const b64 = (value) => Buffer.from(JSON.stringify(value)).toString('base64url');
  const head = `${b64({ alg: 'HS256', typ: 'JWT' })}.${b64(claims)}`;
  return `${head}.${createHmac('sha256', SECRET).update(head).digest('base64url')}`;
}

const now = () => Math.floor(Date.now() / 1000);

before(async () => {
  const auth = { mode: 'jwt', jwt: { hmac_secret_file: join(tmp.path, 'secret'), refresh_before: 2 } };
  daemon = daemonFor(false, { auth }, { dir: tmp.path });
  await daemon.start();
});
after(async () => {
  await daemon.kill();
  tmp.cleanup();
});

describe('JWT refresh', () => {
  it('getToken() answers the server\'s refresh, so the connection outlives its first token', async () => {
    const issued = [];
    const getToken = async () => {
      issued.push(now() + (issued.length === 0 ? 3 : 300));
      return jwt({ sub: 'alice', exp: issued.at(-1) });
    };
    const client = await connect(...endpoint('tcp', daemon, null, { getToken }));
    try {
      assert.equal(client.identity, 'alice');
      const deadline = (issued[0] + 1) * 1000;
      while (Date.now() < deadline) {
        await client.request('ping'); // a round trip every 100 ms, past the first token's exp
        await new Promise((resolve) => setTimeout(resolve, 100));
      }
      assert.equal(issued.length, 2);
      assert.equal(client.state, 'connected');
    } finally {
      await client.close();
    }
  });
});
