/**
 * The byte stream the protocol runs over. Deno.Conn (TCP or Unix) satisfies it; tests
 * may pass anything else that does. Nothing above this file names Deno.Conn.
 */

import { ConnectionClosedError } from "../lib/errors.ts";

export interface ByteConn {
  read(into: Uint8Array): Promise<number | null>;
  write(data: Uint8Array): Promise<number>;
  close(): void;
}

export async function writeAll(conn: ByteConn, data: Uint8Array): Promise<void> {
  let written = 0;
  while (written < data.length) {
    written += await conn.write(data.subarray(written));
  }
}

/** Reads exactly `into.length` bytes, or throws when the stream ends first. */
export async function readExact(conn: ByteConn, into: Uint8Array): Promise<void> {
  let filled = 0;
  while (filled < into.length) {
    const n = await conn.read(into.subarray(filled));
    if (n === null) {
      throw new ConnectionClosedError(`connection closed after ${filled} of ${into.length} bytes`);
    }
    filled += n;
  }
}

/** Closes without throwing: closing an already closed connection is not an error here. */
export function closeQuietly(conn: { close(): void }): void {
  try {
    conn.close();
  } catch {
    // Already closed.
  }
}
