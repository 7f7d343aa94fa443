// Peer: Node.js with the `ws` package as a channel server, for bench/fanout.py's WebSocket
// fan-out: heartbeatd's envelope, one JSON text message per envelope (as heartbeatd's
// WebSocket listener). subscribe answers {channel, epoch, offset}; publish serialises the
// publication once and sends it to every subscriber in one loop (ws frames it per socket),
// then answers {channel, offset}; broadcast D sends {"type":"bcast","data":D} to every
// connection and answers {sent}; ping answers pong.
//
//   node ws_fanout.js PORT      prints {"port": N} once listening
'use strict';
const http = require('http');
const { WebSocketServer } = require('ws');

const channels = new Map(); // name -> {offset, subs: Set<WebSocket>}
const everyone = new Set();

function channel(name) {
  let c = channels.get(name);
  if (!c) {
    c = { offset: 0, subs: new Set() };
    channels.set(name, c);
  }
  return c;
}

function handle(socket, mine, msg) {
  const data = msg.data || {};
  if (msg.type === 'ping') return { type: 'pong', id: msg.id };
  if (msg.type === 'subscribe') {
    const c = channel(data.channel);
    c.subs.add(socket);
    mine.add(data.channel);
    return {
      type: 'subscribe',
      id: msg.id,
      data: { channel: data.channel, epoch: 'node', offset: c.offset },
    };
  }
  if (msg.type === 'publish') {
    const c = channel(data.channel);
    c.offset += 1;
    const publication = JSON.stringify({
      type: 'publication',
      data: { channel: data.channel, offset: c.offset, data: data.data },
    });
    for (const sub of c.subs) sub.send(publication);
    return { type: 'publish', id: msg.id, data: { channel: data.channel, offset: c.offset } };
  }
  if (msg.type === 'broadcast') {
    const push = JSON.stringify({ type: 'bcast', data: msg.data });
    for (const other of everyone) other.send(push);
    return { type: 'broadcast', id: msg.id, data: { sent: everyone.size } };
  }
  return { type: 'error', id: msg.id, error: { code: 'unknown_type', message: msg.type } };
}

const server = http.createServer();
const wss = new WebSocketServer({ server, maxPayload: 1024 * 1024, perMessageDeflate: false });
wss.on('connection', (socket) => {
  socket._socket.setNoDelay(true);
  everyone.add(socket);
  const mine = new Set();
  socket.on('message', (raw, isBinary) => {
    if (isBinary) return socket.close(1003);
    socket.send(JSON.stringify(handle(socket, mine, JSON.parse(raw))));
  });
  socket.on('close', () => {
    everyone.delete(socket);
    for (const name of mine) channels.get(name)?.subs.delete(socket);
  });
});
server.listen({ port: Number(process.argv[2] || 0), host: '127.0.0.1', backlog: 4096 }, () => {
  process.stdout.write(JSON.stringify({ port: server.address().port }) + '\n');
});
process.on('SIGTERM', () => process.exit(0));
