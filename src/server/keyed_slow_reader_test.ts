/**
 * A client that reads its replies slowly but steadily (256 KiB/s, the slow link the
 * frame timeout is sized for) is not taken for one that reads none: a 32 MiB READ
 * goes on being sent, keyed or not. Keyed, the record layer must show the socket's
 * progress record by record, not once per whole frame. On a manual clock.
 */

import assert from "node:assert/strict";
import { MemoryDevice } from "../device/memory_device.ts";
import { BufferPool } from "../lib/buffer_pool.ts";
import { Command, PROTECTION_ENCRYPT } from "../protocol/mod.ts";
import { type ByteConn, writeAll } from "../transport/byte_conn.ts";
import { SecureConn } from "../transport/secure_conn.ts";
import { ManualClock } from "../../tests/helpers/manual_clock.ts";
import { RawClient } from "../../tests/helpers/raw_client.ts";
import { ExportConnection } from "./export_connection.ts";
import { standaloneExportContext } from "../../tests/helpers/export_context.ts";
import { silentLogger } from "../lib/log.ts";

/** Bytes the client takes per simulated second. */
const RATE = 256 * 1024;
const READ_BYTES = 32 * 1024 * 1024;
const SECONDS = 140;

/** The export's side of a link the client drains at RATE: one tick is one second. */
class SlowLink implements ByteConn {
  readonly inbox: Uint8Array[] = [];
  #pending: { data: Uint8Array; resolve: (n: number) => void } | null = null;
  closed = false;

  read(into: Uint8Array): Promise<number | null> {
    const head = this.inbox.shift();
    if (head === undefined) return new Promise(() => {}); // the client sends nothing more
    into.set(head.subarray(0, into.length));
    if (head.length > into.length) this.inbox.unshift(head.subarray(into.length));
    return Promise.resolve(Math.min(head.length, into.length));
  }

  write(data: Uint8Array): Promise<number> {
    if (this.closed) return Promise.reject(new Error("closed"));
    return new Promise((resolve) => this.#pending = { data, resolve });
  }

  tick(): void {
    const pending = this.#pending;
    if (pending === null) return;
    this.#pending = null;
    pending.resolve(Math.min(RATE, pending.data.length));
  }

  close(): void {
    this.closed = true;
  }
}

async function settle(): Promise<void> {
  for (let i = 0; i < 5; i++) await new Promise((resolve) => setTimeout(resolve, 0));
}

/** Seconds until the export closed the connection, or null if it was still sending at the end. */
async function closedAfter(keyed: boolean): Promise<number | null> {
  const link = new SlowLink();
  const clock = new ManualClock();
  const key = crypto.getRandomValues(new Uint8Array(32));
  const options = { protection: PROTECTION_ENCRYPT, sendKey: key, receiveKey: key };
  const request = RawClient.frame({
    command: Command.READ,
    flags: 0,
    txId: 1,
    offset: 0,
    length: READ_BYTES,
    payloadLength: 0,
  });
  if (keyed) {
    const client = new SecureConn({
      read: () => new Promise(() => {}),
      write: (data) => {
        link.inbox.push(data.slice());
        return Promise.resolve(data.length);
      },
      close() {},
    }, { ...options, peer: "the export" });
    await writeAll(client, request);
  } else {
    link.inbox.push(request);
  }
  const connection = new ExportConnection(
    keyed ? new SecureConn(link, { ...options, peer: "the client" }) : link,
    "peer",
    standaloneExportContext({
      device: new MemoryDevice(READ_BYTES),
      pool: new BufferPool(0),
      log: silentLogger,
      clock,
    }),
  );
  void connection.serve();
  for (let second = 1; second <= SECONDS; second++) {
    await settle();
    link.tick();
    await settle();
    clock.advance(1000);
    await settle();
    if (link.closed) return second;
  }
  connection.fence();
  return null;
}

Deno.test("a 32 MiB READ to a client reading at 256 KiB/s goes on being sent (unkeyed)", async () => {
  assert.equal(await closedAfter(false), null);
});

Deno.test("a 32 MiB READ to a client reading at 256 KiB/s goes on being sent (keyed)", async () => {
  assert.equal(await closedAfter(true), null);
});
