/**
 * The export's memory budget for payloads (--memory), shared by its clients: four
 * clients with two 32 MiB READs each (the load that once took the export from 119 to
 * 328 MiB) never hold more than the budget plus one frame, and every read returns
 * the right bytes. The same load with a budget too large to matter holds them all at
 * once: the bound is the budget's doing.
 */

import assert from "node:assert/strict";
import { RemoteDevice } from "../client/remote_device.ts";
import { MemoryDevice } from "../device/memory_device.ts";
import { silentLogger as quiet } from "../lib/log.ts";
import { PAYLOAD_BYTES_MAX } from "../constants.ts";
import { Exporter } from "./exporter.ts";

const MiB = 1024 * 1024;
const READ_BYTES = 32 * MiB;

async function peakUnder(memoryBytes: number): Promise<number> {
  const device = new MemoryDevice(2 * READ_BYTES);
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
        { length: 4 },
        () =>
          RemoteDevice.connect(exporter.address, { writer: false, log: quiet, timeoutMs: 30_000 }),
      ),
    );
    await Promise.all(clients.flatMap((client) =>
      [0, READ_BYTES].map(async (offset) => {
        const into = new Uint8Array(READ_BYTES);
        await client.read(offset, into);
        assert.deepEqual(into, data.subarray(offset, offset + READ_BYTES), `read at ${offset}`);
      })
    ));
    await Promise.all(clients.map((client) => client.close()));
    const memory = exporter.status().memory;
    assert.equal(memory.usedBytes, 0, "every byte charged was given back");
    return memory.peakBytes;
  } finally {
    await exporter.shutdown();
  }
}

Deno.test("memory budget: 4 clients x two 32 MiB reads stay within the budget plus one frame", async () => {
  const budget = 64 * MiB;
  const peak = await peakUnder(budget);
  assert.ok(peak <= budget + PAYLOAD_BYTES_MAX, `peak ${peak / MiB} MiB`);
  assert.ok(peak >= READ_BYTES, "the reads were charged");
});

Deno.test("memory budget: without a tight budget the same load holds far more (the bound is the budget's)", async () => {
  const peak = await peakUnder(1024 * MiB);
  assert.ok(peak > 64 * MiB + PAYLOAD_BYTES_MAX, `peak ${peak / MiB} MiB`);
});
