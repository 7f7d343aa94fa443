// A Node.js `net` server of the seed tutorial's kind, with a correct stream parser.
//
// Like the tutorial: it keeps a client list, answers each JSON body with the JSON string
// '服务端的数据数据:' + body, broadcasts the bare "HeartBeat" token to every client on a timer
// (its second example), treats received tokens as heartbeats, and sends no hello and no ids.
//
// usage: node seed_server.js [HEARTBEAT_MS]   prints {"port": N} once listening.
'use strict';
const net = require('net');

const TOKEN = Buffer.from('HeartBeat');
const PREFIX = 'length:';
const HEADER = 20;
const heartbeatMs = Number(process.argv[2] || 10000);
const clients = new Set();

function frame(value) {
  const body = Buffer.from(JSON.stringify(value));
  return Buffer.concat([Buffer.from(PREFIX + String(body.length).padStart(13, '0')), body]);
}

const server = net.createServer((client) => {
  clients.add(client);
  let buffer = Buffer.alloc(0);
  client.on('data', (chunk) => {
    buffer = Buffer.concat([buffer, chunk]);
    for (;;) {
      if (buffer.length === 0) return;
      if (buffer[0] === TOKEN[0]) {
        if (buffer.length < TOKEN.length) return;
        buffer = buffer.subarray(TOKEN.length);   // a client heartbeat: nothing to answer
        continue;
      }
      if (buffer.length < HEADER) return;
      const head = buffer.subarray(0, HEADER).toString('latin1');
      if (!head.startsWith(PREFIX)) { client.destroy(); return; }
      const length = parseInt(head.substring(7, 20), 10);
      if (buffer.length < HEADER + length) return;
      const text = buffer.subarray(HEADER, HEADER + length).toString('utf8');
      buffer = buffer.subarray(HEADER + length);
      JSON.parse(text);   // the tutorial parses, then replies with the raw text inside a string
      client.write(frame('服务端的数据数据:' + text));
    }
  });
  const forget = () => clients.delete(client);
  client.on('end', forget);
  client.on('close', forget);
  client.on('error', forget);
});

setInterval(() => {
  for (const client of clients) {
    if (client.writable) client.write(TOKEN); else client.destroy();
  }
}, heartbeatMs).unref();

server.listen(0, '127.0.0.1', () => {
  process.stdout.write(JSON.stringify({ port: server.address().port }) + '\n');
});
process.on('SIGTERM', () => process.exit(0));
