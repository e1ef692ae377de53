/**
 * What the fast-check property tests share: the operations they generate, how one is
 * submitted to a device and applied to the model of what the device must hold, the data
 * a write carries (made from its seed), and the options that replay a failure from the
 * seed and path fast-check prints.
 */

import type { BlockDevice } from "../../src/device/block_device.ts";
import { assertSameBytes } from "./bytes.ts";

/** One operation of a generated workload. */
export type ModelOp =
  | { kind: "read"; offset: number; length: number }
  | {
    kind: "write";
    offset: number;
    length: number;
    seed: number;
    fua: boolean;
    preflush?: boolean;
  }
  | { kind: "discard"; offset: number; length: number }
  | { kind: "zeroes"; offset: number; length: number }
  | { kind: "flush" };

/**
 * Submits `o` to `device` and applies it to `model` in submission order, which is the
 * truth: the client orders overlapping requests, so a read sees exactly the writes
 * submitted before it (it is checked against the model as of its submission).
 */
export function submitToModel(device: BlockDevice, model: Uint8Array, o: ModelOp): Promise<void> {
  switch (o.kind) {
    case "read": {
      const expected = model.slice(o.offset, o.offset + o.length);
      const into = new Uint8Array(o.length);
      return device.read(o.offset, into).then(() =>
        assertSameBytes(into, expected, `read of ${o.length} bytes at ${o.offset}`)
      );
    }
    case "write": {
      const data = seededBytes(o.seed, o.length);
      model.set(data, o.offset);
      return device.write(o.offset, data, { fua: o.fua, preflush: o.preflush ?? false });
    }
    case "discard":
      model.fill(0, o.offset, o.offset + o.length);
      return device.discard(o.offset, o.length);
    case "zeroes":
      model.fill(0, o.offset, o.offset + o.length);
      return device.writeZeroes(o.offset, o.length);
    case "flush":
      return device.flush();
  }
}

/** `length` bytes of an xorshift stream from `seed`: distinct writes carry distinct data. */
export function seededBytes(seed: number, length: number): Uint8Array {
  const bytes = new Uint8Array(length);
  let x = seed | 1;
  for (let i = 0; i < length; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    bytes[i] = x & 0xff;
  }
  return bytes;
}

/** fc.assert options: `numRuns`, or the one run DST_SEED (and DST_PATH) name, to replay it. */
export function replayOptions(numRuns: number): { numRuns: number; seed?: number; path?: string } {
  const seedText = Deno.env.get("DST_SEED");
  const pathText = Deno.env.get("DST_PATH");
  return {
    numRuns,
    ...(seedText ? { seed: Number(seedText) } : {}),
    ...(pathText ? { path: pathText } : {}),
  };
}
