/**
 * Starting `dst array` from tests, and waiting for a mirror's legs through its
 * STATUS document (what `dst status --json` prints as `status.array`).
 */

import type { MirrorLegStatus, MirrorStatus } from "../../src/array/mirror.ts";
import { RemoteDevice } from "../../src/client/remote_device.ts";
import { formatHostPort, type HostPort, parseHostPort } from "../../src/lib/address.ts";
import type { ExportStatus } from "../../src/server/exporter.ts";
import { runDst, type RunningExport, startDst } from "./spawn.ts";
import { silentLogger as quiet } from "../../src/lib/log.ts";

export type { MirrorLegStatus, MirrorStatus };

export interface RunningArray extends RunningExport {
  /** The startup line up to " on HOST:PORT" ("dst array: serving mirror of 2 legs (...)"). */
  line: string;
}

/** Spawns `dst array ARGS...` and waits for " on HOST:PORT" (and, with --nbd, the NBD line). */
export async function startArray(args: string[]): Promise<RunningArray> {
  const ready = args.includes("--nbd")
    ? /^(.*) on (\S+)\n[^]*as NBD[^\n]* at (\S+)\n/m
    : /^(.*) on (\S+)\n/m;
  const running = await startDst(["array", ...args], ready);
  return {
    ...running,
    line: running.ready[1]!,
    address: parseHostPort(running.ready[2]!, "127.0.0.1"),
    nbdUri: running.ready[3] ?? null,
  };
}

/**
 * A new mirror of `legs` that serves DST on a free port: the first leg is the source
 * (its data is copied to the others) and the state goes to `stateDir`. `extra` adds
 * options (--nbd, client options...).
 */
export function startNewMirror(
  legs: string[],
  stateDir: string,
  ...extra: string[]
): Promise<RunningArray> {
  return startArray([
    "mirror",
    ...legs,
    "--source",
    legs[0]!,
    "--state",
    stateDir,
    "--export",
    "127.0.0.1:0",
    ...extra,
  ]);
}

/** "127.0.0.1:PORT": how a member or an array is named on a command line. */
export function memberName(address: HostPort): string {
  return formatHostPort(address);
}

/** The `array` part of the STATUS document of the mirror served at `address`. */
export async function mirrorStatus(address: HostPort): Promise<MirrorStatus> {
  const device = await RemoteDevice.connect(address, {
    timeoutMs: 2000,
    retries: 0,
    pingMs: 60_000,
    log: quiet,
    writer: false,
  });
  try {
    const status = await device.queryStatus() as ExportStatus;
    const array = status.array as MirrorStatus | undefined;
    if (array === undefined || array.kind !== "mirror") {
      throw new Error(`${formatHostPort(address)} is not a mirror: ${JSON.stringify(status)}`);
    }
    return array;
  } finally {
    await device.close();
  }
}

/** The same, through the CLI: `dst status ADDR --json`. */
export async function mirrorStatusCli(address: HostPort): Promise<MirrorStatus> {
  const result = await runDst(["status", formatHostPort(address), "--json"]);
  if (result.code !== 0) {
    throw new Error(`dst status exited ${result.code}:\n${result.stdout}${result.stderr}`);
  }
  const rows = JSON.parse(result.stdout) as Array<{ status?: { array?: MirrorStatus } }>;
  const array = rows[0]?.status?.array;
  if (array === undefined) throw new Error(`no array in dst status: ${result.stdout}`);
  return array;
}

export const allInSync = (status: MirrorStatus): boolean =>
  status.members.every((member) => member.state === "in-sync");

/** Every leg in sync, and every mark swept (regions idle long enough to be cleared). */
export const allInSyncAndClean = (status: MirrorStatus): boolean =>
  allInSync(status) && status.members.every((member) => member.dirtyRegions === 0);

/**
 * Polls the mirror's status until `predicate` holds (by default: every leg in sync)
 * and returns that status; throws with the last status after `timeoutMs`.
 */
export async function waitForMirror(
  address: HostPort,
  predicate: (status: MirrorStatus) => boolean = allInSync,
  timeoutMs = 15_000,
): Promise<MirrorStatus> {
  const until = performance.now() + timeoutMs;
  let last: MirrorStatus | null = null;
  let lastError: unknown = null;
  for (;;) {
    try {
      last = await mirrorStatus(address);
      if (predicate(last)) return last;
    } catch (error) {
      lastError = error;
    }
    if (performance.now() > until) {
      throw new Error(
        `timed out after ${timeoutMs} ms waiting for the mirror at ${formatHostPort(address)}; ` +
          `last status: ${JSON.stringify(last)}` +
          (lastError === null ? "" : `; last error: ${lastError}`),
      );
    }
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}

/** The status of the leg called `name` (throws if there is none). */
export function leg(status: MirrorStatus, name: string): MirrorLegStatus {
  const found = status.members.find((member) => member.name === name);
  if (found === undefined) {
    throw new Error(`no leg ${name} in ${JSON.stringify(status.members)}`);
  }
  return found;
}
