// Every failure the client reports: one hierarchy under ClientError, so one `instanceof`
// check covers them all and the subclasses say which.

/** Base of every error a request, a subscription or a connection rejects with. */
export class ClientError extends Error {
  constructor(message, options) {
    super(message, options);
    this.name = 'ClientError';
  }
}

/**
 * The server answered with an error envelope: `code` is its machine-readable code;
 * `retryAfter` the ms its `retry_after` asks to wait before trying again (null: none, or not a
 * number from 0 to 60 s).
 */
export class ServerError extends ClientError {
  constructor(code, message, retryAfter = null) {
    super(`${code}: ${message}`);
    this.name = 'ServerError';
    this.code = code;
    // The server's own text, without the code (Error's message keeps both for logs).
    this.message = message;
    this.retryAfter = retryAfter;
  }

  toString() {
    return `ServerError: ${this.code}: ${this.message}`;
  }
}

/** No reply (or no connection) within the request's timeout. */
export class TimeoutError extends ClientError {
  constructor(message) {
    super(message);
    this.name = 'TimeoutError';
  }
}

/** The connection failed or closed before the reply arrived, or the client was closed. */
export class ConnectionError extends ClientError {
  constructor(message, options) {
    super(message, options);
    this.name = 'ConnectionError';
  }
}

/**
 * `maxQueuedRequests` requests already wait for a connection, or (`option` 'maxBuffered') a
 * resumable session holds `maxBuffered` messages the server has not acknowledged: failing
 * fast instead.
 */
export class QueueFullError extends ClientError {
  constructor(limit, option = 'maxQueuedRequests') {
    super(
      option === 'maxBuffered'
        ? `${limit} session messages wait for the server's ack (maxBuffered)`
        : `${limit} requests already wait for a connection (maxQueuedRequests)`,
    );
    this.name = 'QueueFullError';
    this.limit = limit;
    /** Which bound was reached: 'maxQueuedRequests' or 'maxBuffered'. */
    this.option = option;
  }
}

/** A message larger than the server accepts (its hello's `max_frame_bytes`), not sent. */
export class MessageTooLargeError extends ClientError {
  constructor(size, limit) {
    super(`a message of ${size} bytes exceeds the server's limit of ${limit} bytes`);
    this.name = 'MessageTooLargeError';
    this.size = size;
    this.limit = limit;
  }
}

/**
 * A resumable client's session ended (`reason`: the server's `resumed: false` reason, or
 * `session_taken_over`) while this request waited for its reply: whether it ran is unknown.
 */
export class SessionLost extends ConnectionError {
  constructor(reason) {
    super(`the session was lost (${reason}) before the reply`);
    this.name = 'SessionLost';
    this.reason = reason;
  }
}

/**
 * The server kept answering a session start or a resume with `unavailable` (a cluster whose
 * Redis is down, or a node that has no link to it yet) for `sessionRetryTimeout` ms: the
 * client stopped trying (`open()` rejects with this; a held session is lost, reason
 * `unavailable`).  `open()` starts trying again.
 */
export class SessionUnavailableError extends ConnectionError {
  constructor(elapsed, attempts, limit, cause) {
    super(
      `the server answered "unavailable" to every session start or resume for ${Math.round(elapsed)} ms ` +
        `(${attempts} attempts; sessionRetryTimeout is ${limit} ms): gave up`,
      { cause },
    );
    this.name = 'SessionUnavailableError';
    this.reason = 'unavailable';
    /** ms from the first `unavailable` answer to the last. */
    this.elapsed = elapsed;
    /** Attempts answered `unavailable`. */
    this.attempts = attempts;
    /** The `sessionRetryTimeout` that ran out, ms. */
    this.limit = limit;
  }
}

/**
 * What SubscriptionUnavailableError and SubscriptionRateLimitedError share: a subscription
 * refused for `subscribeRetryTimeout` ms, given up (its `ready()` rejects with this, `state` is
 * 'failed') with no more subscribes sent for it.  A ServerError with the code of the refusal it
 * ends with; subscribe again to retry.  Not exported: catch either, or ServerError.
 */
class SubscriptionGaveUpError extends ServerError {
  constructor(name, code, refused, channel, elapsed, refusals, limit, cause) {
    const { unavailable = 0, rate_limited: rateLimited = 0 } = refusals;
    const attempts = unavailable + rateLimited;
    super(
      code,
      `the server ${refused} to ${channel} for ${Math.round(elapsed)} ms ` +
        `(${attempts} attempts: ${unavailable} unavailable, ${rateLimited} rate_limited; ` +
        `subscribeRetryTimeout is ${limit} ms): gave up`,
      cause?.retryAfter ?? null,
    );
    this.name = name;
    this.cause = cause;
    this.channel = channel;
    /** ms from the first refusal to the last (or to the deadline, see rateLimitedAttempts). */
    this.elapsed = elapsed;
    /** Subscribes refused, both kinds: unavailableAttempts + rateLimitedAttempts. */
    this.attempts = attempts;
    /** Subscribes answered `unavailable`. */
    this.unavailableAttempts = unavailable;
    /** Subscribes answered `rate_limited`. */
    this.rateLimitedAttempts = rateLimited;
    /** The `subscribeRetryTimeout` that ran out, ms. */
    this.limit = limit;
  }

  toString() {
    return `${this.name}: ${this.message}`;
  }
}

/**
 * The server answered every subscribe to `channel` with `unavailable` (the cluster's broker,
 * its Redis, is down) for `subscribeRetryTimeout` ms (SubscriptionGaveUpError above).
 */
export class SubscriptionUnavailableError extends SubscriptionGaveUpError {
  /** `refusals`: `{unavailable, rate_limited}`, the subscribes answered each way (a number: all `unavailable`). */
  constructor(channel, elapsed, refusals, limit, cause) {
    const counts = typeof refusals === 'number' ? { unavailable: refusals } : refusals;
    super('SubscriptionUnavailableError', 'unavailable', 'answered "unavailable" to every subscribe', channel, elapsed, counts, limit, cause);
  }
}

/**
 * The server refused every subscribe to `channel`, the last with `rate_limited` (heartbeatd's
 * per-connection subscribe budget, `channels.subscribe_rate` and `channels.subscribe_burst`,
 * which refills by itself: the client asks again with the reconnect backoff, and never before
 * the refusal's `retry_after`), for `subscribeRetryTimeout` ms (SubscriptionGaveUpError
 * above).  `attempts` counts both kinds of refusal; `rateLimitedAttempts` and
 * `unavailableAttempts` each.
 */
export class SubscriptionRateLimitedError extends SubscriptionGaveUpError {
  /** `refusals`: `{unavailable, rate_limited}`, the subscribes answered each way (a number: all `rate_limited`). */
  constructor(channel, elapsed, refusals, limit, cause) {
    const counts = typeof refusals === 'number' ? { rate_limited: refusals } : refusals;
    super('SubscriptionRateLimitedError', 'rate_limited', 'refused every subscribe (the last as "rate_limited")', channel, elapsed, counts, limit, cause);
  }
}
