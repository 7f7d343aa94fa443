// Real processes for the integration tests: heartbeatd (twistd) and redis-server, each on a
// loopback port, always stopped.  The daemon's bound ports are read from its log, never fixed;
// every wait is on an event (a log line, an exit) with a deadline, never a sleep.
//
// HEARTBEATD_TWISTD names the twistd to run (tests/test_js_client.py passes the venv's);
// the default is the repository's .venv/bin/twistd.

import { spawn, spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import { after, before } from 'node:test';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

export const JS = resolve(dirname(fileURLToPath(import.meta.url)), '..', '..');
export const REPO = resolve(JS, '..');
export const TWISTD = process.env.HEARTBEATD_TWISTD || join(REPO, '.venv', 'bin', 'twistd');
export const PYTHON = join(dirname(TWISTD), 'python');
export const FIXTURES = join(JS, 'test', 'fixtures');

const LISTENING = /heartbeatd \S+ listening on 127\.0\.0\.1:(\d+)/;
const WS_LISTENING = /WebSocket listening on 127\.0\.0\.1:(\d+)/;
const READY = /heartbeatd is ready \(pid \d+\)/;
let daemons = 0; // names each daemon's config file: several may share a folder

/** True when this checkout's heartbeatd has the WebSocket listener (heartbeatd/websocket/). */
export function hasWebSocket() {
  return existsSync(join(REPO, 'heartbeatd', 'websocket', '__init__.py'));
}

/** A fresh temporary folder, removed by `cleanup()`. */
export function tempDir(prefix = 'heartbeatd-js-') {
  const path = mkdtempSync(join(tmpdir(), prefix));
  return { path, cleanup: () => rmSync(path, { recursive: true, force: true }) };
}

/** A daemon with `config` for the enclosing describe(): started before its tests, killed
 * (and its directory removed) after them. Its `.daemon` is set once started. */
export function suiteDaemon(config) {
  const tmp = tempDir();
  const suite = { daemon: null };
  before(async () => {
    suite.daemon = new Daemon(config, { dir: tmp.path });
    await suite.daemon.start();
  });
  after(async () => {
    await suite.daemon?.kill();
    tmp.cleanup();
  });
  return suite;
}

/** Wait for `regex` in the lines a process writes; the match, or an error with the log. */
class LogWatcher {
  constructor(stream, name) {
    this.name = name;
    this.lines = [];
    this.waiters = [];
    this.ended = false;
    let partial = '';
    stream.setEncoding('utf8');
    stream.on('data', (chunk) => {
      const parts = (partial + chunk).split('\n');
      partial = parts.pop();
      for (const line of parts) this._line(line);
    });
    stream.on('end', () => {
      if (partial) this._line(partial);
      this.ended = true;
      for (const w of this.waiters.splice(0)) w.fail('the process ended');
    });
  }

  _line(line) {
    this.lines.push(line);
    for (const w of [...this.waiters]) w.check(line);
  }

  /** Resolve with the `count`-th match of `regex` (counting lines already seen). */
  waitFor(regex, { timeout = 20_000, count = 1 } = {}) {
    let seen = 0;
    for (const line of this.lines) {
      const m = regex.exec(line);
      if (m && ++seen >= count) return Promise.resolve(m);
    }
    return new Promise((resolvePromise, reject) => {
      const waiter = {
        check: (line) => {
          const m = regex.exec(line);
          if (m && ++seen >= count) {
            this.waiters.splice(this.waiters.indexOf(waiter), 1);
            clearTimeout(timer);
            resolvePromise(m);
          }
        },
        fail: (why) => {
          clearTimeout(timer);
          reject(new Error(`${why} waiting for ${regex} in ${this.name}; log:\n${this.lines.join('\n')}`));
        },
      };
      const timer = setTimeout(() => {
        this.waiters.splice(this.waiters.indexOf(waiter), 1);
        waiter.fail('timed out');
      }, timeout);
      if (this.ended) waiter.fail('the process ended');
      else this.waiters.push(waiter);
    });
  }
}

/**
 * One heartbeatd process.  `config` is merged over test defaults (loopback port 0, admin off,
 * a short drain); `start()` resolves once it is ready, with `port` (and `wsPort` when
 * `websocket.listen` is set).  `restart()` starts it again on the same ports.
 */
export class Daemon {
  constructor(config = {}, { dir, env = {}, pythonPath = [] } = {}) {
    this.dir = dir ?? tempDir().path;
    this.config = {
      listen: 'tcp:0:interface=127.0.0.1',
      admin: { listen: '' },
      shutdown: { drain_timeout: 0.2 },
      ...config,
    };
    this.env = {
      ...process.env,
      PYTHONUNBUFFERED: '1',
      PYTHONPATH: [FIXTURES, ...pythonPath, process.env.PYTHONPATH].filter(Boolean).join(':'),
      ...env,
    };
    this.process = null;
    this.port = 0;
    this.wsPort = 0;
    this.starts = 0;
    this.name = `heartbeatd-${++daemons}`;
  }

  get url() {
    return `tcp://127.0.0.1:${this.port}`;
  }

  async start() {
    this.starts += 1;
    const path = join(this.dir, `${this.name}-${this.starts}.yaml`);
    writeFileSync(path, JSON.stringify(this.config, null, 2)); // JSON is YAML
    const argv = ['--nodaemon', '--pidfile=', '--logger=heartbeatd.daemon.logs.observer', 'heartbeatd', '--config', path];
    const child = spawn(TWISTD, argv, { env: this.env, stdio: ['ignore', 'pipe', 'pipe'] });
    this.process = child;
    this.exited = new Promise((resolvePromise) => child.once('exit', (code, signal) => resolvePromise({ code, signal })));
    this.log = new LogWatcher(child.stdout, `heartbeatd (pid ${child.pid})`);
    child.stderr.on('data', (chunk) => this.log._line(`stderr: ${chunk}`));
    try {
      this.port = Number((await this.log.waitFor(LISTENING))[1]);
      if (this.config.websocket?.listen) this.wsPort = Number((await this.log.waitFor(WS_LISTENING))[1]);
      await this.log.waitFor(READY);
    } catch (error) {
      await this.kill();
      throw error;
    }
    return this;
  }

  /** Kill it at once (a crash: no goaway) and wait for the exit. */
  async kill() {
    if (this.process === null) return;
    const child = this.process;
    this.process = null;
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
    await this.exited;
  }

  /** Stop it with `signal` (SIGTERM drains: goaway first) and wait for the exit code. */
  async stop(signal = 'SIGTERM') {
    if (this.process === null) return null;
    const child = this.process;
    this.process = null;
    child.kill(signal);
    const { code } = await this.exited;
    return code;
  }

  /** Start again on the same port(s), after a kill or a stop. */
  async restart() {
    await this.kill();
    this.config = { ...this.config, listen: `tcp:${this.port}:interface=127.0.0.1` };
    if (this.wsPort) {
      this.config.websocket = { ...this.config.websocket, listen: `tcp:${this.wsPort}:interface=127.0.0.1` };
    }
    return this.start();
  }
}

/** A free loopback port (closed again; fine for a redis-server started right after). */
export async function freePort() {
  const server = net.createServer();
  await new Promise((resolvePromise) => server.listen(0, '127.0.0.1', resolvePromise));
  const { port } = server.address();
  await new Promise((resolvePromise) => server.close(resolvePromise));
  return port;
}

/** A private redis-server without persistence; `url`; `stop()`. */
export async function startRedis(dir) {
  const port = await freePort();
  const child = spawn(
    'redis-server',
    ['--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no', '--dir', dir, '--daemonize', 'no'],
    { stdio: ['ignore', 'pipe', 'pipe'] },
  );
  const exited = new Promise((resolvePromise) => child.once('exit', resolvePromise));
  const spawned = new Promise((resolvePromise, reject) => {
    child.once('spawn', resolvePromise);
    child.once('error', (error) => reject(new Error(`redis-server could not start: ${error.message} (apt-get install redis-server)`)));
  });
  await spawned;
  const log = new LogWatcher(child.stdout, 'redis-server');
  await log.waitFor(/Ready to accept connections/);
  return {
    url: `redis://127.0.0.1:${port}/0`,
    async stop() {
      if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
      await exited;
    },
  };
}

/**
 * A throwaway CA and a certificate for localhost/127.0.0.1 (trustme, through the venv's
 * Python): `{ca, cert, key}` file paths, and `caPem`.
 */
export function makeCerts(dir) {
  const result = spawnSync(PYTHON, [join(FIXTURES, 'make_certs.py'), dir], { encoding: 'utf8' });
  if (result.status !== 0) throw new Error(`make_certs.py failed: ${result.stderr}`);
  const paths = JSON.parse(result.stdout);
  return { ...paths, caPem: readFileSync(paths.ca, 'utf8') };
}

/** Resolve when `emitter` emits `event` (with its first argument); reject after `timeout`. */
export function nextEvent(emitter, event, timeout = 10_000) {
  return new Promise((resolvePromise, reject) => {
    const timer = setTimeout(() => {
      off();
      reject(new Error(`no ${event} event within ${timeout} ms`));
    }, timeout);
    const off = emitter.on(event, (value) => {
      clearTimeout(timer);
      off();
      resolvePromise(value);
    });
  });
}

/** Resolve once `predicate()` is true, checking on each event of `emitter` named in `events`. */
export function until(predicate, emitter, events, timeout = 10_000) {
  if (predicate()) return Promise.resolve();
  return new Promise((resolvePromise, reject) => {
    const offs = [];
    const done = (error) => {
      clearTimeout(timer);
      for (const off of offs) off();
      if (error) reject(error);
      else resolvePromise();
    };
    const timer = setTimeout(() => done(new Error(`condition not met within ${timeout} ms`)), timeout);
    for (const event of events) {
      offs.push(emitter.on(event, () => predicate() && done()));
    }
  });
}

/**
 * `promise`, within `ms`: a step that hangs fails here with what it was (`what`) and, from
 * `why()`, what the test saw meanwhile, instead of running into the runner's timeout with no
 * reason.  A rejection gets the same context.
 */
export function within(promise, ms, what, why = () => '') {
  let timer;
  const context = () => {
    const seen = why();
    return seen ? `\n${seen}` : '';
  };
  const deadline = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what}: not done within ${ms} ms${context()}`)), ms);
  });
  const step = Promise.resolve(promise).catch((error) => {
    throw new Error(`${what} failed: ${error?.message ?? error}${context()}`, { cause: error });
  });
  return Promise.race([step, deadline]).finally(() => clearTimeout(timer));
}
