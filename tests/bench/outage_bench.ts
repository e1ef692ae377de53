/**
 * The bench's outage row: 4 KiB random writes, 32 in flight, from the DST client to a
 * `dst export` through the fault proxy, for RUN_SECONDS; in one run the link is cut
 * for CUT_MS in the middle, in the other it is not. The cut run must end with no
 * error; its rate over the time the link was up is compared with the uncut run's.
 * The client runs with --timeout 500, so the cut is found dead and the writes are
 * resent on a new connection after the heal (the proxy keeps a cut connection cut,
 * as a long partition would).
 *
 * Run alone with: deno run -A --unstable-net tests/bench/outage_bench.ts
 */

import { RemoteDevice } from "../../src/client/remote_device.ts";
import { FaultProxy } from "../helpers/fault_proxy.ts";
import { startExport } from "../helpers/spawn.ts";
import { silentLogger as quiet } from "../../src/lib/log.ts";

const MiB = 1024 * 1024;
const IMAGE_BYTES = 256 * MiB;
const DEPTH = 32;
const RUN_SECONDS = 6;
const CUT_AT_MS = 2_000;
const CUT_MS = 1_000;

export interface OutageRun {
  cut: boolean;
  ops: number;
  errors: number;
  seconds: number;
  /** Ops per second over the time the link was up (the cut's second left out). */
  upRatePerSecond: number;
  /** The longest time with no write completing. */
  longestStallMs: number;
  reconnects: number;
  resends: number;
}

async function run(address: { hostname: string; port: number }, cut: boolean): Promise<OutageRun> {
  const proxy = FaultProxy.start(address);
  const device = await RemoteDevice.connect(proxy.address, {
    timeoutMs: 500,
    retries: 3,
    log: quiet,
  });
  const blocks = IMAGE_BYTES / 4096;
  const buffers = Array.from({ length: DEPTH }, () => crypto.getRandomValues(new Uint8Array(4096)));
  let ops = 0;
  let errors = 0;
  let lastDoneMs = performance.now();
  let longestStallMs = 0;
  const started = performance.now();
  const until = started + RUN_SECONDS * 1000;
  const timers: ReturnType<typeof setTimeout>[] = [];
  if (cut) {
    timers.push(setTimeout(() => proxy.cut(), CUT_AT_MS));
    timers.push(setTimeout(() => proxy.heal(), CUT_AT_MS + CUT_MS));
  }
  const worker = async (slot: number) => {
    while (performance.now() < until) {
      const offset = Math.floor(Math.random() * blocks) * 4096;
      try {
        await device.write(offset, buffers[slot]!);
        ops += 1;
      } catch {
        errors += 1;
      }
      const now = performance.now();
      longestStallMs = Math.max(longestStallMs, now - lastDoneMs);
      lastDoneMs = now;
    }
  };
  await Promise.all(Array.from({ length: DEPTH }, (_, slot) => worker(slot)));
  const seconds = (performance.now() - started) / 1000;
  timers.forEach((timer) => clearTimeout(timer));
  const { reconnects, resends } = device.transportStats();
  await device.close();
  await proxy.close();
  const upSeconds = seconds - (cut ? CUT_MS / 1000 : 0);
  return {
    cut,
    ops,
    errors,
    seconds,
    upRatePerSecond: ops / upSeconds,
    longestStallMs,
    reconnects,
    resends,
  };
}

/** The uncut run, then the cut one, on one export. */
export async function benchOutage(): Promise<[OutageRun, OutageRun]> {
  const dir = await Deno.makeTempDir({ dir: "/dev/shm", prefix: "dst-bench-outage-" });
  const server = await startExport([
    `${dir}/outage.img`,
    "--create",
    String(IMAGE_BYTES),
    "--listen",
    "127.0.0.1:0",
  ]);
  try {
    const whole = await run(server.address, false);
    const withCut = await run(server.address, true);
    return [whole, withCut];
  } finally {
    await server.stop();
    await Deno.remove(dir, { recursive: true });
  }
}

export function printOutageBench([whole, withCut]: [OutageRun, OutageRun]): void {
  console.log(
    `\nOutage: 4 KiB random writes, ${DEPTH} in flight, ${RUN_SECONDS} s through a proxy; ` +
      `the link cut for ${CUT_MS} ms at ${CUT_AT_MS} ms in one run (client --timeout 500)`,
  );
  console.log(
    "| run | writes | errors | IOPS while the link was up | longest stall | reconnects | resent |",
  );
  console.log("|---|--:|--:|--:|--:|--:|--:|");
  for (const r of [whole, withCut]) {
    console.log(
      `| ${r.cut ? "cut for 1 s" : "no cut"} | ${r.ops.toLocaleString("en")} | ${r.errors} | ${
        Math.round(r.upRatePerSecond).toLocaleString("en")
      } | ${Math.round(r.longestStallMs)} ms | ${r.reconnects} | ${r.resends} |`,
    );
  }
  const ratio = withCut.upRatePerSecond / whole.upRatePerSecond;
  console.log(
    `cut run vs uncut, over the time the link was up: ${ratio.toFixed(2)}x; ` +
      `errors in the cut run: ${withCut.errors} (bar: 0) ${withCut.errors === 0 ? "✓" : "✗"}`,
  );
}

if (import.meta.main) printOutageBench(await benchOutage());
