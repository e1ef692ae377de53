/**
 * Socket calls for the test proxies that report how a stream ended instead of
 * throwing: a proxy forwards an end or a reset as it saw it.
 */

/** How a stream ended: "fin" for an orderly end, "broken" for an error. */
export type Ending = "fin" | "broken";

/** Bytes read, or how the stream ended: "fin" for an orderly end, "broken" for an error. */
export async function readQuietly(conn: Deno.TcpConn, into: Uint8Array): Promise<number | Ending> {
  try {
    return (await conn.read(into)) ?? "fin";
  } catch {
    return "broken";
  }
}

/** Writes all of `bytes` and returns how many went out: fewer means the write failed. */
export async function writeQuietly(conn: Deno.TcpConn, bytes: Uint8Array): Promise<number> {
  let written = 0;
  try {
    while (written < bytes.length) written += await conn.write(bytes.subarray(written));
  } catch {
    // The peer closed or reset: the caller sees the short count.
  }
  return written;
}

export async function closeWriteQuietly(conn: Deno.TcpConn): Promise<boolean> {
  try {
    await conn.closeWrite();
    return true;
  } catch {
    return false;
  }
}
