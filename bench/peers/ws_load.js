// Load generator for bench/websocket.py: CONNS WebSocket clients (the `ws` package), each
// keeping DEPTH echo requests of SIZE bytes in flight; after WARMUP seconds, counts replies
// for DURATION seconds and prints {"msgs_per_s", "replies", "total"} (total: replies since
// the start, warm-up included). Server pings are answered.
//
//   node ws_load.js URL CONNS DEPTH SIZE DURATION WARMUP
'use strict';
const WebSocket = require('ws');

const [url, conns, depth, size, duration, warmup] = process.argv.slice(2);
const request = JSON.stringify({ type: 'echo', id: 1, data: 'x'.repeat(Number(size)) });
let counting = false;
let replies = 0;
let total = 0;
let open = 0;

function start(ws) {
  for (let i = 0; i < Number(depth); i++) ws.send(request);
}

for (let i = 0; i < Number(conns); i++) {
  const ws = new WebSocket(url, { perMessageDeflate: false });
  ws.on('open', () => {
    ws._socket.setNoDelay(true);
    open += 1;
    start(ws);
  });
  ws.on('message', (data) => {
    const text = data.toString();
    if (text.startsWith('{"type":"echo"')) {
      total += 1;
      if (counting) replies += 1;
      ws.send(request);
    } else if (text.startsWith('{"type":"ping"')) {
      ws.send(JSON.stringify({ type: 'pong', id: JSON.parse(text).id }));
    }
  });
  ws.on('error', (error) => {
    console.error(String(error));
    process.exit(1);
  });
}

setTimeout(() => {
  counting = true;
  setTimeout(() => {
    counting = false;
    console.log(JSON.stringify({ msgs_per_s: replies / Number(duration), replies, total, open }));
    process.exit(0);
  }, Number(duration) * 1000);
}, Number(warmup) * 1000);
