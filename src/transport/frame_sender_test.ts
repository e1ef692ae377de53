import assert from "node:assert/strict";
import { concat, pattern } from "../../tests/helpers/bytes.ts";
import type { ByteConn } from "./byte_conn.ts";
import { FrameSender, type FrameSenderOptions } from "./frame_sender.ts";
import { manyTurns } from "../../tests/helpers/turns.ts";

interface WriteRecord {
  /** The very buffer write() was given. */
  data: Uint8Array;
  /** Its bytes when write() was called. */
  copy: Uint8Array;
  /** How many of them the connection took (write()'s answer), or null if it failed. */
  accepted: number | null;
}

/**
 * Records every write, copying the bytes at write time. Writes may be held until the
 * test lets them go, delayed, cut short (partial writes) or failed.
 */
class RecordingConn implements ByteConn {
  readonly writes: WriteRecord[] = [];
  /** Each write takes at most this many bytes. */
  maxBytesPerWrite = Infinity;
  delayMs = 0;
  /** While true, writes wait for `releaseWrite()`. */
  hold = false;
  /** The next write fails with this error. */
  failNext: Error | null = null;
  readonly #held: Array<() => void> = [];

  async write(data: Uint8Array): Promise<number> {
    const record: WriteRecord = { data, copy: data.slice(), accepted: null };
    this.writes.push(record);
    if (this.delayMs > 0) await new Promise((resolve) => setTimeout(resolve, this.delayMs));
    if (this.hold) await new Promise<void>((resolve) => this.#held.push(resolve));
    const failure = this.failNext;
    if (failure !== null) {
      this.failNext = null;
      throw failure;
    }
    record.accepted = Math.min(data.length, this.maxBytesPerWrite);
    return record.accepted;
  }

  get heldWrites(): number {
    return this.#held.length;
  }

  /** Lets the oldest held write complete. */
  releaseWrite(): void {
    const release = this.#held.shift();
    assert.ok(release !== undefined, "a write is held");
    release();
  }

  /** Everything the peer received, in order. */
  received(): Uint8Array {
    return concat(...this.writes.map((w) => w.copy.subarray(0, w.accepted ?? 0)));
  }

  read(_into: Uint8Array): Promise<number | null> {
    return Promise.resolve(null);
  }

  close(): void {}
}

const OPTIONS: FrameSenderOptions = { coalesceBytes: 64, zeroCopyBytesMin: 32, queueBytesMax: 48 };

/** Lets pending work run, many turns of it (a check that something waits means it then). */
const settle = manyTurns;

/** Whether `promise` has settled, after letting pending work run. */
async function isSettled(promise: Promise<unknown>): Promise<boolean> {
  let settled = false;
  promise.then(() => (settled = true), () => (settled = true));
  await settle();
  return settled;
}

Deno.test("FrameSender sends several small frames queued in one turn in ONE write, in order", async () => {
  const conn = new RecordingConn();
  const sender = new FrameSender(conn, OPTIONS);
  const h1 = pattern(1, 4), p1 = pattern(50, 10);
  const h2 = pattern(11, 4);
  const h3 = pattern(21, 4), p3 = pattern(90, 31);
  sender.send(h1, p1);
  sender.send(h2);
  sender.send(h3, p3);
  assert.equal(conn.writes.length, 0, "writing starts in a microtask");
  assert.equal(sender.queuedBytes, 53);

  await sender.drain();
  assert.equal(conn.writes.length, 1);
  assert.deepEqual(conn.received(), concat(h1, p1, h2, h3, p3));
  assert.equal(sender.queuedBytes, 0);
});

Deno.test("FrameSender sends frames queued in a later turn in a later write", async () => {
  const conn = new RecordingConn();
  const sender = new FrameSender(conn, OPTIONS);
  sender.send(pattern(0, 8));
  await sender.drain();
  sender.send(pattern(8, 8));
  await sender.drain();
  assert.equal(conn.writes.length, 2);
  assert.deepEqual(conn.received(), pattern(0, 16));
});

Deno.test("FrameSender starts a new buffer when small frames overflow the coalescing buffer", async () => {
  const conn = new RecordingConn();
  const sender = new FrameSender(conn, OPTIONS);
  const frames = Array.from({ length: 5 }, (_, i) => pattern(i * 30, 30));
  for (const frame of frames) sender.send(frame);
  await sender.drain();
  assert.deepEqual(conn.received(), concat(...frames));
  for (const write of conn.writes) assert.ok(write.copy.length <= OPTIONS.coalesceBytes);
});

Deno.test("FrameSender copies a payload below zeroCopyBytesMin and runs its onSent at once", async () => {
  const conn = new RecordingConn();
  const sender = new FrameSender(conn, OPTIONS);
  const header = pattern(0, 4);
  const payload = pattern(100, OPTIONS.zeroCopyBytesMin - 1);
  const expected = concat(header, payload);
  let sent = 0;
  sender.send(header, payload, () => sent++);
  assert.equal(sent, 1, "onSent ran inside send()");

  payload.fill(0); // the caller may reuse it at once
  await sender.drain();
  assert.equal(conn.writes.length, 1);
  assert.notEqual(conn.writes[0]!.data.buffer, payload.buffer);
  assert.deepEqual(conn.received(), expected);
  assert.equal(sent, 1);
});

Deno.test("FrameSender writes a payload >= zeroCopyBytesMin from its own buffer with no copy", async () => {
  const conn = new RecordingConn();
  conn.hold = true;
  const sender = new FrameSender(conn, OPTIONS);
  const backing = new Uint8Array(100);
  const payload = backing.subarray(10, 10 + OPTIONS.zeroCopyBytesMin);
  payload.set(pattern(7, payload.length));
  const header = pattern(200, 6);
  let sent = 0;
  sender.send(header, payload, () => sent++);
  assert.equal(sent, 0, "the payload is still needed");

  await settle();
  assert.equal(conn.writes.length, 1, "the header goes first, alone");
  assert.deepEqual(conn.writes[0]!.copy, header);
  conn.releaseWrite();
  await settle();
  assert.equal(conn.writes.length, 2);
  const write = conn.writes[1]!;
  assert.equal(write.data.buffer, payload.buffer, "the same ArrayBuffer");
  assert.equal(write.data.byteOffset, payload.byteOffset);
  assert.equal(write.data.length, payload.length);
  assert.equal(sent, 0, "onSent waits for the payload's write");

  conn.releaseWrite();
  await sender.drain();
  assert.equal(sent, 1);
  assert.deepEqual(conn.received(), concat(header, pattern(7, payload.length)));
});

Deno.test("FrameSender keeps small frames after a large payload in order", async () => {
  const conn = new RecordingConn();
  const sender = new FrameSender(conn, OPTIONS);
  const hA = pattern(1, 4), pA = pattern(40, 5);
  const hB = pattern(2, 4), pB = pattern(60, 40);
  const hC = pattern(3, 4), pC = pattern(120, 5);
  sender.send(hA, pA);
  sender.send(hB, pB);
  sender.send(hC, pC);
  await sender.drain();

  assert.equal(conn.writes.length, 3);
  assert.deepEqual(conn.writes[0]!.copy, concat(hA, pA, hB));
  assert.equal(conn.writes[1]!.data.buffer, pB.buffer);
  assert.deepEqual(conn.writes[2]!.copy, concat(hC, pC));
});

Deno.test("FrameSender delivers all bytes in order through partial writes", async () => {
  const conn = new RecordingConn();
  conn.maxBytesPerWrite = 3;
  const sender = new FrameSender(conn, OPTIONS);
  const parts: Uint8Array[] = [];
  let sent = 0;
  for (let i = 0; i < 6; i++) {
    const header = pattern(i * 16, 4);
    const payload = pattern(100 + i * 37, i % 2 === 0 ? 9 : 33);
    parts.push(header, payload);
    sender.send(header, payload, () => sent++);
  }
  await sender.drain();
  assert.deepEqual(conn.received(), concat(...parts));
  assert.ok(conn.writes.every((write) => (write.accepted ?? 0) <= 3));
  assert.equal(sent, 6);
});

Deno.test("FrameSender delivers all bytes through delayed writes", async () => {
  const conn = new RecordingConn();
  conn.delayMs = 2;
  conn.maxBytesPerWrite = 20;
  const sender = new FrameSender(conn, OPTIONS);
  const parts: Uint8Array[] = [];
  for (let turn = 0; turn < 3; turn++) {
    for (let i = 0; i < 3; i++) {
      const header = pattern(turn * 50 + i, 4);
      const payload = pattern(turn * 7 + i, i * 20);
      parts.push(header, payload);
      sender.send(header, payload);
    }
    await new Promise((resolve) => setTimeout(resolve, 1));
  }
  await sender.drain();
  assert.deepEqual(conn.received(), concat(...parts));
  assert.equal(sender.queuedBytes, 0);
});

Deno.test("FrameSender.whenWritable() resolves at once while the queue has room", async () => {
  const conn = new RecordingConn();
  conn.hold = true;
  const sender = new FrameSender(conn, OPTIONS);
  sender.send(pattern(0, OPTIONS.queueBytesMax)); // exactly at the limit
  assert.equal(await isSettled(sender.whenWritable()), true);
  conn.releaseWrite();
  await sender.drain();
});

Deno.test("FrameSender.whenWritable() waits while queuedBytes > queueBytesMax, until the write", async () => {
  const conn = new RecordingConn();
  conn.hold = true;
  const sender = new FrameSender(conn, OPTIONS);
  sender.send(pattern(0, 4), pattern(10, 40));
  sender.send(pattern(0, 4), pattern(60, 10));
  assert.equal(sender.queuedBytes, 58);
  assert.ok(sender.queuedBytes > OPTIONS.queueBytesMax);

  const writable = sender.whenWritable();
  assert.equal(await isSettled(writable), false);
  assert.equal(conn.heldWrites, 1);
  conn.releaseWrite(); // the first header
  assert.equal(await isSettled(writable), false, "54 bytes still queued");
  conn.releaseWrite(); // the 40-byte payload
  assert.equal(await isSettled(writable), true);
  assert.ok(sender.queuedBytes <= OPTIONS.queueBytesMax);
  conn.releaseWrite();
  await sender.drain();
});

Deno.test("FrameSender.drain() resolves only when everything queued is written", async () => {
  const conn = new RecordingConn();
  conn.hold = true;
  const sender = new FrameSender(conn, OPTIONS);
  assert.equal(await isSettled(sender.drain()), true, "nothing queued");

  sender.send(pattern(0, 4), pattern(0, 40));
  sender.send(pattern(1, 4));
  const drained = sender.drain();
  for (let i = 0; i < 2; i++) {
    await settle();
    conn.releaseWrite();
    assert.equal(await isSettled(drained), false);
  }
  await settle();
  assert.equal(conn.heldWrites, 1);
  conn.releaseWrite();
  assert.equal(await isSettled(drained), true);
  assert.equal(sender.queuedBytes, 0);
  assert.equal(conn.writes.length, 3);
});

Deno.test("FrameSender breaks on a failing write: closed resolves and queued onSent callbacks run", async () => {
  const conn = new RecordingConn();
  const failure = new Error("connection reset");
  conn.failNext = failure;
  const sender = new FrameSender(conn, OPTIONS);
  const sent: string[] = [];
  sender.send(pattern(0, 4), pattern(0, 5), () => sent.push("small"));
  sender.send(pattern(1, 4), pattern(0, 40), () => sent.push("large 1"));
  sender.send(pattern(2, 4), pattern(0, 50), () => sent.push("large 2"));
  assert.deepEqual(sent, ["small"]);
  const writable = sender.whenWritable(); // over the limit: waits

  assert.equal(await sender.closed, failure);
  assert.equal(sender.broken, true);
  assert.deepEqual(sent, ["small", "large 1", "large 2"]);
  assert.equal(sender.queuedBytes, 0);
  assert.equal(await isSettled(writable), true, "a broken sender lets producers go");
  assert.equal(await isSettled(sender.drain()), true);
  assert.equal(conn.writes.length, 1, "nothing after the failure");
});

Deno.test("FrameSender runs a failed zero-copy payload's onSent exactly once", async () => {
  const conn = new RecordingConn();
  conn.hold = true;
  const sender = new FrameSender(conn, OPTIONS);
  let sent = 0;
  sender.send(pattern(0, 4), pattern(0, 40), () => sent++);
  await settle();
  conn.releaseWrite(); // the header
  await settle();
  conn.failNext = new Error("broken pipe");
  conn.releaseWrite(); // the payload fails
  await sender.closed;
  await settle();
  assert.equal(sent, 1);
  assert.equal(sender.broken, true);
});

Deno.test("FrameSender.send() after a failure only runs onSent", async () => {
  const conn = new RecordingConn();
  conn.failNext = new Error("gone");
  const sender = new FrameSender(conn, OPTIONS);
  sender.send(pattern(0, 4));
  await sender.closed;

  let sent = 0;
  sender.send(pattern(0, 4), pattern(0, 40), () => sent++);
  sender.send(pattern(0, 4), pattern(0, 4), () => sent++);
  sender.send(pattern(0, 4));
  assert.equal(sent, 2);
  assert.equal(sender.queuedBytes, 0);
  await settle();
  assert.equal(conn.writes.length, 1, "no write after the failure");
});

Deno.test("abort() during a zero-copy write releases the payload only when that write ends", async () => {
  const held: Array<() => void> = [];
  const conn = {
    write: (d: Uint8Array) => new Promise<number>((r) => held.push(() => r(d.length))),
    read: () => Promise.resolve(null),
    close() {},
  };
  const sender = new FrameSender(conn, {
    coalesceBytes: 64,
    zeroCopyBytesMin: 32,
    queueBytesMax: 48,
  });
  let released = 0;
  sender.send(new Uint8Array(4), new Uint8Array(40), () => (released += 1));
  await new Promise((r) => setTimeout(r, 0));
  held.shift()!(); // the header is written
  await new Promise((r) => setTimeout(r, 0)); // the payload's write is under way
  sender.abort(new Error("shutdown"));
  assert.equal(released, 0, "the socket may still be reading the payload");
  held.shift()!();
  await new Promise((r) => setTimeout(r, 0));
  assert.equal(released, 1, "released once the write ended");
});
