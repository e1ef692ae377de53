/**
 * tests/PROMISES.md lists each promise of the README with the tests that back it.
 * This keeps the list true: every file it names exists, and every test it names
 * (`- \`FILE\` › NAME`, NAME the test's name or its start) is a test of that file (a
 * Deno.test name, not text elsewhere), so a test that is renamed or removed fails here
 * until the list says what backs the promise now.
 */

import assert from "node:assert/strict";

const ROOT = new URL("../", import.meta.url).pathname;

interface Reference {
  file: string;
  name: string | null;
}

/** The list's references: a bullet naming a file, with a test name after "›" (wrapped lines joined). */
function references(text: string): Reference[] {
  const out: Reference[] = [];
  const bullets = text.split(/\n(?=- |\n)/);
  for (const bullet of bullets) {
    const match = /^- `([^`]+)`(?: › ([\s\S]+))?/.exec(bullet.trim());
    if (match === null) continue;
    const name = match[2]?.replace(/\s+/g, " ").trim() ?? null;
    out.push({ file: match[1]!, name });
  }
  return out;
}

/** The names of a file's tests: the first argument of Deno.test, or its `name:` (quotes undone). */
function testNames(source: string): string[] {
  const quoted = /(["'`])((?:\\.|(?!\1)[^\\])*)\1/.source;
  const names: string[] = [];
  for (const start of [/Deno\.test\(\s*/.source, /\bname:\s*/.source]) {
    for (const match of source.matchAll(new RegExp(start + quoted, "g"))) {
      names.push(match[2]!.replace(/\\(.)/g, "$1"));
    }
  }
  return names;
}

Deno.test("tests/PROMISES.md names only files and tests that exist", async () => {
  const list = await Deno.readTextFile(`${ROOT}tests/PROMISES.md`);
  const refs = references(list);
  assert.ok(refs.length > 50, `the list names tests (found ${refs.length})`);
  const missing: string[] = [];
  for (const { file, name } of refs) {
    let source: string;
    try {
      source = await Deno.readTextFile(`${ROOT}${file}`);
    } catch {
      missing.push(`${file}: no such file`);
      continue;
    }
    if (name !== null && !testNames(source).some((test) => test.startsWith(name))) {
      missing.push(`${file}: no test "${name}"`);
    }
  }
  assert.deepEqual(missing, []);
});
