/**
 * What `dst status` shows: the exports table and an array's members, and for
 * `--watch` the rates between two samples, a resync's progress bar, one frame for a
 * terminal (redrawn in place) or for a pipe (a timestamp line, then the tables), and
 * the document a script reads per interval.
 *
 * Owns: turning STATUS documents into text and documents. Does not own: querying the
 * exports, the options or the watch loop (status.ts), padding columns (table.ts).
 */

import type { LinearStatus } from "../array/linear.ts";
import type { MirrorLegStatus, MirrorStatus, ResyncProgress } from "../array/mirror.ts";
import { assert } from "../lib/assert.ts";
import { printable } from "../lib/printable.ts";
import { formatBytes, formatDuration } from "../lib/units.ts";
import type { ExportStatus } from "../server/exporter.ts";
import { formatTable } from "./table.ts";
import { plural } from "../lib/plural.ts";

/** One address's answer: its STATUS, or why it could not be queried. */
export interface Row {
  address: string;
  status?: ExportStatus;
  error?: string;
}

/** One round of queries to every address, and when it began (milliseconds since the epoch). */
export interface Sample {
  timeMs: number;
  rows: Row[];
}

/** What an export did per second between two samples. */
export interface Rates {
  /** Reads and writes per second. */
  iops: number;
  /** Bytes read and written per second. */
  bytesPerSecond: number;
}

/** A row of a --watch document: the row, and its rates since the sample before (null: none yet). */
export type WatchRow = Row & { rates?: Rates | null };

/** What `--watch --json` prints as one line per interval (and `--watch --yaml` as one document). */
export interface WatchDocument {
  time: string;
  exports: WatchRow[];
}

const MiB = 1024 * 1024;

/** The cells of a progress bar: ten, so each `#` is a tenth. */
const PROGRESS_BAR_CELLS = 10;

/**
 * An export's rates between two of its STATUS documents, timed by its own uptime (so the
 * time the queries took does not count). Null when there is nothing to compare: no
 * earlier answer, another export process at that address (restarted), or no time passed.
 */
export function ratesBetween(before: ExportStatus | undefined, after: ExportStatus): Rates | null {
  if (before === undefined || before.exportId !== after.exportId) return null;
  const seconds = (after.uptimeMs - before.uptimeMs) / 1000;
  const operations = after.reads + after.writes - before.reads - before.writes;
  const bytes = after.readBytes + after.writtenBytes - before.readBytes - before.writtenBytes;
  // Counters only grow within one export process: a drop means it restarted.
  if (seconds <= 0 || operations < 0 || bytes < 0) return null;
  return { iops: operations / seconds, bytesPerSecond: bytes / seconds };
}

/** Each row of `current` with its rates since `previous` (matched by address). */
export function watchRows(previous: Sample | null, current: Sample): WatchRow[] {
  return current.rows.map((row) => {
    if (row.status === undefined) return row;
    const before = previous?.rows.find((r) => r.address === row.address)?.status;
    return { ...row, rates: ratesBetween(before, row.status) };
  });
}

/** The document a script gets for `current` (JSON: one line; YAML: one document). */
export function watchDocument(previous: Sample | null, current: Sample): WatchDocument {
  return { time: timestamp(current.timeMs), exports: watchRows(previous, current) };
}

/** "2026-12-01T05:03:00Z": when a sample was taken, in UTC to the second. */
export function timestamp(timeMs: number): string {
  return new Date(timeMs).toISOString().replace(/\.\d{3}Z$/, "Z");
}

/** "1211/4096 regions, 385.3 MiB/s, 7.5s left": how a resync is going. */
export function resyncNote(r: ResyncProgress): string {
  const regions = `${r.regionsDone}/${plural(r.regionsTotal, "region")}`;
  return `${regions}, ${formatBytes(r.bytesPerSecond)}/s` +
    (r.etaMs === null ? "" : `, ${formatDuration(r.etaMs)} left`);
}

/** `[#####.....] 52%`: how far `done` of `total` is (an empty total counts as done). */
export function progressBar(done: number, total: number): string {
  assert(done >= 0, "progress is never negative");
  assert(done <= total || total === 0, "progress never passes its total");
  const fraction = total === 0 ? 1 : done / total;
  const filled = Math.floor(fraction * PROGRESS_BAR_CELLS);
  return `[${"#".repeat(filled)}${".".repeat(PROGRESS_BAR_CELLS - filled)}] ` +
    `${Math.floor(fraction * 100)}%`;
}

export interface FrameOptions {
  /** A terminal gets the frame redrawn in place; anything else gets it appended. */
  isTerminal: boolean;
  intervalSeconds: number;
}

/** Moves the cursor home; each line then clears what is left of the line before it. */
const CURSOR_HOME = "\x1b[H";
const CLEAR_LINE_END = "\x1b[K";
const CLEAR_SCREEN_END = "\x1b[J";
export const HIDE_CURSOR = "\x1b[?25l";
export const SHOW_CURSOR = "\x1b[?25h";

/**
 * One interval of `dst status --watch`, rates from `previous` to `current` ("-" on the
 * first). On a terminal it overwrites the frame before (cursor home, each line's end and
 * the rest of the screen cleared: no flicker); elsewhere it is a timestamp line and the
 * tables, with no escape codes, ending in a blank line.
 */
export function renderFrame(
  previous: Sample | null,
  current: Sample,
  options: FrameOptions,
): string {
  const body = renderStatus(watchRows(previous, current), { watching: true });
  if (!options.isTerminal) return `${timestamp(current.timeMs)}\n${body}\n\n`;
  const header = `every ${options.intervalSeconds}s: dst status ${
    current.rows.map((row) => row.address).join(" ")
  }    ${timestamp(current.timeMs)}    (Ctrl-C to stop)`;
  const lines = [header, "", ...body.split("\n")];
  return CURSOR_HOME + lines.map((line) => line + CLEAR_LINE_END).join("\n") + "\n" +
    CLEAR_SCREEN_END;
}

export interface RenderOptions {
  /** With --watch: IOPS and MIB/S columns (from each row's rates), and progress bars. */
  watching?: boolean;
}

/**
 * The exports table (none when no export answered), then each array's members, then the
 * addresses that did not answer.
 */
export function renderStatus(rows: WatchRow[], options: RenderOptions = {}): string {
  const watching = options.watching ?? false;
  const answered = rows.filter((row) => row.status !== undefined);
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
      ...(watching ? ["IOPS", "MIB/S"] : []),
      "READS",
      "READ",
      "WRITES",
      "WRITTEN",
      "ERRORS",
      "UPTIME",
    ],
    answered.map((row) => {
      const s = row.status!;
      return [
        row.address,
        s.name,
        formatBytes(s.sizeBytes),
        String(s.blockSize),
        s.readOnly ? "ro" : "rw",
        writerOf(s),
        String(s.clients),
        String(s.inFlight),
        ...(watching ? rateCells(row.rates ?? null) : []),
        String(s.reads),
        formatBytes(s.readBytes),
        String(s.writes),
        formatBytes(s.writtenBytes),
        String(s.errors),
        formatDuration(s.uptimeMs),
      ];
    }),
  );
  const arrays = rows.filter((row) => row.status?.array !== undefined).map((row) =>
    renderArray(row.address, row.status!.array as ArrayStatus, watching)
  );
  const failures = rows.filter((row) => row.error !== undefined).map((row) =>
    `${row.address}: ${printable(row.error ?? "")}`
  );
  return [
    // No export answered: the header alone would read as an empty answer.
    ...(answered.length === 0 ? [] : [table]),
    ...arrays,
    ...(failures.length === 0 ? [] : [`unreachable:\n${failures.join("\n")}`]),
  ].join("\n\n");
}

/** IOPS as a whole number, MiB/s to a tenth; "-" for both before there are two samples. */
function rateCells(rates: Rates | null): string[] {
  if (rates === null) return ["-", "-"];
  return [String(Math.round(rates.iops)), (rates.bytesPerSecond / MiB).toFixed(1)];
}

/** Who may write: the lease holder's address, "shared" (--shared-writers), or "-" (nobody now). */
function writerOf(status: ExportStatus): string {
  if (status.sharedWriters) return "shared";
  const lease = status.writeLease;
  return lease === null ? "-" : lease.peer;
}

/** What an array's export adds to its STATUS. */
type ArrayStatus = MirrorStatus | LinearStatus;

function renderArray(address: string, array: ArrayStatus, bars: boolean): string {
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
      const note = r !== undefined ? resyncNote(r) : m.reason ?? "";
      return [
        m.name,
        legState(m, bars),
        String(m.dirtyRegions),
        String(m.inFlight),
        String(m.errors),
        note,
      ];
    }),
  );
}

/** "in-sync", "resyncing 52%" (or with a bar), and "(reconnecting)" while its connection is down. */
function legState(m: MirrorLegStatus, bars: boolean): string {
  const r = m.resync;
  let state: string = m.state;
  if (m.state === "resyncing" && r !== undefined) {
    state = bars
      ? `resyncing ${progressBar(r.regionsDone, r.regionsTotal)}`
      : `resyncing ${Math.floor((100 * r.regionsDone) / Math.max(r.regionsTotal, 1))}%`;
  }
  // An export that went away shows at once, before any request fails and the mode
  // changes. (`connected` is missing from an older export's STATUS: no claim then.)
  return m.connected === false && m.state !== "detached" ? `${state} (reconnecting)` : state;
}
