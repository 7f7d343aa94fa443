// The transports every behaviour test runs over, and the daemons that serve them: a plain
// daemon serves tcp:// and ws://, a TLS one (the same tls.* keys) tls:// and wss://.  The
// WebSocket variants run where this heartbeatd has the WebSocket listener.

import { Daemon, hasWebSocket, makeCerts } from './daemon.js';

export const WEBSOCKET = hasWebSocket();
export const NO_WEBSOCKET = WEBSOCKET ? false : 'this heartbeatd has no WebSocket listener (websocket.listen) yet';

/** Client options that keep the tests quick: short reconnect delays. */
export const QUICK = Object.freeze({ minReconnectDelay: 50, maxReconnectDelay: 300, timeout: 5000 });

let WebSocketClass = null;
if (WEBSOCKET) WebSocketClass = (await import('ws')).WebSocket;

export const TRANSPORTS = [
  { name: 'tcp', secure: false, skip: false },
  { name: 'tls', secure: true, skip: false },
  { name: 'ws', secure: false, skip: NO_WEBSOCKET },
  { name: 'wss', secure: true, skip: NO_WEBSOCKET },
];

/**
 * A daemon for `secure` (TLS or not) with `config`, serving WebSocket too where it can;
 * `certs` (from makeCerts) is needed for TLS.
 */
export function daemonFor(secure, config, { certs, dir, pythonPath } = {}) {
  const full = { ...config };
  if (secure) full.tls = { certificate: certs.cert, private_key: certs.key, ...config.tls };
  if (WEBSOCKET) full.websocket = { listen: 'tcp:0:interface=127.0.0.1', ...config.websocket };
  return new Daemon(full, { dir, pythonPath });
}

/** The url and client options to reach `daemon` over transport `name`. */
export function endpoint(name, daemon, certs, extra = {}) {
  switch (name) {
    case 'tcp':
      return [`tcp://127.0.0.1:${daemon.port}`, { ...QUICK, ...extra }];
    case 'tls':
      return [`tls://localhost:${daemon.port}`, { ...QUICK, ca: certs.caPem, ...extra }];
    case 'ws':
      return [`ws://127.0.0.1:${daemon.wsPort}/`, { ...QUICK, WebSocket: WebSocketClass, ...extra }];
    case 'wss':
      return [
        `wss://localhost:${daemon.wsPort}/`,
        { ...QUICK, WebSocket: WebSocketClass, webSocketOptions: { ca: certs.caPem }, ...extra },
      ];
    default:
      throw new Error(`no transport ${name}`);
  }
}

export { makeCerts };
