// Peer: Node.js with the `ws` package (the WebSocket server most Node programs use), answering
// heartbeatd's echo envelope the way heartbeatd does: JSON.parse, then JSON.stringify the reply.
// Prints {"port": N} once listening.
//
//   node ws_echo.js PORT
'use strict';
const { WebSocketServer } = require('ws');

const wss = new WebSocketServer({
  host: '127.0.0.1',
  port: Number(process.argv[2] || 0),
  maxPayload: 1024 * 1024, // heartbeatd's default max_frame_bytes
  perMessageDeflate: false,
});
wss.on('connection', (socket) => {
  socket._socket.setNoDelay(true);
  socket.on('message', (data, isBinary) => {
    if (isBinary) return socket.close(1003);
    const message = JSON.parse(data);
    socket.send(JSON.stringify({ type: message.type, id: message.id, data: message.data }));
  });
});
wss.on('listening', () => console.log(JSON.stringify({ port: wss.address().port })));
process.on('SIGTERM', () => process.exit(0));
