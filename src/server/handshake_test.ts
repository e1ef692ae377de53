/**
 * Pins what the export's side of the handshake sends to the numbers of the protocol
 * README's tables: a literal client hello goes in, and the server hello that comes out
 * is compared field by field with bytes written out from the spec (status codes,
 * the 32 MiB payload and 128 requests a v1 export offers, the 112-byte layout).
 *
 * Why: the codec tests of both sides share the constants they check, so an export that
 * offered another limit, or refused with another status code, would pass them while
 * any client written from the spec would misread it.
 */

import assert from "node:assert/strict";
import {
  assertFrame,
  type Field,
  frame,
  PacedConn,
  ScriptedConn,
} from "../../tests/helpers/golden.ts";
import { ManualClock } from "../../tests/helpers/manual_clock.ts";
import { NBD_GREETING_GRACE_MS } from "../constants.ts";
import type { DeviceInfo } from "../device/block_device.ts";
import { ClientKeyShareLayout, PROTECTION_ENCRYPT, PROTECTION_MAC } from "../protocol/mod.ts";
import { concat } from "../../tests/helpers/bytes.ts";
import { acceptHandshake, type Admission, protectionName } from "./handshake.ts";

const hex = (first: number, count: number) =>
  Array.from({ length: count }, (_, i) => (first + i).toString(16).padStart(2, "0")).join("");

function clientHello(
  fields: { versions?: string; authMethods?: string; protections?: string } = {},
): Uint8Array {
  return frame(
    ["magic DSTC", "44535443"],
    ["versionMin, versionMax", fields.versions ?? "0100 0100"],
    ["features WRITER", "01000000"],
    ["authMethods", fields.authMethods ?? "0100"],
    ["protections", fields.protections ?? "0100"],
    ["nonce", hex(0x10, 16)],
    ["clientId", hex(0x20, 16)],
  );
}

const info: DeviceInfo = {
  sizeBytes: 0x123456789ab000,
  blockSize: 4096,
  readOnly: true,
  id: hex(0xa0, 16),
  name: "golden",
};

const admitted: Admission = {
  ok: true,
  features: 1,
  writeGeneration: 7 * 2 ** 32 + 9,
  writeEpoch: hex(0xc0, 16),
  exportInstance: hex(0xd0, 16),
};

/** An export without keys: version 1. */
const V1 = { peer: "test", keys: null };

/** Runs the export's handshake on `hello`; returns its answer with the random nonce zeroed. */
async function answer(hello: Uint8Array, admission: Admission = admitted): Promise<Uint8Array> {
  const conn = new ScriptedConn(hello);
  await acceptHandshake(conn, info, () => Promise.resolve(admission), V1);
  const out = conn.written();
  assert.ok(out.length >= 72, "a whole server hello was sent");
  out.fill(0, 56, 72); // the nonce (offset 56, 16 bytes) is random
  return out;
}

/** A refused hello: version 1, the status, AUTH_NONE and PROTECTION_NONE, then zeroes. */
function refusal(status: string): Field[] {
  return [
    ["magic DSTS", "44535453"],
    ["version 1", "0100"],
    ["status", status],
    ["features", "00000000"],
    ["authMethod AUTH_NONE", "0100"],
    ["protection PROTECTION_NONE", "0100"],
    ["size .. exportId, nonce (zeroed), writeGeneration .. exportInstance", "00".repeat(96)],
  ];
}

Deno.test("an accepted client gets the spec's 112-byte server hello: 32 MiB payloads, 128 requests, exportInstance at 96", async () => {
  assertFrame(await answer(clientHello()), [
    ["magic DSTS", "44535453"],
    ["version 1", "0100"],
    ["status OK", "0000"],
    ["features SHARED_WRITERS", "01000000"],
    ["authMethod AUTH_NONE", "0100"],
    ["protection PROTECTION_NONE", "0100"],
    ["size", "00b09a7856341200"],
    ["blockSize 4096", "00100000"],
    ["exportFlags READ_ONLY", "01000000"],
    ["payloadBytesMax 32 MiB", "00000002"],
    ["inFlightMax 128", "80000000"],
    ["exportId", hex(0xa0, 16)],
    ["nonce (zeroed)", "00".repeat(16)],
    ["writeGeneration", "0900000007000000"],
    ["writeEpoch", hex(0xc0, 16)],
    ["exportInstance", hex(0xd0, 16)],
  ], "server hello");
});

Deno.test("a client without version 1 is refused with status 1, VERSION_UNSUPPORTED, and a reason", async () => {
  const out = await answer(clientHello({ versions: "0200 0300" }));
  assertFrame(out.subarray(0, 112), refusal("0100"), "refused hello");
  const count = new DataView(out.buffer, 112, 2).getUint16(0, true);
  assert.ok(count > 0 && count <= 512, "a little-endian u16 count of at most 512");
  assert.equal(out.length, 112 + 2 + count, "the reason's text follows its count");
});

Deno.test("a client without AUTH_NONE (bit 1) is refused with status 2, AUTH_UNSUPPORTED", async () => {
  const out = await answer(clientHello({ authMethods: "0200" }));
  assertFrame(out.subarray(0, 112), refusal("0200"), "refused hello");
});

Deno.test("a client without PROTECTION_NONE (bit 1) is refused with status 3, PROTECTION_UNSUPPORTED", async () => {
  const out = await answer(clientHello({ protections: "0600" }));
  assertFrame(out.subarray(0, 112), refusal("0300"), "refused hello");
});

Deno.test("protectionName reads in a sentence: records are encrypted, or authenticated", () => {
  assert.equal(protectionName(PROTECTION_ENCRYPT), "encrypted (AES-256-GCM)");
  assert.equal(protectionName(PROTECTION_MAC), "authenticated (HMAC-SHA-256)");
});

Deno.test("a keyed client that does not accept the export's protection is told which it requires", async () => {
  const hello = clientHello({ versions: "0200 0200", authMethods: "0200", protections: "0200" });
  const conn = new ScriptedConn(concat(hello, new Uint8Array(ClientKeyShareLayout.SIZE)));
  const result = await acceptHandshake(conn, info, () => Promise.resolve(admitted), {
    peer: "test",
    keys: { keys: () => [], protection: PROTECTION_ENCRYPT, onTampered: () => {} },
  });
  const reason = "this export requires every record to be encrypted (AES-256-GCM), which the " +
    "client does not accept";
  assert.deepEqual(result, { ok: false, reason });
  assert.equal(new TextDecoder().decode(conn.written().subarray(112 + 2)), reason);
});

Deno.test("a refusal the export decides carries its status, and its reason as a u16 count and UTF-8", async () => {
  const out = await answer(clientHello(), { ok: false, status: 6, reason: "held" });
  assertFrame(out, [
    ...refusal("0600"),
    ["reason count 4", "0400"],
    ["reason text", "68656c64"],
  ], "WRITE_LEASE_HELD");
});

Deno.test("a hello without the DSTC magic is not answered", async () => {
  const hello = clientHello();
  hello.set(frame(["magic DSTS", "44535453"]), 0);
  const conn = new ScriptedConn(hello);
  const result = await acceptHandshake(conn, info, () => Promise.resolve(admitted), V1);
  assert.match(result.ok ? "" : result.reason, /magic/);
  assert.equal(conn.written().length, 0);
});

// An NBD client at the DST port: it waits for the server to speak, while a DST client
// sends its hello at once. The numbers below are NBD's (doc/proto.md), big-endian.

const NBD_GREETING: readonly Field[] = [
  ["NBDMAGIC", "4e42444d41474943"],
  ["IHAVEOPT", "49484156454f5054"],
  ["handshake flags FIXED_NEWSTYLE|NO_ZEROES", "0003"],
];

const WRONG_PORT = "this is a DST port (dst export --listen); NBD clients connect to the " +
  "export's --nbd port, or run dst attach HOST:PORT on the client machine";

/** An NBD option as the client sends it: IHAVEOPT, the option type, the data's length, the data. */
function nbdOption(type: string, data = ""): Uint8Array {
  const bytes = frame(["data", data]);
  return frame(
    ["IHAVEOPT", "49484156454f5054"],
    ["option", type],
    ["length", bytes.length.toString(16).padStart(8, "0")],
    ["data", data],
  );
}

/** An NBD option error reply carrying WRONG_PORT. */
function nbdRefusal(optionType: string, replyType: string): Field[] {
  const text = new TextEncoder().encode(WRONG_PORT);
  return [
    ["option reply magic", "0003e889045565a9"],
    ["option echoed", optionType],
    ["reply type", replyType],
    ["length", text.length.toString(16).padStart(8, "0")],
    ["message", Array.from(text, (b) => b.toString(16).padStart(2, "0")).join("")],
  ];
}

/** Lets the handshake run as far as it can without more input or time. */
const settle = () => new Promise((resolve) => setTimeout(resolve, 0));

const neverAsked = () => Promise.reject(new Error("an NBD client was admitted"));

Deno.test("a client silent for NBD_GREETING_GRACE_MS is greeted as an NBD server would, and its options are refused with a message naming the ports", async () => {
  const clock = new ManualClock();
  const conn = new PacedConn();
  const done = acceptHandshake(conn, info, neverAsked, { ...V1, clock });
  await settle();
  clock.advance(NBD_GREETING_GRACE_MS - 1);
  await settle();
  assert.equal(conn.written().length, 0, "a DST client still has time to send its hello");
  clock.advance(1);
  await settle();
  assertFrame(conn.written(), NBD_GREETING, "NBD greeting");
  // As libnbd does: flags, STRUCTURED_REPLY (8), then GO (7) for the default export.
  conn.feed(frame(["client flags FIXED_NEWSTYLE|NO_ZEROES", "00000003"]));
  conn.feed(nbdOption("00000008"), nbdOption("00000007", "00000000 0000"));
  conn.feed(nbdOption("00000002")); // ABORT
  const result = await done;
  assert.equal(result.ok, false);
  assert.match(result.ok ? "" : result.reason, /NBD client at the DST port/);
  assertFrame(conn.written(), [
    ...NBD_GREETING,
    // A feature it asks for is unsupported, so the client goes on to ask for the export...
    ...nbdRefusal("00000008", "80000001"),
    // ...which is refused by policy (ERR_UNSUP to GO would make it fall back to EXPORT_NAME).
    ...nbdRefusal("00000007", "80000002"),
    ["ABORT acknowledged", "0003e889045565a9 00000002 00000001 00000000"],
  ], "NBD refusals");
});

Deno.test("a hello that arrives just inside the grace is answered as ever, with no NBD byte", async () => {
  const clock = new ManualClock();
  const conn = new PacedConn();
  const done = acceptHandshake(conn, info, () => Promise.resolve(admitted), { ...V1, clock });
  await settle();
  clock.advance(NBD_GREETING_GRACE_MS - 1);
  await settle();
  conn.feed(clientHello().subarray(0, 1));
  await settle();
  clock.advance(NBD_GREETING_GRACE_MS);
  conn.feed(clientHello().subarray(1));
  const result = await done;
  assert.equal(result.ok, true);
  const out = conn.written();
  assert.equal(out.length, 112, "the server hello only");
  assertFrame(out.subarray(0, 4), [["magic DSTS", "44535453"]], "server hello");
});

Deno.test("a connection that ends before the grace is not answered", async () => {
  const clock = new ManualClock();
  const conn = new PacedConn();
  const done = acceptHandshake(conn, info, neverAsked, { ...V1, clock });
  conn.end();
  const result = await done;
  assert.equal(result.ok, false);
  clock.advance(NBD_GREETING_GRACE_MS);
  await settle();
  assert.equal(conn.written().length, 0);
});

/** What an export tells a DST client whose hello came after it had greeted it as NBD's. */
const TOO_LATE = "the export had taken this connection for an NBD client: its hello came more " +
  "than 2 s after connecting; connect again";

/** TOO_LATE as the refusal reason after a server hello: a u16 count, then the text. */
function tooLateReason(): Field[] {
  const text = new TextEncoder().encode(TOO_LATE);
  return [
    ["reason count", text.length.toString(16).padStart(4, "0").replace(/(..)(..)/, "$2$1")],
    ["reason text", Array.from(text, (b) => b.toString(16).padStart(2, "0")).join("")],
  ];
}

Deno.test("a DST hello that arrives after the grace gets the NBD greeting, then a server hello of status 7, HELLO_TOO_LATE, so its client knows to connect again", async () => {
  const clock = new ManualClock();
  const conn = new PacedConn();
  const done = acceptHandshake(conn, info, neverAsked, { ...V1, clock });
  await settle();
  clock.advance(NBD_GREETING_GRACE_MS);
  await settle();
  conn.feed(clientHello());
  const result = await done;
  assert.equal(result.ok, false);
  assert.match(result.ok ? "" : result.reason, /DST client's hello came after/);
  const out = conn.written();
  out.fill(0, 18 + 56, 18 + 72); // the server hello's nonce is random
  assertFrame(out, [...NBD_GREETING, ...refusal("0700"), ...tooLateReason()], "greeting, refusal");
});

Deno.test("a keyed export reads a late DST hello's key share before it refuses it with HELLO_TOO_LATE", async () => {
  const clock = new ManualClock();
  const conn = new PacedConn();
  const keys = { keys: () => [], protection: 4, onTampered() {} };
  const done = acceptHandshake(conn, info, neverAsked, { peer: "test", keys, clock });
  await settle();
  clock.advance(NBD_GREETING_GRACE_MS);
  await settle();
  conn.feed(clientHello({ versions: "0200 0200", authMethods: "0200", protections: "0600" }));
  await settle();
  assert.equal(conn.written().length, 18, "the greeting only, until the key share is in");
  conn.feed(new Uint8Array(104)); // the key share, which the refusal does not look at
  const result = await done;
  assert.equal(result.ok, false);
  const out = conn.written();
  assertFrame(out.subarray(0, 18 + 8), [
    ...NBD_GREETING,
    ["magic DSTS", "44535453"],
    ["version 2", "0200"],
    ["status HELLO_TOO_LATE", "0700"],
  ], "greeting, refusal");
  assertFrame(out.subarray(18 + 112), tooLateReason(), "reason");
});
