// heartbeatd-client: the JavaScript client of heartbeatd (Node.js over TCP/TLS, browsers and
// Node.js over WebSocket).  See docs/js-client.md.

export { Client, connect, CLIENT_EVENTS, DEFAULTS } from './src/client.js';
export { Subscription } from './src/subscription.js';
export {
  ClientError,
  ConnectionError,
  MessageTooLargeError,
  QueueFullError,
  ServerError,
  SessionLost,
  SessionUnavailableError,
  SubscriptionRateLimitedError,
  SubscriptionUnavailableError,
  TimeoutError,
} from './src/errors.js';
export { Emitter } from './src/emitter.js';
export {
  encodeInt32,
  encodeSeed,
  FrameTooLarge,
  FramingError,
  framings,
  HEARTBEAT,
  Int32Decoder,
  SeedDecoder,
} from './src/framing.js';
export { goawayDelay, heartbeatTerms, MIN_HEARTBEAT_INTERVAL, reconnectDelay } from './src/backoff.js';
