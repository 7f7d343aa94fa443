// TypeScript declarations of heartbeatd-client (docs/js-client.md).

/** Any JSON value. */
export type Json = null | boolean | number | string | Json[] | { [key: string]: Json };

export interface TlsOptions {
  /** CA certificate(s), PEM, to trust instead of the system's. */
  ca?: string | Uint8Array | Array<string | Uint8Array>;
  /** Client certificate and key, PEM (mutual TLS). */
  cert?: string | Uint8Array;
  key?: string | Uint8Array;
  /** SNI name and the name the certificate is checked against (default: the url's host). */
  servername?: string;
  /** Default true: refuse a certificate that is not valid for the host. */
  rejectUnauthorized?: boolean;
  minVersion?: 'TLSv1.2' | 'TLSv1.3';
  checkServerIdentity?: (host: string, cert: unknown) => Error | undefined;
}

export interface ClientOptions extends TlsOptions {
  /** Token sent as the first request (`auth`) on every connection. */
  token?: string;
  /** Called on every (re)connect for the token to send; wins over `token`. */
  getToken?: () => string | null | undefined | Promise<string | null | undefined>;
  /** Default timeout in ms of a request, and of each connect (connect + hello + auth). Default 10000. */
  timeout?: number;
  /** Reconnect delays in ms: full jitter between min and min(max, min * 2^attempt). Defaults 500, 20000. */
  minReconnectDelay?: number;
  maxReconnectDelay?: number;
  /**
   * Reconnect after a lost connection or a goaway. Default true. False: once the connection
   * is lost (or an attempt fails) requests and subscriptions fail with ConnectionError.
   */
  reconnect?: boolean;
  /** tcp:// and tls:// only: 'int32' (default) or 'seed' (the seed tutorial's servers). */
  framing?: 'int32' | 'seed';
  /** Requests that may wait for a connection at once; more reject with QueueFullError. Default 1000. */
  maxQueuedRequests?: number;
  /** Largest frame accepted from the server, in bytes. Default 16 MiB. */
  maxFrameBytes?: number;
  /** A WebSocket constructor for ws:// and wss:// (default: globalThis.WebSocket), e.g. the `ws` package. */
  WebSocket?: new (url: string, ...args: any[]) => any;
  /** A second argument for that constructor (e.g. `{ca}` for `ws`; with `ws`, `maxPayload` defaults to `maxFrameBytes`). */
  webSocketOptions?: object;
  /** Random numbers in [0, 1) for the jitter (tests). */
  random?: () => number;
  /**
   * Hold a server session across reconnects: requests in flight survive them, pushes arrive
   * exactly once and in order, subscriptions live on in the session. Default false.
   */
  resumable?: boolean;
  /** With `resumable`: the session's expiry to ask for, in seconds (the server caps it). */
  sessionExpiry?: number;
  /**
   * With `resumable`: messages the session keeps until the server acknowledges them; past it
   * a request rejects (and `send` throws) with QueueFullError, and a subscribe fails with it
   * (`ready()` rejects, `state` 'failed'). Default 10000.
   */
  maxBuffered?: number;
  /**
   * With `resumable`: ms the client keeps retrying (with the reconnect backoff) while the
   * server answers a session start or a resume `unavailable`, from the first such answer;
   * then it stops with SessionUnavailableError (open() rejects; a held session is lost,
   * reason `unavailable`). `Infinity`: never gives up. Default 60000. Only `open()` waits
   * through such answers: `connect()` makes one attempt and rejects with its ServerError.
   */
  sessionRetryTimeout?: number;
  /**
   * ms a subscription keeps subscribing again (with the reconnect backoff) while the server
   * answers `unavailable` (its broker is down) or `rate_limited` (heartbeatd's per-connection
   * subscribe budget), from the first such answer; then it fails with
   * SubscriptionUnavailableError or SubscriptionRateLimitedError, after the last answer
   * (`ready()` rejects, `state` 'failed', no more tries). `Infinity`: never gives up. Default 60000.
   * A `rate_limited` answer's `retry_after` (0 to 60 s) is the least wait before the next
   * subscribe on that connection; ending past this deadline, the subscription fails at it.
   */
  subscribeRetryTimeout?: number;
}

export interface SessionEvent {
  /** The session's id (not the hello's connection `session`). */
  session: string;
  /** Seconds it outlives a lost connection, as the server granted. */
  expiry: number;
}

export interface ResumedEvent {
  session: string;
  /** How many messages the server replayed (sent while we were away, or lost on the way). */
  replayed: number;
}

export interface SessionLostEvent {
  session: string | null;
  /**
   * The server's reason (`unknown_session`, `expired`, `bad_key`, `forbidden`, `overflow`,
   * `sessions_disabled`...), or `session_taken_over`.
   */
  reason: string;
  /** Set when the client gave the session up itself (`unavailable` past `sessionRetryTimeout`). */
  error?: SessionUnavailableError;
}

export interface Hello {
  server: string;
  version: string;
  session: string;
  framing: string;
  heartbeat: { interval: number; timeout: number };
  max_frame_bytes: number;
  auth?: 'required';
  [key: string]: Json | undefined;
}

export interface ConnectedEvent {
  url: string;
  hello: Hello | null;
  identity: string | null;
}

export interface DisconnectedEvent {
  /** Why, in words. */
  reason: string;
  error: Error;
  /** True when the server had said goaway. */
  goaway: boolean;
}

export interface GoawayEvent {
  reason?: string;
  /** Seconds within which the client reconnects, at a random moment. */
  reconnect_after?: number;
  [key: string]: Json | undefined;
}

export interface RequestOptions {
  /** ms; the wait for a connection counts too. Default: the client's `timeout`. */
  timeout?: number;
}

export interface Position {
  epoch: string;
  offset: number;
}

export interface PublicationContext {
  channel: string;
  epoch: string;
  offset: number;
  data: Json;
}

export interface SubscribedContext {
  channel: string;
  epoch: string;
  /** The channel's latest offset when the server answered. */
  offset: number;
  /** True when every publication missed since the last position follows, none twice. */
  recovered: boolean;
  /** True when the subscribe asked with a position (`since`, or after a reconnect). */
  wasRecovering: boolean;
}

export interface ResyncContext {
  channel: string;
  epoch: string;
  offset: number;
  /** 'gap', or the server's reason (e.g. the cluster lost the stream). */
  reason: string;
}

export interface PresenceInfo {
  channel: string;
  session: string;
  node: string;
  identity: string | null;
}

export interface SubscribeOptions {
  /** Resume after this position (e.g. stored from `subscription.position`). */
  since?: Position;
  /** Receive join and leave events of other sessions. */
  joinLeave?: boolean;
  onPublication?: (publication: PublicationContext) => void;
  onJoin?: (info: PresenceInfo) => void;
  onLeave?: (info: PresenceInfo) => void;
  onSubscribed?: (context: SubscribedContext) => void;
  onResync?: (context: ResyncContext) => void;
  onError?: (error: Error) => void;
}

export class Emitter {
  on(event: string, listener: (...args: any[]) => void): () => void;
  once(event: string, listener: (...args: any[]) => void): () => void;
  off(event: string, listener: (...args: any[]) => void): void;
  emit(event: string, ...args: any[]): boolean;
  listenerCount(event: string): number;
}

export class Subscription extends Emitter {
  readonly channel: string;
  readonly state: 'subscribing' | 'subscribed' | 'unsubscribed' | 'failed';
  /** The last publication delivered ('' and 0 before any). */
  readonly epoch: string;
  readonly offset: number;
  readonly position: Position;
  readonly recovered: boolean;
  /**
   * Resolves once subscribed; rejects with the ServerError of a refused subscribe
   * (SubscriptionUnavailableError or SubscriptionRateLimitedError after
   * `subscribeRetryTimeout` of `unavailable` or `rate_limited`), QueueFullError (a session's
   * `maxBuffered`), or ConnectionError (the client was closed, or stopped connecting:
   * `reconnect: false`, SessionUnavailableError). Then `state` is 'failed'.
   */
  ready(): Promise<SubscribedContext>;
  unsubscribe(): Promise<void>;
  on(event: 'publication', listener: (publication: PublicationContext) => void): () => void;
  on(event: 'join' | 'leave', listener: (info: PresenceInfo) => void): () => void;
  on(event: 'subscribed', listener: (context: SubscribedContext) => void): () => void;
  on(event: 'resync', listener: (context: ResyncContext) => void): () => void;
  on(event: 'error', listener: (error: Error) => void): () => void;
}

export type ClientState = 'idle' | 'connecting' | 'connected' | 'disconnected' | 'closed';

export class Client extends Emitter {
  constructor(url: string, options?: ClientOptions);
  readonly url: string;
  readonly state: ClientState;
  readonly connected: boolean;
  readonly hello: Hello | null;
  readonly identity: string | null;
  readonly lastError: Error | null;
  /** The id of the session held (`resumable: true`), or null. */
  readonly session: string | null;
  /** Start (re)connecting; resolves once connected. */
  open(): Promise<Client>;
  close(): Promise<void>;
  request<T = any>(type: string, data?: Json, options?: RequestOptions): Promise<T>;
  /** Seed framing: send a bare JSON value; resolves with the next bare value received. */
  requestValue<T = any>(value: Json, options?: RequestOptions): Promise<T>;
  send(type: string, data?: Json): void;
  subscribe(channel: string, options?: SubscribeOptions): Subscription;
  presence(channel: string, options?: RequestOptions): Promise<Array<{ session: string; node: string; identity: string | null }>>;
  /** Resolves with the publication's offset. */
  publish(channel: string, data: Json, options?: RequestOptions): Promise<number>;
  /** Every push, whatever its type. */
  onPush(listener: (type: string, data: any) => void): () => void;
  on(event: 'connecting', listener: (event: { attempt: number; url: string }) => void): () => void;
  on(event: 'connected', listener: (event: ConnectedEvent) => void): () => void;
  on(event: 'disconnected', listener: (event: DisconnectedEvent) => void): () => void;
  on(event: 'goaway', listener: (event: GoawayEvent) => void): () => void;
  on(event: 'error', listener: (error: Error) => void): () => void;
  on(event: 'session', listener: (event: SessionEvent) => void): () => void;
  on(event: 'resumed', listener: (event: ResumedEvent) => void): () => void;
  on(event: 'session_lost', listener: (event: SessionLostEvent) => void): () => void;
  /** Pushes of `type` (server messages without an id). */
  on(type: string, listener: (data: any) => void): () => void;
}

/**
 * One attempt: resolves with a connected client, or rejects with that attempt's error (with
 * `resumable`, a session start answered `unavailable` too) and leaves nothing running.
 */
export function connect(url: string, options?: ClientOptions): Promise<Client>;

export const CLIENT_EVENTS: readonly string[];
export const DEFAULTS: Readonly<Required<Pick<ClientOptions,
  'timeout' | 'minReconnectDelay' | 'maxReconnectDelay' | 'reconnect' | 'framing' | 'maxQueuedRequests' | 'maxFrameBytes' | 'resumable' | 'maxBuffered' | 'sessionRetryTimeout' | 'subscribeRetryTimeout'>>>;

export class ClientError extends Error {}
export class ServerError extends ClientError {
  constructor(code: string, message: string, retryAfter?: number | null);
  readonly code: string;
  /**
   * The error's `retry_after` in ms (heartbeatd sends it with `rate_limited` from a token
   * bucket: the wait until the same request would be accepted); null without one, or when it
   * is not a number from 0 to 60 seconds.
   */
  readonly retryAfter: number | null;
}
export class TimeoutError extends ClientError {}
export class ConnectionError extends ClientError {}
/** A resumable client's session ended while the request waited: whether it ran is unknown. */
export class SessionLost extends ConnectionError {
  readonly reason: string;
}
/**
 * The server answered every session start or resume `unavailable` for `sessionRetryTimeout`
 * ms: the client stopped trying (open() starts again).
 */
export class SessionUnavailableError extends ConnectionError {
  readonly reason: 'unavailable';
  /** ms from the first `unavailable` answer to the last. */
  readonly elapsed: number;
  /** Attempts answered `unavailable`. */
  readonly attempts: number;
  /** The sessionRetryTimeout that ran out, ms. */
  readonly limit: number;
}
/**
 * Every subscribe to `channel` was answered `unavailable` for `subscribeRetryTimeout` ms: the
 * subscription failed (subscribe again to retry). A ServerError with code `unavailable`.
 */
export class SubscriptionUnavailableError extends ServerError {
  readonly code: 'unavailable';
  readonly channel: string;
  /** ms from the first refusal to the last. */
  readonly elapsed: number;
  /** Subscribes refused, both kinds: `unavailableAttempts + rateLimitedAttempts`. */
  readonly attempts: number;
  /** Subscribes answered `unavailable`. */
  readonly unavailableAttempts: number;
  /** Subscribes answered `rate_limited` (before the broker went, or between its outages). */
  readonly rateLimitedAttempts: number;
  /** The subscribeRetryTimeout that ran out, ms. */
  readonly limit: number;
  /** The server's last `unavailable` answer. */
  readonly cause: ServerError;
}
/**
 * Every subscribe to `channel` was refused (the last as `rate_limited`: heartbeatd's
 * `channels.subscribe_rate`) for `subscribeRetryTimeout` ms: the subscription failed
 * (subscribe again to retry). A ServerError with code `rate_limited`.
 */
export class SubscriptionRateLimitedError extends ServerError {
  readonly code: 'rate_limited';
  readonly channel: string;
  /**
   * ms from the first refusal to the last, or to the deadline when the last refusal's
   * `retry_after` ended after it (the client then gave up without asking again).
   */
  readonly elapsed: number;
  /** Subscribes refused, both kinds: `unavailableAttempts + rateLimitedAttempts`. */
  readonly attempts: number;
  /** Subscribes answered `unavailable`. */
  readonly unavailableAttempts: number;
  /** Subscribes answered `rate_limited`. */
  readonly rateLimitedAttempts: number;
  /** The subscribeRetryTimeout that ran out, ms. */
  readonly limit: number;
  /** The server's last `rate_limited` answer. */
  readonly cause: ServerError;
}
export class QueueFullError extends ClientError {
  readonly limit: number;
  /** The bound reached: requests waiting for a connection, or a session's unacknowledged messages. */
  readonly option: 'maxQueuedRequests' | 'maxBuffered';
}
export class MessageTooLargeError extends ClientError {
  readonly size: number;
  readonly limit: number;
}

// -- the wire framings (pure) ------------------------------------------------------------

export const HEARTBEAT: { readonly heartbeat: true };
export type FrameItem = Uint8Array | typeof HEARTBEAT;

export class FramingError extends Error {
  readonly code: 'bad_frame' | 'frame_too_large';
}
export class FrameTooLarge extends FramingError {
  readonly length: number;
  readonly limit: number;
}

export interface FrameDecoder {
  readonly maxFrameBytes: number;
  readonly error: FramingError | null;
  readonly buffered: number;
  feed(chunk: Uint8Array | ArrayBuffer): FrameItem[];
}
export class Int32Decoder implements FrameDecoder {
  constructor(maxFrameBytes: number);
  readonly maxFrameBytes: number;
  readonly error: FramingError | null;
  readonly buffered: number;
  feed(chunk: Uint8Array | ArrayBuffer): FrameItem[];
}
export class SeedDecoder implements FrameDecoder {
  constructor(maxFrameBytes: number);
  readonly maxFrameBytes: number;
  readonly error: FramingError | null;
  readonly buffered: number;
  feed(chunk: Uint8Array | ArrayBuffer): FrameItem[];
}
export function encodeInt32(body: string | Uint8Array): Uint8Array;
export function encodeSeed(body: string | Uint8Array): Uint8Array;

export interface Framing {
  readonly name: 'int32' | 'seed';
  encode(body: string | Uint8Array): Uint8Array;
  decoder(maxFrameBytes: number): FrameDecoder;
  readonly heartbeatToken: Uint8Array | null;
  readonly bareValues: boolean;
}
export const framings: { readonly int32: Framing; readonly seed: Framing };

// -- the time policies (pure) ------------------------------------------------------------

export const MIN_HEARTBEAT_INTERVAL: number;
export function reconnectDelay(attempt: number, min: number, max: number, random?: () => number): number;
export function heartbeatTerms(
  heartbeat: { interval?: unknown; timeout?: unknown } | null | undefined,
  fallback?: { interval: number; timeout: number } | null,
): { interval: number; timeout: number } | null;
export function goawayDelay(data: { reconnect_after?: unknown } | null | undefined, random?: () => number): number;
