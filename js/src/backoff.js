// Time policies, pure so they are unit-tested: the reconnect delay and the heartbeat terms.

/**
 * Full-jitter backoff: attempt n (1-based) waits a delay drawn uniformly between `min` and
 * `min(max, min * 2^n)` milliseconds, so clients that lost the same server spread out
 * instead of coming back together, and none retries sooner than `min`.
 */
export function reconnectDelay(attempt, min, max, random = Math.random) {
  const exponent = Math.min(Math.max(attempt, 1), 52);
  const cap = Math.min(max, min * 2 ** exponent);
  return min + random() * Math.max(cap - min, 0);
}

/** The shortest heartbeat interval the client accepts from a hello, in ms. */
export const MIN_HEARTBEAT_INTERVAL = 1000;
/** The longest: a day (and below setTimeout's 2^31 - 1 ms, past which it fires at once). */
export const MAX_HEARTBEAT_INTERVAL = 86_400_000;

/**
 * The client's heartbeat from the hello's `heartbeat: {interval, timeout}` (seconds), in ms.
 *
 * The server's terms are clamped: an interval below 1 s would have the client ping (and the
 * server answer) many times a second, so a hostile or misconfigured server could make it
 * flood; a huge or non-finite one would overflow the timer.  The timeout is at least twice
 * the interval, so the client pings once before it gives up.  Missing or invalid terms give
 * `fallback` ({interval, timeout} in ms) or no heartbeat (null).
 */
export function heartbeatTerms(heartbeat, fallback = null) {
  const interval = heartbeat?.interval;
  if (typeof interval !== 'number' || !Number.isFinite(interval) || interval <= 0) {
    return fallback;
  }
  const every = Math.min(Math.max(interval * 1000, MIN_HEARTBEAT_INTERVAL), MAX_HEARTBEAT_INTERVAL);
  let timeout = heartbeat.timeout;
  timeout =
    typeof timeout === 'number' && Number.isFinite(timeout) && timeout > 0 ? timeout * 1000 : every * 3;
  timeout = Math.min(Math.max(timeout, every * 2), MAX_HEARTBEAT_INTERVAL * 2);
  return { interval: every, timeout };
}

/**
 * How long to wait before reconnecting after a `goaway`: a random moment within the
 * server's `reconnect_after` window (seconds, clamped to 0..300), in ms.
 */
export function goawayDelay(data, random = Math.random) {
  const window = data?.reconnect_after;
  const seconds = typeof window === 'number' && Number.isFinite(window) && window > 0 ? Math.min(window, 300) : 0;
  return random() * seconds * 1000;
}

/** The longest `retry_after` the client honours, in seconds. */
export const MAX_RETRY_AFTER = 60;

/**
 * An error object's `retry_after` (seconds until the server would not refuse the same way
 * again: heartbeatd sends it with `rate_limited` from a token bucket), in ms; null when there
 * is none, or it is not a finite number from 0 to MAX_RETRY_AFTER: a hostile or broken server
 * must not stall the client (or make it spin with a negative wait).
 */
export function retryAfterDelay(value) {
  return typeof value === 'number' && Number.isFinite(value) && value >= 0 && value <= MAX_RETRY_AFTER ? value * 1000 : null;
}
