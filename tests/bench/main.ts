/**
 * `deno task bench`: how fast the DST client and export are, client -> export over
 * loopback, on an image in /dev/shm. Prints a table: MiB/s of 1 MiB sequential
 * writes and reads, IOPS of 4 KiB random reads and writes with 32 in flight, and the
 * bytes the client's JS heap grew per operation (after a full GC, so it is what
 * stays, not what the collector will take back). Each figure is the median of 3 runs.
 * Then a run through a link cut for a second (outage_bench.ts), keyed channels against
 * plain ones and the export's memory under 64 keyed clients (keys_bench.ts), the NBD comparison
 * (nbd_peers.ts), the mirror's ratios (array_bench.ts) and the simulation's speed
 * (sim_bench.ts). Where one server is measured against another (DST against nbdkit, a
 * mirror against its baseline), each run alternates which goes first (alternate.ts).
 *
 * Every run that finishes writes its printed output, under a header saying when, at
 * which commit and on what machine it ran, to bench/results/YYYY-MM-DD.md (results.ts).
 *
 * Run with: deno task bench  (the task passes --v8-flags=--expose-gc)
 *
 * One section alone: deno task bench --only NAME, NAME one of client, outage, keys,
 * peers, array, sim. Its results file says so in its command line.
 */

import { RemoteDevice } from "../../src/client/remote_device.ts";
import { randomBytes } from "../helpers/random_bytes.ts";
import { startExport } from "../helpers/spawn.ts";
import { benchArray, printArrayBench } from "./array_bench.ts";
import { benchNbdPeers, printNbdPeers } from "./nbd_peers.ts";
import { benchOutage, printOutageBench } from "./outage_bench.ts";
import { benchSim, printSimBench } from "./sim_bench.ts";
import { captureConsole, RESULTS_DIR, runFacts, writeResults } from "./results.ts";
import { pipeline } from "./pipeline.ts";
import { benchKeys, printKeysBench } from "./keys_bench.ts";

const MiB = 1024 * 1024;
const IMAGE_BYTES = 1024 * MiB;
const SEQ_DEPTH = 8;
const RANDOM_DEPTH = 32;
const RANDOM_SECONDS = 2;
const RUNS = 3;

interface Measurement {
  perSecond: number;
  ops: number;
  heapBytesPerOp: number;
}

const gc = (globalThis as { gc?: () => void }).gc;

function heapUsed(): number {
  gc?.();
  return Deno.memoryUsage().heapUsed;
}

async function measure(run: () => Promise<number>, unitsPerOp: number): Promise<Measurement> {
  const heapBefore = heapUsed();
  const started = performance.now();
  const ops = await run();
  const seconds = (performance.now() - started) / 1000;
  const heapAfter = heapUsed();
  return {
    perSecond: (ops * unitsPerOp) / seconds,
    ops,
    heapBytesPerOp: (heapAfter - heapBefore) / ops,
  };
}

function median(values: Measurement[]): Measurement {
  const sorted = [...values].sort((a, b) => a.perSecond - b.perSecond);
  return sorted[Math.floor(sorted.length / 2)]!;
}

/** The client -> export section: runs it and prints its table. */
async function benchClient(): Promise<void> {
  const dir = await Deno.makeTempDir({ dir: "/dev/shm", prefix: "dst-bench-" });
  const image = `${dir}/bench.img`;
  const server = await startExport([
    image,
    "--create",
    String(IMAGE_BYTES),
    "--listen",
    "127.0.0.1:0",
  ]);
  const device = await RemoteDevice.connect(server.address);
  const big = randomBytes(MiB);
  const blocks = IMAGE_BYTES / 4096;
  const smalls = Array.from(
    { length: RANDOM_DEPTH },
    () => crypto.getRandomValues(new Uint8Array(4096)),
  );

  const sequential = (write: boolean) => () => {
    let at = 0;
    const buffers = Array.from({ length: SEQ_DEPTH }, () => new Uint8Array(MiB));
    let slot = 0;
    return pipeline(SEQ_DEPTH, () => {
      if (at >= IMAGE_BYTES) return null;
      const offset = at;
      at += MiB;
      slot = (slot + 1) % SEQ_DEPTH;
      return write ? device.write(offset, big) : device.read(offset, buffers[slot]!);
    });
  };
  const random = (write: boolean) => () => {
    const until = performance.now() + RANDOM_SECONDS * 1000;
    let slot = 0;
    return pipeline(RANDOM_DEPTH, () => {
      if (performance.now() >= until) return null;
      const offset = Math.floor(Math.random() * blocks) * 4096;
      slot = (slot + 1) % RANDOM_DEPTH;
      return write ? device.write(offset, smalls[slot]!) : device.read(offset, smalls[slot]!);
    });
  };

  const rows: Array<[string, string, Measurement]> = [];
  const phases: Array<[string, string, () => Promise<number>, number]> = [
    ["sequential write, 1 MiB, 8 in flight", "MiB/s", sequential(true), 1],
    ["sequential read, 1 MiB, 8 in flight", "MiB/s", sequential(false), 1],
    ["random write, 4 KiB, 32 in flight", "IOPS", random(true), 1],
    ["random read, 4 KiB, 32 in flight", "IOPS", random(false), 1],
  ];
  try {
    await sequential(true)(); // lay out the image so reads hit written pages
    for (const [name, unit, run, unitsPerOp] of phases) {
      const results: Measurement[] = [];
      for (let i = 0; i < RUNS; i++) results.push(await measure(run, unitsPerOp));
      rows.push([name, unit, median(results)]);
    }
  } finally {
    await device.close();
    await server.stop();
    await Deno.remove(dir, { recursive: true });
  }

  console.log(
    `\nDST bench: client -> dst export over loopback, image in /dev/shm, median of ${RUNS} runs`,
  );
  console.log(`${gc ? "" : "(heap figures without --expose-gc include garbage)\n"}`);
  console.log("| measurement | result | heap growth per op |");
  console.log("|---|--:|--:|");
  for (const [name, unit, m] of rows) {
    console.log(
      `| ${name} | ${Math.round(m.perSecond).toLocaleString("en")} ${unit} | ${
        m.heapBytesPerOp.toFixed(1)
      } B |`,
    );
  }
}

/** The sections, in the order a full run takes them; --only picks one by its name. */
const SECTIONS: Array<[string, () => Promise<void>]> = [
  ["client", benchClient],
  ["outage", async () => printOutageBench(await benchOutage())],
  ["keys", async () => printKeysBench(await benchKeys())],
  ["peers", async () => printNbdPeers(await benchNbdPeers())],
  ["array", async () => printArrayBench(await benchArray())],
  ["sim", async () => printSimBench(await benchSim())],
];

/** The section `--only NAME` (or `--only=NAME`) names; null: all of them. Throws on anything else. */
function parseOnly(args: string[]): string | null {
  const names = SECTIONS.map(([name]) => name);
  const usage = `usage: deno task bench [--only ${names.join("|")}]`;
  const words = args.flatMap((arg) =>
    arg.startsWith("--only=") ? ["--only", arg.slice("--only=".length)] : [arg]
  );
  if (words.length === 0) return null;
  const [flag, name] = words;
  if (words.length !== 2 || flag !== "--only") throw new Error(usage);
  if (!names.includes(name!)) throw new Error(`no section "${name}"; ${usage}`);
  return name!;
}

async function main(): Promise<void> {
  let only: string | null;
  try {
    only = parseOnly(Deno.args);
  } catch (error) {
    console.error((error as Error).message);
    Deno.exit(2);
  }
  // Taken before the run, so the header describes the code that ran.
  const facts = await runFacts(Deno.args);
  const started = new Date();
  const capture = captureConsole();
  try {
    for (const [name, run] of SECTIONS) {
      if (only === null || only === name) await run();
    }
  } finally {
    capture.stop();
  }
  // A run that failed part-way writes no file: a results file is always a whole run.
  const seconds = (Date.now() - started.getTime()) / 1000;
  const name = await writeResults(RESULTS_DIR, { ...facts, started, seconds }, capture.text());
  // On stderr, so stdout stays the bench's output alone.
  console.error(`bench: this run's output is kept in bench/results/${name}`);
}

await main();
