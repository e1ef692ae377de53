/**
 * Property: through a link that is cut, healed, and that delivers an abandoned
 * connection's bytes late, every acknowledged write reads back and the last writer
 * wins. RemoteDevice talks to an Exporter of a MemoryDevice through the fault proxy;
 * random batches of writes, write-zeroes, flushes and reads are submitted
 * concurrently while the link is cut (the batch's frames are then held on the old
 * connection), the link heals, the batch is acknowledged, and the held bytes may
 * reach the export afterwards, as a TCP retransmission after a partition would.
 *
 * Invariants checked:
 * 1. Every read returns the model's bytes as of its submission (overlapping requests
 *    are ordered by the client, so submission order is the truth).
 * 2. After everything settled and every held byte was delivered, the device holds
 *    exactly the model: no late frame of a fenced connection ran.
 * 3. No request fails: an outage shorter than the retries is invisible.
 *
 * Replay a failure with DST_SEED=<seed printed by fast-check> (and DST_PATH=<path>).
 */

import fc from "fast-check";
import { type ModelOp, replayOptions, submitToModel } from "../helpers/property.ts";
import { RemoteDevice } from "../../src/client/remote_device.ts";
import { MemoryDevice } from "../../src/device/memory_device.ts";
import { Exporter } from "../../src/server/exporter.ts";
import { assertSameBytes } from "../helpers/bytes.ts";
import { FaultProxy } from "../helpers/fault_proxy.ts";
import { silentLogger as quiet } from "../../src/lib/log.ts";

const SIZE = 256 * 1024;

/** Ranges biased to collide: a few hot spots, so late frames would overwrite newer data. */
const range = fc.record({
  offset: fc.integer({ min: 0, max: 7 }).map((n) => n * 8192 + 512),
  length: fc.integer({ min: 1, max: 20_000 }),
}).map(({ offset, length }) => ({ offset, length: Math.min(length, SIZE - offset) }));

const op: fc.Arbitrary<ModelOp> = fc.oneof(
  { weight: 2, arbitrary: range.map((r) => ({ kind: "read" as const, ...r })) },
  {
    weight: 5,
    arbitrary: fc.tuple(range, fc.integer(), fc.boolean()).map(([r, seed, fua]) => ({
      kind: "write" as const,
      ...r,
      seed,
      fua,
    })),
  },
  { weight: 1, arbitrary: range.map((r) => ({ kind: "zeroes" as const, ...r })) },
  { weight: 1, arbitrary: fc.constant({ kind: "flush" as const }) },
);

/**
 * A batch: operations submitted together, with the link cut after `cutAfter` of them
 * (or not at all), healed `healAfterMs` later, and the held bytes delivered after the
 * batch was answered when `late`.
 */
const batch = fc.record({
  ops: fc.array(op, { minLength: 1, maxLength: 12 }),
  cutAfter: fc.option(fc.nat({ max: 12 }), { nil: null }),
  healAfterMs: fc.integer({ min: 0, max: 300 }),
  late: fc.boolean(),
});

const program = fc.array(batch, { minLength: 1, maxLength: 5 });

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

Deno.test("through cuts, heals and late deliveries every acknowledged write reads back, last writer wins", async () => {
  const device = new MemoryDevice(SIZE);
  const exporter = Exporter.start(device, {
    listen: { hostname: "127.0.0.1", port: 0 },
    log: quiet,
  });
  const proxy = FaultProxy.start(exporter.address);
  const client = await RemoteDevice.connect(proxy.address, {
    timeoutMs: 150,
    retries: 200,
    log: quiet,
  });
  const model = new Uint8Array(SIZE);
  try {
    await fc.assert(
      fc.asyncProperty(program, async (batches) => {
        await client.writeZeroes(0, SIZE);
        model.fill(0);
        for (const b of batches) {
          const pending: Promise<void>[] = [];
          b.ops.forEach((o, index) => {
            if (index === b.cutAfter) proxy.cut();
            pending.push(submitToModel(client, model, o));
          });
          if (b.cutAfter !== null && b.cutAfter >= b.ops.length) proxy.cut();
          await sleep(b.healAfterMs);
          proxy.heal();
          // Invariant 3: every request is answered; a failure rejects here.
          await Promise.all(pending);
          if (b.late) await proxy.deliverHeld();
        }
        await proxy.deliverHeld();
        await sleep(50); // a late frame, if it were run, would have landed by now
        const whole = new Uint8Array(SIZE);
        await device.read(0, whole);
        assertSameBytes(whole, model, "Invariant 2: the device after every late delivery");
      }),
      replayOptions(12),
    );
  } finally {
    await client.close();
    await proxy.close();
    await exporter.shutdown();
  }
});
