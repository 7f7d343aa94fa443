// How bytes reach the connection: a TCP/TLS stream cut by a framing (Node), or WebSocket
// messages (browsers, and Node with a WebSocket constructor).  Each transport hands the
// connection whole frame bodies (`sink.item(body)`, or HEARTBEAT in seed framing) and one
// `sink.closed(error)` at the end; it offers `send(text)`, `sendToken()`, `close()`, `abort()`.
//
// Node's `net` and `tls` are imported only when a tcp:// or tls:// url is opened, so a
// browser (or a bundle for one) never loads them.

import { ConnectionError } from './errors.js';
import { framings } from './framing.js';

/** `{kind: 'stream'|'websocket', secure, host, port, href}` of a url, or a TypeError. */
export function parseUrl(url) {
  let parsed;
  try {
    parsed = new URL(String(url));
  } catch {
    throw new TypeError(`not a url: ${JSON.stringify(String(url))}`);
  }
  const scheme = parsed.protocol.slice(0, -1);
  if (scheme === 'ws' || scheme === 'wss') {
    return { kind: 'websocket', secure: scheme === 'wss', href: parsed.href };
  }
  if (scheme !== 'tcp' && scheme !== 'tls') {
    throw new TypeError(`unsupported url scheme ${JSON.stringify(scheme)}: use tcp://, tls://, ws:// or wss://`);
  }
  const host = parsed.hostname.replace(/^\[(.*)\]$/, '$1');
  const port = Number(parsed.port);
  if (!host || !Number.isInteger(port) || port < 1 || port > 65535) {
    throw new TypeError(`a ${scheme}:// url needs a host and a port, e.g. ${scheme}://127.0.0.1:9000`);
  }
  return { kind: 'stream', secure: scheme === 'tls', host, port, href: `${scheme}://${parsed.host}` };
}

/**
 * Open a transport to `target` (from parseUrl); resolves once bytes can flow (TCP connected,
 * TLS handshake done, WebSocket open), rejects with a ConnectionError.
 */
export function openTransport(target, options, sink) {
  return target.kind === 'websocket'
    ? openWebSocket(target, options, sink)
    : openStream(target, options, sink);
}

function describe(error) {
  if (!error) return 'closed';
  return error.code && !String(error.message).includes(error.code)
    ? `${error.code}: ${error.message}`
    : String(error.message || error);
}

async function openStream(target, options, sink) {
  if (typeof process === 'undefined' || !process.versions?.node) {
    throw new ConnectionError(`${target.href}: tcp:// and tls:// need Node.js; browsers use ws:// or wss://`);
  }
  const framing = framings[options.framing];
  const net = await import('node:net');
  const tls = target.secure ? await import('node:tls') : null;
  return new Promise((resolve, reject) => {
    let socket;
    if (tls) {
      const tlsOptions = { host: target.host, port: target.port };
      for (const key of ['ca', 'cert', 'key', 'rejectUnauthorized', 'minVersion', 'checkServerIdentity']) {
        if (options[key] !== undefined) tlsOptions[key] = options[key];
      }
      // SNI carries names only (RFC 6066); the certificate is still checked against an IP.
      const servername = options.servername ?? (net.isIP(target.host) ? undefined : target.host);
      if (servername) tlsOptions.servername = servername;
      socket = tls.connect(tlsOptions);
    } else {
      socket = net.connect({ host: target.host, port: target.port });
    }
    socket.setNoDelay(true);
    socket.setKeepAlive(true, 30_000);
    const decoder = framing.decoder(options.maxFrameBytes);
    let opened = false;
    let failure = null;
    const transport = {
      kind: 'stream',
      send(text) {
        socket.write(framing.encode(text));
      },
      sendToken() {
        if (framing.heartbeatToken) socket.write(framing.heartbeatToken);
      },
      close() {
        socket.end();
      },
      abort(error) {
        failure ??= error;
        socket.destroy();
      },
    };
    socket.once(tls ? 'secureConnect' : 'connect', () => {
      opened = true;
      resolve(transport);
    });
    socket.on('data', (chunk) => {
      for (const item of decoder.feed(chunk)) {
        sink.item(item);
        if (socket.destroyed) return;
      }
      if (decoder.error) {
        transport.abort(new ConnectionError(`the server sent an unframeable stream: ${decoder.error.message}`));
      }
    });
    socket.on('error', (error) => {
      failure ??= error;
    });
    socket.on('close', () => {
      if (!opened) {
        reject(new ConnectionError(`could not connect to ${target.href}: ${describe(failure)}`, { cause: failure }));
      } else {
        sink.closed(failure);
      }
    });
  });
}

/** The "ws" package's WebSocket (it has terminate(), which browsers' lack). */
function isWsPackage(WebSocketClass) {
  return typeof WebSocketClass?.prototype?.terminate === 'function';
}

/** Is `text` more than `limit` bytes in UTF-8 (the server's unit), not UTF-16 units? */
export function utf8Exceeds(text, limit) {
  if (text.length > limit) return true; // every unit is at least one byte
  if (text.length * 3 <= limit) return false; // and at most three
  let bytes = 0;
  for (let i = 0; i < text.length; i++) {
    const unit = text.charCodeAt(i);
    if (unit < 0x80) bytes += 1;
    else if (unit < 0x800) bytes += 2;
    else if (unit >= 0xd800 && unit < 0xdc00 && i + 1 < text.length) {
      const next = text.charCodeAt(i + 1);
      if (next >= 0xdc00 && next < 0xe000) {
        bytes += 4;
        i++;
      } else bytes += 3;
    } else bytes += 3;
    if (bytes > limit) return true;
  }
  return false;
}

function openWebSocket(target, options, sink) {
  const WebSocketClass = options.WebSocket ?? globalThis.WebSocket;
  if (typeof WebSocketClass !== 'function') {
    return Promise.reject(
      new ConnectionError('no WebSocket here: pass options.WebSocket (e.g. the "ws" package in Node.js < 22)'),
    );
  }
  return new Promise((resolve, reject) => {
    let ws;
    // The "ws" package (Node) takes options, and with maxPayload stops reading a message
    // past the limit (1009) instead of holding all of it first.  A browser's WebSocket takes
    // no options: it hands over whole messages, checked below once received.
    let wsOptions = options.webSocketOptions;
    if (isWsPackage(WebSocketClass) && Number.isSafeInteger(options.maxFrameBytes)) {
      wsOptions = { maxPayload: options.maxFrameBytes, ...wsOptions };
    }
    try {
      ws = wsOptions ? new WebSocketClass(target.href, wsOptions) : new WebSocketClass(target.href);
    } catch (error) {
      reject(new ConnectionError(`could not open ${target.href}: ${describe(error)}`, { cause: error }));
      return;
    }
    ws.binaryType = 'arraybuffer';
    let opened = false;
    let ended = false;
    let failure = null;
    const end = (error) => {
      if (ended) return;
      ended = true;
      if (!opened) {
        reject(new ConnectionError(`could not connect to ${target.href}: ${describe(error)}`, { cause: error }));
      } else {
        sink.closed(error);
      }
    };
    const transport = {
      kind: 'websocket',
      send(text) {
        ws.send(text);
      },
      sendToken() {},
      close() {
        ws.close(1000);
      },
      abort(error) {
        failure ??= error;
        // A dead peer never completes a closing handshake: report the end now.
        if (typeof ws.terminate === 'function') ws.terminate();
        else ws.close(4000, 'abort');
        end(failure);
      },
    };
    ws.onopen = () => {
      opened = true;
      resolve(transport);
    };
    ws.onmessage = (event) => {
      if (ended) return;
      const data = event.data;
      if (typeof data !== 'string') {
        transport.abort(new ConnectionError('the server sent a binary WebSocket message'));
      } else if (utf8Exceeds(data, options.maxFrameBytes)) {
        transport.abort(new ConnectionError(`the server sent a message over ${options.maxFrameBytes} bytes`));
      } else {
        sink.item(data);
      }
    };
    ws.onerror = (event) => {
      if (event?.error?.code === 'WS_ERR_UNSUPPORTED_MESSAGE_LENGTH') {
        // ws's maxPayload: the same report as a message found too large on arrival.
        failure ??= new ConnectionError(`the server sent a message over ${options.maxFrameBytes} bytes`);
      }
      failure ??= new ConnectionError(event?.message || event?.error?.message || 'WebSocket error');
    };
    ws.onclose = (event) => {
      const why = event.reason ? `${event.code} ${event.reason}` : `code ${event.code}`;
      end(failure ?? new ConnectionError(`WebSocket closed (${why})`));
    };
  });
}
