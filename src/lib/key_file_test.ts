import assert from "node:assert/strict";
import { KeyFileError } from "./errors.ts";
import { bytesToHex } from "./hex.ts";
import {
  addKey,
  checkKeyFileStat,
  keyByName,
  type KeyFileStat,
  keyFingerprint,
  loadKeyFile,
  parseKeyFile,
} from "./key_file.ts";

const HEX_A = bytesToHex(Uint8Array.from({ length: 32 }, (_, i) => i));
const HEX_B = "ff".repeat(32);

/** Writes `text` to a fresh key file (mode 0600 unless given) and runs `body` with its path. */
async function withKeyFile(
  text: string,
  body: (path: string, dir: string) => Promise<void>,
  mode = 0o600,
): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "dst-key-file-test-" });
  try {
    const path = `${dir}/keys`;
    await Deno.writeTextFile(path, text);
    await Deno.chmod(path, mode);
    await body(path, dir);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

/** Asserts `promise` rejects with a KeyFileError whose message matches `pattern` and holds no key. */
async function refuses(promise: Promise<unknown>, pattern: RegExp, ...secrets: string[]) {
  await assert.rejects(promise, (error: unknown) => {
    assert.ok(error instanceof KeyFileError, String(error));
    assert.match(error.message, pattern);
    assertNoKeyMaterial(error.message, HEX_A, HEX_B, ...secrets);
    return true;
  });
}

/** No run of 8 or more characters of any secret appears in `text`. */
function assertNoKeyMaterial(text: string, ...secrets: string[]): void {
  for (const secret of secrets) {
    for (let i = 0; i + 8 <= secret.length; i++) {
      const piece = secret.slice(i, i + 8);
      assert.ok(!text.toLowerCase().includes(piece.toLowerCase()), `"${text}" shows key material`);
    }
  }
}

Deno.test("key file: the fingerprint is SHA-256 of the prefix and the key, 16 hex digits, stable", async () => {
  // Computed independently: sha256(b"dst key fingerprint\0" + key)[:16 hex digits].
  assert.equal(
    await keyFingerprint(Uint8Array.from({ length: 32 }, (_, i) => i)),
    "def67cf23757cb4d",
  );
  assert.equal(await keyFingerprint(new Uint8Array(32).fill(0xff)), "0512064d2b0d7a54");
});

Deno.test("key file: parses NAME:HEX lines in file order, with comments, blank lines and CRLF", async () => {
  const keys = await parseKeyFile(
    "keys",
    `# my keys\n\nnode1:${HEX_A}\r\n  # old one below\nnode-2.b_c:${HEX_B.toUpperCase()}\n`,
  );
  assert.deepEqual(keys.map((k) => [k.name, k.line, k.fingerprint]), [
    ["node1", 3, "def67cf23757cb4d"],
    ["node-2.b_c", 5, "0512064d2b0d7a54"],
  ]);
  assert.equal(bytesToHex(keys[0]!.bytes), HEX_A);
  assert.equal(bytesToHex(keys[1]!.bytes), HEX_B);
});

Deno.test("key file: a key shows its name and fingerprint in JSON and inspect, never its bytes", async () => {
  const [key] = await parseKeyFile("keys", `node1:${HEX_A}\n`);
  const shown = [JSON.stringify(key), Deno.inspect(key), Deno.inspect({ key })];
  for (const text of shown) {
    assert.match(text, /node1/);
    assert.match(text, /def67cf23757cb4d/);
    assertNoKeyMaterial(text, HEX_A);
  }
});

Deno.test("key file: a malformed line is refused with its number and why, never its content", async () => {
  const cases: [string, RegExp][] = [
    [`${HEX_A}\n`, /keys line 1: expected NAME:HEX, found no ":"/],
    [`# c\nbad name:${HEX_A}\n`, /keys line 2: the name must be 1 to 64 characters/],
    [`:${HEX_A}\n`, /line 1: the name must be/],
    [`${"n".repeat(65)}:${HEX_A}\n`, /line 1: the name must be/],
    [`${HEX_B.slice(0, 20)}${HEX_A}:${HEX_A}\n`, /line 1: the name must be/],
    [`a:${HEX_A.slice(0, 62)}\n`, /line 1: the key must be 64 hex digits \(256 bits\)/],
    [`a:${HEX_A}00\n`, /line 1: the key must be 64 hex digits/],
    [`a:${HEX_A.slice(0, 63)}g\n`, /line 1: the key must be 64 hex digits/],
    [`a:${HEX_A} ${HEX_B}\n`, /line 1: the key must be 64 hex digits/],
  ];
  for (const [text, pattern] of cases) {
    await refuses(parseKeyFile("keys", text), pattern);
  }
});

Deno.test("key file: a name used twice is refused, naming both lines", async () => {
  await refuses(
    parseKeyFile("keys", `a:${HEX_A}\nb:${HEX_B}\na:${HEX_B}\n`),
    /keys line 3: the name "a" is already used on line 1/,
  );
});

Deno.test("key file: loadKeyFile returns the keys in order; keyByName picks one, the first by default", async () => {
  await withKeyFile(`one:${HEX_A}\ntwo:${HEX_B}\n`, async (path) => {
    const file = await loadKeyFile(path);
    assert.equal(file.path, path);
    assert.deepEqual(file.keys.map((k) => k.name), ["one", "two"]);
    assert.equal(keyByName(file).name, "one");
    assert.equal(keyByName(file, "two").fingerprint, "0512064d2b0d7a54");
    assert.throws(() => keyByName(file, "three"), (error: unknown) => {
      assert.ok(error instanceof KeyFileError);
      assert.match(error.message, /has no key named "three" \(it has: one, two\)/);
      return true;
    });
  });
});

Deno.test("key file: a file with no keys (empty, or only comments) is refused with what to run", async () => {
  for (const text of ["", "# nothing yet\n\n"]) {
    await withKeyFile(text, async (path) => {
      await refuses(
        loadKeyFile(path),
        /holds no keys; add one with `dst keygen .*keys --name NAME`/,
      );
    });
  }
});

Deno.test("key file: a missing file is refused with what to run", async () => {
  await withKeyFile("", async (_path, dir) => {
    await refuses(loadKeyFile(`${dir}/none`), /no such key file; make one with `dst keygen /);
  });
});

Deno.test("key file: a file group or others may read or write is refused: chmod 600", async () => {
  for (const mode of [0o640, 0o604, 0o620, 0o602, 0o644, 0o666]) {
    await withKeyFile(`a:${HEX_A}\n`, async (path) => {
      await refuses(
        loadKeyFile(path),
        new RegExp(`mode 0${mode.toString(8)}\\): run \`chmod 600 ${path}\``),
      );
    }, mode);
  }
});

Deno.test("key file: a symbolic link is refused, even to a safe file", async () => {
  await withKeyFile(`a:${HEX_A}\n`, async (path, dir) => {
    await Deno.symlink(path, `${dir}/link`);
    await refuses(loadKeyFile(`${dir}/link`), /link is a symbolic link.*readlink -f /);
  });
});

Deno.test("key file: a path that is not a regular file is refused", async () => {
  await withKeyFile("", async (_path, dir) => {
    await Deno.mkdir(`${dir}/folder`, { mode: 0o700 });
    await refuses(loadKeyFile(`${dir}/folder`), /folder is not a regular file/);
  });
});

Deno.test("key file: a file that is not the current user's is refused, saying what to run", () => {
  const stat: KeyFileStat = { isFile: true, isSymlink: false, uid: 0, mode: 0o100600 };
  assert.throws(() => checkKeyFileStat("/etc/keys", stat, 1000), (error: unknown) => {
    assert.ok(error instanceof KeyFileError);
    assert.match(
      error.message,
      /belongs to uid 0, not to you \(uid 1000\).*`chown 1000 \/etc\/keys`/,
    );
    return true;
  });
  checkKeyFileStat("/etc/keys", stat, 0);
  checkKeyFileStat("keys", { ...stat, uid: null, mode: null }, null); // no owners or modes here
});

Deno.test("key file: a file owned by another user is refused on disk too (as root)", {
  ignore: Deno.uid() !== 0,
}, async () => {
  await withKeyFile(`a:${HEX_A}\n`, async (path) => {
    await Deno.chown(path, 65534, null);
    await refuses(loadKeyFile(path), /belongs to uid 65534, not to you \(uid 0\)/);
    await refuses(addKey(path, "b"), /belongs to uid 65534/);
  });
});

Deno.test("key file: a path with spaces is quoted in the command an error suggests", async () => {
  const dir = await Deno.makeTempDir({ prefix: "dst-key-file-test-" });
  try {
    const path = `${dir}/my keys`;
    await Deno.writeTextFile(path, `a:${HEX_A}\n`);
    await Deno.chmod(path, 0o644);
    await refuses(loadKeyFile(path), new RegExp(`run \`chmod 600 '${dir}/my keys'\``));
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("key file: addKey creates the file with mode 0600 whatever the umask, then appends", async () => {
  await withKeyFile("", async (_path, dir) => {
    const path = `${dir}/new`;
    const umask = Deno.umask(0o277); // takes even the owner's write bit
    let first;
    try {
      first = await addKey(path, "one");
    } finally {
      Deno.umask(umask);
    }
    assert.equal(first.created, true);
    assert.equal(first.keyCount, 1);
    assert.equal((await Deno.stat(path)).mode! & 0o777, 0o600);
    const text = await Deno.readTextFile(path);
    assert.match(text, /^one:[0-9a-f]{64}\n$/);
    const second = await addKey(path, "two");
    assert.deepEqual([second.created, second.keyCount], [false, 2]);
    const file = await loadKeyFile(path);
    assert.deepEqual(file.keys.map((k) => [k.name, k.fingerprint]), [
      ["one", first.fingerprint],
      ["two", second.fingerprint],
    ]);
    assert.notEqual(bytesToHex(file.keys[0]!.bytes), bytesToHex(file.keys[1]!.bytes));
  });
});

Deno.test("key file: addKey appends after a last line without a newline, and to a file of comments", async () => {
  await withKeyFile(`# keys\na:${HEX_A}`, async (path) => {
    await addKey(path, "b");
    const file = await loadKeyFile(path);
    assert.deepEqual(file.keys.map((k) => k.name), ["a", "b"]);
  });
  await withKeyFile("# keys for node1\n", async (path) => {
    await addKey(path, "first");
    assert.deepEqual((await loadKeyFile(path)).keys.map((k) => k.name), ["first"]);
  });
});

Deno.test("key file: addKey refuses a name in the file, an unsafe file, a link, a malformed file", async () => {
  await withKeyFile(`a:${HEX_A}\n`, async (path, dir) => {
    const before = await Deno.readTextFile(path);
    await refuses(addKey(path, "a"), /already has a key named "a" \(line 1\); keys rotate/);
    await refuses(addKey(path, "bad name"), /the key name must be 1 to 64/i);
    await Deno.symlink(path, `${dir}/link`);
    await refuses(addKey(`${dir}/link`, "b"), /is a symbolic link/);
    await Deno.symlink(`${dir}/nowhere`, `${dir}/dangling`);
    await refuses(addKey(`${dir}/dangling`, "b"), /is a symbolic link/);
    await Deno.chmod(path, 0o640);
    await refuses(addKey(path, "b"), /run `chmod 600 /);
    await Deno.chmod(path, 0o600);
    assert.equal(await Deno.readTextFile(path), before, "nothing was written");
  });
  await withKeyFile(`a:${HEX_A.slice(1)}\n`, async (path) => {
    await refuses(addKey(path, "b"), /line 1: the key must be 64 hex digits/);
  });
});

Deno.test("key file: two addKey calls at once with one name: one adds it, the other is refused", async () => {
  await withKeyFile("", async (_path, dir) => {
    const path = `${dir}/race`;
    const results = await Promise.allSettled([addKey(path, "same"), addKey(path, "same")]);
    assert.equal(results.filter((r) => r.status === "fulfilled").length, 1);
    assert.equal((await loadKeyFile(path)).keys.length, 1);
  });
});
