/**
 * The README's promise that bad input "never writes outside the device", and that a
 * well-framed request past the end gets an error reply while the connection goes on:
 * every command that changes data (WRITE, DISCARD or TRIM, WRITE_ZEROES, with and
 * without FUA), starting inside the device and crossing its end, at the end, after
 * it, and at offsets where offset + length passes 2^53, 2^63 and 2^64 (where a u64
 * sum wraps around to a small number), sent as raw DST frames, and by nbdsh (libnbd
 * with its own range checks off) to `dst export --nbd`, to `dst attach`, and to
 * `dst array` linear and mirror over local images.
 *
 * Each request gets the documented error: over DST ENOSPC, or EINVAL for an offset of
 * 2^53 or more (src/protocol/README.md, "Errors"); over NBD what the NBD spec says,
 * ENOSPC for WRITE and WRITE_ZEROES and EINVAL for TRIM. The images are filled with
 * random bytes first and compared whole, size included, after the server stopped
 * with SIGTERM; the only change is one in-range write that ends exactly at the end,
 * so a server that refused too much would fail too.
 */

import assert from "node:assert/strict";
import { type HostPort } from "../../src/lib/address.ts";
import { Command, RequestFlag, RequestLayout, WIRE_ERROR_NAMES } from "../../src/protocol/mod.ts";
import { startArray, waitForMirror } from "../helpers/array.ts";
import { assertSameBytes } from "../helpers/bytes.ts";
import { randomBytes } from "../helpers/random_bytes.ts";
import { RawClient } from "../helpers/raw_client.ts";
import { scenario, startAttach, startExport, stopClean } from "../helpers/spawn.ts";
import { missing, toolOk } from "../helpers/tools.ts";

const KiB = 1024;
const MiB = 1024 * KiB;
const SIZE = MiB;

/** Each range reaches past the end of a device of `size` bytes: [what, offset, length]. */
function pastEnd(size: number): Array<[string, bigint, number]> {
  const end = BigInt(size);
  return [
    ["crossing the end by one byte", end - 1n, 2],
    ["crossing the end", end - 512n, 1024],
    ["the whole device and one byte more", 0n, size + 1],
    ["at the end", end, 512],
    ["after the end", end + 4096n, 512],
    ["at 2^40", 2n ** 40n, 512],
    ["crossing 2^53", 2n ** 53n - 512n, 1024],
    ["at 2^53", 2n ** 53n, 512],
    ["crossing 2^63", 2n ** 63n - 256n, 512],
    ["crossing 2^64, where a u64 sum wraps to 256", 2n ** 64n - 256n, 512],
    ["at 2^64 - 1, where a u64 sum wraps to 0", 2n ** 64n - 1n, 1],
  ];
}

/** An image of `size` random bytes at `path`; returns its bytes. */
async function randomImage(path: string, size: number): Promise<Uint8Array> {
  const bytes = randomBytes(size);
  await Deno.writeFile(path, bytes);
  return bytes;
}

/** `image` with `data` written at `offset`: what the file must hold afterwards. */
function withWrite(image: Uint8Array, offset: number, data: Uint8Array): Uint8Array {
  const expected = image.slice();
  expected.set(data, offset);
  return expected;
}

/** The file at `path` is `expected`, byte for byte, and not a byte longer. */
async function assertImage(path: string, expected: Uint8Array, what: string): Promise<void> {
  assert.equal((await Deno.stat(path)).size, expected.length, `${what}: its size`);
  assertSameBytes(await Deno.readFile(path), expected, what);
}

const DST_COMMANDS: Array<[string, number, number[]]> = [
  ["WRITE", Command.WRITE, [0, RequestFlag.FUA]],
  ["DISCARD", Command.DISCARD, [0, RequestFlag.FUA]],
  ["WRITE_ZEROES", Command.WRITE_ZEROES, [0, RequestFlag.FUA]],
];

/**
 * Sends every command of DST_COMMANDS for every range of `pastEnd(size)` as raw frames
 * (the offset written as a full u64, which a JavaScript number cannot hold), then one
 * in-range WRITE of `edge` ending exactly at the end, all on one connection. Returns
 * what each got and what the protocol documents, as lines to compare.
 */
async function dstPastEnd(
  address: HostPort,
  size: number,
  edge: Uint8Array,
): Promise<{ got: string[]; expected: string[] }> {
  const raw = await RawClient.connect(address);
  const got: string[] = [];
  const expected: string[] = [];
  try {
    assert.equal(raw.hello.sizeBytes, size);
    let txId = 1;
    const ask = async (
      command: number,
      flags: number,
      offset: bigint,
      length: number,
    ): Promise<string> => {
      const payload = command === Command.WRITE ? randomBytes(length) : undefined;
      const id = txId++;
      const frame = RawClient.frame({
        command,
        flags,
        txId: id,
        offset: 0,
        length,
        payloadLength: payload?.length ?? 0,
      }, payload);
      new DataView(frame.buffer).setBigUint64(RequestLayout.offset, offset, true);
      await raw.send(frame);
      const { header } = await raw.reply();
      assert.equal(header.txId, id, "the reply is to this request");
      return header.error === 0 ? "accepted" : WIRE_ERROR_NAMES[header.error] ?? `${header.error}`;
    };
    for (const [what, offset, length] of pastEnd(size)) {
      for (const [name, command, flagSets] of DST_COMMANDS) {
        for (const flags of flagSets) {
          const label = `${name}${flags & RequestFlag.FUA ? " FUA" : ""} ${what}`;
          got.push(`${label}: ${await ask(command, flags, offset, length)}`);
          // An offset of 2^53 or more is no offset a device can have: EINVAL, like a bad field.
          expected.push(`${label}: ${offset >= 2n ** 53n ? "EINVAL" : "ENOSPC"}`);
        }
      }
    }
    const frame = RawClient.frame({
      command: Command.WRITE,
      flags: RequestFlag.FUA,
      txId: txId,
      offset: size - edge.length,
      length: edge.length,
      payloadLength: edge.length,
    }, edge);
    await raw.send(frame);
    const { header } = await raw.reply();
    got.push(`WRITE ending at the end: ${WIRE_ERROR_NAMES[header.error]}`);
    expected.push("WRITE ending at the end: OK");
  } finally {
    raw.close();
  }
  return { got, expected };
}

/**
 * nbdsh code: with libnbd's own checks off, so every request reaches the server, tries
 * WRITE, TRIM and WRITE_ZEROES (with FUA, NO_HOLE and both) on every range, prints
 * one line per request with the errno it got, then writes EDGE_LENGTH bytes of
 * EDGE_BYTE at EDGE_OFFSET, inside the device.
 */
function nbdshPastEnd(size: number, edgeOffset: number, edgeLength: number, edgeByte: number) {
  const ranges = pastEnd(size).map(([what, offset, length]) =>
    `    (${JSON.stringify(what)}, ${offset}, ${length}),`
  ).join("\n");
  return `
import errno
h.set_strict_mode(0)
FUA, NO_HOLE = nbd.CMD_FLAG_FUA, nbd.CMD_FLAG_NO_HOLE
ranges = [
${ranges}
]
def send(name, flags, offset, length):
    if name == "WRITE":
        h.pwrite(b"\\xee" * length, offset, flags)
    elif name == "TRIM":
        h.trim(length, offset, flags)
    else:
        h.zero(length, offset, flags)
for what, offset, length in ranges:
    for name, flag_sets in (
        ("WRITE", (0, FUA)),
        ("TRIM", (0, FUA)),
        ("WRITE_ZEROES", (0, FUA, NO_HOLE, FUA | NO_HOLE)),
    ):
        for flags in flag_sets:
            label = name + (" FUA" if flags & FUA else "") + (" NO_HOLE" if flags & NO_HOLE else "")
            try:
                send(name, flags, offset, length)
                got = "accepted"
            except nbd.Error as e:
                got = errno.errorcode.get(e.errnum, str(e.errnum))
            print("%s %s: %s" % (label, what, got))
h.pwrite(bytes([${edgeByte}]) * ${edgeLength}, ${edgeOffset}, FUA)
print("WRITE inside the device: OK")
`;
}

/** What the NBD spec says each line of nbdshPastEnd gets. */
function nbdExpected(size: number): string[] {
  const lines: string[] = [];
  for (const [what] of pastEnd(size)) {
    for (
      const [name, labels] of [
        ["WRITE", ["WRITE", "WRITE FUA"]],
        ["TRIM", ["TRIM", "TRIM FUA"]],
        ["WRITE_ZEROES", [
          "WRITE_ZEROES",
          "WRITE_ZEROES FUA",
          "WRITE_ZEROES NO_HOLE",
          "WRITE_ZEROES FUA NO_HOLE",
        ]],
      ] as const
    ) {
      // The spec: ENOSPC for a write past the end, EINVAL for a read or trim.
      const errno = name === "TRIM" ? "EINVAL" : "ENOSPC";
      for (const label of labels) lines.push(`${label} ${what}: ${errno}`);
    }
  }
  lines.push("WRITE inside the device: OK");
  return lines;
}

/** Runs nbdshPastEnd against `uri` and returns its lines with the expected ones. */
async function nbdPastEnd(
  uri: string,
  size: number,
  edgeOffset: number,
  edgeLength: number,
  edgeByte: number,
): Promise<{ got: string[]; expected: string[] }> {
  const out = await toolOk("nbdsh", [
    "-u",
    uri,
    "-c",
    nbdshPastEnd(size, edgeOffset, edgeLength, edgeByte),
  ]);
  return { got: out.trimEnd().split("\n"), expected: nbdExpected(size) };
}

/** The replies, after the images: a wrong error must not hide a changed image. */
function assertReplies(results: Array<[string, { got: string[]; expected: string[] }]>): void {
  for (const [where, { got, expected }] of results) assert.deepEqual(got, expected, where);
}

Deno.test('Bad input "never writes outside the device": DST WRITE, DISCARD and WRITE_ZEROES past the end get ENOSPC (EINVAL from 2^53 on) and the image is unchanged', async () => {
  await scenario("dst-past-end-", async (dir, track) => {
    const image = `${dir}/disk.img`;
    const original = await randomImage(image, SIZE);
    const server = track(await startExport([image, "--listen", "127.0.0.1:0"]));
    const edge = randomBytes(512);
    const replies = await dstPastEnd(server.address, SIZE, edge);
    await stopClean(server, "dst export");
    await assertImage(image, withWrite(original, SIZE - edge.length, edge), "the image");
    assertReplies([["dst export", replies]]);
  });
});

Deno.test({
  name:
    'Bad input "never writes outside the device": NBD WRITE and WRITE_ZEROES past the end get ENOSPC, TRIM EINVAL, through export --nbd and attach, and the image is unchanged',
  ignore: missing("nbdsh"),
  fn: () =>
    scenario("dst-nbd-past-end-", async (dir, track) => {
      const image = `${dir}/disk.img`;
      const original = await randomImage(image, SIZE);
      const server = track(
        await startExport([image, "--listen", "127.0.0.1:0", "--nbd", "127.0.0.1:0"]),
      );
      const direct = await nbdPastEnd(server.nbdUri!, SIZE, SIZE - 512, 512, 0xa1);
      // nbdsh has disconnected, so the NBD port's write lease is free for the attach.
      const attach = track(await startAttach([`127.0.0.1:${server.address.port}`]));
      const attached = await nbdPastEnd(attach.uri, SIZE, SIZE - 1024, 512, 0xb2);
      await stopClean(attach, "dst attach");
      await stopClean(server, "dst export");
      const expected = withWrite(
        withWrite(original, SIZE - 512, new Uint8Array(512).fill(0xa1)),
        SIZE - 1024,
        new Uint8Array(512).fill(0xb2),
      );
      await assertImage(image, expected, "the image");
      assertReplies([["dst export --nbd", direct], ["dst attach", attached]]);
    }),
});

Deno.test({
  name:
    'Bad input "never writes outside the device": dst array linear and mirror of local images, past-end requests over DST and NBD leave every member unchanged',
  ignore: missing("nbdsh"),
  fn: () =>
    scenario("dst-array-past-end-", async (dir, track) => {
      // Linear: two halves of SIZE, so the array's end is the second member's end.
      const [a, b] = [`${dir}/a.img`, `${dir}/b.img`];
      const aBytes = await randomImage(a, SIZE / 2);
      const bBytes = await randomImage(b, SIZE / 2);
      const linear = track(
        await startArray(["linear", a, b, "--export", "127.0.0.1:0", "--nbd", "127.0.0.1:0"]),
      );
      const edge = randomBytes(512);
      // The raw DST client disconnects before nbdsh writes: the NBD port is another writer.
      const linearDst = await dstPastEnd(linear.address, SIZE, edge);
      const linearNbd = await nbdPastEnd(linear.nbdUri!, SIZE, SIZE - 1024, 512, 0xc3);
      await stopClean(linear, "dst array linear");
      await assertImage(a, aBytes, "the linear array's first member");
      const bExpected = withWrite(
        withWrite(bBytes, SIZE / 2 - 512, edge),
        SIZE / 2 - 1024,
        new Uint8Array(512).fill(0xc3),
      );
      await assertImage(b, bExpected, "the linear array's second member");
      assertReplies([["linear over DST", linearDst], ["linear over NBD", linearNbd]]);

      // Mirror: both legs hold the same bytes, so the new mirror's first copy changes none.
      const [m0, m1] = [`${dir}/m0.img`, `${dir}/m1.img`];
      const legBytes = await randomImage(m0, SIZE);
      await Deno.writeFile(m1, legBytes);
      const mirror = track(
        await startArray([
          "mirror",
          m0,
          m1,
          "--source",
          m0,
          "--state",
          `${dir}/state`,
          "--export",
          "127.0.0.1:0",
          "--nbd",
          "127.0.0.1:0",
        ]),
      );
      await waitForMirror(mirror.address);
      const mirrorDst = await dstPastEnd(mirror.address, SIZE, edge);
      const mirrorNbd = await nbdPastEnd(mirror.nbdUri!, SIZE, SIZE - 1024, 512, 0xd4);
      await stopClean(mirror, "dst array mirror");
      const legExpected = withWrite(
        withWrite(legBytes, SIZE - 512, edge),
        SIZE - 1024,
        new Uint8Array(512).fill(0xd4),
      );
      await assertImage(m0, legExpected, "the mirror's first leg");
      await assertImage(m1, legExpected, "the mirror's second leg");
      assertReplies([["mirror over DST", mirrorDst], ["mirror over NBD", mirrorNbd]]);
    }),
});
