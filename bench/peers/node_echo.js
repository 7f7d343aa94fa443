// Peer: a Node.js `net` echo server of the seed's style, with correct int32 stream parsing.
// Replies produced by one read go out in one write (batched). With --heartbeat S it pings
// every client every S seconds from setInterval, like the seed, printing each sweep's time.
//
//   node node_echo.js PORT [--heartbeat S]
'use strict';
const net = require('net');

const clients = new Set();
const ping = Buffer.from('{"type":"ping"}');
const pingFrame = Buffer.alloc(4 + ping.length);
pingFrame.writeUInt32BE(ping.length, 0);
ping.copy(pingFrame, 4);

const server = net.createServer((socket) => {
  socket.setNoDelay(true);
  clients.add(socket);
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
      const reply = Buffer.from(JSON.stringify(JSON.parse(body)));
      const header = Buffer.alloc(4);
      header.writeUInt32BE(reply.length, 0);
      out.push(header, reply);
    }
    buffer = buffer.subarray(offset);
    if (out.length) socket.write(Buffer.concat(out));
  });
  const forget = () => clients.delete(socket);
  socket.on('close', forget);
  socket.on('error', forget);
});

const args = process.argv.slice(2);
const at = args.indexOf('--heartbeat');
if (at >= 0) {
  setInterval(() => {
    const started = process.hrtime.bigint();
    for (const socket of clients) socket.write(pingFrame);
    const ms = Number(process.hrtime.bigint() - started) / 1e6;
    process.stdout.write(JSON.stringify({ sweep_ms: ms }) + '\n');
  }, Number(args[at + 1]) * 1000);
}
server.listen({ port: Number(args[0]), host: '127.0.0.1', backlog: 4096 }, () => {
  process.stdout.write(JSON.stringify({ port: server.address().port }) + '\n');
});
process.on('SIGTERM', () => process.exit(0));
