// The client an application holds: one connection at a time, kept up across server restarts.
//
// It reconnects with full-jitter backoff (backoff.js), follows the server's `goaway` (lets
// what is in flight finish, then comes back at a random moment within `reconnect_after`),
// re-sends its token (`getToken()` is asked again on every connect) and re-subscribes every
// channel from the last offset it delivered.  Requests made while it is disconnected wait in
// a bounded queue, each for at most its own timeout.

import { goawayDelay, reconnectDelay } from './backoff.js';
import { Connection, now } from './connection.js';
import { Emitter } from './emitter.js';
import { ClientError, ConnectionError, QueueFullError, ServerError, TimeoutError } from './errors.js';
import { framings } from './framing.js';
import { Subscription } from './subscription.js';
import { parseUrl } from './transport.js';

export const DEFAULTS = Object.freeze({
  timeout: 10_000,
  minReconnectDelay: 500,
  maxReconnectDelay: 20_000,
  reconnect: true,
  framing: 'int32',
  maxQueuedRequests: 1000,
  maxFrameBytes: 16 * 1024 * 1024,
});

/** Events the client emits itself; a push of one of these types reaches `onPush` only. */
export const CLIENT_EVENTS = Object.freeze(['connecting', 'connected', 'disconnected', 'goaway', 'error']);

/** A request's timeout in ms, or a RangeError: setTimeout fires at once past 2^31 - 1. */
function timeoutOf(timeout, fallback) {
  const ms = timeout ?? fallback;
  if (typeof ms !== 'number' || !(ms > 0) || ms > 2_147_483_647) {
    throw new RangeError(`a timeout is a number of ms in 1..2147483647, not ${ms}`);
  }
  return ms;
}

function checkOptions(options) {
  const o = { ...DEFAULTS };
  for (const [key, value] of Object.entries(options ?? {})) {
    if (value !== undefined) o[key] = value;
  }
  const positive = ['timeout', 'minReconnectDelay', 'maxReconnectDelay'];
  for (const key of positive) {
    if (typeof o[key] !== 'number' || !(o[key] > 0) || o[key] > 2_147_483_647) {
      throw new RangeError(`options.${key} must be a number of ms in 1..2147483647, not ${o[key]}`);
    }
  }
  if (o.maxReconnectDelay < o.minReconnectDelay) {
    throw new RangeError('options.maxReconnectDelay must be at least options.minReconnectDelay');
  }
  for (const key of ['maxQueuedRequests', 'maxFrameBytes']) {
    if (!Number.isSafeInteger(o[key]) || o[key] < 0) {
      throw new RangeError(`options.${key} must be an integer >= 0, not ${o[key]}`);
    }
  }
  if (!Object.hasOwn(framings, o.framing)) {
    throw new RangeError(`options.framing must be "int32" or "seed", not ${JSON.stringify(o.framing)}`);
  }
  if (o.getToken !== undefined && typeof o.getToken !== 'function') {
    throw new TypeError('options.getToken must be a function returning a token (or a Promise of one)');
  }
  if (o.token !== undefined && o.token !== null && typeof o.token !== 'string') {
    throw new TypeError('options.token must be a string');
  }
  o.random ??= Math.random;
  return o;
}

export class Client extends Emitter {
  constructor(url, options = {}) {
    super();
    this.url = String(url);
    this._target = parseUrl(url);
    this.options = checkOptions(options);
    /** 'idle', 'connecting', 'connected', 'disconnected' or 'closed'. */
    this.state = 'idle';
    /** The current Connection (also while it drains after a goaway), or null. */
    this.connection = null;
    this._hello = null;
    /** The identity the server gave our token, on the current connection. */
    this.identity = null;
    /** Why the last attempt or connection failed (an Error), or null. */
    this.lastError = null;
    this._attempts = 0;
    this._retryTimer = null;
    this._nextDelay = null;
    this._queue = [];
    this._subs = new Map();
    this._openWaiters = [];
    this._failFast = false;
    this._pushListeners = [];
  }

  /**
   * Start connecting (and reconnecting) if not already; resolves once connected, with this
   * client.  It waits through failed attempts; it rejects only when the client is closed, or
   * an attempt fails with `reconnect: false`.
   */
  open() {
    if (this.state === 'closed') return Promise.reject(new ConnectionError('the client is closed'));
    if (this.state === 'connected') return Promise.resolve(this);
    const waiting = new Promise((resolve, reject) => this._openWaiters.push({ resolve, reject }));
    // Idle, or disconnected with no retry planned (reconnect: false): start an attempt.
    if (this.state === 'idle' || (this.state === 'disconnected' && this._retryTimer === null)) this._attempt();
    return waiting;
  }

  /** The hello of the current (or last) connection; null before one (a seed server sends none). */
  get hello() {
    return this.connection?.hello ?? this._hello;
  }

  get connected() {
    return this.state === 'connected';
  }

  /** Stop for good: pending and queued requests fail, the connection closes. */
  async close() {
    if (this.state === 'closed') return;
    const wasConnected = this.state === 'connected';
    this.state = 'closed';
    clearTimeout(this._retryTimer);
    this._retryTimer = null;
    const closed = new ConnectionError('the client is closed');
    this._rejectQueue(closed);
    this._settleOpen(closed);
    for (const sub of this._subs.values()) sub._ended(closed);
    const conn = this.connection;
    this.connection = null;
    if (conn !== null) await conn.close();
    if (wasConnected) this.emit('disconnected', { reason: 'closed', error: closed, goaway: false });
  }

  // -- requests ----------------------------------------------------------------------------

  /**
   * Send a request; resolves with the reply's `data`.  Rejects with ServerError (the server's
   * error reply), TimeoutError (no reply, or no connection, within `timeout` ms),
   * ConnectionError (lost before the reply, or the client closed) or QueueFullError.
   */
  request(type, data, { timeout } = {}) {
    let ms;
    try {
      ms = timeoutOf(timeout, this.options.timeout);
    } catch (error) {
      return Promise.reject(error);
    }
    if (typeof type !== 'string' || type === '') {
      return Promise.reject(new TypeError('a message type is a non-empty string'));
    }
    const conn = this.connection;
    if (conn !== null && conn.usable) return conn.request(type, data, { timeout: ms });
    return this._enqueue((c, left) => c.request(type, data, { timeout: left }), ms);
  }

  /** Seed framing: send a bare JSON value; resolves with the next bare value received. */
  requestValue(value, { timeout } = {}) {
    let ms;
    try {
      ms = timeoutOf(timeout, this.options.timeout);
    } catch (error) {
      return Promise.reject(error);
    }
    const conn = this.connection;
    if (conn !== null && conn.usable) return conn.requestValue(value, { timeout: ms });
    return this._enqueue((c, left) => c.requestValue(value, { timeout: left }), ms);
  }

  /** Send a message that gets no reply; throws a ConnectionError while not connected. */
  send(type, data) {
    const conn = this.connection;
    if (conn === null || !conn.ready || conn.closed) {
      throw new ConnectionError(`not connected (${this.state})`);
    }
    conn.send(type, data);
  }

  _enqueue(start, ms) {
    if (this.state === 'closed') return Promise.reject(new ConnectionError('the client is closed'));
    if (this.state === 'disconnected' && !this.options.reconnect) {
      return Promise.reject(new ConnectionError('not connected, and reconnect is off', { cause: this.lastError }));
    }
    if (this._queue.length >= this.options.maxQueuedRequests) {
      return Promise.reject(new QueueFullError(this.options.maxQueuedRequests));
    }
    if (this.state === 'idle') this._attempt();
    return new Promise((resolve, reject) => {
      const entry = { start, deadline: now() + ms, resolve, reject, timer: null };
      entry.timer = setTimeout(() => {
        const i = this._queue.indexOf(entry);
        if (i >= 0) this._queue.splice(i, 1);
        const last = this.lastError ? ` (last error: ${this.lastError.message})` : '';
        reject(new TimeoutError(`not connected within ${ms} ms${last}`));
      }, ms);
      this._queue.push(entry);
    });
  }

  _flushQueue(conn) {
    const queue = this._queue;
    this._queue = [];
    for (const entry of queue) {
      clearTimeout(entry.timer);
      const left = Math.max(Math.round(entry.deadline - now()), 1);
      entry.start(conn, left).then(entry.resolve, entry.reject);
    }
  }

  _rejectQueue(error) {
    const queue = this._queue;
    this._queue = [];
    for (const entry of queue) {
      clearTimeout(entry.timer);
      entry.reject(error);
    }
  }

  // -- pushes ------------------------------------------------------------------------------

  /** Call `listener(type, data)` for every push, whatever its type (returns a remover). */
  onPush(listener) {
    return this.on('\0push', listener);
  }

  _push(type, data) {
    const body = data !== null && typeof data === 'object' ? data : {};
    const sub = typeof body.channel === 'string' ? this._subs.get(body.channel) : undefined;
    if (sub !== undefined) {
      if (type === 'publication' && Number.isSafeInteger(body.offset)) sub._publication(body.offset, body.data);
      else if (type === 'join' || type === 'leave') sub._presence(type, body);
      else if (type === 'resync') sub._resync(body);
    }
    if (type === 'refresh' && data == null) this._refresh();
    this.emit('\0push', type, data);
    if (!CLIENT_EVENTS.includes(type)) this.emit(type, data);
  }

  /** The server's JWT is about to expire (auth.mode: jwt): answer with getToken()'s. */
  async _refresh() {
    const conn = this.connection;
    if (!this.options.getToken || conn === null) return;
    try {
      const token = await this._askToken();
      if (typeof token !== 'string' || token === '') throw new TypeError('getToken() gave no token');
      if (this.connection === conn && conn.usable) await conn.request('refresh', { token });
    } catch (error) {
      this.emit('error', error);
    }
  }

  // -- channels ----------------------------------------------------------------------------

  /**
   * Subscribe to `channel` now and after every reconnect; see Subscription.  One
   * subscription per channel: unsubscribe before subscribing again.
   */
  subscribe(channel, options = {}) {
    if (this.state === 'closed') throw new ConnectionError('the client is closed');
    const current = this._subs.get(channel);
    if (current !== undefined && current.active) {
      throw new ClientError(`already subscribed to ${JSON.stringify(channel)}: unsubscribe first`);
    }
    const sub = new Subscription(this, channel, options);
    this._subs.set(channel, sub);
    const conn = this.connection;
    if (conn !== null && conn.usable) this._attach(conn, sub);
    else if (this.state === 'idle') this._attempt();
    return sub;
  }

  /** The sessions subscribed to `channel`: `[{session, node, identity}]`. */
  async presence(channel, options) {
    const answer = await this.request('presence', { channel }, options);
    return Array.isArray(answer?.clients) ? answer.clients : [];
  }

  /** Publish `data` to `channel` (needs `channels.client_publish`); resolves with its offset. */
  async publish(channel, data, options) {
    const answer = await this.request('publish', { channel, data }, options);
    return answer?.offset;
  }

  _attach(conn, sub) {
    clearTimeout(sub._retryTimer);
    sub._retryTimer = null;
    conn.request('subscribe', sub._request(), { timeout: this.options.timeout }).then(
      (answer) => {
        if (this._subs.get(sub.channel) !== sub || !sub.active || this.connection !== conn) return;
        if (!sub._answered(answer)) conn.abort(new ConnectionError('a malformed subscribe answer'));
      },
      (error) => {
        if (this._subs.get(sub.channel) !== sub || !sub.active || this.connection !== conn) return;
        if (error instanceof ServerError && error.code !== 'unavailable') {
          this._subs.delete(sub.channel); // refused for good (bad_channel, too_many_channels...)
          sub._failed(error);
        } else if (error instanceof ServerError) {
          // The cluster's broker is down: try again on this connection, backing off.
          sub._early = null;
          sub.emit('error', error);
          sub._attempts = (sub._attempts ?? 0) + 1;
          const delay = reconnectDelay(sub._attempts, this.options.minReconnectDelay, this.options.maxReconnectDelay, this.options.random);
          sub._retryTimer = setTimeout(() => {
            if (this.connection === conn && conn.usable && sub.active) this._attach(conn, sub);
          }, delay);
        } else if (error instanceof TimeoutError) {
          // A late answer would leave the server subscribed to what we asked again: start
          // over on a fresh connection instead.
          sub.emit('error', error);
          conn.abort(new ConnectionError(`subscribing to ${sub.channel} timed out`));
        } // a ConnectionError: the next connection subscribes again
      },
    );
  }

  async _unsubscribe(sub) {
    if (!sub.active) return;
    sub.state = 'unsubscribed';
    sub._ended(new ClientError(`unsubscribed from ${sub.channel}`));
    if (this._subs.get(sub.channel) === sub) this._subs.delete(sub.channel);
    const conn = this.connection;
    if (conn !== null && conn.ready && !conn.closed) {
      try {
        await conn.request('unsubscribe', { channel: sub.channel });
      } catch (error) {
        if (!(error instanceof ServerError && error.code === 'not_subscribed')) {
          if (!(error instanceof ConnectionError)) throw error;
        }
      }
    }
  }

  // -- connecting --------------------------------------------------------------------------

  async _attempt() {
    this._retryTimer = null;
    if (this.state === 'closed') return;
    this.state = 'connecting';
    this._attempts += 1;
    this.emit('connecting', { attempt: this._attempts, url: this.url });
    const conn = new Connection(this._target, this.options, {
      push: (type, data) => this.connection === conn && this._push(type, data),
      goaway: (data) => this._goaway(conn, data),
      error: (error) => this.emit('error', error),
      closed: (reason) => this._lost(conn, reason),
    });
    this.connection = conn;
    try {
      const token = this.options.getToken ? await this._askToken() : this.options.token;
      if (this.state === 'closed') throw new ConnectionError('the client is closed');
      await conn.open(token ?? undefined);
      if (this.state === 'closed') throw new ConnectionError('the client is closed');
    } catch (error) {
      conn.abort(error);
      if (this.connection === conn) this.connection = null;
      this._attemptFailed(error);
      return;
    }
    this._attempts = 0;
    this.lastError = null;
    this.state = 'connected';
    this.identity = conn.identity;
    for (const sub of this._subs.values()) if (sub.active) this._attach(conn, sub);
    this._flushQueue(conn);
    this.emit('connected', { url: this.url, hello: conn.hello, identity: conn.identity });
    this._settleOpen(null);
  }

  /**
   * getToken()'s answer within options.timeout: a getToken that never settles (a stuck login
   * service) would otherwise hold the attempt forever, with no error and no retry.
   */
  _askToken() {
    const ms = this.options.timeout;
    let timer;
    const deadline = new Promise((_, reject) => {
      timer = setTimeout(() => reject(new TimeoutError(`getToken() gave no token within ${ms} ms`)), ms);
    });
    return Promise.race([Promise.resolve().then(() => this.options.getToken()), deadline]).finally(() =>
      clearTimeout(timer),
    );
  }

  _attemptFailed(error) {
    if (this.state === 'closed') return;
    this.lastError = error;
    this.emit('error', error);
    if (this._failFast || !this.options.reconnect) {
      this.state = 'disconnected';
      this._settleOpen(error);
      this._rejectQueue(new ConnectionError(`could not connect: ${error.message}`, { cause: error }));
      if (this._failFast) this.close();
      return;
    }
    this._schedule();
  }

  _lost(conn, reason) {
    if (!conn.ready && !conn.draining) return; // a failed attempt: _attempt handles it
    if (this.connection !== conn) return;
    this.connection = null;
    this._hello = conn.hello;
    if (this.state === 'closed') return;
    this.state = 'disconnected';
    this.lastError = reason;
    this.identity = null;
    for (const sub of this._subs.values()) sub._disconnected();
    this.emit('disconnected', { reason: reason.message, error: reason, goaway: conn.draining });
    if (!this.options.reconnect) {
      this._rejectQueue(new ConnectionError(`disconnected: ${reason.message}`, { cause: reason }));
      return;
    }
    this._schedule();
  }

  _schedule() {
    const { minReconnectDelay, maxReconnectDelay, random } = this.options;
    const delay = this._nextDelay ?? reconnectDelay(this._attempts, minReconnectDelay, maxReconnectDelay, random);
    this._nextDelay = null;
    this.state = 'disconnected';
    this._retryTimer = setTimeout(() => this._attempt(), delay);
  }

  _goaway(conn, data) {
    if (this.connection !== conn) return;
    this._nextDelay = goawayDelay(data, this.options.random);
    this.emit('goaway', data);
    // New requests queue for the next connection; those in flight finish here first.
    conn.whenIdle().then(() => conn.close());
  }

  _settleOpen(error) {
    const waiters = this._openWaiters;
    this._openWaiters = [];
    for (const { resolve, reject } of waiters) {
      if (error === null) resolve(this);
      else reject(error);
    }
  }
}

/**
 * Connect to `url` (`tcp://`, `tls://`, `ws://` or `wss://`) and resolve with a connected
 * Client.  If this first attempt fails, the promise rejects with its error and the client is
 * closed; once connected, the client reconnects by itself.
 */
export async function connect(url, options = {}) {
  const client = new Client(url, options);
  client._failFast = true;
  await client.open();
  client._failFast = false;
  return client;
}
