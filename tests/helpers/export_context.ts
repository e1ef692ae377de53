/**
 * The context an ExportConnection needs, for tests that serve one connection on its
 * own: their device, pool, log and clock; no writer lease, no owner, full access.
 */

import type { ExportContext } from "../../src/server/export_connection.ts";

export function standaloneExportContext(
  parts: Pick<ExportContext, "device" | "pool" | "log" | "clock">,
): ExportContext {
  return {
    ...parts,
    statusJson: () => new Uint8Array(),
    countError() {},
    acquire: null,
    grant: null,
    ended() {},
    control: null,
    access: "rw",
  };
}
