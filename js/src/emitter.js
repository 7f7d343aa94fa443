// A tiny event emitter (the client has no runtime dependencies, and browsers lack Node's).
//
// A listener that throws does not stop the others: the error goes to the emitter's `error`
// listeners (an `error` listener that throws is ignored, so this can never loop), and with no
// `error` listener it is dropped rather than thrown into the connection's read loop.

export class Emitter {
  constructor() {
    this._listeners = new Map();
  }

  /** Call `listener(...args)` on each `event`; returns a function that removes it. */
  on(event, listener) {
    if (typeof listener !== 'function') throw new TypeError('a listener must be a function');
    let list = this._listeners.get(event);
    if (list === undefined) this._listeners.set(event, (list = []));
    list.push(listener);
    return () => this.off(event, listener);
  }

  /** Like `on`, for the next `event` only. */
  once(event, listener) {
    const off = this.on(event, (...args) => {
      off();
      listener(...args);
    });
    return off;
  }

  off(event, listener) {
    const list = this._listeners.get(event);
    if (list === undefined) return;
    const i = list.indexOf(listener);
    if (i >= 0) list.splice(i, 1);
    if (list.length === 0) this._listeners.delete(event);
  }

  listenerCount(event) {
    return this._listeners.get(event)?.length ?? 0;
  }

  /** Call every listener of `event`; true if there was one. */
  emit(event, ...args) {
    const list = this._listeners.get(event);
    if (list === undefined) return false;
    for (const listener of [...list]) {
      try {
        listener(...args);
      } catch (error) {
        if (event !== 'error') this.emit('error', error);
      }
    }
    return true;
  }
}
