// The client an application holds: one connection at a time, kept up across server restarts.
//
// It reconnects with full-jitter backoff (backoff.js), follows the server's `goaway` (lets
// what is in flight finish, then comes back at a random moment within `reconnect_after`),
// re-sends its token (`getToken()` is asked again on every connect) and re-subscribes every
// channel from the last offset it delivered.  Requests made while it is disconnected wait in
// a bounded queue, each for at most its own timeout.
//
// With `resumable: true` it also holds a server session (session.js, docs/protocol.md
// "Sessions"): it numbers what it sends, resumes after every reconnect (the server replays
// what it missed, it resends what the server missed), so requests in flight survive a
// reconnect and pushes arrive exactly once and in order; subscriptions live on in the
// session.  When a session is lost it starts a new one and falls back to the above.

import { goawayDelay, reconnectDelay } from './backoff.js';
import { Connection, now } from './connection.js';
import { Emitter } from './emitter.js';
import { encodeMessage } from './envelope.js';
import {
  ClientError,
  ConnectionError,
  QueueFullError,
  ServerError,
  SessionLost,
  SessionUnavailableError,
  SubscriptionRateLimitedError,
  SubscriptionUnavailableError,
  TimeoutError,
} from './errors.js';
import { framings } from './framing.js';
import { serverError } from './connection.js';
import { SessionState } from './session.js';
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
  resumable: false,
  maxBuffered: 10_000,
  sessionRetryTimeout: 60_000,
  subscribeRetryTimeout: 60_000,
});

/**
 * The refusals `sessionRetryTimeout` counts: an attempt whose session start or resume the
 * server answered `unavailable` (its error is put here by `_establish`).
 */
const refusedUnavailable = new WeakSet();

/** Events the client emits itself; a push of one of these types reaches `onPush` only. */
export const CLIENT_EVENTS = Object.freeze([
  'connecting',
  'connected',
  'disconnected',
  'goaway',
  'error',
  'session',
  'resumed',
  'session_lost',
]);

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
  if (!Number.isSafeInteger(o.maxBuffered) || o.maxBuffered < 1) {
    throw new RangeError(`options.maxBuffered must be an integer >= 1, not ${o.maxBuffered}`);
  }
  for (const key of ['sessionRetryTimeout', 'subscribeRetryTimeout']) {
    const retry = o[key];
    if (retry !== Infinity && (typeof retry !== 'number' || !(retry > 0) || retry > 2_147_483_647)) {
      throw new RangeError(`options.${key} must be a number of ms in 1..2147483647, or Infinity, not ${retry}`);
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
  if (typeof o.resumable !== 'boolean') throw new TypeError('options.resumable must be true or false');
  if (o.sessionExpiry !== undefined && (!Number.isSafeInteger(o.sessionExpiry) || o.sessionExpiry < 1)) {
    throw new RangeError(`options.sessionExpiry must be a whole number of seconds >= 1, not ${o.sessionExpiry}`);
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
    // -- resumable sessions --
    this._resumable = this.options.resumable;
    this._lastId = 0; // request ids, unique across connections: a replayed reply finds its request
    this._session = new SessionState({ sendAck: (seq) => this._sendAck(seq) });
    /** The connection the session is attached to (null while detached, or with no session). */
    this._sessionConn = null;
    /** Changes whenever a session starts or is lost: answers from an older one are stale. */
    this._sessionEpoch = 0;
    /** Requests numbered in the session, by id: they wait for their reply across reconnects. */
    this._sessionPending = new Map();
    this._sessionIdleWaiters = [];
    /** Channels of subscriptions failed while the session (of this epoch) may hold them. */
    this._dropped = new Map();
    /** When the first of the attempts answered `unavailable` in a row was refused (now()). */
    this._unavailableSince = null;
    this._unavailableAttempts = 0;
  }

  /** The session's id while the client holds one (resumable: true), else null. */
  get session() {
    return this._session.id;
  }

  /** A connection new work may go out on now (with `resumable`, once its session is settled). */
  _live(conn) {
    return conn !== null && conn.usable && (!this._resumable || this.state === 'connected');
  }

  /**
   * Start connecting (and reconnecting) if not already; resolves once connected, with this
   * client.  It waits through failed attempts; it rejects only when the client is closed, an
   * attempt fails with `reconnect: false`, or (`resumable`) the server answered every session
   * start or resume `unavailable` for `sessionRetryTimeout` ms (SessionUnavailableError).
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
    const conn0 = this.connection;
    if (conn0 !== null && this._sessionConn === conn0 && !conn0.closed) {
      // A clean end: ack what arrived, and end the session (nobody can resume it now).
      try {
        this._session.flushAck();
        this._sessionWrite(conn0, 'session_end', undefined, ++this._lastId, false);
      } catch {
        // closing anyway
      }
    }
    this._sessionConn = null;
    this._session.forget();
    this._rejectSessionPending(closed);
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
    if (this._live(conn)) return this._requestOn(conn, type, data, ms);
    return this._enqueue((c, left) => this._requestOn(c, type, data, left), ms);
  }

  /**
   * A request on `conn`: numbered in the session when it carries one.  A session request's
   * `ms` runs from when it is sent, across reconnects; with `perConnection` it runs only
   * while the session is attached, afresh on each connection (`_pauseDeadlines`,
   * `_armDeadlines`), so the time spent reconnecting never times it out.
   */
  _requestOn(conn, type, data, ms, perConnection = false) {
    if (this._sessionConn !== conn) return conn.request(type, data, { timeout: ms });
    return new Promise((resolve, reject) => {
      const id = ++this._lastId;
      try {
        this._sessionWrite(conn, type, data, id);
      } catch (error) {
        reject(error);
        return;
      }
      const entry = { resolve, reject, timer: null, perConnection, arm: null };
      entry.arm = () => {
        entry.timer = setTimeout(() => {
          this._sessionPending.delete(id);
          const where = perConnection ? ' on a connection' : '';
          reject(new TimeoutError(`no reply to ${JSON.stringify(type)} within ${ms} ms${where}`));
          this._maybeSessionIdle();
        }, ms);
      };
      entry.arm();
      this._sessionPending.set(id, entry);
    });
  }

  /** The session was detached: per-connection deadlines stop until it is attached again. */
  _pauseDeadlines() {
    for (const entry of this._sessionPending.values()) {
      if (entry.perConnection) {
        clearTimeout(entry.timer);
        entry.timer = null;
      }
    }
  }

  /** The session is attached again (after its replay was handled): they start afresh. */
  _armDeadlines() {
    for (const entry of this._sessionPending.values()) {
      if (entry.perConnection && entry.timer === null) entry.arm();
    }
  }

  /**
   * Number a session message, keep it for a resend, write it.  If the write throws, the
   * caller fails the message: its copy goes too, so no resume ever sends it (a message is
   * numbered only when written, so one that failed before leaving is always the last).
   */
  _sessionWrite(conn, type, data, id, bounded = true) {
    // A server that never acknowledges (or a flood of requests) must not grow the resend
    // buffer without end: timed-out requests keep their copies until the server acks them.
    const buffered = this._session.buffer.length;
    if (bounded && buffered >= this.options.maxBuffered) throw new QueueFullError(this.options.maxBuffered, 'maxBuffered');
    const { seq, text } = this._session.number((n) => conn._checked(encodeMessage(type, data, id, n)));
    try {
      conn.sendText(text);
    } catch (error) {
      this._session.unnumber(seq);
      throw error;
    }
  }

  _rejectSessionPending(error) {
    const pending = [...this._sessionPending.values()];
    this._sessionPending.clear();
    for (const { reject, timer } of pending) {
      clearTimeout(timer);
      reject(error);
    }
    this._maybeSessionIdle();
  }

  /** Resolves once no session request waits for its reply, or `conn` is closed. */
  _whenSessionIdle(conn) {
    if (this._sessionPending.size === 0 || conn.closed) return Promise.resolve();
    return new Promise((resolve) => this._sessionIdleWaiters.push(resolve));
  }

  _maybeSessionIdle(force = false) {
    if ((force || this._sessionPending.size === 0) && this._sessionIdleWaiters.length) {
      const waiters = this._sessionIdleWaiters;
      this._sessionIdleWaiters = [];
      for (const resolve of waiters) resolve();
    }
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
    if (this._live(conn)) return conn.requestValue(value, { timeout: ms });
    return this._enqueue((c, left) => c.requestValue(value, { timeout: left }), ms);
  }

  /** Send a message that gets no reply; throws a ConnectionError while not connected. */
  send(type, data) {
    const conn = this.connection;
    if (conn === null || !conn.ready || conn.closed || (this._resumable && this.state !== 'connected')) {
      throw new ConnectionError(`not connected (${this.state})`);
    }
    if (this._sessionConn === conn) this._sessionWrite(conn, type, data, undefined);
    else conn.send(type, data);
  }

  _enqueue(start, ms) {
    if (this.state === 'closed') return Promise.reject(new ConnectionError('the client is closed'));
    if (this.state === 'disconnected' && !this.options.reconnect) {
      return Promise.reject(new ConnectionError('not connected, and reconnect is off', { cause: this.lastError }));
    }
    if (this.state === 'disconnected' && this._retryTimer === null && this.lastError instanceof SessionUnavailableError) {
      // It gave up (sessionRetryTimeout): nothing would send this until open() is called.
      return Promise.reject(new ConnectionError('not connected: gave up on an unavailable session store; call open()', { cause: this.lastError }));
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
      else if (type === 'subscription_lost' && sub.active) this._subscriptionLost(sub, body);
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
    if (this._live(conn)) this._attach(conn, sub);
    else if (this.state === 'idle') this._attempt();
    else if (this.state === 'disconnected' && this._retryTimer === null) {
      // Nothing would send it (reconnect: false, or it gave up on an unavailable session
      // store) until open() is called: it fails now, as a request would.
      this._subs.delete(channel);
      sub._failed(new ConnectionError(`not connected (${this._stopped()}): call open(), then subscribe`, { cause: this.lastError }));
    }
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
    // In a session the answer comes whatever the reconnects (until the session is lost): its
    // `timeout` counts only while the session is attached, afresh on each connection, so a
    // reconnect and resume never time it out; without one, it comes on this connection or never.
    const inSession = this._sessionConn === conn;
    const epoch = this._sessionEpoch;
    sub._sessionEpoch = inSession ? epoch : null;
    const current = () =>
      this._subs.get(sub.channel) === sub && sub.active && (inSession ? this._sessionEpoch === epoch : this.connection === conn);
    const dropped = this._dropped.get(sub.channel);
    this._dropped.delete(sub.channel);
    if (inSession && (sub._unsureEpoch === epoch || dropped === epoch)) {
      // A subscribe of this session timed out, or its subscription failed when the client
      // stopped connecting (_failSubscriptions): the server may hold it.  Unsubscribe first
      // (numbered: the server handles it before the subscribe), or the subscribe would be
      // answered `already_subscribed`.  Either answer will do.
      this._requestOn(conn, 'unsubscribe', { channel: sub.channel }, this.options.timeout).catch(() => {});
    }
    sub._unsureEpoch = null;
    this._requestOn(conn, 'subscribe', sub._request(), this.options.timeout, inSession).then(
      (answer) => {
        if (!current()) return;
        sub._attempts = 0; // the next unavailable spell backs off from the start again
        sub._unavailableSince = null;
        sub._refusals = null;
        if (!sub._answered(answer)) this.connection?.abort(new ConnectionError('a malformed subscribe answer'));
      },
      (error) => {
        if (!current()) return;
        if (error instanceof ServerError && (error.code === 'unavailable' || error.code === 'rate_limited')) {
          this._subscribeRefused(sub, error, current);
        } else if (inSession && error instanceof ServerError && error.code === 'not_subscribed' && this._sessionConn !== conn) {
          // Answered after a resume: the server dropped the subscribe when the session's
          // connection went, before it was settled (heartbeatd: "unsubscribed meanwhile").
          // Not a refusal: subscribe again, at most once per connection.
          sub._early = null;
          sub._sessionEpoch = null;
          const live = this.connection;
          if (this._live(live)) this._attach(live, sub);
        } else if (error instanceof ServerError) {
          this._subs.delete(sub.channel); // refused for good (bad_channel, too_many_channels...)
          sub._failed(error);
        } else if (error instanceof TimeoutError) {
          // A late answer would leave the server subscribed to what we asked again: start
          // over on a fresh connection instead.  A session outlives the connection, and may
          // hold the subscription: after the resume, unsubscribe and subscribe again.
          sub.emit('error', error);
          if (inSession) {
            sub._sessionEpoch = null;
            sub._unsureEpoch = epoch;
          }
          (inSession ? this._sessionConn : conn)?.abort(new ConnectionError(`subscribing to ${sub.channel} timed out`));
        } else if (!(error instanceof ConnectionError)) {
          // Refused before it left: QueueFullError (a session holds maxBuffered unacked
          // messages), MessageTooLargeError.  A request fails at once with these, and nothing
          // here would send the subscribe again before the session is lost: fail it too.
          this._subs.delete(sub.channel);
          sub._failed(error);
        } // a ConnectionError: the next connection subscribes again (reconnect: false: _lost fails it)
      },
    );
  }

  /**
   * A subscribe answered `unavailable` (the cluster's broker is down) or `rate_limited` (the
   * daemon's per-connection subscribe budget, a token bucket that refills by itself): try
   * again on this connection, backing off, but not for ever: after `subscribeRetryTimeout` ms
   * of nothing but these refusals (from the first, across reconnects) the subscription fails,
   * with the typed error of the last one.  A `rate_limited` answer's `retry_after` (honoured
   * from 0 to 60 s, see retryAfterDelay) is the least wait: no subscribe goes out on this
   * connection before it, and when it ends past the deadline the subscription fails at the
   * deadline instead of asking again (a reconnect, with a fresh budget, asks at once).
   */
  _subscribeRefused(sub, error, current) {
    const t = now();
    sub._unavailableSince ??= t;
    const refusals = (sub._refusals ??= { unavailable: 0, rate_limited: 0 });
    refusals[error.code] += 1;
    sub._early = null;
    const limit = this.options.subscribeRetryTimeout;
    const elapsed = t - sub._unavailableSince;
    const giveUp = (at) => {
      this._subs.delete(sub.channel);
      const GaveUp = error.code === 'rate_limited' ? SubscriptionRateLimitedError : SubscriptionUnavailableError;
      sub._failed(new GaveUp(sub.channel, at, { ...refusals }, limit, error));
    };
    if (elapsed >= limit) {
      giveUp(elapsed);
      return;
    }
    sub.emit('error', error);
    // The session does not hold it: a resume before the retry must subscribe it again.
    sub._sessionEpoch = null;
    sub._attempts = (sub._attempts ?? 0) + 1;
    const { minReconnectDelay, maxReconnectDelay, random } = this.options;
    const left = sub._unavailableSince + limit - t;
    const least = error.code === 'rate_limited' ? (error.retryAfter ?? 0) : 0;
    // The last try comes at the deadline, not after; none comes before the server's retry_after.
    const tooLate = least > left;
    const delay = Math.min(Math.max(reconnectDelay(sub._attempts, minReconnectDelay, maxReconnectDelay, random), least), left);
    sub._retryTimer = setTimeout(() => {
      sub._retryTimer = null;
      if (!current()) return;
      if (tooLate) {
        giveUp(now() - sub._unavailableSince); // this connection's budget comes back after the deadline
        return;
      }
      const conn = this.connection;
      if (this._live(conn)) this._attach(conn, sub);
    }, delay);
  }

  async _unsubscribe(sub) {
    if (!sub.active) return;
    sub.state = 'unsubscribed';
    sub._ended(new ClientError(`unsubscribed from ${sub.channel}`));
    if (this._subs.get(sub.channel) === sub) this._subs.delete(sub.channel);
    const conn = this.connection;
    // In a session the unsubscribe must reach the server even across a reconnect.
    const inSession = this._resumable && this._session.started;
    if (inSession || (conn !== null && conn.ready && !conn.closed)) {
      try {
        if (inSession) await this.request('unsubscribe', { channel: sub.channel });
        else await conn.request('unsubscribe', { channel: sub.channel });
      } catch (error) {
        if (!(error instanceof ServerError && error.code === 'not_subscribed')) {
          if (!(error instanceof ConnectionError || (inSession && error instanceof TimeoutError))) throw error;
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
    const events = {
      push: (type, data) => this.connection === conn && this._push(type, data),
      goaway: (data) => this._goaway(conn, data),
      error: (error) => {
        if (error instanceof ServerError && error.code === 'session_taken_over' && this._sessionConn === conn) {
          // Someone else resumed our session: never resume it again (section 5).
          this._loseSession('session_taken_over');
        }
        this.emit('error', error);
      },
      closed: (reason) => this._lost(conn, reason),
    };
    if (this._resumable) {
      events.nextId = () => ++this._lastId;
      events.sequenced = (message) => this._sequenced(conn, message);
      events.reply = (message) => this._sessionReply(message);
    }
    const conn = new Connection(this._target, this.options, events);
    this.connection = conn;
    let outcome;
    try {
      const token = this.options.getToken ? await this._askToken() : this.options.token;
      if (this.state === 'closed') throw new ConnectionError('the client is closed');
      await conn.open(token ?? undefined);
      if (this.state === 'closed') throw new ConnectionError('the client is closed');
      outcome = this._resumable ? await this._establish(conn) : 'none';
      if (this.state === 'closed') throw new ConnectionError('the client is closed');
      // What the session's first messages did may have ended the connection already.
      if (conn.closed) throw conn.closeReason;
    } catch (error) {
      conn.abort(error);
      if (this.connection === conn) this.connection = null;
      if (this._sessionConn === conn) {
        this._sessionConn = null;
        this._session.detach();
        this._pauseDeadlines();
      }
      this._attemptFailed(error);
      return;
    }
    this._attempts = 0;
    this._unavailableSince = null;
    this._unavailableAttempts = 0;
    this.lastError = null;
    this.state = 'connected';
    this.identity = conn.identity;
    if (this._sessionConn === conn) this._armDeadlines();
    for (const sub of this._subs.values()) {
      // A resumed session still holds its subscriptions: only those never sent in it go out.
      if (sub.active && (outcome !== 'resumed' || sub._sessionEpoch !== this._sessionEpoch)) this._attach(conn, sub);
    }
    if (outcome === 'resumed') this._unsubscribeDropped(conn);
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
    if (refusedUnavailable.has(error) && !this._failFast) {
      // Retried with the usual backoff, but not for ever: a node that never gets its store
      // back would hold open() (and the session's requests) with no end and no reason.
      const t = now();
      this._unavailableSince ??= t;
      this._unavailableAttempts += 1;
      if (t - this._unavailableSince >= this.options.sessionRetryTimeout) {
        this._giveUpUnavailable(t - this._unavailableSince, error);
        return;
      }
    }
    if (this._failFast || !this.options.reconnect) {
      this.state = 'disconnected';
      this._settleOpen(error);
      const failed = new ConnectionError(`could not connect: ${error.message}`, { cause: error });
      this._rejectQueue(failed);
      if (this._failFast) this.close();
      else this._failSubscriptions(failed);
      return;
    }
    this._schedule();
  }

  /**
   * Every session start or resume for `sessionRetryTimeout` ms was answered `unavailable`:
   * stop trying (as with `reconnect: false`; `open()` starts again).  A held session is lost
   * (`session_lost`, reason `unavailable`): it cannot be resumed now, and its requests would
   * otherwise wait for a store that does not come back.
   */
  _giveUpUnavailable(elapsed, cause) {
    const error = new SessionUnavailableError(elapsed, this._unavailableAttempts, this.options.sessionRetryTimeout, cause);
    this._unavailableSince = null;
    this._unavailableAttempts = 0;
    this.state = 'disconnected';
    this.lastError = error;
    if (this._session.started) this._loseSession('unavailable', error);
    this.emit('error', error);
    this._settleOpen(error);
    this._rejectQueue(error);
    this._failSubscriptions(error);
  }

  _lost(conn, reason) {
    if (!conn.ready && !conn.draining) return; // a failed attempt: _attempt handles it
    if (this.connection !== conn) return;
    if (this.state === 'connecting') return; // lost while its session was settled: the same
    this.connection = null;
    if (this._sessionConn === conn) {
      this._sessionConn = null;
      this._session.detach();
      this._pauseDeadlines();
    }
    this._maybeSessionIdle(true); // a goaway's wait ends with its connection
    this._hello = conn.hello;
    if (this.state === 'closed') return;
    this.state = 'disconnected';
    this.lastError = reason;
    this.identity = null;
    // Subscriptions in a session live on in it; otherwise they subscribe again.
    if (!this._session.started) for (const sub of this._subs.values()) sub._disconnected();
    this.emit('disconnected', { reason: reason.message, error: reason, goaway: conn.draining });
    if (!this.options.reconnect) {
      const error = new ConnectionError(`disconnected: ${reason.message}`, { cause: reason });
      this._rejectQueue(error);
      this._rejectSessionPending(error);
      this._failSubscriptions(error);
      return;
    }
    this._schedule();
  }

  /**
   * The client stopped connecting (reconnect: false): no subscription would be sent again, so
   * each fails with `error` (a ConnectionError).  One a session held may still be held there:
   * a later subscribe to its channel in that session unsubscribes first.
   */
  _failSubscriptions(error) {
    const held = this._session.started;
    for (const sub of [...this._subs.values()]) {
      if (!sub.active) continue;
      if (held) this._dropped.set(sub.channel, this._sessionEpoch);
      clearTimeout(sub._retryTimer);
      sub._retryTimer = null;
      this._subs.delete(sub.channel);
      sub._failed(error);
    }
  }

  /** Resumed: the session's subscriptions that failed meanwhile, not subscribed again, go. */
  _unsubscribeDropped(conn) {
    for (const [channel, epoch] of [...this._dropped]) {
      if (epoch !== this._sessionEpoch || this._subs.has(channel)) continue;
      this._dropped.delete(channel);
      this._requestOn(conn, 'unsubscribe', { channel }, this.options.timeout).catch(() => {});
    }
  }

  /** Why a disconnected client with no retry planned is not connecting. */
  _stopped() {
    return this.lastError instanceof SessionUnavailableError ? 'gave up on an unavailable session store' : 'reconnect is off';
  }

  _schedule() {
    const { minReconnectDelay, maxReconnectDelay, random, sessionRetryTimeout } = this.options;
    let delay = this._nextDelay ?? reconnectDelay(this._attempts, minReconnectDelay, maxReconnectDelay, random);
    this._nextDelay = null;
    if (this._unavailableSince !== null) {
      // The last try of a session refused as unavailable comes at its deadline, not after
      // (past it, an attempt that failed otherwise, say a refused connect, backs off as usual).
      const left = this._unavailableSince + sessionRetryTimeout - now();
      if (left > 0) delay = Math.min(delay, left);
    }
    this.state = 'disconnected';
    this._retryTimer = setTimeout(() => this._attempt(), delay);
  }

  _goaway(conn, data) {
    if (this.connection !== conn) return;
    this._nextDelay = goawayDelay(data, this.options.random);
    this.emit('goaway', data);
    // New requests queue for the next connection; those in flight finish here first (a
    // session's too: the daemon may be restarting, and a session in its memory goes with it).
    // A session acks what arrived before closing.
    Promise.all([conn.whenIdle(), this._whenSessionIdle(conn)]).then(() => {
      if (this._sessionConn === conn) this._session.flushAck();
      return conn.close();
    });
  }

  // -- sessions (resumable: true) ----------------------------------------------------------

  /**
   * On a new connection: resume the session held, or start one.  Resolves with 'resumed',
   * 'started' or 'none' (the server has no sessions for us: go on as without).  What the
   * server sends after its answer is held until the answer is handled, so the application
   * hears `resumed` or `session` before the messages of the session.
   */
  async _establish(conn) {
    const s = this._session;
    if (s.started) {
      let answer;
      try {
        answer = await conn.request('resume', { session: s.id, key: s.key, ack: s.resuming() }, { hold: true });
      } catch (error) {
        if (!(error instanceof ServerError)) throw error;
        answer = { resumed: false, reason: error.code }; // a refusal is as final as resumed: false
      }
      if (answer?.resumed === true && !(Number.isSafeInteger(answer.ack) && answer.ack >= 0 && answer.ack < s.nextSeq)) {
        // The server has client seqs we never sent (or no valid ack): our next messages would
        // be taken for duplicates.  This session cannot go on, nor this connection that holds
        // it: a new one starts a new session.
        this._loseSession('out_of_sync');
        throw new ConnectionError("the server's resume answer acknowledges messages never sent");
      }
      if (answer?.resumed === true) {
        this._sessionConn = conn;
        s.reattach();
        for (const text of s.resendAfter(answer.ack)) conn.sendText(text);
        const replayed = Number.isSafeInteger(answer.replay) ? answer.replay : 0;
        this.emit('resumed', { session: s.id, replayed });
        conn.release();
        return 'resumed';
      }
      const reason = typeof answer?.reason === 'string' ? answer.reason : 'unknown';
      if (reason === 'unavailable') {
        // The cluster's store is down, the session may well be there: try again later
        // (for sessionRetryTimeout ms at most).
        conn.release();
        const error = new ConnectionError('the session store is unavailable: resuming later');
        refusedUnavailable.add(error);
        throw error;
      }
      this._loseSession(reason);
      conn.release();
    }
    const expiry = this.options.sessionExpiry;
    let answer;
    try {
      answer = await conn.request('session', expiry === undefined ? {} : { expiry }, { hold: true });
    } catch (error) {
      if (!(error instanceof ServerError)) throw error;
      conn.release();
      if (error.code === 'unavailable') {
        // The cluster's session store is not reachable (yet): this attempt fails, the next
        // one (after the backoff) asks again, for sessionRetryTimeout ms at most.  A plain
        // connection would give no guarantee.
        refusedUnavailable.add(error);
        throw error;
      }
      // sessions_disabled, too_many_sessions, an older server's unknown_type: no session on
      // this connection (the next one asks again).
      this.emit('error', error);
      return 'none';
    }
    if (typeof answer?.session !== 'string' || typeof answer?.key !== 'string') {
      conn.release();
      throw new ConnectionError('a malformed session answer');
    }
    s.start({ session: answer.session, key: answer.key, expiry: answer.expiry });
    this._sessionEpoch += 1;
    this._sessionConn = conn;
    this.emit('session', { session: answer.session, expiry: answer.expiry });
    conn.release();
    return 'started';
  }

  /**
   * The server could not restore a subscription of the resumed session (its channel's broker
   * was unavailable): subscribe again, from the last offset delivered, as after a lost
   * session.
   */
  _subscriptionLost(sub, body) {
    sub._disconnected();
    sub._sessionEpoch = null; // a resume attaches it again if it is not attached before
    const reason = String(body.reason ?? 'unavailable');
    sub.emit('error', new ServerError(reason, `the session's subscription to ${sub.channel} was not restored`));
    const conn = this.connection;
    if (this._live(conn)) this._attach(conn, sub);
  }

  /**
   * A session ended for good: its waiting requests fail, the application is told (`error`:
   * why the client gave it up itself, when it did).
   */
  _loseSession(reason, error = undefined) {
    const s = this._session;
    const session = s.id;
    s.forget();
    this._sessionConn = null;
    this._sessionEpoch += 1;
    this._rejectSessionPending(new SessionLost(reason));
    this._dropped.clear();
    for (const sub of this._subs.values()) sub._disconnected();
    this.emit('session_lost', error === undefined ? { session, reason } : { session, reason, error });
  }

  /** A message with a seq or an ack (or an ack message): false drops it. */
  _sequenced(conn, message) {
    if (this._sessionConn !== conn || this.connection !== conn) return true;
    const s = this._session;
    if (message.type === 'ack' && message.id === undefined && message.seq === undefined) {
      s.serverAcked(message.data?.seq);
      return false;
    }
    if (message.ack !== undefined && message.ack !== null) s.serverAcked(message.ack);
    if (message.seq === undefined) return true;
    const verdict = message.seq === null ? 'gap' : s.receive(message.seq);
    if (verdict === 'duplicate') return false;
    if (verdict === 'gap') {
      // Resuming asks the server for everything after the last seq we have.
      conn.abort(new ConnectionError(`the server's seq went from ${s.received} to ${message.seq}: resuming`));
      return false;
    }
    return true;
  }

  /** A reply to a session request (it may come on a later connection than its request). */
  _sessionReply(message) {
    const entry = this._sessionPending.get(message.id);
    if (entry === undefined) return false;
    if (message.seq === undefined) {
      // Not a reply (those are numbered): an error that closes the connection (bad_seq...).
      // The request stays pending, for the resume to resend.
      if (message.type === 'error') this.emit('error', serverError(message.error));
      return true;
    }
    this._sessionPending.delete(message.id);
    clearTimeout(entry.timer);
    if (message.type === 'error') entry.reject(serverError(message.error));
    else entry.resolve(message.data);
    this._maybeSessionIdle();
    return true;
  }

  _sendAck(seq) {
    const conn = this._sessionConn;
    if (conn !== null && !conn.closed) conn.send('ack', { seq });
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
