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
    assert.deepEqual(stray, []); // an id that matches no request is a late reply: dropped
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

it('a late reply (its request timed out) and a second hello are not pushes', async () => {
  const server = await fake((socket, send) => {
    send(HELLO);
    const decoder = new Int32Decoder(1 << 20);
    socket.on('data', (chunk) => {
      for (const body of decoder.feed(chunk)) {
        const request = JSON.parse(new TextDecoder().decode(body));
        if (request.data === 'slow') {
          // Answered after the client gave up, then a second hello, then the next answer.
          setTimeout(() => {
            send({ type: request.type, id: request.id, data: 'late' });
            send({ type: 'error', id: request.id, error: { code: 'internal_error', message: 'late too' } });
            send({ type: 'hello', data: { server: 'impostor', heartbeat: { interval: 1, timeout: 2 } } });
          }, 150);
        } else {
          setTimeout(() => send({ type: request.type, id: request.id, data: request.data }), 300);
        }
      }
    });
  });
  const client = await connect(server.url, { reconnect: false });
  try {
    const pushes = [];
    const errors = [];
    client.on('echo', (data) => pushes.push(data));
    client.on('hello', (data) => pushes.push(data));
    client.on('error', (e) => errors.push(e.message));
    await assert.rejects(client.request('echo', 'slow', { timeout: 50 }), { name: 'TimeoutError' });
    assert.equal(await client.request('echo', 'next'), 'next');
    assert.deepEqual(pushes, []);
    assert.deepEqual(errors, []);
    assert.equal(client.state, 'connected');
  } finally {
    await client.close();
    await server.close();
  }
});

it('over the "ws" package, a message past maxFrameBytes is refused before it is all held', async () => {
  const { WebSocketServer } = await import('ws');
  const wss = new WebSocketServer({ host: '127.0.0.1', port: 0 });
  await new Promise((resolve) => wss.on('listening', resolve));
  let closeCode = null;
  const serverSaw = new Promise((resolve) => {
    wss.on('connection', (socket) => socket.on('close', (code) => resolve((closeCode = code))));
  });
  wss.on('connection', (socket) => {
    socket.on('error', () => {});
    socket.send(JSON.stringify({ type: 'hello', data: { heartbeat: { interval: 60, timeout: 180 } } }));
    // 64 KiB announced in one frame: with maxPayload the client refuses it from its header.
    setTimeout(() => socket.send(`{"type":"news","data":"${'x'.repeat(64 * 1024)}"}`), 50);
  });
  const { WebSocket } = await import('ws');
  const url = `ws://127.0.0.1:${wss.address().port}/`;
  const client = await connect(url, { reconnect: false, WebSocket, maxFrameBytes: 4096 });
  try {
    const news = [];
    client.on('news', (data) => news.push(data));
    const gone = new Promise((resolve) => client.on('disconnected', resolve));
    const { error } = await gone;
    assert.equal(error.message, 'the server sent a message over 4096 bytes');
    // Refused from its header by ws (a 1009 close frame), not read whole and then dropped.
    await serverSaw;
    assert.equal(closeCode, 1009);
    assert.deepEqual(news, []);
  } finally {
    await client.close();
    for (const socket of wss.clients) socket.terminate();
    await new Promise((resolve) => wss.close(resolve));
  }
});

it('a WebSocket message is measured in UTF-8 bytes, not UTF-16 units', async () => {
  const { utf8Exceeds } = await import('../src/transport.js');
  assert.equal(utf8Exceeds('é'.repeat(600), 1024), true); // 600 units, 1200 bytes
  assert.equal(utf8Exceeds('é'.repeat(500), 1024), false);
  assert.equal(utf8Exceeds('😀'.repeat(256), 1024), false); // 512 units, 1024 bytes
  assert.equal(utf8Exceeds('😀'.repeat(257), 1024), true);
  assert.equal(utf8Exceeds('x'.repeat(1025), 1024), true);
});
