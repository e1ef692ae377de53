/**
 * Pins NBD's transmission phase to NBD's protocol document (doc/proto.md, as wire.ts
 * cites it): requests written out as literal bytes from its message layout (28-byte
 * header, big-endian) go in, and each reply is compared field by field with the
 * document's simple reply (16 bytes) or structured chunk (20-byte header), with its
 * command types, command flags, error values, chunk types and the DONE flag as
 * literal numbers.
 *
 * Why: everything else that talks to this server here reads and writes frames with
 * the same constants it uses, so a shifted command type or error value would pass
 * while the kernel's NBD client or qemu misread every reply.
 */

import assert from "node:assert/strict";
import { assertFrame, type Field, frame, ScriptedConn } from "../../tests/helpers/golden.ts";
import { MemoryDevice } from "../device/memory_device.ts";
import { BufferPool } from "../lib/buffer_pool.ts";
import { silentLogger } from "../lib/log.ts";
import { NbdConnection } from "./transmission.ts";

/** The device: 1 MiB, so offset 0x100000 is its end. */
const SIZE = 0x100000;
const COOKIE = "0102030405060708";
const COOKIE_2 = "1112131415161718";

/** A request as the document lays it out; `data` follows the header for WRITE. */
function request(
  fields: { flags?: string; type: string; cookie?: string; offset: string; length: string },
  data = "",
): Uint8Array {
  return frame(
    ["magic", "25609513"],
    ["command flags", fields.flags ?? "0000"],
    ["type", fields.type],
    ["cookie", fields.cookie ?? COOKIE],
    ["offset", fields.offset],
    ["length", fields.length],
    ["data", data],
  );
}

function simpleReply(error: string, cookie = COOKIE): Field[] {
  return [["magic", "67446698"], ["error", error], ["cookie", cookie]];
}

const FLUSH_2 = request({
  type: "0003",
  cookie: COOKIE_2,
  offset: "0".repeat(16),
  length: "0".repeat(8),
});

interface Served {
  out: Uint8Array;
  device: MemoryDevice;
}

/** Serves `input` on one connection until it ends; returns everything the server sent. */
async function serve(
  setup: { structuredReplies?: boolean; readOnly?: boolean; before?: (d: MemoryDevice) => void },
  ...input: Uint8Array[]
): Promise<Served> {
  const device = new MemoryDevice(SIZE, { readOnly: setup.readOnly ?? false });
  setup.before?.(device);
  const conn = new ScriptedConn(...input);
  const connection = new NbdConnection(conn, "peer", {
    device,
    pool: new BufferPool(0),
    log: silentLogger,
    structuredReplies: setup.structuredReplies ?? false,
    acquire: null,
  });
  await connection.serve();
  return { out: conn.written(), device };
}

/** Splits a run of 16-byte simple replies and orders them by cookie (replies may come in any order). */
function simpleReplies(bytes: Uint8Array): Uint8Array[] {
  assert.equal(bytes.length % 16, 0, "whole simple replies");
  const out = [];
  for (let at = 0; at < bytes.length; at += 16) out.push(bytes.subarray(at, at + 16));
  const cookie = (reply: Uint8Array) =>
    new DataView(reply.buffer, reply.byteOffset + 8).getBigUint64(0);
  return out.sort((a, b) => (cookie(a) < cookie(b) ? -1 : 1));
}

const text = (bytes: Uint8Array) => new TextDecoder().decode(bytes);

Deno.test("a WRITE (type 1) with FUA (bit 0) is a 28-byte header and its data; the simple reply is 16 bytes: magic 0x67446698, error 0, the cookie", async () => {
  const write = request(
    { flags: "0001", type: "0001", offset: "0000000000000200", length: "00000004" },
    "61626364",
  );
  const { out, device } = await serve({}, write);
  assertFrame(out, simpleReply("00000000"), "WRITE reply");
  assert.equal(text(device.bytes.subarray(0x200, 0x204)), "abcd");
});

Deno.test("a READ (type 0) without structured replies gets the simple reply, then the data", async () => {
  const read = request({ type: "0000", offset: "0000000000000200", length: "00000004" });
  const before = (d: MemoryDevice) => d.bytes.set(frame(["wxyz", "7778797a"]), 0x200);
  const { out } = await serve({ before }, read);
  assertFrame(out, [...simpleReply("00000000"), ["data", "7778797a"]], "READ reply");
});

Deno.test("a READ (type 0) with structured replies gets one OFFSET_DATA chunk (type 1) flagged DONE (bit 0): the offset, then the data", async () => {
  const read = request({ type: "0000", offset: "0000000000000200", length: "00000004" });
  const before = (d: MemoryDevice) => d.bytes.set(frame(["wxyz", "7778797a"]), 0x200);
  const { out } = await serve({ structuredReplies: true, before }, read);
  assertFrame(out, [
    ["magic", "668e33ef"],
    ["flags DONE", "0001"],
    ["type OFFSET_DATA", "0001"],
    ["cookie", COOKIE],
    ["length 8 + 4", "0000000c"],
    ["offset", "0000000000000200"],
    ["data", "7778797a"],
  ], "READ chunk");
});

Deno.test("a READ past the end is EINVAL (22): a simple reply, or an ERROR chunk (type 2^15 + 1) flagged DONE with the error and a message", async () => {
  const read = request({ type: "0000", offset: "00000000000ffffe", length: "00000004" });
  const simple = await serve({}, read);
  assertFrame(simple.out, simpleReply("00000016"), "simple");

  const { out } = await serve({ structuredReplies: true }, read);
  const view = new DataView(out.buffer, out.byteOffset);
  const messageLength = view.getUint16(24);
  assertFrame(out.subarray(0, 26), [
    ["magic", "668e33ef"],
    ["flags DONE", "0001"],
    ["type ERROR", "8001"],
    ["cookie", COOKIE],
    ["length 6 + message", (6 + messageLength).toString(16).padStart(8, "0")],
    ["error EINVAL", "00000016"],
    ["message length", messageLength.toString(16).padStart(4, "0")],
  ], "ERROR chunk");
  assert.ok(messageLength > 0, "a message for the user");
  assert.equal(out.length, 26 + messageLength);
});

Deno.test("a WRITE past the end is ENOSPC (28); its data is drained, so the next 28-byte request is read and answered", async () => {
  const write = request(
    { type: "0001", offset: "00000000000ffffe", length: "00000004" },
    "61626364",
  );
  const { out } = await serve({}, write, FLUSH_2);
  const [first, second] = simpleReplies(out);
  assertFrame(first!, simpleReply("0000001c"), "WRITE past the end");
  assertFrame(second!, simpleReply("00000000", COOKIE_2), "FLUSH after it");
});

Deno.test("a TRIM past the end is EINVAL (22), a WRITE_ZEROES past the end ENOSPC (28), as the spec's error section says", async () => {
  const cases: Array<[string, string]> = [["0004", "00000016"], ["0006", "0000001c"]];
  for (const [type, error] of cases) {
    const sent = request({ type, offset: "00000000000ffffe", length: "00000004" });
    const { out } = await serve({}, sent, FLUSH_2);
    const [refused, flushed] = simpleReplies(out);
    assertFrame(refused!, simpleReply(error), `type ${type} past the end`);
    assertFrame(flushed!, simpleReply("00000000", COOKIE_2), "the stream stays framed");
  }
});

Deno.test("READ (0) and FLUSH (3) with FUA (bit 0) are accepted: the spec makes FUA valid on every command once SEND_FUA is negotiated", async () => {
  const read = request({
    type: "0000",
    flags: "0001",
    offset: "0000000000000200",
    length: "00000004",
  });
  const flush = request({
    type: "0003",
    flags: "0001",
    cookie: COOKIE_2,
    offset: "0".repeat(16),
    length: "0".repeat(8),
  });
  const before = (d: MemoryDevice) => d.bytes.set([1, 2, 3, 4], 0x200);
  const { out } = await serve({ before }, read, flush);
  assertFrame(
    out.subarray(0, 20),
    [...simpleReply("00000000"), ["data", "01020304"]],
    "READ with FUA",
  );
  assertFrame(out.subarray(20), simpleReply("00000000", COOKIE_2), "FLUSH with FUA");
});

Deno.test("WRITE (1), TRIM (4) and WRITE_ZEROES (6) on a read-only export are EPERM (1)", async () => {
  const cases: Array<[string, string]> = [["0001", "61626364"], ["0004", ""], ["0006", ""]];
  for (const [type, data] of cases) {
    const sent = request({ type, offset: "0000000000000200", length: "00000004" }, data);
    const { out } = await serve({ readOnly: true }, sent);
    assertFrame(out, simpleReply("00000001"), `type ${type}`);
  }
});

Deno.test("FLUSH (type 3) gets error 0", async () => {
  const flush = request({ type: "0003", offset: "0".repeat(16), length: "0".repeat(8) });
  const { out } = await serve({}, flush);
  assertFrame(out, simpleReply("00000000"), "FLUSH");
});

Deno.test("TRIM (type 4) with FUA (bit 0) and WRITE_ZEROES (type 6) with NO_HOLE (bit 1) zero their range", async () => {
  const cases: Array<[string, string]> = [["0004", "0001"], ["0006", "0002"], ["0006", "0003"]];
  for (const [type, flags] of cases) {
    const sent = request({ type, flags, offset: "0000000000000200", length: "00000004" });
    const before = (d: MemoryDevice) => d.bytes.fill(0xff, 0x1ff, 0x205);
    const { out, device } = await serve({ before }, sent);
    assertFrame(out, simpleReply("00000000"), `type ${type} flags ${flags}`);
    assert.deepEqual([...device.bytes.subarray(0x1ff, 0x205)], [0xff, 0, 0, 0, 0, 0xff]);
  }
});

Deno.test("flags a command does not take here are EINVAL (22): DF (bit 2) and REQ_ONE (bit 3) anywhere, FAST_ZERO (bit 4) and NO_HOLE on WRITE", async () => {
  const range = { offset: "0000000000000200", length: "00000004" };
  const cases: Array<[string, string, string]> = [
    ["0000", "0004", ""], // READ with DF: SEND_DF is not advertised
    ["0000", "0008", ""],
    ["0001", "0002", "61626364"], // NO_HOLE belongs to WRITE_ZEROES
    ["0001", "0004", "61626364"],
    ["0006", "0010", ""], // FAST_ZERO: SEND_FAST_ZERO is not advertised
    ["0006", "0008", ""],
    ["0004", "0002", ""],
  ];
  for (const [type, flags, data] of cases) {
    const { out } = await serve({}, request({ type, flags, ...range }, data), FLUSH_2);
    const [refused, flushed] = simpleReplies(out);
    assertFrame(refused!, simpleReply("00000016"), `type ${type} flags ${flags}`);
    assertFrame(flushed!, simpleReply("00000000", COOKIE_2), "the stream stays framed");
  }
});

Deno.test("CACHE (5), BLOCK_STATUS (7) and an unknown type (8) are EINVAL (22)", async () => {
  for (const type of ["0005", "0007", "0008"]) {
    const sent = request({ type, offset: "0000000000000200", length: "00000004" });
    const { out } = await serve({}, sent);
    assertFrame(out, simpleReply("00000016"), `type ${type}`);
  }
});

Deno.test("DISC (type 2) is not answered: what came before it is, and nothing after it is read", async () => {
  const write = request(
    { type: "0001", offset: "0000000000000200", length: "00000004" },
    "61626364",
  );
  const disc = request({
    type: "0002",
    cookie: COOKIE_2,
    offset: "0".repeat(16),
    length: "0".repeat(8),
  });
  const { out } = await serve({}, write, disc, FLUSH_2);
  assertFrame(out, simpleReply("00000000"), "only the WRITE is answered");
});

Deno.test("a request whose magic is not 0x25609513 (the historic 0x12560953, the reserved 0x25609514) closes the connection unanswered", async () => {
  for (const magic of ["12560953", "25609514", "67446698"]) {
    const sent = FLUSH_2.slice();
    sent.set(frame(["magic", magic]), 0);
    const { out } = await serve({}, sent);
    assert.equal(out.length, 0, `magic ${magic}`);
  }
});
