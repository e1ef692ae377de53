/**
 * Pins the NBD handshake to NBD's protocol document (doc/proto.md, as wire.ts cites
 * it): literal client bytes go in, and what the server sends back is compared field
 * by field with bytes written out from that document's message layouts, big-endian:
 * the greeting's magics and handshake flags, option replies with their magic, reply
 * types and info types, the transmission flags and the 124 zero bytes of EXPORT_NAME.
 *
 * Why: this server's other tests, and its clients in the integration tests, reach it
 * through code that shares its constants or through tools that forgive a lot; a wrong
 * option reply type or a shifted flag would pass them and break a strict client.
 */

import assert from "node:assert/strict";
import { assertFrame, type Field, frame, ScriptedConn } from "../../tests/helpers/golden.ts";
import { MemoryDevice } from "../device/memory_device.ts";
import { silentLogger } from "../lib/log.ts";
import { type NbdExport, negotiate, type Negotiated } from "./handshake.ts";
import { transmissionFlags } from "./server.ts";

const GREETING: readonly Field[] = [
  ["NBDMAGIC", "4e42444d41474943"],
  ["IHAVEOPT", "49484156454f5054"],
  ["handshake flags FIXED_NEWSTYLE|NO_ZEROES", "0003"],
];

/** Client flags: FIXED_NEWSTYLE (bit 0) and NO_ZEROES (bit 1). */
const BOTH_FLAGS = frame(["client flags", "00000003"]);

/** An option as the client sends it: IHAVEOPT, the option type, the data's length, the data. */
function option(type: string, data = ""): Uint8Array {
  const bytes = frame(["data", data]);
  return frame(
    ["IHAVEOPT", "49484156454f5054"],
    ["option", type],
    ["length", bytes.length.toString(16).padStart(8, "0")],
    ["data", data],
  );
}

const ABORT = option("00000002");

/** The header of the server's reply to `option`: magic, the option echoed, the reply type, length. */
function reply(optionType: string, replyType: string, length: string): Field[] {
  return [
    ["option reply magic", "0003e889045565a9"],
    ["option echoed", optionType],
    ["reply type", replyType],
    ["length", length],
  ];
}

/** The export: 0x123456000 bytes, named "golden", flags as a writable export advertises them. */
const exported: NbdExport = {
  name: "golden",
  description: "test disk",
  sizeBytes: 0x123456000,
  transmissionFlags: transmissionFlags(new MemoryDevice(4096)),
};

const INFO_EXPORT = (optionType: string): Field[] => [
  ...reply(optionType, "00000003", "0000000c"),
  ["info type EXPORT", "0000"],
  ["size", "0000000123456000"],
  ["transmission flags", "016d"],
];

const ACK = (optionType: string): Field[] => reply(optionType, "00000001", "00000000");

async function handshake(...input: Uint8Array[]): Promise<[Negotiated | null, Uint8Array]> {
  const conn = new ScriptedConn(...input);
  const negotiated = await negotiate(conn, exported, "peer", silentLogger);
  return [negotiated, conn.written()];
}

/** Splits the server's option replies; each is checked against the spec's header. */
function replies(bytes: Uint8Array): Array<{ head: Uint8Array; data: Uint8Array }> {
  const out = [];
  let at = 0;
  while (at < bytes.length) {
    const length = new DataView(bytes.buffer, bytes.byteOffset + at + 16, 4).getUint32(0);
    out.push({
      head: bytes.subarray(at, at + 20),
      data: bytes.subarray(at + 20, at + 20 + length),
    });
    at += 20 + length;
  }
  return out;
}

Deno.test("a writable export advertises HAS_FLAGS, SEND_FLUSH, SEND_FUA, SEND_TRIM, SEND_WRITE_ZEROES and CAN_MULTI_CONN: 0x016d", () => {
  assert.equal(transmissionFlags(new MemoryDevice(4096)), 0x016d);
});

Deno.test("a read-only export advertises HAS_FLAGS, READ_ONLY, SEND_FLUSH and CAN_MULTI_CONN: 0x0107", () => {
  assert.equal(transmissionFlags(new MemoryDevice(4096, { readOnly: true })), 0x0107);
});

Deno.test("the greeting is NBDMAGIC, IHAVEOPT and the handshake flags, 18 bytes; ABORT (2) gets ACK (1)", async () => {
  const [negotiated, out] = await handshake(BOTH_FLAGS, ABORT);
  assert.equal(negotiated, null);
  assertFrame(out, [...GREETING, ...ACK("00000002")], "greeting, then ACK");
});

Deno.test("GO (7) asking for BLOCK_SIZE gets INFO replies (3) of type EXPORT (0, 12 bytes) and BLOCK_SIZE (3, 14 bytes: 1, 4096, 2^25), then ACK", async () => {
  const go = option("00000007", "00000000 0001 0003"); // name "", one info request: BLOCK_SIZE
  const [negotiated, out] = await handshake(BOTH_FLAGS, go);
  assert.deepEqual(negotiated, { structuredReplies: false });
  assertFrame(out, [
    ...GREETING,
    ...INFO_EXPORT("00000007"),
    ...reply("00000007", "00000003", "0000000e"),
    ["info type BLOCK_SIZE", "0003"],
    ["minimum block size 1", "00000001"],
    ["preferred block size 4096", "00001000"],
    ["maximum payload 2^25", "02000000"],
    ...ACK("00000007"),
  ], "GO");
});

Deno.test("INFO (6) asking for NAME (1) and DESCRIPTION (2) gets them as INFO replies, then ACK, and negotiation goes on", async () => {
  // Name "golden" (6 bytes), two info requests: NAME, DESCRIPTION.
  const info = option("00000006", "00000006 676f6c64656e 0002 0001 0002");
  const [negotiated, out] = await handshake(BOTH_FLAGS, info, ABORT);
  assert.equal(negotiated, null);
  assertFrame(out, [
    ...GREETING,
    ...INFO_EXPORT("00000006"),
    ...reply("00000006", "00000003", "00000008"),
    ["info type NAME", "0001"],
    ["golden", "676f6c64656e"],
    ...reply("00000006", "00000003", "0000000b"),
    ["info type DESCRIPTION", "0002"],
    ["test disk", "74657374206469736b"],
    ...ACK("00000006"),
    ...ACK("00000002"),
  ], "INFO, then ABORT");
});

Deno.test("EXPORT_NAME (1) from a client without NO_ZEROES gets the size, the transmission flags and 124 zero bytes", async () => {
  const [negotiated, out] = await handshake(
    frame(["FIXED_NEWSTYLE", "00000001"]),
    option("00000001"),
  );
  assert.deepEqual(negotiated, { structuredReplies: false });
  assertFrame(out, [
    ...GREETING,
    ["size", "0000000123456000"],
    ["transmission flags", "016d"],
    ["reserved zeroes", "00".repeat(124)],
  ], "EXPORT_NAME");
});

Deno.test("EXPORT_NAME (1) from a client with NO_ZEROES gets the size and the transmission flags only", async () => {
  const name = option("00000001", "676f6c64656e");
  const [negotiated, out] = await handshake(BOTH_FLAGS, name);
  assert.deepEqual(negotiated, { structuredReplies: false });
  assertFrame(out, [
    ...GREETING,
    ["size", "0000000123456000"],
    ["transmission flags", "016d"],
  ], "EXPORT_NAME");
});

Deno.test("LIST (3) gets one SERVER reply (2) with the name's length and the name, then ACK", async () => {
  const [, out] = await handshake(BOTH_FLAGS, option("00000003"), ABORT);
  assertFrame(out, [
    ...GREETING,
    ...reply("00000003", "00000002", "0000000a"),
    ["name length 6", "00000006"],
    ["golden", "676f6c64656e"],
    ...ACK("00000003"),
    ...ACK("00000002"),
  ], "LIST");
});

Deno.test("STRUCTURED_REPLY (8) gets ACK and turns structured replies on", async () => {
  const go = option("00000007", "00000000 0000"); // name "", no info requests
  const [negotiated, out] = await handshake(BOTH_FLAGS, option("00000008"), go);
  assert.deepEqual(negotiated, { structuredReplies: true });
  assertFrame(out, [
    ...GREETING,
    ...ACK("00000008"),
    ...INFO_EXPORT("00000007"),
    ...ACK("00000007"),
  ], "STRUCTURED_REPLY, then GO");
});

Deno.test("options this server does not speak (4, 5, 9, 10, 11, 12) get ERR_UNSUP, 2^31 + 1, with a message", async () => {
  for (const type of ["00000004", "00000005", "00000009", "0000000a", "0000000b", "0000000c"]) {
    const [negotiated, out] = await handshake(BOTH_FLAGS, option(type), ABORT);
    assert.equal(negotiated, null);
    assertFrame(out.subarray(0, 18), GREETING, "greeting");
    const [unsup, ack, ...more] = replies(out.subarray(18));
    const length = unsup!.data.length.toString(16).padStart(8, "0");
    assertFrame(unsup!.head, reply(type, "80000001", length), `option ${type}`);
    assert.ok(unsup!.data.length > 0, "an error reply carries a message");
    assertFrame(ack!.head, ACK("00000002"), "ABORT");
    assert.equal(more.length, 0);
  }
});

Deno.test("an invalid option gets ERR_INVALID, 2^31 + 3; an unknown export name ERR_UNKNOWN, 2^31 + 6", async () => {
  const cases: Array<[Uint8Array, string, string]> = [
    [option("00000003", "00"), "00000003", "80000003"], // LIST takes no data
    [option("00000008", "00"), "00000008", "80000003"], // nor does STRUCTURED_REPLY
    [option("00000007", "0000"), "00000007", "80000003"], // GO's data is at least 6 bytes
    [option("00000007", "00000005 6f74686572 0000"), "00000007", "80000006"], // "other"
    [option("00000006", "00000005 6f74686572 0000"), "00000006", "80000006"],
  ];
  for (const [sent, type, error] of cases) {
    const [negotiated, out] = await handshake(BOTH_FLAGS, sent, ABORT);
    assert.equal(negotiated, null);
    const [refused, ack] = replies(out.subarray(18));
    const length = refused!.data.length.toString(16).padStart(8, "0");
    assertFrame(refused!.head, reply(type, error, length), `option ${type}`);
    assertFrame(ack!.head, ACK("00000002"), "ABORT");
  }
});

Deno.test("client flags with an unknown bit (bit 2), or without FIXED_NEWSTYLE, end the handshake after the greeting", async () => {
  for (const flags of ["00000004", "00000007", "00000000", "00000002"]) {
    const [negotiated, out] = await handshake(frame(["client flags", flags]), ABORT);
    assert.equal(negotiated, null, `client flags ${flags}`);
    assertFrame(out, GREETING, `client flags ${flags}`);
  }
});

Deno.test("an option without the IHAVEOPT magic ends the handshake", async () => {
  const bad = option("00000007", "00000000 0000");
  bad.set(frame(["NBDMAGIC", "4e42444d41474943"]), 0);
  const [negotiated, out] = await handshake(BOTH_FLAGS, bad);
  assert.equal(negotiated, null);
  assertFrame(out, GREETING, "greeting only");
});

Deno.test('a DST client hello ("DSTC" where the client flags belong) ends the handshake with a log line naming the DST port', async () => {
  const warnings: string[] = [];
  const log = { ...silentLogger, warn: (line: string) => warnings.push(line) };
  const dstHello = frame(["magic DSTC", "44535443"], [
    "rest of a DST client hello",
    "00".repeat(44),
  ]);
  const conn = new ScriptedConn(dstHello);
  assert.equal(await negotiate(conn, exported, "peer", log), null);
  assertFrame(conn.written(), GREETING, "greeting only");
  assert.equal(warnings.length, 1, warnings.join("\n"));
  assert.match(warnings[0]!, /^peer: a DST client at the NBD port/);
  assert.match(warnings[0]!, /DST clients connect to the export's --listen port/);
});
