// The JSON envelope of docs/protocol.md: `{"type", "id"?, "data"?}` and `error` frames.

const decoder = new TextDecoder('utf-8', { fatal: true });

/** Why a frame is not a message: the client skips it and reports it as an `error` event. */
export class MalformedMessage extends Error {
  constructor(message) {
    super(message);
    this.name = 'MalformedMessage';
  }
}

/** The body of a request, push or pong; `id` and `data` are left out when undefined. */
export function encodeMessage(type, data, id) {
  const message = { type };
  if (id !== undefined) message.id = id;
  if (data !== undefined) message.data = data;
  return JSON.stringify(message);
}

/**
 * A frame body (Uint8Array or, over WebSocket, a string) as `{type, id, data, error, bare}`.
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
  return { type: value.type, id, data: value.data, error: value.error, bare: false };
}
