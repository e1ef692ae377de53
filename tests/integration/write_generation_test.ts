/**
 * Write generations and mirror state, with the real CLI: an export raises its write
 * generation, durably, when a connection starts writing; a mirror leg that someone
 * else wrote to while it was detached (over DST or over the export's NBD) gets a
 * full copy; a mirror state folder that
 * is missing or is for other legs is refused with what to do.
 */

import assert from "node:assert/strict";
import { RemoteDevice } from "../../src/client/remote_device.ts";
import { randomBytes } from "../helpers/random_bytes.ts";
import { memberName, startNewMirror, waitForMirror } from "../helpers/array.ts";
import { exportImage, runDst, type RunningExport, startExport } from "../helpers/spawn.ts";
import { missing, toolOk } from "../helpers/tools.ts";
import { RawClient } from "../helpers/raw_client.ts";
import { Command, type RequestHeader } from "../../src/protocol/mod.ts";
import { silentLogger as quiet } from "../../src/lib/log.ts";

const MiB = 1024 * 1024;

async function generationOf(address: { hostname: string; port: number }): Promise<number> {
  const device = await RemoteDevice.connect(address, { log: quiet, writer: false });
  try {
    return ((await device.queryStatus()) as { writeGeneration: number }).writeGeneration;
  } finally {
    await device.close();
  }
}

Deno.test("an export's write generation goes up once per writing connection and survives a restart", async () => {
  const dir = await Deno.makeTempDir({ prefix: "dst-generation-" });
  const image = `${dir}/disk.img`;
  let server = await startExport([image, "--create", "4M", "--listen", "127.0.0.1:0"]);
  try {
    assert.equal(await generationOf(server.address), 0, "reading and status start nothing");
    const reader = await RemoteDevice.connect(server.address, { log: quiet, writer: false });
    await reader.read(0, new Uint8Array(4096));
    await assert.rejects(reader.write(0, new Uint8Array(4096)), /read-only/);
    await reader.close();
    assert.equal(await generationOf(server.address), 0);

    const writer = await RemoteDevice.connect(server.address, { log: quiet });
    assert.equal(writer.writeGeneration, 1, "a writer gets its generation in the hello");
    await writer.write(0, new Uint8Array(4096).fill(1));
    await writer.write(4096, new Uint8Array(4096).fill(2));
    await writer.close();
    assert.equal(await generationOf(server.address), 1, "one writing connection, one generation");

    // A client that writes without declaring it gets its grant, and generation, on its first write.
    const raw = await RawClient.connect(server.address);
    await raw.send(RawClient.frame(writeHeader(0, 4096), new Uint8Array(4096).fill(3)));
    assert.equal((await raw.reply()).header.error, 0);
    raw.close();
    assert.equal(await generationOf(server.address), 2);

    await server.stop();
    server = await startExport([image, "--listen", "127.0.0.1:0"]);
    assert.equal(await generationOf(server.address), 2, "kept in the export's state");
  } finally {
    await server.stop("SIGKILL");
    await Deno.remove(dir, { recursive: true });
  }
});

function writeHeader(offset: number, length: number): RequestHeader {
  return { command: Command.WRITE, flags: 0, txId: 1, offset, length, payloadLength: length };
}

/** Writes 4 KiB of 0xee at 5 MiB into an export from outside any mirror. */
type Intruder = (b: RunningExport) => Promise<void>;

const INTRUDERS: Array<[string, Intruder]> = [
  ["a DST client", async (b) => {
    const intruder = await RemoteDevice.connect(b.address, { log: quiet });
    await intruder.write(5 * MiB, new Uint8Array(4096).fill(0xee));
    await intruder.close();
  }],
  ["an NBD client of the leg's export --nbd", async (b) => {
    await toolOk("nbdsh", ["-u", b.nbdUri!, "-c", `h.pwrite(b"\\xee" * 4096, ${5 * MiB})`]);
  }],
];

for (const [who, intrude] of INTRUDERS) {
  Deno.test({
    name: `a mirror leg written by ${who} while detached gets a full copy`,
    ignore: who.includes("NBD") && missing("nbdsh"),
    fn: () => someoneElseWrites(intrude),
  });
}

async function someoneElseWrites(intrude: Intruder): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "dst-generation-" });
  const a = await startExport([`${dir}/a.img`, "--create", "8M", "--listen", "127.0.0.1:0"]);
  const b = await startExport(
    [`${dir}/b.img`, "--create", "8M", "--listen", "127.0.0.1:0", "--nbd", "127.0.0.1:0"],
  );
  const legA = `127.0.0.1:${a.address.port}`;
  const legB = `127.0.0.1:${b.address.port}`;
  const mirror = await startNewMirror([legA, legB], `${dir}/state`);
  const arrayAddress = memberName(mirror.address);
  try {
    const data = randomBytes(8 * MiB);
    const client = await RemoteDevice.connect(mirror.address, { log: quiet });
    await client.write(0, data);
    await client.flush();
    await waitForMirror(mirror.address);
    assert.equal((await runDst(["array", "detach", arrayAddress, legB])).code, 0);

    await intrude(b); // someone else writes to B while it is out

    const attached = await runDst(["array", "attach", arrayAddress, legB]);
    assert.equal(attached.code, 0, attached.stderr);
    assert.match(attached.stdout, /resyncing 8 of 8 regions/, "every region is copied");
    await waitForMirror(mirror.address);
    await client.close();
    assert.match(mirror.log(), /written by someone else/);
    const imageB = await Deno.readFile(`${dir}/b.img`);
    assert.ok(imageB.every((byte, i) => byte === data[i]), "B was made level with A again");
  } finally {
    await mirror.stop("SIGKILL");
    await Promise.all([a.stop("SIGKILL"), b.stop("SIGKILL")]);
    await Deno.remove(dir, { recursive: true });
  }
}

Deno.test("a mirror with state for other legs is refused with what to do", async () => {
  const dir = await Deno.makeTempDir({ prefix: "dst-generation-" });
  const a = await exportImage(dir, "a.img", "4M");
  const b = await exportImage(dir, "b.img", "4M");
  const c = await startExport([`${dir}/c.img`, "--create", "4M", "--listen", "127.0.0.1:0"]);
  const [legA, legB, legC] = [a, b, c].map((s) => `127.0.0.1:${s.address.port}`);
  const state = `${dir}/state`;
  try {
    const made = await startNewMirror([legA!, legB!], state);
    await made.stop();

    const other = await runDst(
      ["array", "mirror", legA!, legC!, "--state", state, "--export", "127.0.0.1:0"],
    );
    assert.equal(other.code, 1);
    assert.match(other.stderr, /is for legs .* --source MEMBER/);
  } finally {
    await Promise.all([a.stop("SIGKILL"), b.stop("SIGKILL"), c.stop("SIGKILL")]);
    await Deno.remove(dir, { recursive: true });
  }
});
