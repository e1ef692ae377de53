/** `dst status HOST:PORT...`: what each export (or array) is doing. */

import type { LinearStatus } from "../array/linear.ts";
import type { MirrorStatus } from "../array/mirror.ts";
import { RemoteDevice } from "../client/remote_device.ts";
import { EXPORT_PORT_DEFAULT } from "../constants.ts";
import { formatHostPort, parseHostPort } from "../lib/address.ts";
import { describeError, UsageError } from "../lib/errors.ts";
import { formatBytes, formatDuration } from "../lib/units.ts";
import type { ExportStatus } from "../server/exporter.ts";
import { parseCommand } from "./args.ts";
import { CLIENT_KEY_HELP, CLIENT_KEY_OPTIONS, clientKey } from "./key_options.ts";
import type { Key } from "../lib/key_file.ts";
import { formatTable } from "./table.ts";
import { printable } from "../lib/printable.ts";

export const STATUS_HELP = `Usage: dst status HOST:PORT... [--json] [--key FILE [--key-name NAME]]

Shows each export's path, size, block size, read-only bit, who holds its write lease
(WRITER: the holder's address, "shared" with --shared-writers, "-" when free), clients,
transactions in flight, reads and writes (operations and bytes), errors and uptime. For an array's
export, also its kind and each member: a mirror leg's state (in-sync, resyncing with
progress, out-of-sync, detached; "(reconnecting)" when its connection is down), dirty
regions, requests in flight and errors.

  --json   one JSON document: [{"address": ..., "status": {...}} or {"address": ..., "error": ...}]
${CLIENT_KEY_HELP}

Example: dst status 10.0.0.5:1025 10.0.0.6:1025`;

/** A status query gives up fast: a person is waiting, and a dead export is itself the answer. */
const STATUS_TIMEOUT_MS = 3_000;

interface Row {
  address: string;
  status?: ExportStatus;
  error?: string;
}

export async function statusCommand(argv: string[]): Promise<number> {
  const parsed = parseCommand("status", argv, {
    json: { type: "boolean" },
    ...CLIENT_KEY_OPTIONS,
  });
  if (parsed.values.help) {
    console.log(STATUS_HELP);
    return 0;
  }
  if (parsed.positionals.length === 0) {
    throw new UsageError(`needs at least one HOST:PORT\n\n${STATUS_HELP}`, "status");
  }
  const addresses = parsed.positionals.map((text) =>
    parseHostPort(text, "127.0.0.1", EXPORT_PORT_DEFAULT)
  );
  const key = await clientKey(parsed, "status");
  const rows = await Promise.all(addresses.map(async (address): Promise<Row> => {
    const where = formatHostPort(address);
    try {
      return { address: where, status: await queryStatus(address, key) };
    } catch (error) {
      return { address: where, error: describeError(error) };
    }
  }));
  console.log(parsed.values.json ? JSON.stringify(rows, null, 2) : renderStatus(rows));
  return rows.some((row) => row.error !== undefined) ? 1 : 0;
}

async function queryStatus(
  address: { hostname: string; port: number },
  key: Key | undefined,
): Promise<ExportStatus> {
  const device = await RemoteDevice.connect(address, {
    key,
    timeoutMs: STATUS_TIMEOUT_MS,
    retries: 0,
    pingMs: 60_000,
    writer: false,
  });
  try {
    return await device.queryStatus() as ExportStatus;
  } finally {
    await device.close();
  }
}

export function renderStatus(rows: Row[]): string {
  const table = formatTable(
    [
      "ADDRESS",
      "PATH",
      "SIZE",
      "BLOCK",
      "MODE",
      "WRITER",
      "CLIENTS",
      "IN FLIGHT",
      "READS",
      "READ",
      "WRITES",
      "WRITTEN",
      "ERRORS",
      "UPTIME",
    ],
    rows.filter((row) => row.status !== undefined).map(({ address, status: s }) => [
      address,
      s!.name,
      formatBytes(s!.sizeBytes),
      String(s!.blockSize),
      s!.readOnly ? "ro" : "rw",
      writerOf(s!),
      String(s!.clients),
      String(s!.inFlight),
      String(s!.reads),
      formatBytes(s!.readBytes),
      String(s!.writes),
      formatBytes(s!.writtenBytes),
      String(s!.errors),
      formatDuration(s!.uptimeMs),
    ]),
  );
  const arrays = rows.filter((row) => row.status?.array !== undefined).map((row) =>
    renderArray(row.address, row.status!.array as ArrayStatus)
  );
  const failures = rows.filter((row) => row.error !== undefined).map((row) =>
    `${row.address}: ${printable(row.error ?? "")}`
  );
  return [
    table,
    ...arrays,
    ...(failures.length === 0 ? [] : [`unreachable:\n${failures.join("\n")}`]),
  ].join("\n\n");
}

/** Who may write: the lease holder's address, "shared" (--shared-writers), or "-" (nobody now). */
function writerOf(status: ExportStatus): string {
  if (status.sharedWriters) return "shared";
  const lease = status.writeLease;
  return lease === null ? "-" : lease.peer;
}

/** What an array's export adds to its STATUS. */
type ArrayStatus = MirrorStatus | LinearStatus;

function renderArray(address: string, array: ArrayStatus): string {
  if (array.kind === "linear") {
    return `${address}: linear array, ${formatBytes(array.sizeBytes)}\n` + formatTable(
      ["MEMBER", "START", "SIZE"],
      array.members.map((m) => [m.name, formatBytes(m.startBytes), formatBytes(m.sizeBytes)]),
    );
  }
  const degraded = array.members.some((m) =>
    m.state !== "detached" && (m.state !== "in-sync" || m.connected === false)
  );
  return `${address}: mirror, ${formatBytes(array.sizeBytes)}, regions of ${
    formatBytes(array.regionBytes)
  }${degraded ? " (degraded)" : ""}\n` + formatTable(
    ["LEG", "STATE", "DIRTY REGIONS", "IN FLIGHT", "ERRORS", "NOTE"],
    array.members.map((m) => {
      const r = m.resync;
      const state = m.state === "resyncing" && r !== undefined
        ? `resyncing ${Math.floor((100 * r.regionsDone) / Math.max(r.regionsTotal, 1))}%`
        : m.state;
      // An export that went away shows at once, before any request fails and the mode
      // changes. (`connected` is missing from an older export's STATUS: no claim then.)
      const link = m.connected === false && m.state !== "detached" ? " (reconnecting)" : "";
      const note = r !== undefined
        ? `${r.regionsDone}/${r.regionsTotal} regions, ${formatBytes(r.bytesPerSecond)}/s` +
          (r.etaMs === null ? "" : `, ${formatDuration(r.etaMs)} left`)
        : m.reason ?? "";
      return [
        m.name,
        state + link,
        String(m.dirtyRegions),
        String(m.inFlight),
        String(m.errors),
        note,
      ];
    }),
  );
}
