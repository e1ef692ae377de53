/**
 * Keys through real processes, as a user runs them: `dst keygen`, `dst export --key`,
 * `dst attach --key` with nbdcopy writing and reading, and a tampering proxy in
 * between. Every case checks the bytes on the export's image.
 * - keyed reads and writes in both protections; the encrypted wire shows no
 *   plaintext, the MAC and unkeyed wires do;
 * - no key, a wrong key, and a keyed client against an unkeyed export: refused
 *   with words that say what to do, and nothing written;
 * - a flipped bit in either direction and a duplicated piece of the stream, both
 *   protections: the copy completes, the data is right, and the side that caught
 *   it logs it (the export also counts it in STATUS);
 * - a recorded connection replayed to the export writes nothing;
 * - an unsafe key file is refused with what to run;
 * - SIGHUP: a new key works at once; a removed key's connections are closed and
 *   cannot come back.
 */

import assert from "node:assert/strict";
import { assertSameBytes } from "../helpers/bytes.ts";
import { randomBytes } from "../helpers/random_bytes.ts";
import {
  exportImage,
  runDst,
  scenario,
  startAttach,
  startDst,
  stopClean,
} from "../helpers/spawn.ts";
import { containsBytes, TamperProxy } from "../helpers/tamper_proxy.ts";
import { missing, toolOk } from "../helpers/tools.ts";
import { waitUntil } from "../helpers/wait.ts";
import type { ExportStatus } from "../../src/server/exporter.ts";

const MiB = 1024 * 1024;
const SIZE = "16M";
const DATA_BYTES = 4 * MiB;
/** Text that must not cross an encrypted wire readable (written many times over). */
const MARKER = new TextEncoder().encode("plaintext marker: the quick brown fox 0123456789 ");

async function keygen(path: string, name: string): Promise<string> {
  const made = await runDst(["keygen", path, "--name", name]);
  assert.equal(made.code, 0, made.stderr);
  return made.stdout.match(/fingerprint ([0-9a-f]{16})/)![1]!;
}

/** DATA_BYTES of random data with MARKER written all through it. */
function markedData(): Uint8Array {
  const data = randomBytes(DATA_BYTES);
  for (let at = 0; at + MARKER.length <= data.length; at += 4096) data.set(MARKER, at);
  return data;
}

async function status(address: string, keyFile: string): Promise<ExportStatus> {
  const result = await runDst(["status", address, "--key", keyFile, "--json"]);
  assert.equal(result.code, 0, result.stderr);
  return JSON.parse(result.stdout)[0].status;
}

/** nbdcopy DATA into the attach's NBD URI and back; asserts the copy reads back the same. */
async function copyThrough(uri: string, dir: string, data: Uint8Array): Promise<void> {
  const source = `${dir}/source.bin`;
  await Deno.writeFile(source, data);
  await toolOk("nbdcopy", [source, uri]);
  const back = `${dir}/back.bin`;
  await toolOk("nbdcopy", [uri, back]);
  assertSameBytes((await Deno.readFile(back)).subarray(0, data.length), data, "read back");
}

async function imageStart(path: string, bytes: number): Promise<Uint8Array> {
  return (await Deno.readFile(path)).subarray(0, bytes);
}

const needs = missing("nbdcopy");

for (const protect of ["encrypt", "mac"] as const) {
  Deno.test({
    name: "keys: attach --key writes and reads through a keyed export; the encrypted wire shows " +
      `no plaintext, the MAC wire is readable but checked (${protect})`,
    ignore: needs,
    fn: () =>
      scenario("dst-keys-", async (dir, track) => {
        const keys = `${dir}/site.keys`;
        await keygen(keys, "site");
        const server = track(
          await exportImage(dir, "disk.img", SIZE, "--key", keys, "--protect", protect),
        );
        const proxy = TamperProxy.start(server.address, { record: true });
        try {
          const attach = track(
            await startAttach([
              `127.0.0.1:${proxy.address.port}`,
              "--key",
              keys,
              "--listen",
              "127.0.0.1:0",
            ]),
          );
          const data = markedData();
          await copyThrough(attach.uri, dir, data);
          await stopClean(attach, "attach");
          const wire = proxy.recordings().map((r) => r.toServer);
          assert.ok(
            wire.reduce((sum, bytes) => sum + bytes.length, 0) > DATA_BYTES,
            "it all crossed",
          );
          assert.equal(wire.some((bytes) => containsBytes(bytes, MARKER)), protect === "mac");
          await stopClean(server, "export");
          assertSameBytes(await imageStart(`${dir}/disk.img`, DATA_BYTES), data, "the image");
          assert.match(server.log(), new RegExp(`clients must prove a key of .*site \\(`));
          const records = protect === "mac"
            ? "authenticated \\(HMAC-SHA-256\\)"
            : "encrypted \\(AES-256-GCM\\)";
          assert.match(server.log(), new RegExp(`; records are ${records}; SIGHUP rereads`));
        } finally {
          await proxy.close();
        }
      }),
  });
}

Deno.test({
  name: "keys: without a key the same copy crosses the wire in plaintext (the control)",
  ignore: needs,
  fn: () =>
    scenario("dst-keys-", async (dir, track) => {
      const server = track(await exportImage(dir, "disk.img", SIZE));
      const proxy = TamperProxy.start(server.address, { record: true });
      try {
        const attach = track(
          await startAttach([`127.0.0.1:${proxy.address.port}`, "--listen", "127.0.0.1:0"]),
        );
        await copyThrough(attach.uri, dir, markedData());
        await stopClean(attach, "attach");
        assert.ok(proxy.recordings().some((r) => containsBytes(r.toServer, MARKER)));
      } finally {
        await proxy.close();
      }
    }),
});

Deno.test("keys: no key, a wrong key, an unknown name and a keyed client on an unkeyed export are refused, nothing written", () =>
  scenario("dst-keys-", async (dir, track) => {
    const keys = `${dir}/site.keys`;
    const other = `${dir}/other.keys`;
    const fingerprint = await keygen(keys, "site");
    const otherFingerprint = await keygen(other, "site");
    assert.notEqual(fingerprint, otherFingerprint);
    await keygen(`${dir}/stranger.keys`, "stranger");
    const keyed = track(await exportImage(dir, "keyed.img", SIZE, "--key", keys));
    const plain = track(await exportImage(dir, "plain.img", SIZE));
    const keyedAt = `127.0.0.1:${keyed.address.port}`;
    const plainAt = `127.0.0.1:${plain.address.port}`;

    const noKey = await runDst(["attach", keyedAt, "--listen", "127.0.0.1:0"]);
    assert.equal(noKey.code, 1);
    assert.match(noKey.stderr, /requires a key: give the client --key FILE/);

    const wrong = await runDst(["attach", keyedAt, "--key", other, "--listen", "127.0.0.1:0"]);
    assert.equal(wrong.code, 1);
    assert.match(wrong.stderr, /could not prove it holds key "site" \(fingerprint [0-9a-f]{16}\)/);

    const unknown = await runDst([
      "attach",
      keyedAt,
      "--key",
      `${dir}/stranger.keys`,
      "--listen",
      "127.0.0.1:0",
    ]);
    assert.equal(unknown.code, 1);
    assert.match(unknown.stderr, /could not prove it holds key "stranger"/);

    const downgrade = await runDst(["attach", plainAt, "--key", keys, "--listen", "127.0.0.1:0"]);
    assert.equal(downgrade.code, 1);
    assert.match(downgrade.stderr, /has no key, and the client was given one/);

    const statusNoKey = await runDst(["status", keyedAt]);
    assert.equal(statusNoKey.code, 1);
    assert.match(statusNoKey.stdout, /requires a key/);

    const keyedStatus = await status(keyedAt, keys);
    assert.equal(keyedStatus.writeGeneration, 0, "no client was ever granted writing");
    assert.equal(keyedStatus.writes, 0);
    await stopClean(keyed, "keyed export");
    await stopClean(plain, "plain export");
    for (const image of ["keyed.img", "plain.img"]) {
      assert.ok((await Deno.readFile(`${dir}/${image}`)).every((byte) => byte === 0), image);
    }
    assert.match(keyed.log(), /the client named key "stranger", which this export does not have/);
    assert.doesNotMatch(
      keyed.log() + noKey.stderr + wrong.stderr,
      /[0-9a-f]{64}/,
      "no key in any log",
    );
  }));

const TAMPERS = [
  {
    what: "a flipped bit toward the export",
    direction: "toServer",
    afterBytes: 300_000,
    action: { kind: "flip" },
  },
  {
    what: "a flipped bit toward the client",
    direction: "toClient",
    afterBytes: 200_000,
    action: { kind: "flip" },
  },
  {
    what: "a duplicated piece toward the export",
    direction: "toServer",
    afterBytes: 500_000,
    action: { kind: "duplicate", lengthBytes: 700 },
  },
] as const;

for (const protect of ["encrypt", "mac"] as const) {
  Deno.test({
    name: "keys: tampering in either direction costs a reconnect, never data " + `(${protect})`,
    ignore: needs,
    fn: () =>
      scenario("dst-keys-", async (dir, track) => {
        const keys = `${dir}/site.keys`;
        await keygen(keys, "site");
        const server = track(
          await exportImage(dir, "disk.img", SIZE, "--key", keys, "--protect", protect),
        );
        const at = `127.0.0.1:${server.address.port}`;
        const proxy = TamperProxy.start(server.address);
        try {
          for (const tamper of TAMPERS) {
            const before = (await status(at, keys)).tampered;
            proxy.tamper({
              direction: tamper.direction,
              afterBytes: tamper.afterBytes,
              action: tamper.action,
            });
            const attach = track(
              await startAttach([
                `127.0.0.1:${proxy.address.port}`,
                "--key",
                keys,
                "--listen",
                "127.0.0.1:0",
              ]),
            );
            const data = randomBytes(DATA_BYTES);
            await copyThrough(attach.uri, dir, data);
            await stopClean(attach, "attach");
            assert.ok(
              Object.values(proxy.stats().applied).some((n) => n > 0),
              `${tamper.what} happened`,
            );
            proxy.disarm();
            const caught = tamper.direction === "toServer" ? server.log() : attach.log();
            assert.match(
              caught,
              /failed its check|claims \d+ sealed bytes/,
              `${tamper.what}: logged`,
            );
            if (tamper.direction === "toServer") {
              assert.ok((await status(at, keys)).tampered > before, `${tamper.what}: counted`);
            }
            assert.match(attach.log(), /reconnecting/, tamper.what);
            assertSameBytes(await imageStart(`${dir}/disk.img`, DATA_BYTES), data, tamper.what);
          }
        } finally {
          await proxy.close();
        }
      }),
  });
}

Deno.test({
  name: "keys: a whole keyed connection recorded and replayed to the export writes nothing",
  ignore: needs,
  fn: () =>
    scenario("dst-keys-", async (dir, track) => {
      const keys = `${dir}/site.keys`;
      await keygen(keys, "site");
      const server = track(await exportImage(dir, "disk.img", SIZE, "--key", keys));
      const at = `127.0.0.1:${server.address.port}`;
      const proxy = TamperProxy.start(server.address, { record: true });
      try {
        const attach = track(
          await startAttach([
            `127.0.0.1:${proxy.address.port}`,
            "--key",
            keys,
            "--listen",
            "127.0.0.1:0",
          ]),
        );
        await copyThrough(attach.uri, dir, randomBytes(MiB));
        await stopClean(attach, "attach");
        // Zero the image's start through a fresh keyed attach, so a replay's data would show.
        const cleaner = track(await startAttach([at, "--key", keys, "--listen", "127.0.0.1:0"]));
        const zeros = `${dir}/zeros.bin`;
        await Deno.writeFile(zeros, new Uint8Array(MiB));
        await toolOk("nbdcopy", [zeros, cleaner.uri]);
        await stopClean(cleaner, "cleaner");
        const before = await status(at, keys);
        for (const recording of proxy.recordings()) {
          const replayed = await proxy.replay(recording, { chunking: "original" });
          assert.ok(replayed.received.length <= 88, "it got at most a fresh key share back");
        }
        const after = await status(at, keys);
        assert.equal(after.writes, before.writes, "the replay wrote nothing");
        assert.equal(after.writeGeneration, before.writeGeneration, "nor was granted writing");
        await stopClean(server, "export");
        assert.ok((await imageStart(`${dir}/disk.img`, MiB)).every((byte) => byte === 0));
        assert.match(server.log(), /did not prove key "site"|proof of key "site" is wrong/);
      } finally {
        await proxy.close();
      }
    }),
});

Deno.test("keys: an export refuses a key file others can read, saying what to run", () =>
  scenario("dst-keys-", async (dir) => {
    const keys = `${dir}/site.keys`;
    await keygen(keys, "site");
    await Deno.chmod(keys, 0o644);
    const result = await runDst([
      "export",
      `${dir}/disk.img`,
      "--create",
      SIZE,
      "--listen",
      "127.0.0.1:0",
      "--key",
      keys,
    ]);
    assert.equal(result.code, 1);
    assert.match(result.stderr, /chmod 600/);
    const protect = await runDst(["export", `${dir}/disk.img`, "--protect", "mac"]);
    assert.equal(protect.code, 2);
    assert.match(protect.stderr, /--protect goes with --key FILE/);
  }));

Deno.test({
  name: "keys: SIGHUP adds a key at once, and closes for good the connections of a key removed",
  ignore: needs,
  fn: () =>
    scenario("dst-keys-", async (dir, track) => {
      const serverKeys = `${dir}/export.keys`;
      const oldKeys = `${dir}/old.keys`;
      const newKeys = `${dir}/new.keys`;
      await keygen(oldKeys, "old");
      await keygen(newKeys, "new");
      await Deno.copyFile(oldKeys, serverKeys);
      const server = track(await exportImage(dir, "disk.img", SIZE, "--key", serverKeys));
      const at = `127.0.0.1:${server.address.port}`;
      const oldAttach = track(
        await startAttach([at, "--key", oldKeys, "--listen", "127.0.0.1:0", "--read-only"]),
      );

      // Rotation, step 1: add the new key (the file keeps mode 0600), SIGHUP.
      await Deno.writeTextFile(serverKeys, await Deno.readTextFile(newKeys), { append: true });
      server.process.kill("SIGHUP");
      await waitUntil(() => /SIGHUP: reread .*added new/.test(server.log()), "the reload", {
        timeoutMs: 15_000,
      });
      const newAttach = track(await startAttach([at, "--key", newKeys, "--listen", "127.0.0.1:0"]));
      const data = randomBytes(MiB);
      await copyThrough(newAttach.uri, dir, data);
      await toolOk("nbdinfo", [oldAttach.uri]); // the old key still works

      // Step 2: remove the old key, SIGHUP: its connection closes and cannot come back.
      await Deno.writeTextFile(serverKeys, await Deno.readTextFile(newKeys));
      server.process.kill("SIGHUP");
      await waitUntil(() => /removed old, closing 1 connection/.test(server.log()), "the removal", {
        timeoutMs: 15_000,
      });
      await waitUntil(
        () => /could not prove it holds key "old"/.test(oldAttach.log()),
        "the old client told",
        { timeoutMs: 15_000 },
      );
      await stopClean(newAttach, "new attach");
      await stopClean(server, "export");
      assertSameBytes(await imageStart(`${dir}/disk.img`, MiB), data, "the image");
    }),
});

Deno.test({
  name:
    "keys: a mirror proves the key to its legs and requires it of its own clients; detach takes --key",
  ignore: needs,
  fn: () =>
    scenario("dst-keys-", async (dir, track) => {
      const keys = `${dir}/site.keys`;
      await keygen(keys, "site");
      const a = track(await exportImage(dir, "a.img", SIZE, "--key", keys));
      const b = track(await exportImage(dir, "b.img", SIZE, "--key", keys, "--protect", "mac"));
      const legs = [`127.0.0.1:${a.address.port}`, `127.0.0.1:${b.address.port}`];
      const mirror = track(
        await startDst(
          [
            "array",
            "mirror",
            ...legs,
            "--export",
            "127.0.0.1:0",
            "--state",
            `${dir}/state`,
            "--key",
            keys,
          ],
          / on (\S+)\n/,
        ),
      );
      const at = mirror.ready[1]!;
      const noKey = await runDst(["attach", at, "--listen", "127.0.0.1:0"]);
      assert.equal(noKey.code, 1);
      assert.match(noKey.stderr, /requires a key/);
      const attach = track(await startAttach([at, "--key", keys, "--listen", "127.0.0.1:0"]));
      const data = randomBytes(DATA_BYTES);
      await copyThrough(attach.uri, dir, data);
      await stopClean(attach, "attach");
      const detach = await runDst(["array", "detach", at, legs[1]!, "--key", keys]);
      assert.equal(detach.code, 0, detach.stderr);
      await stopClean(mirror, "mirror");
      await stopClean(a, "leg a");
      await stopClean(b, "leg b");
      for (const leg of ["a.img", "b.img"]) {
        assertSameBytes(await imageStart(`${dir}/${leg}`, DATA_BYTES), data, leg);
      }
    }),
});
