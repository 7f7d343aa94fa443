// The JSON envelope of docs/protocol.md: `{"type", "id"?, "data"?}` and `error` frames.

const decoder = new TextDecoder('utf-8', { fatal: true });

/** Why a frame is not a message: the client skips it and reports it as an `error` event. */
export class MalformedMessage extends Error {
  constructor(message) {
    super(message);
    this.name = 'MalformedMessage';
  }
}

/**
 * The body of a request, push or pong; `id`, `data` and `seq` (a session message's number)
 * are left out when undefined.
 */
export function encodeMessage(type, data, id, seq) {
  const message = { type };
  if (id !== undefined) message.id = id;
  if (seq !== undefined) message.seq = seq;
  if (data !== undefined) message.data = data;
  return JSON.stringify(message);
}

/** A safe integer >= 0, or undefined: what a `seq` or an `ack` may be. */
const counter = (value) => (Number.isSafeInteger(value) && value >= 0 ? value : undefined);

/**
 * A frame body (Uint8Array or, over WebSocket, a string) as `{type, id, data, error, bare}`
 * (plus `seq` and `ack` when present: an integer >= 0, or null when malformed).
 * With `bareValues` (seed framing) a JSON value that is not an envelope comes back as
 * `{type: 'message', data: value, bare: true}`; otherwise it is a MalformedMessage.
 */
export function decodeMessage(body, bareValues = false) {
  let text = body;
  if (typeof body !== 'string') {
    try {
      text = decoder.decode(body);
    } catch {
      throw new MalformedMessage('a frame is not valid UTF-8');
    }
  }
  let value;
  try {
    value = JSON.parse(text);
  } catch {
    throw new MalformedMessage(`a frame is not valid JSON: ${JSON.stringify(text.slice(0, 40))}`);
  }
  const isEnvelope =
    value !== null && typeof value === 'object' && !Array.isArray(value) &&
    typeof value.type === 'string' && value.type !== '';
  if (!isEnvelope) {
    if (bareValues) return { type: 'message', id: undefined, data: value, error: undefined, bare: true };
    throw new MalformedMessage('a frame is not an envelope (an object with a string "type")');
  }
  const id = typeof value.id === 'string' || Number.isSafeInteger(value.id) ? value.id : undefined;
  const message = { type: value.type, id, data: value.data, error: value.error, bare: false };
  // A session message's number, and the server's piggybacked ack (docs/protocol.md, Sessions).
  if (value.seq !== undefined) message.seq = counter(value.seq) ?? null;
  if (value.ack !== undefined) message.ack = counter(value.ack) ?? null;
  return message;
}
