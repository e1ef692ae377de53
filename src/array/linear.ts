/**
 * A linear array: members one after another. Its size is the sum of theirs; byte
 * `offset` of the array is in the member whose range holds it, and a request that
 * spans a boundary is split into one request per member.
 */

import {
  type BlockDevice,
  checkRange,
  checkWritable,
  type DeviceInfo,
  type DeviceStats,
  emptyStats,
  type IoFlags,
} from "../device/block_device.ts";
import { sha256Hex } from "../lib/hex.ts";

export interface LinearMemberStatus {
  name: string;
  startBytes: number;
  sizeBytes: number;
}

/** What a linear array's export adds to its STATUS (`dst status`). */
export interface LinearStatus {
  kind: "linear";
  sizeBytes: number;
  members: LinearMemberStatus[];
}

export class LinearDevice implements BlockDevice {
  readonly info: DeviceInfo;
  /** starts[i] is the array offset of member i's first byte; starts[n] is the size. */
  readonly #starts: number[];
  readonly #stats = emptyStats();

  private constructor(readonly members: BlockDevice[], info: DeviceInfo, starts: number[]) {
    this.info = info;
    this.#starts = starts;
  }

  static async create(members: BlockDevice[]): Promise<LinearDevice> {
    const starts = [0];
    for (const member of members) starts.push(starts.at(-1)! + member.info.sizeBytes);
    const info: DeviceInfo = {
      sizeBytes: starts.at(-1)!,
      blockSize: Math.max(...members.map((m) => m.info.blockSize)),
      readOnly: members.some((m) => m.info.readOnly),
      id: (await sha256Hex(`linear\n${members.map((m) => m.info.id).join("\n")}`)).slice(0, 32),
      name: `linear(${members.map((m) => m.info.name).join(", ")})`,
    };
    return new LinearDevice(members, info, starts);
  }

  status(): LinearStatus {
    return {
      kind: "linear",
      sizeBytes: this.info.sizeBytes,
      members: this.members.map((member, i) => ({
        name: member.info.name,
        startBytes: this.#starts[i]!,
        sizeBytes: member.info.sizeBytes,
      })),
    };
  }

  async read(offset: number, into: Uint8Array): Promise<void> {
    checkRange(this.info, "read", offset, into.length);
    await this.#split(
      offset,
      into.length,
      (m, at, from, to) => m.read(at, into.subarray(from, to)),
    );
    this.#stats.reads += 1;
    this.#stats.readBytes += into.length;
  }

  async write(offset: number, data: Uint8Array, flags?: IoFlags): Promise<void> {
    checkWritable(this.info, "write");
    checkRange(this.info, "write", offset, data.length);
    await this.#split(
      offset,
      data.length,
      (m, at, from, to) => m.write(at, data.subarray(from, to), flags),
    );
    this.#stats.writes += 1;
    this.#stats.writtenBytes += data.length;
  }

  async flush(): Promise<void> {
    await this.#all(this.members.map((m) => m.flush()));
    this.#stats.flushes += 1;
  }

  async discard(offset: number, length: number, flags?: IoFlags): Promise<void> {
    checkWritable(this.info, "discard");
    checkRange(this.info, "discard", offset, length);
    await this.#split(offset, length, (m, at, from, to) => m.discard(at, to - from, flags));
    this.#stats.discards += 1;
    this.#stats.discardBytes += length;
  }

  async writeZeroes(offset: number, length: number, flags?: IoFlags): Promise<void> {
    checkWritable(this.info, "write zeroes");
    checkRange(this.info, "write zeroes", offset, length);
    await this.#split(offset, length, (m, at, from, to) => m.writeZeroes(at, to - from, flags));
    this.#stats.zeroes += 1;
    this.#stats.zeroBytes += length;
  }

  stats(): DeviceStats {
    return { ...this.#stats };
  }

  async close(): Promise<void> {
    await Promise.allSettled(this.members.map((m) => m.close()));
  }

  /**
   * Runs `op(member, memberOffset, from, to)` for each member piece of
   * [offset, offset + length), where from..to is the piece's place in the request.
   */
  #split(
    offset: number,
    length: number,
    op: (member: BlockDevice, at: number, from: number, to: number) => Promise<void>,
  ): Promise<void> {
    const pieces: Promise<void>[] = [];
    const end = offset + length;
    for (let i = this.#memberAt(offset), at = offset; at < end; i++) {
      const pieceEnd = Math.min(end, this.#starts[i + 1]!);
      pieces.push(op(this.members[i]!, at - this.#starts[i]!, at - offset, pieceEnd - offset));
      at = pieceEnd;
    }
    return this.#all(pieces);
  }

  /** The member holding byte `offset` (the last member for offset == size). */
  #memberAt(offset: number): number {
    let low = 0;
    let high = this.members.length - 1;
    while (low < high) {
      const middle = (low + high + 1) >> 1;
      if (this.#starts[middle]! <= offset) low = middle;
      else high = middle - 1;
    }
    return low;
  }

  /** Waits for every piece; the first error (after all settled) is the caller's. */
  async #all(pieces: Promise<void>[]): Promise<void> {
    const results = await Promise.allSettled(pieces);
    const failed = results.find((r) => r.status === "rejected");
    if (failed !== undefined) {
      this.#stats.errors += 1;
      throw (failed as PromiseRejectedResult).reason;
    }
  }
}
