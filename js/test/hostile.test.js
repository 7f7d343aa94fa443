// Servers that misbehave (fake ones, on loopback): every misdeed becomes a typed error or an
// `error` event, and the client stays usable when the connection can.

import assert from 'node:assert/strict';
import net from 'node:net';
import { it } from 'node:test';

import { connect, ServerError } from '../index.js';
import { encodeInt32, Int32Decoder } from '../src/framing.js';
import { until } from './helpers/daemon.js';

/** A fake int32 server; `onConnection(socket, reply)` plays it. */
async function fake(onConnection) {
  const sockets = new Set();
  const server = net.createServer((socket) => {
    sockets.add(socket);
    socket.on('error', () => {});
    socket.on('close', () => sockets.delete(socket));
    const send = (message) => socket.write(encodeInt32(typeof message === 'string' ? message : JSON.stringify(message)));
    onConnection(socket, send);
  });
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  return {
    url: `tcp://127.0.0.1:${server.address().port}`,
    close: async () => {
      for (const s of sockets) s.destroy();
      await new Promise((resolve) => server.close(resolve));
    },
  };
}

const HELLO = { type: 'hello', data: { server: 'fake', heartbeat: { interval: 60, timeout: 180 }, max_frame_bytes: 1024 } };

it('a refusal before the hello (too_many_connections) rejects connect() with its code', async () => {
  const server = await fake((socket, send) => {
    send({ type: 'error', id: null, error: { code: 'too_many_connections', message: 'the server is full' } });
    socket.end();
  });
  try {
    await assert.rejects(connect(server.url), (e) => e instanceof ServerError && e.code === 'too_many_connections');
  } finally {
    await server.close();
  }
});

it('garbage frames are reported as error events; the connection stays usable', async () => {
  const server = await fake((socket, send) => {
    send(HELLO);
    const decoder = new Int32Decoder(1 << 20);
    socket.on('data', (chunk) => {
      for (const body of decoder.feed(chunk)) {
        const request = JSON.parse(new TextDecoder().decode(body));
        send('not json');
        send('[1, 2]');
        socket.write(encodeInt32(Uint8Array.of(0x22, 0xff, 0x22))); // not UTF-8
        send({ type: 'error', id: null, error: { code: 'bad_json', message: 'for nobody' } });
        send({ type: 'echo', id: 'some other id', data: 'stray' });
        send({ type: request.type, id: request.id, data: request.data });
      }
    });
  });
  const client = await connect(server.url, { reconnect: false });
  try {
    const errors = [];
    client.on('error', (e) => errors.push(e.message));
    const stray = [];
    client.on('echo', (data) => stray.push(data));
    assert.equal(await client.request('echo', 'fine'), 'fine');
    await until(() => errors.length === 4, client, ['error']);
    assert.match(errors[0], /not valid JSON/);
    assert.match(errors[1], /not an envelope/);
    assert.match(errors[2], /UTF-8/);
    assert.match(errors[3], /for nobody/);
    assert.deepEqual(stray, ['stray']);
    assert.equal(client.state, 'connected');
  } finally {
    await client.close();
    await server.close();
  }
});

it('a hello announcing a small max_frame_bytes is obeyed, and a goaway is followed once', async () => {
  let connections = 0;
  const server = await fake((socket, send) => {
    connections += 1;
    send(HELLO);
    if (connections === 1) {
      send({ type: 'goaway', data: { reason: 'shutdown', reconnect_after: 0 } });
      send({ type: 'goaway', data: { reason: 'shutdown', reconnect_after: 1e9 } }); // ignored
    }
    const decoder = new Int32Decoder(1 << 20);
    socket.on('data', (chunk) => {
      for (const body of decoder.feed(chunk)) {
        const request = JSON.parse(new TextDecoder().decode(body));
        send({ type: request.type, id: request.id, data: request.data });
      }
    });
  });
  const client = await connect(server.url, { minReconnectDelay: 20, maxReconnectDelay: 50 });
  try {
    // Waits for the connection after the goaway (reconnect_after 0: at once).
    assert.equal(await client.request('echo', 'x'.repeat(900)), 'x'.repeat(900));
    await assert.rejects(client.request('echo', 'x'.repeat(1100)), { name: 'MessageTooLargeError', limit: 1024 });
    assert.equal(connections, 2);
  } finally {
    await client.close();
    await server.close();
  }
});
