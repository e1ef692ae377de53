/**
 * The record layer alone, over an in-memory wire the test controls: what goes in
 * comes out byte for byte in both protections; the wire shows no plaintext when
 * encrypted; and every kind of tampering (a flipped bit, a replayed, duplicated,
 * reordered or reflected record, a wrong key) fails before any byte of the record
 * is handed up, once, with the peer named.
 */

import assert from "node:assert/strict";
import { ChannelTamperedError } from "../lib/errors.ts";
import {
  PROTECTION_ENCRYPT,
  PROTECTION_MAC,
  RECORD_PLAINTEXT_BYTES_MAX,
} from "../protocol/wire.ts";
import { type ByteConn, writeAll } from "./byte_conn.ts";
import { SecureConn, type SecureConnOptions } from "./secure_conn.ts";

/** One direction of a wire: what was written, as records, and a reader over what the test lets through. */
class Wire implements ByteConn {
  readonly written: Uint8Array[] = [];
  #incoming: Uint8Array[] = [];
  #ended = false;
  #wake: (() => void) | null = null;

  write(data: Uint8Array): Promise<number> {
    this.written.push(data.slice());
    return Promise.resolve(data.length);
  }

  deliver(...chunks: Uint8Array[]): void {
    this.#incoming.push(...chunks.map((chunk) => chunk.slice()));
    this.#wake?.();
  }

  end(): void {
    this.#ended = true;
    this.#wake?.();
  }

  async read(into: Uint8Array): Promise<number | null> {
    while (this.#incoming.length === 0) {
      if (this.#ended) return null;
      await new Promise<void>((resolve) => this.#wake = resolve);
    }
    const chunk = this.#incoming[0]!;
    const n = Math.min(into.length, chunk.length);
    into.set(chunk.subarray(0, n));
    if (n === chunk.length) this.#incoming.shift();
    else this.#incoming[0] = chunk.subarray(n);
    return n;
  }

  close(): void {
    this.end();
  }
}

const keyA = crypto.getRandomValues(new Uint8Array(32));
const keyB = crypto.getRandomValues(new Uint8Array(32));

function pair(protection: number, extra: Partial<SecureConnOptions> = {}) {
  const senderWire = new Wire();
  const receiverWire = new Wire();
  const tampered: string[] = [];
  const sender = new SecureConn(senderWire, {
    protection,
    sendKey: keyA,
    receiveKey: keyB,
    peer: "the receiver",
    ...extra,
  });
  const receiver = new SecureConn(receiverWire, {
    protection,
    sendKey: keyB,
    receiveKey: keyA,
    peer: "the sender",
    onTampered: (message) => tampered.push(message),
    ...extra,
  });
  return { sender, senderWire, receiver, receiverWire, tampered };
}

async function readAll(conn: ByteConn, bytes: number): Promise<Uint8Array> {
  const out = new Uint8Array(bytes);
  let at = 0;
  while (at < bytes) {
    const n = await conn.read(out.subarray(at, Math.min(bytes, at + 70_000)));
    assert.notEqual(n, null, `stream ended after ${at} of ${bytes} bytes`);
    at += n!;
  }
  return out;
}

function pattern(bytes: number, seed: number): Uint8Array {
  const out = new Uint8Array(bytes);
  for (let i = 0; i < bytes; i++) out[i] = (i * 31 + seed) & 0xff;
  return out;
}

function contains(haystack: Uint8Array, needle: Uint8Array): boolean {
  outer: for (let i = 0; i + needle.length <= haystack.length; i++) {
    for (let j = 0; j < needle.length; j++) if (haystack[i + j] !== needle[j]) continue outer;
    return true;
  }
  return false;
}

for (const [name, protection] of [["encrypt", PROTECTION_ENCRYPT], ["mac", PROTECTION_MAC]]) {
  Deno.test(
    "SecureConn: writes of every size arrive byte for byte, in order " + `(${name})`,
    async () => {
      const { sender, senderWire, receiver, receiverWire } = pair(protection as number);
      const sizes = [
        1,
        17,
        4096,
        RECORD_PLAINTEXT_BYTES_MAX,
        RECORD_PLAINTEXT_BYTES_MAX + 5,
        3_000_000,
      ];
      const sent = sizes.map((size, i) => pattern(size, i));
      for (const data of sent) await writeAll(sender, data);
      receiverWire.deliver(...senderWire.written);
      for (const data of sent) assert.deepEqual(await readAll(receiver, data.length), data);
      receiverWire.end();
      assert.equal(await receiver.read(new Uint8Array(1)), null, "a clean end between records");
    },
  );

  Deno.test(
    "SecureConn: a flipped bit anywhere in a record hands up none of it " + `(${name})`,
    async () => {
      const probe = pair(protection as number);
      await probe.sender.write(pattern(300, 1));
      const recordBytes = probe.senderWire.written[0]!.length;
      for (const at of [0, 3, 4, 100, recordBytes - 1]) {
        const { sender, senderWire, receiver, receiverWire, tampered } = pair(protection as number);
        await writeAll(sender, pattern(300, 1));
        await writeAll(sender, pattern(300, 2)); // a live stream goes on: a longer claimed length fills up
        const record = senderWire.written[0]!.slice();
        record[at] = record[at]! ^ 0x01;
        receiverWire.deliver(record, senderWire.written[1]!);
        await assert.rejects(
          receiver.read(new Uint8Array(400)),
          ChannelTamperedError,
          `bit at ${at}`,
        );
        assert.equal(tampered.length, 1, "counted once");
        assert.match(tampered[0]!, /from the sender/);
        await assert.rejects(
          receiver.read(new Uint8Array(1)),
          ChannelTamperedError,
          "stays failed",
        );
      }
    },
  );

  Deno.test(
    "SecureConn: a replayed, duplicated, dropped or reordered record fails " + `(${name})`,
    async () => {
      const cases: [string, (a: Uint8Array, b: Uint8Array) => Uint8Array[]][] = [
        ["duplicated", (a, b) => [a, a, b]],
        ["reordered", (a, b) => [b, a]],
        ["dropped", (_a, b) => [b]],
      ];
      for (const [what, rearrange] of cases) {
        const { sender, senderWire, receiver, receiverWire, tampered } = pair(protection as number);
        await writeAll(sender, pattern(50, 1));
        await writeAll(sender, pattern(60, 2));
        const [a, b] = senderWire.written;
        receiverWire.deliver(...rearrange(a!, b!));
        if (what === "duplicated") assert.deepEqual(await readAll(receiver, 50), pattern(50, 1));
        await assert.rejects(readAll(receiver, 60), ChannelTamperedError, what);
        assert.equal(tampered.length, 1, what);
      }
      // A whole earlier connection's records, replayed into a new one with the same keys,
      // would pass: the handshake's fresh transcript gives every connection its own keys.
    },
  );

  Deno.test("SecureConn: a record reflected back to its sender fails " + `(${name})`, async () => {
    const { sender, senderWire } = pair(protection as number);
    await writeAll(sender, pattern(80, 3));
    const reflectWire = new Wire();
    const reflected = new SecureConn(reflectWire, {
      protection: protection as number,
      sendKey: keyA,
      receiveKey: keyB,
      peer: "itself",
    });
    reflectWire.deliver(...senderWire.written);
    await assert.rejects(reflected.read(new Uint8Array(100)), ChannelTamperedError);
  });

  Deno.test(
    "SecureConn: keys change after the set number of records, on both sides " + `(${name})`,
    async () => {
      const { sender, senderWire, receiver, receiverWire } = pair(protection as number, {
        recordsPerKey: 3,
        bytesPerKey: 1000,
      });
      const sent = Array.from({ length: 12 }, (_, i) => pattern(i * 97 + 1, i));
      for (const data of sent) await writeAll(sender, data);
      receiverWire.deliver(...senderWire.written);
      for (const data of sent) assert.deepEqual(await readAll(receiver, data.length), data);
      // A receiver that did not change keys fails at the first record under the new key.
      const staleWire = new Wire();
      const staleReceiver = new SecureConn(staleWire, {
        protection: protection as number,
        sendKey: keyB,
        receiveKey: keyA,
        peer: "the sender",
      });
      staleWire.deliver(...senderWire.written);
      for (const data of sent.slice(0, 3)) {
        assert.deepEqual(await readAll(staleReceiver, data.length), data);
      }
      await assert.rejects(readAll(staleReceiver, sent[3]!.length), ChannelTamperedError);
    },
  );

  Deno.test(
    "SecureConn: a record claiming more than the limit fails before it is read " + `(${name})`,
    async () => {
      const { receiver, receiverWire, tampered } = pair(protection as number);
      const header = new Uint8Array(4);
      new DataView(header.buffer).setUint32(0, 0xffffffff, true);
      receiverWire.deliver(header);
      await assert.rejects(receiver.read(new Uint8Array(10)), ChannelTamperedError);
      assert.equal(tampered.length, 1);
    },
  );

  Deno.test(
    "SecureConn: a connection cut inside a record ends without handing any of it up " + `(${name})`,
    async () => {
      const { sender, senderWire, receiver, receiverWire, tampered } = pair(protection as number);
      await writeAll(sender, pattern(500, 4));
      receiverWire.deliver(senderWire.written[0]!.subarray(0, 200));
      receiverWire.end();
      await assert.rejects(receiver.read(new Uint8Array(600)), ChannelTamperedError);
      assert.equal(tampered.length, 0, "a cut link is not counted as tampering");
    },
  );
}

Deno.test("SecureConn: the encrypted wire shows no plaintext; the MAC wire does", async () => {
  const secret = new TextEncoder().encode("the quick brown fox jumps over the lazy dog 0123456789");
  for (
    const [protection, shows] of [[PROTECTION_ENCRYPT, false], [PROTECTION_MAC, true]] as const
  ) {
    const { sender, senderWire } = pair(protection);
    await writeAll(sender, secret);
    assert.equal(contains(senderWire.written[0]!, secret), shows);
  }
});

Deno.test("SecureConn: a large write is sent a batch of records per call, so a slow reader's progress shows", async () => {
  const { sender, senderWire } = pair(PROTECTION_ENCRYPT);
  const first = await sender.write(new Uint8Array(3_000_000));
  assert.ok(first > 0 && first <= 512 * 1024, `the first call took ${first} bytes`);
  assert.ok(senderWire.written.length <= 2, "at most two records went out");
});
