// Peer: socket.io 4 as a channel server, for bench/fanout.py: a room per channel, the way
// socket.io applications fan out. Events (each with an ack, the reply):
//   subscribe(channel)             joins the room; ack {channel, epoch, offset}
//   publish({channel, data})       offset += 1; io.to(channel).emit('publication',
//                                  {channel, offset, data}) (socket.io encodes a broadcast
//                                  once and writes it to each socket); ack {channel, offset}
//   broadcast(data)                io.emit('bcast', data); ack {sent}
//   ping()                         ack 'pong'
// WebSocket transport only (no long-polling), no compression, engine.io pings every hour
// (heartbeatd's bench config also sends none during a run).
//
//   node socketio_fanout.js PORT      prints {"port": N} once listening
'use strict';
const http = require('http');
const { Server } = require('socket.io');

const offsets = new Map();
const server = http.createServer();
const io = new Server(server, {
  transports: ['websocket'],
  perMessageDeflate: false,
  pingInterval: 3600 * 1000,
  pingTimeout: 3600 * 1000,
  maxHttpBufferSize: 1024 * 1024,
  serveClient: false,
});
io.on('connection', (socket) => {
  socket.conn.transport.socket?._socket?.setNoDelay(true);
  socket.on('subscribe', (channel, ack) => {
    socket.join(channel);
    ack({ channel, epoch: 'socket.io', offset: offsets.get(channel) || 0 });
  });
  socket.on('publish', (msg, ack) => {
    const offset = (offsets.get(msg.channel) || 0) + 1;
    offsets.set(msg.channel, offset);
    io.to(msg.channel).emit('publication', { channel: msg.channel, offset, data: msg.data });
    ack({ channel: msg.channel, offset });
  });
  socket.on('broadcast', (data, ack) => {
    io.emit('bcast', data);
    ack({ sent: io.engine.clientsCount });
  });
  socket.on('ping', (ack) => ack('pong'));
});
server.listen({ port: Number(process.argv[2] || 0), host: '127.0.0.1', backlog: 4096 }, () => {
  process.stdout.write(JSON.stringify({ port: server.address().port }) + '\n');
});
process.on('SIGTERM', () => process.exit(0));
