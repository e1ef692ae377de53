/**
 * The exporter's fencing and lease bookkeeping, in one process (Exporter of a
 * MemoryDevice, real sockets on loopback): the cases a review of the fencing change
 * found, each first shown failing.
 * 1. A silent lease holder that is fenced while a write of its connection is still on
 *    the device: the client's reconnect waits for that write, so it can never land
 *    after the client's newer acknowledged one.
 * 2. One writer's reconnects never raise the write generation (an abandoned handshake
 *    that was granted all the same would otherwise make the writer think someone else
 *    wrote, and fail writes it should resend); another writer's grant does.
 */

import assert from "node:assert/strict";
import { RemoteDevice } from "../client/remote_device.ts";
import { MemoryDevice } from "../device/memory_device.ts";
import { Exporter } from "./exporter.ts";
import { silentLogger as quiet } from "../lib/log.ts";

const SIZE = 1024 * 1024;
const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

/** A memory device whose next write at offset 0 waits until `release()`. */
class StallingDevice extends MemoryDevice {
  #stall: PromiseWithResolvers<void> | null = null;

  stallNextWrite(): () => void {
    const stall = Promise.withResolvers<void>();
    this.#stall = stall;
    return () => stall.resolve();
  }

  override async write(offset: number, data: Uint8Array): Promise<void> {
    const stall = this.#stall;
    if (offset === 0 && stall !== null) {
      this.#stall = null;
      await stall.promise;
    }
    return await super.write(offset, data);
  }
}

Deno.test("a fenced silent holder's write on the device is waited for before its client's reconnect is answered", async () => {
  const device = new StallingDevice(SIZE);
  const exporter = Exporter.start(device, {
    listen: { hostname: "127.0.0.1", port: 0 },
    leaseIdleMs: 300,
    log: quiet,
  });
  // The client pings rarely: to the export it is a silent holder.
  const client = await RemoteDevice.connect(exporter.address, {
    timeoutMs: 60_000,
    pingMs: 60_000,
    retries: 3,
    log: quiet,
  });
  try {
    const release = device.stallNextWrite();
    const stalled = client.write(0, new Uint8Array(4096).fill(0xaa));
    // Long enough for the export to fence the silent connection and the client to come back.
    const released = sleep(1500).then(release);
    await stalled;
    await client.write(0, new Uint8Array(4096).fill(0xbb));
    await released;
    await sleep(100); // the stalled write, if it could still land, has landed now
    assert.equal(device.bytes[0], 0xbb, "the last acknowledged write is what the device holds");
  } finally {
    await client.close();
    await exporter.shutdown();
  }
});

Deno.test("one writer's reconnects keep the write generation; another writer's grant raises it", async () => {
  const exporter = Exporter.start(new MemoryDevice(SIZE), {
    listen: { hostname: "127.0.0.1", port: 0 },
    log: quiet,
  });
  const idA = crypto.getRandomValues(new Uint8Array(16));
  const connectA = () => RemoteDevice.connect(exporter.address, { clientId: idA, log: quiet });
  try {
    const first = await connectA();
    assert.equal(first.writeGeneration, 1, "the first grant starts generation 1");
    await first.close();
    for (let i = 0; i < 3; i++) {
      const again = await connectA();
      assert.equal(again.writeGeneration, 1, "the same writer again: nobody else wrote");
      await again.close();
    }
    const other = await RemoteDevice.connect(exporter.address, { log: quiet });
    assert.equal(other.writeGeneration, 2, "another writer's grant");
    await other.close();
    const back = await connectA();
    assert.equal(back.writeGeneration, 3, "A comes back after someone else wrote");
    await back.close();
    assert.equal(exporter.status().writeGeneration, 3);
  } finally {
    await exporter.shutdown();
  }
});
