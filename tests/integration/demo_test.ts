/**
 * `dst demo`, the quick start's first command: it exports a temporary image, writes
 * and reads back through the DST client, shows the status, stops the export cleanly
 * and checks the image, and leaves nothing behind.
 */

import assert from "node:assert/strict";
import { runDst } from "../helpers/spawn.ts";

/** The demo folders (dst-demo-*) in the temp folder now. */
function demoFolders(): Set<string> {
  const tmp = Deno.env.get("TMPDIR") ?? "/tmp";
  const names = new Set<string>();
  for (const entry of Deno.readDirSync(tmp)) {
    if (entry.name.startsWith("dst-demo-")) names.add(entry.name);
  }
  return names;
}

/** Every path under `dir`, relative to it. */
function pathsUnder(dir: string, prefix = ""): string[] {
  const paths: string[] = [];
  for (const entry of Deno.readDirSync(`${dir}/${prefix}`)) {
    const path = `${prefix}${entry.name}`;
    paths.push(path);
    if (entry.isDirectory) paths.push(...pathsUnder(dir, `${path}/`));
  }
  return paths;
}

Deno.test("dst demo writes, reads back and verifies through a real export, stops it cleanly and leaves nothing behind", async () => {
  const before = demoFolders();
  // A state home of its own: the demo's export must keep its write generation elsewhere.
  const stateHome = await Deno.makeTempDir({ prefix: "dst-demo-state-home-" });
  let result;
  try {
    result = await runDst(["demo", "--size", "16M"], { XDG_STATE_HOME: stateHome });
    assert.deepEqual(pathsUnder(stateHome), [], "the demo left nothing in $XDG_STATE_HOME");
  } finally {
    await Deno.remove(stateHome, { recursive: true });
  }
  assert.equal(result.code, 0, result.stderr);
  // The child's command line as one that can be pasted back: a size the CLI takes.
  assert.match(result.stdout, /\n== dst export \S+ --create 16M --listen 127\.0\.0\.1:0 /);
  assert.match(result.stdout, /verified: all 16777216 bytes read back identical/);
  assert.match(result.stdout, /export exited with code 0/);
  assert.match(result.stdout, /holds exactly what was written/);
  assert.match(result.stdout, /demo OK/);
  const left = [...demoFolders()].filter((name) => !before.has(name));
  assert.deepEqual(left, [], "the demo removed its temporary folder");
});

Deno.test("dst demo --key runs the same job over a keyed, encrypted export", async () => {
  const dir = await Deno.makeTempDir({ prefix: "dst-demo-key-" });
  try {
    const keys = `${dir}/demo.keys`;
    assert.equal((await runDst(["keygen", keys, "--name", "demo"])).code, 0);
    const result = await runDst(["demo", "--size", "8M", "--key", keys]);
    assert.equal(result.code, 0, result.stderr);
    assert.match(result.stderr, /clients must prove a key of .*demo \(/);
    assert.match(result.stdout, /verified: all 8388608 bytes read back identical/);
    assert.match(result.stdout, /demo OK/);
    const wrong = `${dir}/other.keys`;
    await Deno.writeTextFile(wrong, "# empty\n", { mode: 0o600 });
    const refused = await runDst(["demo", "--key", wrong]);
    assert.equal(refused.code, 1);
    assert.match(refused.stderr, /holds no keys; add one with `dst keygen/);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
