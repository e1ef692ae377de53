/**
 * Seeded fuzzing of version 2 (fast-check), on both sides:
 * - the export's handshake, fed valid, mutated and random hellos, key shares and
 *   proofs from a client that does not hold the key: it never throws, never admits
 *   (no lease, no generation), and answers with nothing, a refusal or a key share;
 * - the client's handshake, fed random and mutated answers: it fails with a
 *   DstError that names the export, never connects, never hangs;
 * - the record reader, fed real records with bytes flipped, cut, repeated or
 *   replaced: whatever it hands up is exactly a prefix of what was sealed, it
 *   fails only with ChannelTamperedError (a claimed length over the 1 MiB limit
 *   too: SecureConn checks it before it allocates the record).
 * Replay a failure with DST_SEED (and DST_PATH).
 */

import assert from "node:assert/strict";
import fc from "fast-check";
import { dialExport } from "../../src/client/dial.ts";
import { ChannelTamperedError, DstError } from "../../src/lib/errors.ts";
import { Key, keyFingerprint } from "../../src/lib/key_file.ts";
import {
  AUTH_PSK,
  encodeClientHello,
  encodeClientKeyShare,
  encodeClientProof,
  PROTECTION_ENCRYPT,
  PROTECTION_MAC,
} from "../../src/protocol/mod.ts";
import { acceptHandshake } from "../../src/server/handshake.ts";
import { writeAll } from "../../src/transport/byte_conn.ts";
import { SecureConn } from "../../src/transport/secure_conn.ts";
import { ScriptedConn } from "../helpers/golden.ts";
import { replayOptions } from "../helpers/property.ts";
import { concat } from "../helpers/bytes.ts";

const keyBytes = crypto.getRandomValues(new Uint8Array(32));
const site = new Key("site", keyBytes, await keyFingerprint(keyBytes), 1);
const info = {
  id: "0".repeat(32),
  name: "fuzz",
  sizeBytes: 1 << 20,
  blockSize: 4096,
  readOnly: false,
};

/** Mutations of a valid byte string: flips, cuts, insertions and random tails. */
function mutated(valid: Uint8Array): fc.Arbitrary<Uint8Array> {
  return fc.oneof(
    fc.constant(valid),
    fc.tuple(fc.nat(valid.length - 1), fc.integer({ min: 1, max: 255 })).map(([at, mask]) => {
      const copy = valid.slice();
      copy[at] = copy[at]! ^ mask;
      return copy;
    }),
    fc.nat(valid.length).map((length) => valid.slice(0, length)),
    fc.uint8Array({ maxLength: 64 }).map((tail) => concat(valid, tail)),
    fc.uint8Array({ maxLength: valid.length + 16 }),
  );
}

const v2Hello = encodeClientHello({
  versionMin: 2,
  versionMax: 2,
  features: 1,
  authMethods: AUTH_PSK,
  protections: PROTECTION_MAC | PROTECTION_ENCRYPT,
  nonce: new Uint8Array(16),
  clientId: new Uint8Array(16).fill(7),
});
const v1Hello = encodeClientHello({
  versionMin: 1,
  versionMax: 1,
  features: 1,
  authMethods: 1,
  protections: 1,
  nonce: new Uint8Array(16),
  clientId: new Uint8Array(16).fill(7),
});

Deno.test("fuzz v2: the export's handshake never throws and never admits a client without the key", async () => {
  const publicKey = new Uint8Array(
    await crypto.subtle.exportKey(
      "raw",
      ((await crypto.subtle.generateKey({ name: "X25519" }, true, ["deriveBits"])) as CryptoKeyPair)
        .publicKey,
    ),
  );
  const share = encodeClientKeyShare({ publicKey, keyName: "site" });
  const input = fc.tuple(
    fc.oneof(mutated(v2Hello), mutated(v1Hello)),
    fc.oneof(mutated(share), fc.constant(new Uint8Array(0))),
    fc.oneof(
      fc.uint8Array({ minLength: 32, maxLength: 32 }).map(encodeClientProof),
      fc.uint8Array({ maxLength: 80 }),
    ),
    fc.uint8Array({ maxLength: 200 }),
  );
  await fc.assert(
    fc.asyncProperty(input, async ([hello, keyShare, proof, rest]) => {
      const conn = new ScriptedConn(hello, keyShare, proof, rest);
      let admitted = 0;
      const result = await acceptHandshake(
        conn,
        info,
        () => {
          admitted += 1;
          return Promise.resolve({
            ok: true,
            features: 0,
            writeGeneration: 1,
            writeEpoch: "0".repeat(32),
            exportInstance: "0".repeat(32),
          });
        },
        {
          peer: "fuzz",
          keys: { keys: () => [site], protection: PROTECTION_ENCRYPT, onTampered: () => {} },
        },
      );
      assert.equal(result.ok, false, "admitted without the key");
      assert.equal(admitted, 0, "admit() ran without the key");
      const out = conn.written();
      assert.ok(
        out.length === 0 || out.length === 88 || (out.length >= 114 && out.length <= 114 + 512),
        `answered ${out.length} bytes`,
      );
    }),
    replayOptions(2000),
  );
});

Deno.test("fuzz v2: the client's handshake fails with a DstError on any answer from an export without the key", async () => {
  const serverShareStart = new Uint8Array([0x44, 0x53, 0x54, 0x41, 2, 0, 4, 0]);
  const answer = fc.oneof(
    fc.uint8Array({ maxLength: 300 }),
    fc.uint8Array({ minLength: 80, maxLength: 80 }).map((rest) => concat(serverShareStart, rest)),
    fc.uint8Array({ minLength: 108, maxLength: 200 }).map((rest) =>
      concat(new Uint8Array([0x44, 0x53, 0x54, 0x53]), rest)
    ),
  );
  await fc.assert(
    fc.asyncProperty(answer, async (bytes) => {
      const conn = new ScriptedConn(bytes);
      await assert.rejects(
        dialExport({ hostname: "fuzz", port: 1 }, { key: site, dial: () => Promise.resolve(conn) }),
        (error) => error instanceof DstError && /fuzz:1/.test(error.message),
      );
      assert.ok(conn.closed, "the connection is closed");
    }),
    replayOptions(2000),
  );
});

Deno.test("fuzz v2: the record reader hands up only a prefix of what was sealed, and fails only as tampering", async () => {
  const sendKey = crypto.getRandomValues(new Uint8Array(32));
  const receiveKey = crypto.getRandomValues(new Uint8Array(32));
  const plan = fc.record({
    protection: fc.constantFrom(PROTECTION_ENCRYPT, PROTECTION_MAC),
    writes: fc.array(fc.integer({ min: 1, max: 5000 }), { minLength: 1, maxLength: 6 }),
    damage: fc.oneof(
      fc.record({
        kind: fc.constant("flip" as const),
        at: fc.nat(),
        mask: fc.integer({ min: 1, max: 255 }),
      }),
      fc.record({ kind: fc.constant("cut" as const), at: fc.nat() }),
      fc.record({
        kind: fc.constant("repeat" as const),
        at: fc.nat(),
        length: fc.integer({ min: 1, max: 64 }),
      }),
      fc.record({ kind: fc.constant("huge" as const), at: fc.nat() }),
      fc.record({ kind: fc.constant("none" as const) }),
    ),
  });
  await fc.assert(
    fc.asyncProperty(plan, async ({ protection, writes, damage }) => {
      const wire = new ScriptedConn();
      const sender = new SecureConn(wire, { protection, sendKey, receiveKey, peer: "receiver" });
      const sent = writes.map((length, i) => new Uint8Array(length).fill(i + 1));
      for (const data of sent) await writeAll(sender, data);
      let bytes = wire.written();
      const at = "at" in damage ? damage.at % bytes.length : 0;
      if (damage.kind === "flip") bytes[at] = bytes[at]! ^ damage.mask;
      if (damage.kind === "cut") bytes = bytes.subarray(0, at);
      if (damage.kind === "repeat") {
        bytes = concat(
          bytes.subarray(0, at),
          bytes.subarray(at, at + damage.length),
          bytes.subarray(at),
        );
      }
      if (damage.kind === "huge") {
        bytes = concat(
          bytes.subarray(0, at),
          new Uint8Array([0xff, 0xff, 0xff, 0x7f]),
          bytes.subarray(at),
        );
      }
      const receiver = new SecureConn(new ScriptedConn(bytes), {
        protection,
        sendKey: receiveKey,
        receiveKey: sendKey,
        peer: "sender",
      });
      const expected = concat(...sent);
      const got: number[] = [];
      const into = new Uint8Array(7000);
      try {
        for (let n; (n = await receiver.read(into)) !== null;) got.push(...into.subarray(0, n));
      } catch (error) {
        assert.ok(error instanceof ChannelTamperedError, String(error));
        assert.notEqual(damage.kind, "none");
      }
      assert.ok(got.length <= expected.length, "more bytes than were sealed");
      assert.deepEqual(new Uint8Array(got), expected.subarray(0, got.length), "bytes not sealed");
      if (damage.kind === "none") assert.equal(got.length, expected.length);
    }),
    replayOptions(1000),
  );
});
