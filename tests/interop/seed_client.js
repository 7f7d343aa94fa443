// A Node.js `net` client speaking the seed tutorial's protocol, with a correct stream parser.
//
// Frames: "length:" + 13 zero-padded digits + UTF-8 JSON body; the bare token "HeartBeat" is a
// heartbeat in either direction. Unlike the tutorial, it parses the byte stream, so split and
// coalesced reads are handled.
//
// usage: node seed_client.js PORT MODE [COUNT]
//   MODE "chat":   send COUNT values (date strings, like the tutorial) plus a heartbeat after
//                  each, exit when every value has its reply. Like the tutorial's client, it
//                  never answers a heartbeat token (the server answers ours).
//   MODE "silent": send nothing, never answer; report heartbeats until the server closes.
// Prints one JSON line per event: {"event": "data"|"heartbeat"|"close"|"error", ...}.
'use strict';
const net = require('net');

const TOKEN = Buffer.from('HeartBeat');
const PREFIX = 'length:';
const HEADER = 20;

const [port, mode = 'chat', countArg = '5'] = process.argv.slice(2);
const count = Number(countArg);

function header(length) {
  return PREFIX + String(length).padStart(13, '0');
}

function emit(event) {
  process.stdout.write(JSON.stringify(event) + '\n');
}

function send(client, value) {
  const body = Buffer.from(JSON.stringify(value));
  client.write(header(body.length));   // header and body in separate writes, as the tutorial did
  client.write(body);
}

let buffer = Buffer.alloc(0);
function parse(chunk, onItem) {
  buffer = Buffer.concat([buffer, chunk]);
  for (;;) {
    if (buffer.length === 0) return;
    if (buffer[0] === TOKEN[0]) {
      if (buffer.length < TOKEN.length) return;
      if (!buffer.subarray(0, TOKEN.length).equals(TOKEN)) throw new Error('bad token');
      buffer = buffer.subarray(TOKEN.length);
      onItem(null);
    } else {
      if (buffer.length < HEADER) return;
      const head = buffer.subarray(0, HEADER).toString('latin1');
      if (!head.startsWith(PREFIX)) throw new Error('bad header ' + JSON.stringify(head));
      const length = parseInt(head.substring(7, 20), 10);
      if (buffer.length < HEADER + length) return;
      const body = buffer.subarray(HEADER, HEADER + length).toString('utf8');
      buffer = buffer.subarray(HEADER + length);
      onItem(JSON.parse(body));
    }
  }
}

const client = net.connect(Number(port), '127.0.0.1');
let replies = 0;
let sawHello = false;
const sent = [];

client.on('connect', () => {
  if (mode !== 'chat') return;
  for (let i = 0; i < count; i += 1) {
    const value = new Date(Date.UTC(2026, 0, 1, 0, 0, i)).toUTCString();
    sent.push(value);
    send(client, value);
    client.write(TOKEN);   // the tutorial's client heartbeat, right after a frame
  }
});

client.on('data', (chunk) => {
  try {
    parse(chunk, (item) => {
      if (item === null) {
        emit({ event: 'heartbeat' });
        return;
      }
      if (!sawHello && item && item.type === 'hello') {
        sawHello = true;
        emit({ event: 'hello', data: item.data });
        return;
      }
      emit({ event: 'data', value: item });
      replies += 1;
      if (mode === 'chat' && replies === count) client.end();
    });
  } catch (err) {
    emit({ event: 'error', message: String(err) });
    client.destroy();
  }
});

client.on('close', () => emit({ event: 'close' }));
client.on('error', (err) => emit({ event: 'error', message: String(err) }));
