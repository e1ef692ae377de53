/**
 * `dst keygen`, run as a user runs it: the key file it makes (mode 0600, one
 * NAME:HEX line), rotation by appending a new name, and its refusals. Its output
 * never shows a key.
 */

import assert from "node:assert/strict";
import { bytesToHex } from "../../src/lib/hex.ts";
import { isKeyName, loadKeyFile } from "../../src/lib/key_file.ts";
import { runDst } from "../helpers/spawn.ts";

/** Runs `body` in a fresh temp dir, removed afterwards. */
async function inTempDir(body: (dir: string) => Promise<void>): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "dst-keygen-test-" });
  try {
    await body(dir);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

/** Every key in the file, as hex. */
async function keyHexes(path: string): Promise<string[]> {
  return (await loadKeyFile(path)).keys.map((key) => bytesToHex(key.bytes));
}

/** Asserts no key of `hexes` (nor a 16-digit piece of one) is in the output. */
function assertShowsNoKey(output: { stdout: string; stderr: string }, hexes: string[]): void {
  const text = output.stdout + output.stderr;
  for (const hex of hexes) {
    for (let i = 0; i + 16 <= hex.length; i += 8) {
      assert.ok(!text.includes(hex.slice(i, i + 16)), `the output shows a key:\n${text}`);
    }
  }
}

Deno.test("dst keygen creates FILE with mode 0600 and one NAME:HEX line, and prints the name and fingerprint", async () => {
  await inTempDir(async (dir) => {
    const path = `${dir}/keys`;
    const result = await runDst(["keygen", path, "--name", "node1"]);
    assert.equal(result.code, 0, result.stderr);
    assert.equal((await Deno.lstat(path)).mode! & 0o777, 0o600);
    const text = await Deno.readTextFile(path);
    assert.match(text, /^node1:[0-9a-f]{64}\n$/);
    const [key] = (await loadKeyFile(path)).keys;
    assert.match(
      result.stdout,
      new RegExp(`created ${path}: key "node1", fingerprint ${key!.fingerprint} \\(1 key`),
    );
    assertShowsNoKey(result, await keyHexes(path));
  });
});

Deno.test("dst keygen names the key after the host by default", {
  // A host name that cannot name a key (too long, odd characters) gets a usage error instead.
  ignore: !isKeyName(Deno.hostname()),
}, async () => {
  await inTempDir(async (dir) => {
    const result = await runDst(["keygen", `${dir}/keys`]);
    assert.equal(result.code, 0, result.stderr);
    const [key] = (await loadKeyFile(`${dir}/keys`)).keys;
    assert.equal(key!.name, Deno.hostname());
  });
});

Deno.test("dst keygen with another name appends: two keys, loaded in order; the same name is refused", async () => {
  await inTempDir(async (dir) => {
    const path = `${dir}/keys`;
    assert.equal((await runDst(["keygen", path, "--name", "old"])).code, 0);
    const second = await runDst(["keygen", path, "--name", "new"]);
    assert.equal(second.code, 0, second.stderr);
    assert.match(second.stdout, /added to .*: key "new", fingerprint [0-9a-f]{16} \(2 keys/);
    const file = await loadKeyFile(path);
    assert.deepEqual(file.keys.map((key) => key.name), ["old", "new"]);
    assert.equal((await Deno.lstat(path)).mode! & 0o777, 0o600);

    const before = await Deno.readTextFile(path);
    const again = await runDst(["keygen", path, "--name", "old"]);
    assert.equal(again.code, 1);
    assert.match(again.stderr, /already has a key named "old" \(line 1\); keys rotate by adding/);
    assert.equal(await Deno.readTextFile(path), before, "the file is unchanged");
    assertShowsNoKey(second, await keyHexes(path));
    assertShowsNoKey(again, await keyHexes(path));
  });
});

Deno.test("dst keygen refuses a group-readable key file, saying to chmod 600 it", async () => {
  await inTempDir(async (dir) => {
    const path = `${dir}/keys`;
    assert.equal((await runDst(["keygen", path, "--name", "a"])).code, 0);
    await Deno.chmod(path, 0o640);
    const result = await runDst(["keygen", path, "--name", "b"]);
    assert.equal(result.code, 1);
    assert.match(result.stderr, new RegExp(`mode 0640\\): run \`chmod 600 ${path}\``));
    assertShowsNoKey(result, [(await Deno.readTextFile(path)).trim().split(":")[1]!]);
    await Deno.chmod(path, 0o600);
    assert.equal((await loadKeyFile(path)).keys.length, 1, "nothing was appended");
  });
});

Deno.test("dst keygen refuses a symbolic link, to a key file or to nowhere", async () => {
  await inTempDir(async (dir) => {
    const path = `${dir}/keys`;
    assert.equal((await runDst(["keygen", path, "--name", "a"])).code, 0);
    await Deno.symlink(path, `${dir}/link`);
    await Deno.symlink(`${dir}/nowhere`, `${dir}/dangling`);
    for (const link of [`${dir}/link`, `${dir}/dangling`]) {
      const result = await runDst(["keygen", link, "--name", "b"]);
      assert.equal(result.code, 1);
      assert.match(result.stderr, /is a symbolic link.*readlink -f/);
      assertShowsNoKey(result, await keyHexes(path));
    }
    assert.equal((await loadKeyFile(path)).keys.length, 1);
    await assert.rejects(Deno.lstat(`${dir}/nowhere`), Deno.errors.NotFound);
  });
});

Deno.test("dst keygen refuses a bad name and a missing FILE as usage errors", async () => {
  await inTempDir(async (dir) => {
    const bad = await runDst(["keygen", `${dir}/keys`, "--name", "has space"]);
    assert.equal(bad.code, 2);
    assert.match(bad.stderr, /--name must be 1 to 64 characters/);
    assert.equal((await runDst(["keygen"])).code, 2);
    await assert.rejects(Deno.lstat(`${dir}/keys`), Deno.errors.NotFound);
    const help = await runDst(["keygen", "--help"]);
    assert.equal(help.code, 0);
    assert.match(help.stdout, /Usage: dst keygen FILE \[--name NAME\]/);
  });
});
