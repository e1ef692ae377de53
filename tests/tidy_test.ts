/**
 * The codebase checks itself (as TigerBeetle runs its tidy as a test): no default
 * exports, no console output outside the CLI layer and the tests, no leftover
 * FIXME/XXX markers, and every source file opens with a comment saying what it owns.
 */

import assert from "node:assert/strict";
import { DENO_PERMISSIONS } from "../src/cli/self.ts";

const ROOT = new URL("../", import.meta.url).pathname;

async function* sourceFiles(dir: string): AsyncGenerator<string> {
  for await (const entry of Deno.readDir(dir)) {
    const path = `${dir}/${entry.name}`;
    if (entry.isDirectory) yield* sourceFiles(path);
    else if (entry.name.endsWith(".ts")) yield path;
  }
}

Deno.test("tidy: no default exports, console only in the CLI layer, no FIXME, a header on every file", async () => {
  const problems: string[] = [];
  const files = [`${ROOT}main.ts`];
  for await (const path of sourceFiles(`${ROOT}src`)) files.push(path);
  for (const path of files) {
    const text = await Deno.readTextFile(path);
    const name = path.slice(ROOT.length);
    const isTest = name.endsWith("_test.ts");
    if (/^export default/m.test(text)) problems.push(`${name}: default export`);
    if (/\b(FIXME|XXX)\b/.test(text)) problems.push(`${name}: leftover FIXME/XXX`);
    const cliLayer = name === "main.ts" || name.startsWith("src/cli/");
    if (!cliLayer && !isTest && /\bconsole\.(log|error|warn|info)\(/.test(text)) {
      problems.push(`${name}: console output outside the CLI layer (use src/lib/log.ts)`);
    }
    if (!isTest && !/^(#!.*\n)?\/\*\*/.test(text)) problems.push(`${name}: no opening comment`);
  }
  assert.deepEqual(problems, []);
});

Deno.test("deno.json's tasks run dst with the same permissions as the bundle and its children", async () => {
  const config = JSON.parse(await Deno.readTextFile(new URL("../deno.json", import.meta.url)));
  for (const task of ["dst", "demo", "compile"]) {
    const words: string[] = config.tasks[task].split(/\s+/);
    const flags = words.filter((word) => word.startsWith("--allow") || word === "-A");
    assert.deepEqual(flags, DENO_PERMISSIONS, `task ${task}`);
  }
  const bundle = await Deno.readTextFile(new URL("../dist/dst.js", import.meta.url)).catch(() =>
    null
  );
  if (bundle !== null) {
    assert.ok(bundle.startsWith(`#!/usr/bin/env -S deno run ${DENO_PERMISSIONS.join(" ")} `));
  }
});
