/**
 * Version 2 end to end in one process (an Exporter on a MemoryDevice, RemoteDevice
 * and dialExport on loopback): the right key reads and writes in both protections;
 * every mismatch (wrong key, unknown key name, no key against a keyed export, a key
 * against an unkeyed one) is refused with words that say what to do, with nothing
 * granted and nothing written; and a recorded handshake replayed later proves nothing.
 */

import assert from "node:assert/strict";
import { AuthenticationFailed, dialExport, HandshakeRefused } from "../client/dial.ts";
import { RemoteDevice } from "../client/remote_device.ts";
import { NBD_GREETING_GRACE_MS } from "../constants.ts";
import { MemoryDevice } from "../device/memory_device.ts";
import { Key, keyFingerprint } from "../lib/key_file.ts";
import { silentLogger as quiet } from "../lib/log.ts";
import {
  encodeRefusalReason,
  encodeServerHello,
  HelloStatus,
  PROTECTION_ENCRYPT,
  PROTECTION_MAC,
  PROTOCOL_VERSION_KEYED,
} from "../protocol/mod.ts";
import { closeQuietly, readExact, writeAll } from "../transport/byte_conn.ts";
import { Exporter } from "./exporter.ts";

const SIZE = 1024 * 1024;

async function makeKey(name: string): Promise<Key> {
  const bytes = crypto.getRandomValues(new Uint8Array(32));
  return new Key(name, bytes, await keyFingerprint(bytes), 1);
}

function start(device: MemoryDevice, keys: Key[] | null, protection = PROTECTION_ENCRYPT) {
  return Exporter.start(device, {
    listen: { hostname: "127.0.0.1", port: 0 },
    log: quiet,
    ...(keys === null ? {} : { keys: { keys: () => keys, protection } }),
  });
}

for (const protection of [PROTECTION_ENCRYPT, PROTECTION_MAC]) {
  const word = protection === PROTECTION_ENCRYPT ? "encrypt" : "mac";
  Deno.test(`keyed export (${word}): the right key writes and reads back byte for byte`, async () => {
    const site = await makeKey("site");
    const device = new MemoryDevice(SIZE);
    const exporter = start(device, [await makeKey("old"), site], protection);
    try {
      const client = await RemoteDevice.connect(exporter.address, { key: site, log: quiet });
      const data = new Uint8Array(200_000).map((_, i) => (i * 7919) >> 3);
      await client.write(4096, data);
      await client.flush();
      const back = new Uint8Array(data.length);
      await client.read(4096, back);
      assert.deepEqual(back, data);
      const stored = new Uint8Array(data.length);
      await device.read(4096, stored);
      assert.deepEqual(stored, data, "on the device itself");
      await client.close();
      const status = exporter.status();
      assert.equal(status.protection, word);
      assert.equal(status.tampered, 0);
    } finally {
      await exporter.shutdown();
    }
  });
}

Deno.test("keyed export: a keyed client whose hello came after the NBD grace is told so, and its second connection gets in", async () => {
  const site = await makeKey("site");
  const exporter = start(new MemoryDevice(SIZE), [site]);
  try {
    let dials = 0;
    const dial = async (address: { hostname: string; port: number }) => {
      dials += 1;
      const conn = await Deno.connect(address);
      if (dials === 1) {
        await new Promise((resolve) => setTimeout(resolve, NBD_GREETING_GRACE_MS + 300));
      }
      return conn;
    };
    const { conn, hello } = await dialExport(exporter.address, { key: site, dial });
    assert.equal(hello.version, PROTOCOL_VERSION_KEYED);
    assert.equal(dials, 2);
    closeQuietly(conn);
  } finally {
    await exporter.shutdown();
  }
});

Deno.test("keyed export: the hello says version 2 and the protection chosen", async () => {
  const site = await makeKey("site");
  const exporter = start(new MemoryDevice(SIZE), [site], PROTECTION_MAC);
  try {
    const { conn, hello } = await dialExport(exporter.address, { key: site });
    assert.equal(hello.version, PROTOCOL_VERSION_KEYED);
    assert.equal(hello.protection, PROTECTION_MAC);
    assert.equal(hello.sizeBytes, SIZE);
    closeQuietly(conn);
  } finally {
    await exporter.shutdown();
  }
});

Deno.test("keyed export: a wrong key and an unknown key name fail alike, naming the key, granting nothing", async () => {
  const site = await makeKey("site");
  const exporter = start(new MemoryDevice(SIZE), [site]);
  try {
    const impostor = new Key("site", crypto.getRandomValues(new Uint8Array(32)), "f".repeat(16), 1);
    const stranger = await makeKey("stranger");
    const messages: string[] = [];
    for (const key of [impostor, stranger]) {
      try {
        await dialExport(exporter.address, { key, writer: true });
        assert.fail("dialed with a key the export does not have");
      } catch (e) {
        assert.ok(e instanceof AuthenticationFailed, String(e));
        messages.push(e.message.replace(key.name, "NAME").replace(key.fingerprint, "FP"));
      }
    }
    assert.equal(messages[0], messages[1], "from outside, wrong and unknown look the same");
    assert.match(messages[0]!, /could not prove it holds key "NAME"/);
    assert.equal(exporter.status().writeGeneration, 0, "no write was granted");
    assert.equal(exporter.status().writeLease, null);
  } finally {
    await exporter.shutdown();
  }
});

Deno.test("keyed export: a client without a key is refused, told to use --key", async () => {
  const exporter = start(new MemoryDevice(SIZE), [await makeKey("site")]);
  try {
    await assert.rejects(
      dialExport(exporter.address, { writer: true }),
      (e) =>
        e instanceof HandshakeRefused && /requires a key: give the client --key/.test(e.message),
    );
    assert.equal(exporter.status().writeGeneration, 0);
  } finally {
    await exporter.shutdown();
  }
});

Deno.test("unkeyed export: a client with a key refuses it (no downgrade), told why", async () => {
  const exporter = start(new MemoryDevice(SIZE), null);
  try {
    await assert.rejects(
      dialExport(exporter.address, { key: await makeKey("site"), writer: true }),
      (e) =>
        e instanceof HandshakeRefused && /has no key, and the client was given one/.test(e.message),
    );
    assert.equal(exporter.status().writeGeneration, 0);
  } finally {
    await exporter.shutdown();
  }
});

Deno.test("keyed client: a plain OK hello from a server that skipped the key exchange is refused", async () => {
  // A v1 export (or a man in the middle) answering a keyed hello with an ordinary OK.
  const unkeyed = start(new MemoryDevice(SIZE), null);
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const served = (async () => {
    const conn = await listener.accept();
    const upstream = await Deno.connect(unkeyed.address);
    // Pass the client's plain 48-byte hello on as if it offered no key, drop its key share.
    const hello = new Uint8Array(48 + 104);
    await readExact(conn, hello);
    const view = new DataView(hello.buffer);
    view.setUint16(4, 1, true);
    view.setUint16(6, 1, true);
    view.setUint16(12, 1, true);
    view.setUint16(14, 1, true);
    await writeAll(upstream, hello.subarray(0, 48));
    const reply = new Uint8Array(112);
    await readExact(upstream, reply);
    await writeAll(conn, reply);
    return { conn, upstream };
  })();
  try {
    await assert.rejects(
      dialExport(listener.addr as Deno.NetAddr, { key: await makeKey("site") }),
      (e) =>
        e instanceof AuthenticationFailed && /answered without proving key "site"/.test(e.message),
    );
    const { conn, upstream } = await served;
    closeQuietly(conn);
    closeQuietly(upstream);
  } finally {
    listener.close();
    await unkeyed.shutdown();
  }
});

Deno.test("keyed export: a recorded handshake replayed later is not admitted", async () => {
  const site = await makeKey("site");
  const exporter = start(new MemoryDevice(SIZE), [site]);
  try {
    // Record what a real client sends, through a relay that keeps its bytes.
    const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
    const sent: Uint8Array[] = [];
    const relay = (async () => {
      const conn = await listener.accept();
      const upstream = await Deno.connect(exporter.address);
      const pump = async (from: Deno.Conn, to: Deno.Conn, keep: boolean) => {
        const buffer = new Uint8Array(65536);
        try {
          for (let n; (n = await from.read(buffer)) !== null;) {
            if (keep) sent.push(buffer.slice(0, n));
            await writeAll(to, buffer.subarray(0, n));
          }
        } catch {
          // closed
        }
        closeQuietly(to);
      };
      await Promise.all([pump(conn, upstream, true), pump(upstream, conn, false)]);
    })();
    const client = await RemoteDevice.connect(listener.addr as Deno.NetAddr, {
      key: site,
      log: quiet,
    });
    await client.write(0, new Uint8Array(4096).fill(7));
    await client.flush();
    await client.close();
    await relay;
    listener.close();
    const before = exporter.status();

    // Replay it byte for byte to the export.
    const replay = await Deno.connect(exporter.address);
    for (const chunk of sent) await writeAll(replay, chunk);
    const answer = new Uint8Array(1 << 16);
    let got = 0;
    for (let n; (n = await replay.read(answer.subarray(got))) !== null;) got += n;
    closeQuietly(replay);
    const after = exporter.status();
    assert.equal(after.writes, before.writes, "the replay wrote nothing");
    assert.equal(after.writeGeneration, before.writeGeneration, "nor was it granted writing");
    assert.equal(got, 88, "it got only a fresh key share, whose proof it cannot answer");
  } finally {
    await exporter.shutdown();
  }
});

Deno.test("keyed client: a plain WRITE_LEASE_HELD (or any status a keyed export only sends after the proofs) from someone without the key is not believed", async () => {
  for (const status of [HelloStatus.WRITE_LEASE_HELD, HelloStatus.BUSY]) {
    const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
    const served = (async () => {
      const conn = await listener.accept();
      await readExact(conn, new Uint8Array(48 + 104));
      const hello = encodeServerHello({
        version: 1,
        status,
        features: 0,
        authMethod: 1,
        protection: 1,
        sizeBytes: 0,
        blockSize: 0,
        exportFlags: 0,
        payloadBytesMax: 0,
        inFlightMax: 0,
        exportId: new Uint8Array(16),
        nonce: new Uint8Array(16),
        writeGeneration: 0,
        writeEpoch: new Uint8Array(16),
        exportInstance: new Uint8Array(16),
      });
      await writeAll(conn, hello);
      await writeAll(conn, encodeRefusalReason("forged by someone on the path"));
      closeQuietly(conn);
    })();
    try {
      await assert.rejects(
        dialExport(listener.addr as Deno.NetAddr, { key: await makeKey("site"), writer: true }),
        (e) => e instanceof AuthenticationFailed && /without proving key "site"/.test(e.message),
      );
    } finally {
      await served;
      listener.close();
    }
  }
});

Deno.test("keyed export: a client identity is bound to its key: another key with the same id neither fences it nor takes its lease", async () => {
  const writerKey = await makeKey("writer");
  const otherKey = await makeKey("other");
  const exporter = start(new MemoryDevice(SIZE), [writerKey, otherKey]);
  try {
    const clientId = crypto.getRandomValues(new Uint8Array(16));
    const writer = await RemoteDevice.connect(exporter.address, {
      key: writerKey,
      clientId,
      log: quiet,
    });
    await writer.write(0, new Uint8Array(4096).fill(1));
    const generation = exporter.status().writeGeneration;
    await assert.rejects(
      dialExport(exporter.address, { key: otherKey, clientId, writer: true }),
      (e) => e instanceof HandshakeRefused && e.code === "WRITE_LEASE_HELD",
    );
    await writer.write(4096, new Uint8Array(4096).fill(2)); // its connection was not fenced
    assert.equal(writer.transportStats().reconnects, 0, "its connection was never fenced");
    assert.equal(exporter.status().writeGeneration, generation, "nobody else was granted writing");
    await writer.close();
  } finally {
    await exporter.shutdown();
  }
});
