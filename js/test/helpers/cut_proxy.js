// A loopback TCP proxy whose connections the test cuts at will (both sides destroyed at
// once, bytes in flight lost), to drop a client's connection to a daemon mid-stream.  It
// carries any protocol over TCP (int32 framing, WebSocket).

import net from 'node:net';

export class CutProxy {
  /** `targetPort` may be changed: new connections go to the new one (another node). */
  constructor(targetPort) {
    this.targetPort = targetPort;
    this.pairs = new Set();
    this.frozen = [];
    /** Connections accepted so far. */
    this.accepted = 0;
    this.server = net.createServer((client) => this._accept(client));
  }

  async start() {
    await new Promise((resolve) => this.server.listen(0, '127.0.0.1', resolve));
    this.port = this.server.address().port;
    return this;
  }

  _accept(client) {
    this.accepted += 1;
    const upstream = net.connect({ host: '127.0.0.1', port: this.targetPort });
    const pair = [client, upstream];
    this.pairs.add(pair);
    const end = () => {
      if (!this.pairs.has(pair)) return; // frozen: its server side stays
      this.pairs.delete(pair);
      client.destroy();
      upstream.destroy();
    };
    for (const s of pair) {
      s.setNoDelay(true);
      s.on('error', end);
      s.on('close', end);
    }
    client.pipe(upstream);
    upstream.pipe(client);
  }

  /** Drop every connection now; how many there were. */
  cut() {
    const n = this.pairs.size;
    for (const [client, upstream] of [...this.pairs]) {
      client.destroy();
      upstream.destroy();
    }
    this.pairs.clear();
    return n;
  }

  /**
   * A half-open connection: the client's side is dropped, the server's stays open and quiet
   * (the server still thinks the client is there).
   */
  freeze() {
    const n = this.pairs.size;
    for (const [client, upstream] of [...this.pairs]) {
      upstream.unpipe(client);
      client.unpipe(upstream);
      upstream.pause();
      client.destroy();
      this.frozen.push(upstream);
    }
    this.pairs.clear();
    return n;
  }

  async stop() {
    for (const s of this.frozen) s.destroy();
    this.cut();
    await new Promise((resolve) => this.server.close(resolve));
  }
}
