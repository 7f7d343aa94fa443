// Peer: a Node.js `net` channel server speaking heartbeatd's int32-framed envelope, for
// bench/fanout.py. subscribe answers {channel, epoch, offset}; publish frames the publication
// once and writes it to every subscriber in one loop (Node's natural way: no batching), then
// answers {channel, offset}; broadcast D writes {"type":"bcast","data":D} to every connection
// and answers {sent}; ping answers pong. Offsets count per channel from 1.
//
//   node node_fanout.js PORT
'use strict';
const net = require('net');

const channels = new Map(); // name -> {offset, subs: Set<socket>}
const everyone = new Set();

function frame(obj) {
  const body = Buffer.from(JSON.stringify(obj));
  const out = Buffer.alloc(4 + body.length);
  out.writeUInt32BE(body.length, 0);
  body.copy(out, 4);
  return out;
}

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
  if (msg.type === 'ping') return frame({ type: 'pong', id: msg.id });
  if (msg.type === 'subscribe') {
    const c = channel(data.channel);
    c.subs.add(socket);
    mine.add(data.channel);
    return frame({
      type: 'subscribe',
      id: msg.id,
      data: { channel: data.channel, epoch: 'node', offset: c.offset },
    });
  }
  if (msg.type === 'publish') {
    const c = channel(data.channel);
    c.offset += 1;
    const publication = frame({
      type: 'publication',
      data: { channel: data.channel, offset: c.offset, data: data.data },
    });
    for (const sub of c.subs) sub.write(publication);
    return frame({ type: 'publish', id: msg.id, data: { channel: data.channel, offset: c.offset } });
  }
  if (msg.type === 'broadcast') {
    const push = frame({ type: 'bcast', data: msg.data });
    for (const other of everyone) other.write(push);
    return frame({ type: 'broadcast', id: msg.id, data: { sent: everyone.size } });
  }
  return frame({ type: 'error', id: msg.id, error: { code: 'unknown_type', message: msg.type } });
}

const server = net.createServer((socket) => {
  socket.setNoDelay(true);
  everyone.add(socket);
  const mine = new Set();
  let buffer = Buffer.alloc(0);
  socket.on('data', (chunk) => {
    buffer = buffer.length ? Buffer.concat([buffer, chunk]) : chunk;
    const out = [];
    let offset = 0;
    while (buffer.length - offset >= 4) {
      const length = buffer.readUInt32BE(offset);
      if (buffer.length - offset - 4 < length) break;
      const body = buffer.toString('utf8', offset + 4, offset + 4 + length);
      offset += 4 + length;
      out.push(handle(socket, mine, JSON.parse(body)));
    }
    buffer = buffer.subarray(offset);
    if (out.length) socket.write(Buffer.concat(out));
  });
  const forget = () => {
    everyone.delete(socket);
    for (const name of mine) channels.get(name)?.subs.delete(socket);
  };
  socket.on('close', forget);
  socket.on('error', forget);
});

server.listen({ port: Number(process.argv[2]), host: '127.0.0.1', backlog: 4096 }, () => {
  process.stdout.write(JSON.stringify({ port: server.address().port }) + '\n');
});
process.on('SIGTERM', () => process.exit(0));
