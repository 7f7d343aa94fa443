// docs/js-client.md (and js/README.md) are tested: every `js` block runs against a real daemon
// (the `<!-- js: KIND -->` line above it names which), and prints what its `// prints:`
// comments say.  The
// options table matches DEFAULTS and index.d.ts, and index.d.ts declares every export.

import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { promisify } from 'node:util';

import * as runtime from '../index.js';
import { DEFAULTS } from '../src/client.js';
import { JS, REPO, tempDir } from './helpers/daemon.js';
import { daemonFor, makeCerts, WEBSOCKET } from './helpers/transports.js';

const run = promisify(execFile);
const PAGE = join(REPO, 'docs', 'js-client.md');
const KINDS = ['plain', 'auth', 'tls', 'seed', 'browser', 'none'];

/** The fenced blocks of a markdown page: `{language, line, marker, code}`. */
export function blocks(text) {
  const lines = text.split('\n');
  const found = [];
  for (let i = 0; i < lines.length; i++) {
    const open = /^```(\w*)\s*$/.exec(lines[i]);
    if (!open) continue;
    const end = lines.findIndex((l, j) => j > i && l.trim() === '```');
    assert.ok(end > i, `line ${i + 1}: unclosed block`);
    const marker = /^<!-- js: (\w+) -->$/.exec(lines[i - 1]?.trim() ?? '');
    found.push({ language: open[1], line: i + 1, marker: marker?.[1] ?? null, code: lines.slice(i + 1, end).join('\n') + '\n' });
    i = end;
  }
  return found;
}

const page = readFileSync(PAGE, 'utf8');
const PAGES = { 'docs/js-client.md': page, 'js/README.md': readFileSync(join(JS, 'README.md'), 'utf8') };
const examples = Object.entries(PAGES).flatMap(([name, text]) =>
  blocks(text).filter((b) => b.language === 'js').map((b) => ({ ...b, page: name })),
);

it('every js block of the pages says which daemon it runs against', () => {
  assert.ok(examples.length >= 10);
  for (const block of examples) {
    assert.ok(KINDS.includes(block.marker), `${block.page}:${block.line}: <!-- js: ${KINDS.join('|')} --> above the block`);
  }
  for (const text of Object.values(PAGES)) {
    assert.deepEqual(blocks(text).filter((b) => b.marker !== null && b.language !== 'js'), []);
  }
});

describe('the examples of docs/js-client.md', { skip: WEBSOCKET ? false : 'no WebSocket listener here yet' }, () => {
  const tmp = tempDir();
  const certs = makeCerts(tmp.path);
  const scratch = mkdtempSync(join(JS, '.docs-run-')); // inside the package: imports resolve
  const tokens = join(tmp.path, 'tokens');
  writeFileSync(tokens, 'alice:alice-token\n');
  const options = { dir: tmp.path, certs, pythonPath: [join(REPO, 'examples', 'chat')] };
  const daemons = {
    plain: daemonFor(false, { handlers: ['chat_handlers'] }, options),
    auth: daemonFor(false, { handlers: ['chat_handlers'], auth: { mode: 'token', tokens_file: tokens } }, options),
    tls: daemonFor(true, {}, options),
    seed: daemonFor(false, { framing: 'seed' }, options),
  };

  before(() => Promise.all(Object.values(daemons).map((d) => d.start())));
  after(async () => {
    await Promise.all(Object.values(daemons).map((d) => d.kill()));
    rmSync(scratch, { recursive: true, force: true });
    tmp.cleanup();
  });

  function prepare(block) {
    const d = daemons[block.marker === 'browser' ? 'plain' : block.marker];
    let code = block.code;
    if (d) {
      code = code.replaceAll('tcp://127.0.0.1:9000', `tcp://127.0.0.1:${d.port}`);
      code = code.replaceAll('ws://127.0.0.1:9001/', `ws://127.0.0.1:${d.wsPort}/`);
      code = code.replaceAll('tls://localhost:9443', `tls://localhost:${d.port}`);
    }
    code = code.replaceAll("'/etc/heartbeatd/ca.pem'", JSON.stringify(certs.ca));
    if (block.marker === 'browser') {
      // A browser's module, run in Node.js: the package by name, and a global WebSocket.
      code = code.replace(/from '\/js\/index\.js'/, "from 'heartbeatd-client'");
      code = `${code}\n`.replace(/^/, "globalThis.WebSocket ??= (await import('ws')).WebSocket;\n");
    }
    return code;
  }

  for (const block of examples) {
    it(`${block.page}:${block.line} (${block.marker})`, async () => {
      const file = join(scratch, `${block.page.replace(/\W/g, '-')}-${block.line}.mjs`);
      writeFileSync(file, prepare(block));
      const { stdout } = await run(process.execPath, [file], { cwd: JS, timeout: 20_000 });
      const expected = [...block.code.matchAll(/\/\/ prints: (.*)$/gm)].map((m) => m[1]);
      assert.ok(expected.length > 0, 'each example says what it prints');
      assert.deepEqual(stdout.trimEnd().split('\n'), expected);
    });
  }
});

it('the options table lists every option of index.d.ts, with DEFAULTS as its defaults', () => {
  const section = page.split('\n## Options\n')[1].split('\n## ')[0];
  const table = new Map();
  for (const row of section.split('\n').filter((l) => l.startsWith('| `'))) {
    const [names, value] = row.split('|').slice(1, 3).map((c) => c.trim());
    for (const name of names.match(/`\w+`/g)) table.set(name.slice(1, -1), value);
  }
  const dts = readFileSync(join(JS, 'index.d.ts'), 'utf8');
  const declared = new Set();
  for (const name of ['TlsOptions', 'ClientOptions']) {
    const body = dts.split(`export interface ${name} `)[1].split('\n}\n')[0];
    for (const m of body.matchAll(/^ {2}(\w+)\??:/gm)) declared.add(m[1]);
  }
  assert.deepEqual([...table.keys()].sort(), [...declared].sort());
  for (const [name, value] of Object.entries(DEFAULTS)) {
    assert.equal(table.get(name), `\`${typeof value === 'string' ? `'${value}'` : value}\``, name);
  }
});

it('index.d.ts declares every export, and nothing that is not exported', () => {
  const dts = readFileSync(join(JS, 'index.d.ts'), 'utf8');
  const values = [...dts.matchAll(/^export (?:class|function|const) (\w+)/gm)].map((m) => m[1]);
  assert.deepEqual(values.sort(), Object.keys(runtime).sort());
});
