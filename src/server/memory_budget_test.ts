/**
 * The export's memory budget for payloads (--memory), shared by its clients: eight
 * clients with a 32 MiB READ each (the kind of load that once took the export from 119
 * to 328 MiB) never hold more than the budget plus one request, and every read returns
 * the right bytes. The same load with a budget too large to matter holds them all at
 * once: the bound is the budget's doing. While the budget is spent, a waiting client's
 * pings and status queries are still answered.
 */

import assert from "node:assert/strict";
import { RemoteDevice } from "../client/remote_device.ts";
import { MemoryDevice } from "../device/memory_device.ts";
import { silentLogger as quiet } from "../lib/log.ts";
import { PAYLOAD_BYTES_MAX } from "../constants.ts";
import { Exporter } from "./exporter.ts";

const MiB = 1024 * 1024;
const READ_BYTES = 32 * MiB;

/** A device whose large reads wait until `release()`. */
class HeldReads extends MemoryDevice {
  #gate = Promise.withResolvers<void>();
  override async read(offset: number, into: Uint8Array): Promise<void> {
    if (into.length > MiB) await this.#gate.promise;
    return super.read(offset, into);
  }
  release(): void {
    this.#gate.resolve();
  }
}

/** Waits until `value()` is above 0 and has not changed for 200 ms. */
async function settled(value: () => number): Promise<void> {
  let last = -1;
  let sinceMs = performance.now();
  for (;;) {
    const now = value();
    if (now !== last) {
      last = now;
      sinceMs = performance.now();
    } else if (now > 0 && performance.now() - sinceMs > 200) {
      return;
    }
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
}

/**
 * Peak payload memory while 8 clients each ask for a 32 MiB read that the device holds
 * until no more are being dispatched (so they pile up as far as the export lets them),
 * then lets go.
 */
async function peakUnder(memoryBytes: number): Promise<number> {
  const device = new HeldReads(2 * READ_BYTES);
  const data = new Uint8Array(2 * READ_BYTES).map((_, i) => (i * 131) >> 9);
  await device.write(0, data);
  const exporter = Exporter.start(device, {
    listen: { hostname: "127.0.0.1", port: 0 },
    log: quiet,
    memoryBytes,
  });
  try {
    const clients = await Promise.all(
      Array.from(
        { length: 8 },
        () =>
          RemoteDevice.connect(exporter.address, { writer: false, log: quiet, timeoutMs: 30_000 }),
      ),
    );
    const reads = Promise.all(clients.map(async (client, i) => {
      const offset = (i % 2) * READ_BYTES;
      const into = new Uint8Array(READ_BYTES);
      await client.read(offset, into);
      assert.deepEqual(into, data.subarray(offset, offset + READ_BYTES), `read at ${offset}`);
    }));
    await settled(() => exporter.status().memory.usedBytes);
    device.release();
    await reads;
    await Promise.all(clients.map((client) => client.close()));
    const memory = exporter.status().memory;
    assert.equal(memory.usedBytes, 0, "every byte charged was given back");
    return memory.peakBytes;
  } finally {
    await exporter.shutdown();
  }
}

Deno.test("memory budget: 8 clients x a 32 MiB read stay within the budget plus one request", async () => {
  const budget = 64 * MiB;
  const peak = await peakUnder(budget);
  assert.ok(peak <= budget + PAYLOAD_BYTES_MAX, `peak ${peak / MiB} MiB`);
  assert.ok(peak >= READ_BYTES, "the reads were charged");
});

Deno.test("memory budget: without a tight budget the same load holds far more (the bound is the budget's)", async () => {
  const peak = await peakUnder(1024 * MiB);
  assert.equal(peak, 8 * READ_BYTES, "all eight reads at once");
});

Deno.test("memory budget: while it is spent, a waiting client's pings and status queries are answered", async () => {
  const device = new HeldReads(READ_BYTES);
  const exporter = Exporter.start(device, {
    listen: { hostname: "127.0.0.1", port: 0 },
    log: quiet,
    memoryBytes: READ_BYTES,
  });
  try {
    const big = await RemoteDevice.connect(exporter.address, { writer: false, log: quiet });
    const other = await RemoteDevice.connect(exporter.address, { writer: false, log: quiet });
    const bigRead = big.read(0, new Uint8Array(READ_BYTES));
    await settled(() => exporter.status().memory.usedBytes);
    let smallDone = false;
    const smallRead = other.read(0, new Uint8Array(4096)).then(() => smallDone = true);
    await other.ping(); // answered though the budget is spent and a read waits before it
    await other.queryStatus();
    assert.equal(smallDone, false, "the read waits for memory");
    device.release();
    await Promise.all([bigRead, smallRead]);
    await Promise.all([big.close(), other.close()]);
  } finally {
    await exporter.shutdown();
  }
});
