/**
 * `dst array` with real processes on loopback: a linear array puts each byte in the
 * right member at the right offset; a mirror's legs end up equal to what was written
 * (through a random workload, a leg killed and restarted, the array itself killed
 * with writes in flight, a detach and an attach); and arrays stack into a tree that
 * nbdcopy can fill over NBD.
 */

import assert from "node:assert/strict";
import { RemoteDevice } from "../../src/client/remote_device.ts";
import {
  allInSync,
  allInSyncAndClean,
  leg,
  memberName,
  mirrorStatus,
  mirrorStatusCli,
  startArray,
  startNewMirror,
  waitForMirror,
} from "../helpers/array.ts";
import { assertSameBytes, concat, settleAll } from "../helpers/bytes.ts";
import { randomBytes } from "../helpers/random_bytes.ts";
import { runDst, type RunningExport, scenario, startExport, stopClean } from "../helpers/spawn.ts";
import { missing, toolOk } from "../helpers/tools.ts";
import { silentLogger as quiet } from "../../src/lib/log.ts";

const MiB = 1024 * 1024;
/** On every array: a dead leg is noticed within about a second. */
const FAST_FAIL = ["--timeout", "300", "--retries", "1"];

/** A small seeded PRNG (mulberry32), so a failing workload can be told apart by its seed. */
function prng(seed: number): (n: number) => number {
  let a = seed >>> 0;
  return (n: number) => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return Math.floor((((t ^ (t >>> 14)) >>> 0) / 4294967296) * n);
  };
}

/** `dst export PATH --create SIZE` on a free port (or `port`, to come back on the same one). */
function exportImage(path: string, size?: number, port = 0): Promise<RunningExport> {
  return startExport([
    path,
    ...(size === undefined ? [] : ["--create", String(size)]),
    "--listen",
    `127.0.0.1:${port}`,
  ]);
}

function connect(address: RunningExport["address"], timeoutMs = 5000, retries = 3) {
  return RemoteDevice.connect(address, { timeoutMs, retries, log: quiet });
}

/** The last "leg NAME is in sync: copied N regions" in an array's log, or null. */
function lastCopiedRegions(log: string, name: string): number | null {
  const escaped = name.replace(/[.]/g, "\\.");
  const all = [
    ...log.matchAll(new RegExp(`leg ${escaped} is in sync: copied (\\d+) regions?,`, "g")),
  ];
  const last = all.at(-1);
  return last === undefined ? null : Number(last[1]);
}

/**
 * Random writes of random sizes at random offsets in [lo, hi), `parallel` at a time,
 * each applied to `model` when issued (overlapping writes are ordered as issued,
 * by the client and by the array); a flush after every few rounds, and a read checked
 * against the model now and then.
 */
async function randomWorkload(
  device: RemoteDevice,
  model: Uint8Array,
  options: { lo: number; hi: number; rounds: number; parallel: number; seed: number },
): Promise<void> {
  const random = prng(options.seed);
  const span = options.hi - options.lo;
  for (let round = 0; round < options.rounds; round++) {
    const pending: Promise<void>[] = [];
    for (let i = 0; i < options.parallel; i++) {
      const kind = random(10);
      const wanted = kind < 3 ? 1 + random(4096) : kind < 8 ? 4096 * (1 + random(16)) : 1 +
        random(256 * 1024);
      const length = Math.min(wanted, span);
      // A third of the writes go to a hot 256 KiB, so writes overlap.
      const hot = random(3) === 0;
      const room = (hot ? Math.min(256 * 1024, span) : span) - length;
      const offset = options.lo + (room <= 0 ? 0 : random(room + 1));
      const data = randomBytes(length);
      model.set(data, offset);
      pending.push(device.write(offset, data));
    }
    await settleAll(pending);
    if (round % 5 === 4) await device.flush();
    if (round % 7 === 6) {
      const at = options.lo + random(span - 65536);
      const back = new Uint8Array(65536);
      await device.read(at, back);
      assertSameBytes(
        back,
        model.subarray(at, at + 65536),
        `read at ${at} in round ${round} (seed ${options.seed})`,
      );
    }
  }
  await device.flush();
}

Deno.test("linear: each byte lands in the right member at the right offset; the size is the sum", async () => {
  await scenario("dst-array-linear-", async (dir, track) => {
    const sizeA = 8 * MiB;
    const sizeB = 12 * MiB;
    const size = sizeA + sizeB;
    const a = track(await exportImage(`${dir}/a.img`, sizeA));
    const b = track(await exportImage(`${dir}/b.img`, sizeB));
    const array = track(
      await startArray([
        "linear",
        memberName(a.address),
        memberName(b.address),
        "--export",
        "127.0.0.1:0",
        ...FAST_FAIL,
      ]),
    );
    assert.match(array.line, /serving linear array of 2 members .*20\.0 MiB, 20971520 bytes/);

    const cli = await runDst(["status", memberName(array.address), "--json"]);
    assert.equal(cli.code, 0, cli.stderr);
    const [row] = JSON.parse(cli.stdout);
    assert.equal(row.status.sizeBytes, size);
    assert.equal(row.status.array.kind, "linear");
    assert.deepEqual(
      row.status.array.members.map((m: { startBytes: number; sizeBytes: number }) => [
        m.startBytes,
        m.sizeBytes,
      ]),
      [[0, sizeA], [sizeA, sizeB]],
    );

    const client = await connect(array.address);
    assert.equal(client.info.sizeBytes, size);
    const model = new Uint8Array(size);
    const write = async (offset: number, length: number) => {
      const data = randomBytes(length);
      model.set(data, offset);
      await client.write(offset, data);
    };
    await write(0, 64 * 1024); // the very start
    await write(2 * MiB + 123, 5 * MiB); // within A, unaligned, more than one transaction
    await write(sizeA - 300_000, MiB); // across the boundary, unaligned
    await write(sizeA - 1, 3); // one byte in A, two in B
    await write(sizeA, 4096); // B's first block
    await write(size - 200 * 1024, 200 * 1024); // the very end
    const random = prng(0x11ea5);
    for (let i = 0; i < 40; i++) {
      const length = 1 + random(128 * 1024);
      await write(random(size - length + 1), length);
    }
    await client.flush();
    const back = new Uint8Array(size);
    await client.read(0, back);
    assertSameBytes(back, model, "read back through the array");
    await client.close();

    await stopClean(array, "the array");
    await stopClean(a, "export A");
    await stopClean(b, "export B");
    const fileA = await Deno.readFile(`${dir}/a.img`);
    const fileB = await Deno.readFile(`${dir}/b.img`);
    assert.equal(fileA.length, sizeA);
    assert.equal(fileB.length, sizeB);
    assertSameBytes(fileA, model.subarray(0, sizeA), "member A's image = array [0, 8M)");
    assertSameBytes(fileB, model.subarray(sizeA), "member B's image = array [8M, 20M) at -8M");
  });
});

Deno.test("mirror: a random workload during and after the first copy leaves both legs equal to it", async () => {
  await scenario("dst-array-mirror-", async (dir, track) => {
    const size = 16 * MiB;
    // A has data of its own: the first copy must bring it to B.
    const model = randomBytes(size);
    await Deno.writeFile(`${dir}/a.img`, model);
    const a = track(await exportImage(`${dir}/a.img`));
    const b = track(await exportImage(`${dir}/b.img`, size));
    const nameA = memberName(a.address);
    const nameB = memberName(b.address);
    const array = track(
      await startNewMirror([nameA, nameB], `${dir}/state`, ...FAST_FAIL),
    );
    assert.match(array.line, /serving mirror of 2 legs /);

    const client = await connect(array.address);
    assert.equal(client.info.sizeBytes, size);
    const seed = Date.now() & 0xffffff;
    // Starts at once, while B gets its first full copy.
    await randomWorkload(client, model, { lo: 0, hi: size, rounds: 60, parallel: 8, seed });
    const status = await waitForMirror(array.address, allInSync, 20_000);
    assert.equal(status.sizeBytes, size);
    assert.equal(leg(status, nameB).errors, 0, "B never failed");
    assert.equal(leg(status, nameA).errors, 0, "A never failed");
    const back = new Uint8Array(size);
    await client.read(0, back);
    assertSameBytes(back, model, `read back (seed ${seed})`);
    await client.close();

    await stopClean(array, "the array");
    await stopClean(a, "export A");
    await stopClean(b, "export B");
    assertSameBytes(await Deno.readFile(`${dir}/a.img`), model, `leg A's image (seed ${seed})`);
    assertSameBytes(await Deno.readFile(`${dir}/b.img`), model, `leg B's image (seed ${seed})`);
  });
});

Deno.test("mirror: a leg killed mid-workload goes out of sync, writes go on, and only what it missed is copied back", async () => {
  await scenario("dst-array-legkill-", async (dir, track) => {
    const size = 32 * MiB;
    const area = 2 * MiB; // every write after the first sync lands here
    const a = track(await exportImage(`${dir}/a.img`, size));
    let b = track(await exportImage(`${dir}/b.img`, size));
    const portB = b.address.port;
    const nameA = memberName(a.address);
    const nameB = memberName(b.address);
    const array = track(
      await startNewMirror([nameA, nameB], `${dir}/state`, ...FAST_FAIL),
    );
    const synced = await waitForMirror(array.address);
    assert.equal(synced.resyncedBytes, size, "the first copy was a full one");
    assert.equal(lastCopiedRegions(array.log(), nameB), size / synced.regionBytes);

    const client = await connect(array.address);
    const model = new Uint8Array(size);
    const random = prng(0xb1ade);
    let stopWriting = false;
    let writeError: unknown = null;
    let acked = 0;
    const writer = async () => {
      while (!stopWriting) {
        const length = 1 + random(128 * 1024);
        const offset = random(area - length + 1);
        const data = randomBytes(length);
        model.set(data, offset);
        try {
          await client.write(offset, data); // must never fail: the array runs degraded
        } catch (error) {
          writeError ??= error;
          stopWriting = true;
          return;
        }
        acked += 1;
      }
    };
    const writers = Array.from({ length: 4 }, writer);
    const waitUntil = async (what: string, condition: () => boolean) => {
      const until = performance.now() + 15_000;
      while (!condition()) {
        if (writeError !== null) throw writeError;
        if (performance.now() > until) throw new Error(`timed out waiting for ${what}`);
        await new Promise((resolve) => setTimeout(resolve, 20));
      }
    };
    try {
      await waitUntil("50 writes", () => acked >= 50);
      await b.stop("SIGKILL");
      const killedAt = acked;
      const degraded = await waitForMirror(
        array.address,
        (s) => leg(s, nameB).state === "out-of-sync",
        10_000,
      );
      assert.equal(leg(degraded, nameA).state, "in-sync");
      // Keep writing degraded for a while.
      await waitUntil("100 degraded writes", () => acked >= killedAt + 100);
      assert.ok(array.log().includes(`leg ${nameB} is out of sync`), array.log());

      b = track(await exportImage(`${dir}/b.img`, undefined, portB));
      await waitForMirror(
        array.address,
        (s) => leg(s, nameB).state !== "out-of-sync",
        15_000,
      );
      // Writes go on during the resync too, then stop.
      const resyncAt = acked;
      await waitUntil("50 writes while resyncing", () => acked >= resyncAt + 50);
    } finally {
      stopWriting = true;
      await Promise.all(writers);
    }
    if (writeError !== null) throw writeError;
    await client.flush();
    const final = await waitForMirror(array.address);
    const copied = final.resyncedBytes - synced.resyncedBytes;
    assert.ok(copied > 0, "something was copied back to B");
    assert.ok(
      copied <= area,
      `the resync copied ${copied} bytes; B missed writes to the first ${area} bytes only`,
    );
    const regions = lastCopiedRegions(array.log(), nameB);
    assert.ok(
      regions !== null && regions >= 1 && regions * final.regionBytes <= area,
      `the log says B's resync copied ${regions} regions:\n${array.log()}`,
    );
    const cli = await mirrorStatusCli(array.address);
    assert.deepEqual(cli.members.map((m) => [m.name, m.state]), [[nameA, "in-sync"], [
      nameB,
      "in-sync",
    ]]);
    const back = new Uint8Array(size);
    await client.read(0, back);
    assertSameBytes(back, model, "read back through the array");
    await client.close();

    await stopClean(array, "the array");
    await stopClean(a, "export A");
    await stopClean(b, "export B");
    assertSameBytes(await Deno.readFile(`${dir}/a.img`), model, "leg A's image");
    assertSameBytes(await Deno.readFile(`${dir}/b.img`), model, "leg B's image");
  });
});

Deno.test("mirror: kill -9 of the array with writes in flight; reopened from --state, the legs agree and keep every acknowledged write", async () => {
  await scenario("dst-array-crash-", async (dir, track) => {
    const size = 16 * MiB;
    const area = 4 * MiB; // the writes go to the first four regions only
    const chunk = 16 * 1024;
    const a = track(await exportImage(`${dir}/a.img`, size));
    const b = track(await exportImage(`${dir}/b.img`, size));
    const nameA = memberName(a.address);
    const nameB = memberName(b.address);
    const state = `${dir}/state`;
    const mirrorArgs = ["mirror", nameA, nameB, "--state", state, "--export", "127.0.0.1:0"];
    const first = track(await startArray([...mirrorArgs, "--source", nameA, ...FAST_FAIL]));
    await waitForMirror(first.address);

    // Disjoint 16 KiB chunks of the first 4 MiB in a shuffled order, 16 in flight.
    const random = prng(0xc4a54);
    const slots = Array.from({ length: area / chunk }, (_, i) => i);
    for (let i = slots.length - 1; i > 0; i--) {
      const j = random(i + 1);
      [slots[i], slots[j]] = [slots[j]!, slots[i]!];
    }
    const data = new Map<number, Uint8Array>();
    const acked = new Set<number>();
    const failed = new Set<number>();
    const client = await connect(first.address, 300, 1);
    let next = 0;
    let killed = false;
    let inFlightAtKill = 0;
    let issued = 0;
    const writer = async () => {
      while (!killed && next < slots.length) {
        const slot = slots[next++]!;
        const bytes = randomBytes(chunk);
        data.set(slot, bytes);
        issued += 1;
        try {
          await client.write(slot * chunk, bytes);
          acked.add(slot);
        } catch {
          failed.add(slot);
          continue;
        }
        if (!killed && acked.size === 60) {
          killed = true;
          first.process.kill("SIGKILL");
          inFlightAtKill = issued - acked.size - failed.size;
        }
      }
    };
    await settleAll(Array.from({ length: 16 }, writer));
    await client.close();
    await first.stop("SIGKILL");
    assert.ok(killed, "the array was killed mid-workload");
    assert.ok(inFlightAtKill > 0, "writes were in flight at the kill");
    assert.equal(acked.size + failed.size, data.size, "every write settled");

    const second = track(await startArray([...mirrorArgs, ...FAST_FAIL]));
    assert.match(second.line, new RegExp(`state ${state}\\)`));
    const reopened = await waitForMirror(second.address);
    await stopClean(second, "the reopened array");
    // Where the crash left writes in flight, B was brought level from A: only there.
    const regions = lastCopiedRegions(second.log(), nameB);
    assert.ok(
      regions !== null && regions >= 1 && regions * reopened.regionBytes <= area,
      `the reopened array copied ${regions} regions to B:\n${second.log()}`,
    );
    await stopClean(a, "export A");
    await stopClean(b, "export B");

    const imageA = await Deno.readFile(`${dir}/a.img`);
    const imageB = await Deno.readFile(`${dir}/b.img`);
    assertSameBytes(imageB, imageA, "leg B's image against leg A's");
    const zeroes = new Uint8Array(chunk);
    for (let slot = 0; slot < size / chunk; slot++) {
      const have = imageA.subarray(slot * chunk, (slot + 1) * chunk);
      const wrote = data.get(slot);
      if (acked.has(slot)) {
        assertSameBytes(have, wrote!, `acknowledged chunk ${slot}`);
      } else if (wrote === undefined) {
        assertSameBytes(have, zeroes, `never-written chunk ${slot}`);
      } else {
        // In flight at the kill: the whole write or none of it (one transaction each).
        const whole = have.every((byte, i) => byte === wrote[i]);
        const none = have.every((byte) => byte === 0);
        assert.ok(whole || none, `chunk ${slot}, in flight at the kill, is half written`);
      }
    }
  });
});

Deno.test("mirror: a detached leg keeps the data as of the detach; attached again, only what it missed is copied", async () => {
  await scenario("dst-array-detach-", async (dir, track) => {
    const size = 16 * MiB;
    const model = randomBytes(size);
    await Deno.writeFile(`${dir}/a.img`, model);
    const a = track(await exportImage(`${dir}/a.img`));
    const b = track(await exportImage(`${dir}/b.img`, size));
    const nameA = memberName(a.address);
    const nameB = memberName(b.address);
    const array = track(
      await startNewMirror([nameA, nameB], `${dir}/state`, ...FAST_FAIL),
    );
    const arrayName = memberName(array.address);
    const client = await connect(array.address);
    await randomWorkload(client, model, { lo: 0, hi: size, rounds: 10, parallel: 4, seed: 5 });
    // In sync, and the marks of the last writes cleared (lazily, once their regions are idle).
    const synced = await waitForMirror(
      array.address,
      allInSyncAndClean,
    );
    assertSameBytes(await Deno.readFile(`${dir}/b.img`), model, "B after the first sync");

    const detach = await runDst(["array", "detach", arrayName, nameB]);
    assert.equal(detach.code, 0, detach.stderr);
    assert.match(detach.stdout, /^dst array detach: .*detached/);
    const detached = await mirrorStatus(array.address);
    assert.equal(leg(detached, nameB).state, "detached");
    const again = await runDst(["array", "detach", arrayName, nameB]);
    assert.equal(again.code, 1, "a second detach is refused");
    assert.match(again.stderr, /detached already/);

    const snapshot = model.slice();
    // New data in [3M, 6M) only: regions 3, 4 and 5.
    await randomWorkload(client, model, {
      lo: 3 * MiB,
      hi: 6 * MiB,
      rounds: 10,
      parallel: 4,
      seed: 6,
    });
    await client.flush();
    assertSameBytes(await Deno.readFile(`${dir}/b.img`), snapshot, "B while detached");
    assertSameBytes(await Deno.readFile(`${dir}/a.img`), model, "A while B is detached");
    const missed = leg(await mirrorStatus(array.address), nameB).dirtyRegions;
    assert.ok(missed >= 1 && missed <= 3, `B missed ${missed} regions`);

    const attach = await runDst(["array", "attach", arrayName, nameB]);
    assert.equal(attach.code, 0, attach.stderr);
    const said = attach.stdout.match(
      /^dst array attach: .*attached; resyncing (\d+) of (\d+) regions/,
    );
    assert.ok(said !== null, attach.stdout);
    assert.equal(Number(said[2]), size / synced.regionBytes);
    assert.ok(Number(said[1]) >= 1 && Number(said[1]) <= 3, attach.stdout);
    const final = await waitForMirror(array.address);
    const copied = final.resyncedBytes - synced.resyncedBytes;
    assert.ok(
      copied > 0 && copied <= 3 * final.regionBytes,
      `the attach copied ${copied} bytes; B missed only [3M, 6M)`,
    );
    const back = new Uint8Array(size);
    await client.read(0, back);
    assertSameBytes(back, model, "read back through the array");
    await client.close();

    await stopClean(array, "the array");
    await stopClean(a, "export A");
    await stopClean(b, "export B");
    assertSameBytes(await Deno.readFile(`${dir}/a.img`), model, "A after the attach");
    assertSameBytes(await Deno.readFile(`${dir}/b.img`), model, "B after the attach");
  });
});

Deno.test({
  name: "a tree: a mirror of (a linear array) and an export, filled by nbdcopy over NBD",
  ignore: missing("nbdcopy"),
  fn: () =>
    scenario("dst-array-tree-", async (dir, track) => {
      const half = 8 * MiB;
      const size = 2 * half;
      const x = track(await exportImage(`${dir}/x.img`, half));
      const y = track(await exportImage(`${dir}/y.img`, half));
      const z = track(await exportImage(`${dir}/z.img`, size));
      const linear = track(
        await startArray([
          "linear",
          memberName(x.address),
          memberName(y.address),
          "--export",
          "127.0.0.1:0",
          ...FAST_FAIL,
        ]),
      );
      const nameL = memberName(linear.address);
      const nameZ = memberName(z.address);
      const mirror = track(
        await startNewMirror([nameL, nameZ], `${dir}/state`, "--nbd", "127.0.0.1:0", ...FAST_FAIL),
      );
      assert.ok(mirror.nbdUri !== null, mirror.line);
      assert.match(mirror.nbdUri, /^nbd:\/\/127\.0\.0\.1:\d+/);

      const source = randomBytes(size);
      await Deno.writeFile(`${dir}/source.bin`, source);
      await toolOk("nbdcopy", [`${dir}/source.bin`, mirror.nbdUri]);
      const status = await waitForMirror(mirror.address, allInSync, 20_000);
      assert.equal(status.sizeBytes, size);
      await toolOk("nbdcopy", [mirror.nbdUri, `${dir}/back.bin`]);
      assertSameBytes(await Deno.readFile(`${dir}/back.bin`), source, "copied back out over NBD");

      await stopClean(mirror, "the mirror");
      await stopClean(linear, "the linear array");
      for (const [process, what] of [[x, "X"], [y, "Y"], [z, "Z"]] as const) {
        await stopClean(process, `export ${what}`);
      }
      const xy = concat(await Deno.readFile(`${dir}/x.img`), await Deno.readFile(`${dir}/y.img`));
      assertSameBytes(xy, source, "X then Y");
      assertSameBytes(await Deno.readFile(`${dir}/z.img`), source, "Z");
    }),
});
