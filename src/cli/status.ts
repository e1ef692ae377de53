/**
 * `dst status HOST:PORT...`: what each export (or array) is doing, once or, with
 * `--watch`, every few seconds with rates until Ctrl-C.
 *
 * Owns: the command's options, querying the exports, and the watch loop (sampling,
 * signals, the terminal's cursor). Does not own: what the tables and documents look
 * like (status_view.ts).
 */

import { stringify as toYaml } from "yaml";
import { RemoteDevice } from "../client/remote_device.ts";
import { EXPORT_PORT_DEFAULT } from "../constants.ts";
import { formatHostPort, type HostPort, parseHostPort } from "../lib/address.ts";
import { describeError, UsageError } from "../lib/errors.ts";
import type { ExportStatus } from "../server/exporter.ts";
import { LOG_OPTIONS_HELP, parseCommand, stringOption } from "./args.ts";
import { CLIENT_KEY_HELP, CLIENT_KEY_OPTIONS, clientKey } from "./key_options.ts";
import type { Key } from "../lib/key_file.ts";
import {
  HIDE_CURSOR,
  renderFrame,
  renderStatus,
  type Row,
  type Sample,
  SHOW_CURSOR,
  watchDocument,
} from "./status_view.ts";

/** Seconds between samples when --watch has no value: quick enough to follow a resync. */
const WATCH_SECONDS_DEFAULT = 2;
/** An hour: past that, a cron job fits better than a process left watching. */
const WATCH_SECONDS_MAX = 3600;

export const STATUS_HELP =
  `Usage: dst status HOST:PORT... [--watch [SECONDS]] [--json | --yaml] [--key FILE [--key-name NAME]]

Shows each export's path, size, block size, read-only bit, who holds its write lease
(WRITER: the holder's address, "shared" with --shared-writers, "-" when free), clients,
transactions in flight, reads and writes (operations and bytes), errors and uptime. For an array's
export, also its kind and each member: a mirror leg's state (in-sync, resyncing with
progress, out-of-sync, detached; "(reconnecting)" when its connection is down), dirty
regions, requests in flight and errors.

  --watch [SECONDS]  query again every SECONDS (a whole number from 1 to ${WATCH_SECONDS_MAX},
                     default ${WATCH_SECONDS_DEFAULT}) until Ctrl-C, adding IOPS (reads and writes per
                     second) and MIB/S (bytes read and written per second) since the sample
                     before, and a progress bar for each resyncing mirror leg. On a terminal
                     the table is redrawn in place; otherwise each table follows a UTC
                     timestamp line. A value, if any, comes right after --watch
  --json   one JSON document: [{"address": ..., "status": {...}} or {"address": ..., "error": ...}];
           with --watch one line per interval: {"time": ..., "exports": [...]}, each
           answered export with "rates": {"iops": ..., "bytesPerSecond": ...} (null at first)
  --yaml   the same as YAML; with --watch one document per interval, each starting "---"
${CLIENT_KEY_HELP}
${LOG_OPTIONS_HELP}

Exit code: 1 when an address could not be queried (without --watch); 0 when --watch is
stopped with Ctrl-C (SIGINT) or SIGTERM; 2 for bad usage.

Example: dst status 10.0.0.5:1025 10.0.0.6:1025 --watch 5`;

/** A status query gives up fast: a person is waiting, and a dead export is itself the answer. */
const STATUS_TIMEOUT_MS = 3_000;

type Format = "table" | "json" | "yaml";

export async function statusCommand(argv: string[]): Promise<number> {
  const parsed = parseCommand("status", explicitWatch(argv), {
    json: { type: "boolean" },
    yaml: { type: "boolean" },
    watch: { type: "string" },
    ...CLIENT_KEY_OPTIONS,
  });
  if (parsed.values.help) {
    console.log(STATUS_HELP);
    return 0;
  }
  if (parsed.positionals.length === 0) {
    throw new UsageError(`needs at least one HOST:PORT\n\n${STATUS_HELP}`, "status");
  }
  if (parsed.values.json && parsed.values.yaml) {
    throw new UsageError("--json and --yaml are two formats: give one", "status");
  }
  const format: Format = parsed.values.json ? "json" : parsed.values.yaml ? "yaml" : "table";
  const watch = stringOption(parsed, "watch");
  const seconds = watch === undefined ? null : parseWatchSeconds(watch);
  const addresses = parsed.positionals.map((text) =>
    parseHostPort(text, "127.0.0.1", EXPORT_PORT_DEFAULT)
  );
  const key = await clientKey(parsed, "status");
  if (seconds !== null) return await watchStatus(addresses, key, format, seconds);
  const rows = await queryAll(addresses, key);
  console.log(
    format === "json"
      ? JSON.stringify(rows, null, 2)
      : format === "yaml"
      ? toYaml(rows).trimEnd()
      : renderStatus(rows),
  );
  return rows.some((row) => row.error !== undefined) ? 1 : 0;
}

/**
 * `argv` with `--watch [SECONDS]` written `--watch=SECONDS` (the default when no value
 * follows), as parseArgs knows no option with an optional value. The word after
 * --watch is its value unless it names an address with a port (has a colon) or is an
 * option; a host name without a port there is read as a value, and refused as one.
 */
export function explicitWatch(argv: string[]): string[] {
  const out: string[] = [];
  for (let i = 0; i < argv.length; i++) {
    const word = argv[i]!;
    if (word === "--") {
      out.push(...argv.slice(i));
      break;
    }
    if (word !== "--watch") {
      out.push(word);
      continue;
    }
    const next = argv[i + 1];
    const isValue = next !== undefined && !next.includes(":") && !/^-(-|[A-Za-z])/.test(next);
    out.push(`--watch=${isValue ? next : WATCH_SECONDS_DEFAULT}`);
    if (isValue) i++;
  }
  return out;
}

/** The --watch interval: a whole number of seconds from 1 to WATCH_SECONDS_MAX. */
export function parseWatchSeconds(text: string): number {
  const value = Number(text);
  if (/^\d+$/.test(text) && value >= 1 && value <= WATCH_SECONDS_MAX) return value;
  const hint = /^[A-Za-z]/.test(text)
    ? ` (to watch the export at ${text}, give it before --watch or as ${text}:${EXPORT_PORT_DEFAULT})`
    : "";
  throw new UsageError(
    `--watch takes a whole number of seconds from 1 to ${WATCH_SECONDS_MAX}, not "${text}"${hint}`,
    "status",
  );
}

/** Every address's answer, queried at once; one that cannot be queried says why. */
function queryAll(addresses: HostPort[], key: Key | undefined): Promise<Row[]> {
  return Promise.all(addresses.map(async (address): Promise<Row> => {
    const where = formatHostPort(address);
    try {
      return { address: where, status: await queryStatus(address, key) };
    } catch (error) {
      return { address: where, error: describeError(error) };
    }
  }));
}

async function queryStatus(address: HostPort, key: Key | undefined): Promise<ExportStatus> {
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

/**
 * Samples every `seconds` (a fresh connection each time, so an export that went away
 * and came back is simply answered again) and writes each interval, until SIGINT or
 * SIGTERM; then puts the terminal's cursor back and resolves 0.
 */
async function watchStatus(
  addresses: HostPort[],
  key: Key | undefined,
  format: Format,
  seconds: number,
): Promise<number> {
  const isTerminal = format === "table" && Deno.stdout.isTerminal();
  const stop = new AbortController();
  const stopped = new Promise<null>((resolve) =>
    stop.signal.addEventListener("abort", () => resolve(null))
  );
  const onSignal = () => stop.abort();
  const signals: Deno.Signal[] = Deno.build.os === "windows" ? ["SIGINT"] : ["SIGINT", "SIGTERM"];
  for (const signal of signals) Deno.addSignalListener(signal, onSignal);
  let previous: Sample | null = null;
  try {
    if (isTerminal) await write(HIDE_CURSOR);
    while (!stop.signal.aborted) {
      const startedMs = performance.now();
      const timeMs = Date.now();
      // A query may take up to its timeout: Ctrl-C does not wait for it.
      const rows = await Promise.race([queryAll(addresses, key), stopped]);
      if (rows === null) break;
      const current: Sample = { timeMs, rows };
      await write(
        format === "json"
          ? JSON.stringify(watchDocument(previous, current)) + "\n"
          : format === "yaml"
          ? "---\n" + toYaml(watchDocument(previous, current))
          : renderFrame(previous, current, { isTerminal, intervalSeconds: seconds }),
      );
      previous = current;
      const waitMs = Math.max(0, seconds * 1000 - (performance.now() - startedMs));
      await sleep(waitMs, stop.signal);
    }
  } catch (error) {
    // The reader went away (`| head`): that ends the watch as Ctrl-C would.
    if (!(error instanceof Deno.errors.BrokenPipe)) throw error;
  } finally {
    for (const signal of signals) Deno.removeSignalListener(signal, onSignal);
    if (isTerminal) await write(SHOW_CURSOR).catch(() => {});
  }
  return 0;
}

/** Writes all of `text` to stdout (a frame at a time, so a reader never sees half of one). */
async function write(text: string): Promise<void> {
  const bytes = new TextEncoder().encode(text);
  for (let done = 0; done < bytes.length;) done += await Deno.stdout.write(bytes.subarray(done));
}

/** Resolves after `ms`, or at once when `signal` aborts. */
function sleep(ms: number, signal: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    if (signal.aborted) return resolve();
    const timer = setTimeout(done, ms);
    signal.addEventListener("abort", done, { once: true });
    function done() {
      clearTimeout(timer);
      signal.removeEventListener("abort", done);
      resolve();
    }
  });
}
