/**
 * Property: any sequence of read / write / flush / discard / write-zeroes, issued in
 * concurrent batches through RemoteDevice to an Exporter of a FileDevice, leaves the
 * image byte-identical to an in-memory model that applies the same operations in
 * submission order, and every read returns the model's bytes at its submission.
 *
 * Why submission order is the truth: the client orders overlapping requests
 * (overlap_gate.ts), so a read sees exactly the writes submitted before it, and
 * overlapping writes land in the order they were submitted.
 *
 * Replay a failure with DST_SEED=<seed printed by fast-check> (and DST_PATH=<path>).
 */

import fc from "fast-check";
import { type ModelOp, replayOptions, submitToModel } from "../helpers/property.ts";
import { RemoteDevice } from "../../src/client/remote_device.ts";
import { FileDevice } from "../../src/device/file_device.ts";
import { Exporter } from "../../src/server/exporter.ts";
import { assertSameBytes, settleAll } from "../helpers/bytes.ts";
import { silentLogger as quiet } from "../../src/lib/log.ts";

const SIZE = 1024 * 1024;

/** Ranges biased to collide: small lengths near a few hot spots, some large. */
const range = fc.oneof(
  fc.record({
    offset: fc.integer({ min: 0, max: 16 }).map((n) => n * 4096 + 100),
    length: fc.integer({ min: 1, max: 9000 }),
  }),
  fc.record({
    offset: fc.integer({ min: 0, max: SIZE - 1 }),
    length: fc.integer({ min: 1, max: 200_000 }),
  }),
).map(({ offset, length }) => ({ offset, length: Math.min(length, SIZE - offset) }));

const op: fc.Arbitrary<ModelOp> = fc.oneof(
  { weight: 3, arbitrary: range.map((r) => ({ kind: "read" as const, ...r })) },
  {
    weight: 4,
    arbitrary: fc.tuple(range, fc.integer(), fc.boolean(), fc.boolean()).map((
      [r, seed, fua, preflush],
    ) => ({
      kind: "write" as const,
      ...r,
      seed,
      fua,
      preflush,
    })),
  },
  { weight: 1, arbitrary: range.map((r) => ({ kind: "discard" as const, ...r })) },
  { weight: 1, arbitrary: range.map((r) => ({ kind: "zeroes" as const, ...r })) },
  { weight: 1, arbitrary: fc.constant({ kind: "flush" as const }) },
);

/** Batches of operations submitted together (many in flight), one batch after another. */
const program = fc.array(fc.array(op, { minLength: 1, maxLength: 24 }), {
  minLength: 1,
  maxLength: 12,
});

Deno.test("client and export agree with an in-memory model on random concurrent workloads", async () => {
  const dir = await Deno.makeTempDir({ prefix: "dst-prop-" });
  const device = await FileDevice.open(`${dir}/disk.img`, { createBytes: SIZE });
  const exporter = Exporter.start(device, {
    listen: { hostname: "127.0.0.1", port: 0 },
    log: quiet,
  });
  const client = await RemoteDevice.connect(exporter.address, { log: quiet });
  const model = new Uint8Array(SIZE);
  try {
    await fc.assert(
      fc.asyncProperty(program, async (batches) => {
        // Each run starts from the same state: zeroes everywhere, on both sides.
        await client.writeZeroes(0, SIZE);
        model.fill(0);
        for (const batch of batches) {
          const pending: Promise<void>[] = [];
          for (const o of batch) {
            pending.push(submitToModel(client, model, o));
          }
          await settleAll(pending);
        }
        const whole = new Uint8Array(SIZE);
        await client.read(0, whole);
        assertSameBytes(whole, model, "the device read back");
        const onDisk = await Deno.readFile(`${dir}/disk.img`);
        assertSameBytes(onDisk, model, "the image file");
      }),
      replayOptions(60),
    );
  } finally {
    await client.close();
    await exporter.shutdown();
    await device.close();
    await Deno.remove(dir, { recursive: true });
  }
});
