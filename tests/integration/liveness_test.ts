/**
 * Liveness, not deadlines (protocol README, "Liveness"): a slow but live export is
 * never taken for a dead one. A FLUSH or FUA write whose device call outlasts the
 * client's timeout succeeds once, without a resend or a reconnect; a mirror leg
 * behind an 8 MiB/s link takes its first copy and a 48 MiB write stream and stays in
 * sync, with no failed request and no new connection to it; one 32 MiB frame that
 * needs 8 s to cross a 4 MiB/s link is not a dead link even with no retries. And a
 * link that really is cut is still found dead, and the write goes through once it
 * heals. Data is checked byte for byte throughout.
 */

import assert from "node:assert/strict";
import { RemoteDevice } from "../../src/client/remote_device.ts";
import type {
  BlockDevice,
  DeviceInfo,
  DeviceStats,
  IoFlags,
} from "../../src/device/block_device.ts";
import { MemoryDevice } from "../../src/device/memory_device.ts";
import type { HostPort } from "../../src/lib/address.ts";
import type { Logger } from "../../src/lib/log.ts";
import { Exporter, type ExportStatus } from "../../src/server/exporter.ts";
import {
  allInSync,
  leg,
  memberName,
  mirrorStatus,
  startNewMirror,
  waitForMirror,
} from "../helpers/array.ts";
import { assertSameBytes, settleAll } from "../helpers/bytes.ts";
import { FaultProxy } from "../helpers/fault_proxy.ts";
import { randomBytes } from "../helpers/random_bytes.ts";
import { runDst, type RunningDst, startExport, stopClean } from "../helpers/spawn.ts";
import { silentLogger as quiet } from "../../src/lib/log.ts";

const KiB = 1024;
const MiB = 1024 * KiB;
const LOCAL: HostPort = { hostname: "127.0.0.1", port: 0 };

const sleep = (ms: number) => new Promise<void>((resolve) => setTimeout(resolve, ms));

/** A logger that keeps warnings and errors, so a failed assertion can show what the client said. */
function recorder(): Logger & { lines: string[] } {
  const lines: string[] = [];
  return {
    lines,
    debug() {},
    info(message) {
      lines.push(`info: ${message}`);
    },
    warn(message) {
      lines.push(`warn: ${message}`);
    },
    error(message) {
      lines.push(`error: ${message}`);
    },
  };
}

/**
 * A MemoryDevice whose flush, and whose writes with FUA, take `delayMs` (a slow
 * fdatasync); it counts every flush and every write it was asked for.
 */
class SlowSyncDevice implements BlockDevice {
  readonly inner: MemoryDevice;
  flushes = 0;
  readonly writes: { offset: number; length: number; fua: boolean }[] = [];

  constructor(sizeBytes: number, readonly delayMs: number) {
    this.inner = new MemoryDevice(sizeBytes, { name: "slow-sync memory" });
  }

  get info(): DeviceInfo {
    return this.inner.info;
  }

  read(offset: number, into: Uint8Array): Promise<void> {
    return this.inner.read(offset, into);
  }

  async write(offset: number, data: Uint8Array, flags?: IoFlags): Promise<void> {
    const fua = flags?.fua === true;
    this.writes.push({ offset, length: data.length, fua });
    await this.inner.write(offset, data);
    if (fua) await sleep(this.delayMs);
  }

  async flush(): Promise<void> {
    this.flushes += 1;
    await sleep(this.delayMs);
    await this.inner.flush();
  }

  discard(offset: number, length: number): Promise<void> {
    return this.inner.discard(offset, length);
  }

  writeZeroes(offset: number, length: number): Promise<void> {
    return this.inner.writeZeroes(offset, length);
  }

  stats(): DeviceStats {
    return this.inner.stats();
  }

  close(): Promise<void> {
    return this.inner.close();
  }
}

/**
 * Runs `body` with `device` served in-process and a FaultProxy in front of it; the
 * client(s) `body` opens are its own to close. Everything is shut down afterwards.
 */
async function behindProxy(
  device: BlockDevice,
  body: (proxy: FaultProxy, exporter: Exporter) => Promise<void>,
): Promise<void> {
  const exporter = Exporter.start(device, { listen: LOCAL, log: quiet });
  const proxy = FaultProxy.start(exporter.address);
  try {
    await body(proxy, exporter);
  } finally {
    await proxy.close();
    await exporter.shutdown();
    await device.close();
  }
}

/** `promise`, or a rejection naming `what` if it has not settled after `ms`. */
async function within<T>(promise: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const late = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what}: still waiting after ${ms} ms`)), ms);
  });
  try {
    return await Promise.race([promise, late]);
  } finally {
    clearTimeout(timer);
  }
}

function noTransportTrouble(client: RemoteDevice, log: { lines: string[] }, what: string): void {
  const stats = client.transportStats();
  const said = `${what}: ${JSON.stringify(stats)}\nclient log:\n${log.lines.join("\n")}`;
  assert.equal(stats.reconnects, 0, `no reconnect (${said})`);
  assert.equal(stats.resends, 0, `no resend (${said})`);
  assert.equal(stats.connected, true, `still connected (${said})`);
}

Deno.test("a slow fdatasync is a slow reply, not a dead link: FLUSH succeeds once", async () => {
  const size = 4 * MiB;
  const device = new SlowSyncDevice(size, 1500);
  const exporter = Exporter.start(device, { listen: LOCAL, log: quiet });
  const log = recorder();
  const client = await RemoteDevice.connect(exporter.address, {
    timeoutMs: 1000,
    retries: 2,
    log,
  });
  try {
    const model = new Uint8Array(size);
    const data = randomBytes(MiB);
    model.set(data, 0);
    await client.write(0, data);

    let started = performance.now();
    await client.flush();
    const flushMs = performance.now() - started;
    assert.ok(
      flushMs >= 1400,
      `the flush took ${flushMs} ms: the device's 1.5 s was not waited for`,
    );
    assert.equal(device.flushes, 1, "the device saw exactly one flush");
    noTransportTrouble(client, log, "after the slow flush");

    // A FUA write whose device call takes 1.5 s as well.
    const fuaAt = 2 * MiB;
    const fuaData = randomBytes(256 * KiB);
    model.set(fuaData, fuaAt);
    started = performance.now();
    await client.write(fuaAt, fuaData, { fua: true });
    const fuaMs = performance.now() - started;
    assert.ok(fuaMs >= 1400, `the FUA write took ${fuaMs} ms`);
    const atFua = device.writes.filter((w) => w.offset === fuaAt);
    assert.deepEqual(
      atFua,
      [{ offset: fuaAt, length: fuaData.length, fua: true }],
      "the device saw the FUA write once",
    );
    assert.equal(device.writes.length, 2, "two writes in all: the first and the FUA one");
    assert.equal(device.flushes, 1, "no other flush");
    noTransportTrouble(client, log, "after the slow FUA write");

    const back = new Uint8Array(size);
    await client.read(0, back);
    assertSameBytes(back, model, "read back through the client");
    assertSameBytes(device.inner.bytes, model, "the device's bytes");
    assert.equal(client.stats().errors, 0);
  } finally {
    await client.close();
    await exporter.shutdown();
    await device.close();
  }
});

/** `dst status ADDR --json` of a plain export (through the real CLI). */
async function exportStatusCli(address: HostPort): Promise<ExportStatus> {
  const result = await runDst(["status", memberName(address), "--json"]);
  assert.equal(
    result.code,
    0,
    `dst status exited ${result.code}:\n${result.stdout}${result.stderr}`,
  );
  const rows = JSON.parse(result.stdout) as Array<{ status?: ExportStatus }>;
  const status = rows[0]?.status;
  assert.ok(status !== undefined, `no status in ${result.stdout}`);
  return status;
}

Deno.test("a leg behind an 8 MiB/s link stays in sync: no failed request, no reconnect", async () => {
  const dir = await Deno.makeTempDir({ prefix: "dst-liveness-mirror-" });
  const running: RunningDst[] = [];
  const track = <T extends RunningDst>(process: T): T => {
    running.push(process);
    return process;
  };
  let proxy: FaultProxy | null = null;
  try {
    const size = 64 * MiB;
    const written = 48 * MiB;
    const chunk = MiB;
    const a = track(
      await startExport([`${dir}/a.img`, "--create", String(size), "--listen", "127.0.0.1:0"]),
    );
    const b = track(
      await startExport([`${dir}/b.img`, "--create", String(size), "--listen", "127.0.0.1:0"]),
    );
    proxy = FaultProxy.start(b.address);
    proxy.throttle(8 * MiB);
    const nameA = memberName(a.address);
    const nameB = memberName(proxy.address);
    const array = track(
      await startNewMirror(
        [nameA, nameB],
        `${dir}/state`,
        "--timeout",
        "1000",
        "--retries",
        "2",
      ),
    );
    // The first copy: all 64 MiB go to B through the 8 MiB/s link (about 8 s).
    const synced = await waitForMirror(array.address, allInSync, 40_000);
    assert.equal(synced.resyncedBytes, size, "the first copy was a full one");
    const acceptedBefore = proxy.stats().accepted;
    const generationBefore = (await exportStatusCli(b.address)).writeGeneration;

    const client = await RemoteDevice.connect(array.address, { log: quiet });
    const model = new Uint8Array(size);
    const data = randomBytes(written);
    model.set(data, 0);
    let next = 0;
    const writer = async () => {
      while (next < written) {
        const at = next;
        next += chunk;
        await client.write(at, data.subarray(at, at + chunk));
      }
    };
    const started = performance.now();
    await settleAll(Array.from({ length: 8 }, writer));
    await client.flush();
    const writeMs = performance.now() - started;
    // 48 MiB through 8 MiB/s: the link really was the bottleneck.
    assert.ok(writeMs >= 4000, `48 MiB went to the mirror in ${writeMs} ms: B was not throttled`);
    const clientStats = client.transportStats();
    assert.equal(clientStats.reconnects, 0, JSON.stringify(clientStats));
    assert.equal(client.stats().errors, 0);

    const status = await mirrorStatus(array.address);
    const context = `status ${JSON.stringify(status)}\narray log:\n${array.log()}`;
    assert.equal(leg(status, nameB).state, "in-sync", `B stayed in sync; ${context}`);
    assert.equal(leg(status, nameA).state, "in-sync", `A stayed in sync; ${context}`);
    assert.equal(leg(status, nameB).errors, 0, `B never failed; ${context}`);
    assert.equal(leg(status, nameA).errors, 0, `A never failed; ${context}`);
    assert.equal(status.resyncedBytes, size, `nothing was copied again; ${context}`);
    assert.equal(
      proxy.stats().accepted,
      acceptedBefore,
      `no new connection reached B through the link; ${context}`,
    );
    assert.equal(
      (await exportStatusCli(b.address)).writeGeneration,
      generationBefore,
      `no new writer connection at B (its write generation did not move); ${context}`,
    );
    assert.doesNotMatch(array.log(), /\blost \S+:|reconnect|out of sync/, context);
    await client.close();

    await stopClean(array, "the array");
    await stopClean(a, "export A");
    await stopClean(b, "export B");
    assertSameBytes(await Deno.readFile(`${dir}/a.img`), model, "leg A's image");
    assertSameBytes(await Deno.readFile(`${dir}/b.img`), model, "leg B's image");
  } finally {
    await Promise.all(running.map((process) => process.stop("SIGKILL")));
    await proxy?.close();
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test({
  name: "a 32 MiB write through a 4 MiB/s link is not taken for a dead link",
  fn: async () => {
    const device = new MemoryDevice(48 * MiB);
    await behindProxy(device, async (proxy) => {
      proxy.throttle(4 * MiB);
      const log = recorder();
      // No retries: a single dead-link verdict would fail the write.
      const client = await RemoteDevice.connect(proxy.address, {
        timeoutMs: 1000,
        retries: 0,
        log,
      });
      try {
        const at = 8 * MiB;
        const data = randomBytes(32 * MiB);
        const started = performance.now();
        await client.write(at, data);
        const writeMs = performance.now() - started;
        assert.ok(writeMs >= 5000, `32 MiB crossed in ${writeMs} ms: the link was not throttled`);
        assert.equal(device.stats().writes, 1, "it went as one frame, once");
        noTransportTrouble(client, log, "after the 32 MiB write");
        assertSameBytes(device.bytes.subarray(at, at + data.length), data, "the device's bytes");

        proxy.throttle(null);
        const back = new Uint8Array(data.length);
        await client.read(at, back);
        assertSameBytes(back, data, "read back through the client");
        noTransportTrouble(client, log, "after the read");
        assert.equal(proxy.stats().accepted, 1, "one connection in all");
      } finally {
        await client.close();
      }
    });
  },
});

Deno.test("a cut link is still found dead", async () => {
  const size = 4 * MiB;
  const device = new MemoryDevice(size);
  await behindProxy(device, async (proxy) => {
    const log = recorder();
    const client = await RemoteDevice.connect(proxy.address, { timeoutMs: 500, retries: 5, log });
    let stuck = true;
    try {
      const model = new Uint8Array(size);
      const first = randomBytes(64 * KiB);
      model.set(first, 0);
      await client.write(0, first);

      proxy.cut();
      const at = MiB;
      const data = randomBytes(256 * KiB);
      model.set(data, at);
      const started = performance.now();
      const healed = sleep(1500).then(() => proxy.heal());
      const writing = client.write(at, data);
      writing.catch(() => {}); // awaited below; a timeout must not leave it unhandled
      await within(writing, 10_000, "the write across the cut");
      const writeMs = performance.now() - started;
      await healed;
      stuck = false;
      assert.ok(writeMs >= 1400, `the write succeeded after ${writeMs} ms, before the heal`);
      const stats = client.transportStats();
      const said = `${JSON.stringify(stats)}\nclient log:\n${log.lines.join("\n")}`;
      assert.ok(stats.reconnects >= 1, `the client found the link dead and reconnected: ${said}`);
      assert.ok(stats.resends >= 1, `the write was sent again on the new link: ${said}`);
      assert.ok(stats.connected, said);
      assert.ok(
        log.lines.some((line) => /^warn: lost /.test(line)),
        `the client said it lost the link: ${said}`,
      );
      assert.ok(proxy.stats().accepted >= 2, "a new connection was made");

      const back = new Uint8Array(size);
      await client.read(0, back);
      assertSameBytes(back, model, "read back through the client");
      assertSameBytes(device.bytes, model, "the device's bytes");
    } finally {
      // A client that never found the link dead waits on it for ever: closing the
      // proxy ends that link, so close() returns once its retries are spent.
      if (stuck) await proxy.close();
      await client.close();
    }
  });
});
