// index.d.ts compiles, and describes the API as a TypeScript program uses it (tsc --strict on
// test/fixtures/usage.ts; the package imports itself by name through its "exports").

import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { join } from 'node:path';
import { it } from 'node:test';
import { promisify } from 'node:util';

import { JS } from './helpers/daemon.js';

const TSC = join(JS, 'node_modules', 'typescript', 'bin', 'tsc');

it('tsc --strict accepts a program written against index.d.ts', async () => {
  const args = [
    TSC, '--noEmit', '--strict', '--target', 'es2022', '--module', 'nodenext',
    '--moduleResolution', 'nodenext', '--lib', 'es2022,dom',
    join('test', 'fixtures', 'usage.ts'),
  ];
  const result = await promisify(execFile)(process.execPath, args, { cwd: JS }).catch((e) => e);
  assert.equal(result.code ?? 0, 0, `${result.stdout}${result.stderr}`);
});
