/**
 * Golden frames for tests that pin a wire format: a frame is written out field by
 * field as hex, copied from a spec's layout table, so a test compares the codec's
 * bytes with the spec's numbers rather than with the codec's own constants. A
 * mismatch names the field and its offset. Also a scripted connection, so a server
 * side can be fed literal bytes and its answer compared the same way.
 */

import assert from "node:assert/strict";
import { concat } from "./bytes.ts";
import type { ByteConn } from "../../src/transport/byte_conn.ts";

/** One field of a golden frame: its name, and its bytes as hex digits (spaces allowed). */
export type Field = readonly [name: string, hex: string];

function digits(field: Field): string {
  const hex = field[1].replace(/\s+/g, "").toLowerCase();
  if (!/^([0-9a-f]{2})*$/.test(hex)) {
    throw new Error(`golden field ${field[0]}: "${field[1]}" is not whole bytes of hex`);
  }
  return hex;
}

/** The bytes the fields spell, end to end. */
export function frame(...fields: readonly Field[]): Uint8Array {
  const hex = fields.map(digits).join("");
  return Uint8Array.from(
    { length: hex.length / 2 },
    (_, i) => parseInt(hex.slice(2 * i, 2 * i + 2), 16),
  );
}

function toHex(bytes: Uint8Array): string {
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

/** Asserts that `actual` is exactly the fields, naming the first field that differs. */
export function assertFrame(actual: Uint8Array, fields: readonly Field[], what: string): void {
  let at = 0;
  for (const field of fields) {
    const expected = digits(field);
    const size = expected.length / 2;
    const got = toHex(actual.subarray(at, at + size));
    assert.equal(got, expected, `${what}: field ${field[0]} at offset ${at}`);
    at += size;
  }
  assert.equal(actual.length, at, `${what}: frame length`);
}

/**
 * A connection that delivers `input` to its reader, then end of stream, and records
 * everything written to it. Closing it ends the stream early.
 */
export class ScriptedConn implements ByteConn {
  readonly #input: Uint8Array;
  #at = 0;
  #closed = false;
  readonly #writes: Uint8Array[] = [];

  constructor(...input: Uint8Array[]) {
    this.#input = concat(...input);
  }

  read(into: Uint8Array): Promise<number | null> {
    if (this.#closed || this.#at >= this.#input.length) return Promise.resolve(null);
    const n = Math.min(into.length, this.#input.length - this.#at);
    into.set(this.#input.subarray(this.#at, this.#at + n));
    this.#at += n;
    return Promise.resolve(n);
  }

  write(data: Uint8Array): Promise<number> {
    if (this.#closed) return Promise.reject(new Error("write after close"));
    this.#writes.push(data.slice());
    return Promise.resolve(data.length);
  }

  close(): void {
    this.#closed = true;
  }

  get closed(): boolean {
    return this.#closed;
  }

  /** Everything written so far, in order. */
  written(): Uint8Array {
    return concat(...this.#writes);
  }
}

/**
 * A connection whose input the test hands over step by step (`feed`, `end`), so a server
 * side can be watched while it waits: a read waits until bytes are fed or the input ends.
 */
export class PacedConn implements ByteConn {
  readonly #input: Uint8Array[] = [];
  #ended = false;
  #closed = false;
  #waiting: (() => void) | null = null;
  readonly #writes: Uint8Array[] = [];

  /** More input; a read waiting for it takes it. */
  feed(...chunks: Uint8Array[]): void {
    this.#input.push(...chunks.map((chunk) => chunk.slice()));
    this.#wake();
  }

  /** The input ends: reads return null once what was fed is taken. */
  end(): void {
    this.#ended = true;
    this.#wake();
  }

  async read(into: Uint8Array): Promise<number | null> {
    while (this.#input.length === 0 && !this.#ended && !this.#closed) {
      await new Promise<void>((resolve) => this.#waiting = resolve);
    }
    const chunk = this.#input[0];
    if (this.#closed || chunk === undefined) return null;
    const n = Math.min(into.length, chunk.length);
    into.set(chunk.subarray(0, n));
    if (n === chunk.length) this.#input.shift();
    else this.#input[0] = chunk.subarray(n);
    return n;
  }

  write(data: Uint8Array): Promise<number> {
    if (this.#closed) return Promise.reject(new Error("write after close"));
    this.#writes.push(data.slice());
    return Promise.resolve(data.length);
  }

  close(): void {
    this.#closed = true;
    this.#wake();
  }

  get closed(): boolean {
    return this.#closed;
  }

  /** Everything written so far, in order. */
  written(): Uint8Array {
    return concat(...this.#writes);
  }

  #wake(): void {
    const waiting = this.#waiting;
    this.#waiting = null;
    waiting?.();
  }
}
