/**
 * The mirror part of `deno task bench`: what `dst array mirror` costs and gains,
 * each figure as a ratio against its baseline, with the bar it should meet.
 *
 *   1. Write throughput through a mirror of two exports vs one export, all on
 *      loopback: sequential 1 MiB writes, 8 in flight, over a 1 GiB image in /dev/shm,
 *      through a RemoteDevice (median of 3, alternating). Bar: mirror >= 0.7x. This is
 *      CPU-bound: on a 2-core machine the client, the array and two exports share the
 *      cores, and the mirror sends every byte twice, so it shows what the mirror costs
 *      in CPU.
 *   2. Write throughput through a mirror of two legs vs one leg, each leg's export in
 *      its own network namespace behind a veth shaped to 200 Mbit/s each way (tbf):
 *      sequential 1 MiB writes, 8 in flight, over 64 MiB (median of 3, alternating).
 *      Bar: mirror >= 0.7x. This is the deployment case, legs on other nodes and the
 *      network the bottleneck: a mirror that writes its legs in parallel takes about
 *      as long as its slower leg (~1.0x); one that wrote them one after the other
 *      would show ~0.5x.
 *   3. Read throughput from a mirror of two legs vs one leg, over the same shaped
 *      legs: sequential 1 MiB reads, 16 in flight, over 64 MiB (median of 3,
 *      alternating). Bar: mirror >= 1.7x (reads are spread over both links).
 *   4. Resync time after 1% of the regions were written while a leg was detached
 *      (`dst array detach`, writes, `dst array attach`) vs the full resync of a new
 *      mirror (--source), both timed by the array's own log lines (resync start to
 *      "is in sync"). Bar: 1% resync <= 5% of the full one.
 *
 * In rows 1 to 3 the mirror and its baseline run side by side, and each run measures
 * both, alternating which goes first (alternate.ts), so the machine's drift falls on
 * both alike. The baseline is therefore an export of its own, like the legs but not
 * one of them: the mirror holds its legs' write lease, so a writer straight to a leg
 * would be refused while the mirror runs.
 *
 * Rows 1 and 4 share one pair of exports and the baseline's third one: the mirror is
 * made (its initial copy is row 4's full resync), its writes are paired with the
 * baseline's, and a leg is detached and attached again. Rows 2 and 3 share one set of
 * shaped legs, two for the mirror and one alone (withShapedLegs), and need root and
 * iproute2; where the namespaces cannot be made, both are skipped with a line saying
 * why. Every image is written once before timing, so first-touch page allocation in
 * tmpfs is not measured.
 *
 * Run alone with: deno task bundle && deno run -A tests/bench/array_bench.ts
 */

import { RemoteDevice, type RemoteDeviceOptions } from "../../src/client/remote_device.ts";
import { formatHostPort, type HostPort, parseHostPort } from "../../src/lib/address.ts";
import { randomBytes } from "../helpers/random_bytes.ts";
import {
  freshBundle,
  runDst,
  type RunningDst,
  type RunningExport,
  serving,
  startExport,
  TEST_STATE_HOME,
} from "../helpers/spawn.ts";
import { tool } from "../helpers/tools.ts";
import { alternating, type Paired } from "./alternate.ts";
import {
  allInSync,
  allInSyncAndClean,
  type RunningArray,
  startNewMirror,
  waitForMirror,
} from "../helpers/array.ts";

const MiB = 1024 * 1024;
const RUNS = 3;

/** Rows 1 and 4: the image of each local leg (1024 regions of the default 1 MiB). */
const LOCAL_IMAGE_BYTES = 1024 * MiB;
const DIRTY_FRACTION = 0.01;

/** Rows 1 and 2. */
const WRITE_DEPTH = 8;

/** Rows 2 and 3: the image of each shaped leg, and the link. */
const SHAPED_IMAGE_BYTES = 64 * MiB;
const READ_DEPTH = 16;
const LINK_RATE = "200mbit";

/** How long a mirror may take to get every leg in sync before the bench gives up. */
const SYNC_TIMEOUT_MS = 90_000;

export interface ArrayRow {
  measurement: string;
  result: string;
  baseline: string;
  /** result / baseline. */
  ratio: number;
  /** How the ratio is shown ("0.85x", "1.9%"). */
  ratioText: string;
  bar: string;
  met: boolean;
}

export interface ArrayBench {
  rows: ArrayRow[];
  /** Lines printed under the table: skipped rows and their reasons, how reads split, ... */
  notes: string[];
}

/** Runs the four measurements; a row that cannot run here is left out, with a note saying why. */
export async function benchArray(): Promise<ArrayBench> {
  const notes: string[] = [];
  const dir = await Deno.makeTempDir({ dir: "/dev/shm", prefix: "dst-bench-array-" });
  try {
    const local = await benchLocalMirror(dir);
    const shaped = await benchShapedLegs(dir);
    const rows = [local.write];
    if (typeof shaped === "string") {
      notes.push(shaped);
    } else {
      rows.push(shaped.write, shaped.read);
      notes.push(...shaped.notes);
    }
    rows.push(local.resync);
    notes.push(...local.notes);
    return { rows, notes };
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

/** A row of the mirror's MiB/s (`a`) against the baseline's (`b`), met at `atLeast` or more. */
function throughputRow(measurement: string, paired: Paired, atLeast: number): ArrayRow {
  const { a: result, b: baseline } = paired;
  const ratio = result / baseline;
  const mib = (value: number) => {
    const digits = value < 100 ? 1 : 0;
    return `${
      value.toLocaleString("en", { minimumFractionDigits: digits, maximumFractionDigits: digits })
    } MiB/s`;
  };
  return {
    measurement,
    result: mib(result),
    baseline: mib(baseline),
    ratio,
    ratioText: `${ratio.toFixed(2)}x`,
    bar: `>= ${atLeast.toFixed(2)}x`,
    met: ratio >= atLeast,
  };
}

/** Prints the rows as a markdown table, then the notes as a list. */
export function printArrayBench({ rows, notes }: ArrayBench): void {
  console.log(
    `\n\`dst array mirror\` (2 legs) against its baseline; throughput is the median of ${RUNS} ` +
      `runs, each run alternating which of the two goes first\n`,
  );
  console.log("| measurement | result | baseline | ratio | bar | met? |");
  console.log("|---|--:|--:|--:|--:|:-:|");
  for (const row of rows) {
    console.log(
      `| ${row.measurement} | ${row.result} | ${row.baseline} | ${row.ratioText} | ${row.bar} | ${
        row.met ? "yes" : "**no**"
      } |`,
    );
  }
  if (notes.length > 0) console.log("");
  for (const note of notes) console.log(`- ${note}`);
}

// --- rows 1 and 4: three exports on /dev/shm, two of them the mirror's legs ---------------

async function benchLocalMirror(
  dir: string,
): Promise<{ write: ArrayRow; resync: ArrayRow; notes: string[] }> {
  // Legs A and B, and the baseline's own export (the mirror holds its legs' write lease).
  const images = [`${dir}/a.img`, `${dir}/b.img`, `${dir}/alone.img`];
  for (const image of images) await fillImage(image, LOCAL_IMAGE_BYTES);
  const exports: RunningExport[] = [];
  let mirror: RunningArray | null = null;
  try {
    for (const image of images) {
      exports.push(await startExport([image, "--listen", "127.0.0.1:0"]));
    }
    const [a, b] = exports.map((leg) => formatHostPort(leg.address)) as [string, string];
    const alone = exports[2]!.address;

    // A new mirror: its initial copy of A to B is row 4's full resync.
    mirror = await startNewMirror([a, b], `${dir}/state-local`);
    const address = mirror.address;
    await waitForMirror(address, allInSync, SYNC_TIMEOUT_MS);
    const full = await resyncFromLog(mirror, b, 1);

    const writes = await pairedThroughput(address, alone, "write", LOCAL_IMAGE_BYTES, WRITE_DEPTH);

    // 1%: with every mark swept (else B would take the last writes' regions along),
    // detach B, write one block into 1% of the regions, attach B.
    const status = await waitForMirror(address, allInSyncAndClean, SYNC_TIMEOUT_MS);
    const regions = Math.ceil(status.sizeBytes / status.regionBytes);
    await dstOk(["array", "detach", formatHostPort(address), b]);
    const dirty = Math.max(1, Math.round(regions * DIRTY_FRACTION));
    await withDevice(address, async (device) => {
      const block = randomBytes(4096);
      for (let i = 0; i < dirty; i++) {
        const region = Math.floor((i * regions) / dirty);
        await device.write(region * status.regionBytes + 8192, block);
      }
      await device.flush();
    });
    await dstOk(["array", "attach", formatHostPort(address), b]);
    await waitForMirror(address, allInSync, SYNC_TIMEOUT_MS);
    const partial = await resyncFromLog(mirror, b, 2);

    const resyncRatio = partial.ms / full.ms;
    return {
      write: throughputRow(
        `sequential write, 1 MiB, ${WRITE_DEPTH} in flight, ${
          LOCAL_IMAGE_BYTES / MiB
        } MiB: mirror vs one export`,
        writes,
        0.7,
      ),
      resync: {
        measurement: `resync after writes to ${
          Math.round(DIRTY_FRACTION * 100)
        }% of the regions vs full resync`,
        result: `${seconds(partial.ms)} (${partial.copied} regions)`,
        baseline: `${seconds(full.ms)} (${full.copied} regions)`,
        ratio: resyncRatio,
        ratioText: `${(resyncRatio * 100).toFixed(1)}%`,
        bar: "<= 5%",
        met: resyncRatio <= 0.05,
      },
      notes: [
        `resync: wrote ${dirty} of ${regions} regions while ${b} was detached; the attach ` +
        `resynced ${partial.total} (${partial.copied} copied) in ${
          seconds(partial.ms)
        }; the full one ${full.total} (${full.copied} copied) in ${seconds(full.ms)} (${
          (LOCAL_IMAGE_BYTES / MiB / (full.ms / 1000)).toFixed(0)
        } MiB/s)`,
      ],
    };
  } finally {
    await mirror?.stop();
    await Promise.all(exports.map((running) => running.stop()));
  }
}

// --- rows 2 and 3: legs behind shaped links, in network namespaces -----------------------

interface Namespace {
  ns: string;
  hostVeth: string;
  nsVeth: string;
  hostIp: string;
  nsIp: string;
}

/** Two for the mirror's legs, one for the leg alone it is measured against. */
const NAMESPACES: Namespace[] = [1, 2, 3].map((i) => ({
  ns: `dstbench${i}`,
  hostVeth: `dstb${i}h`,
  nsVeth: `dstb${i}n`,
  hostIp: `10.77.${i}.1`,
  nsIp: `10.77.${i}.2`,
}));

/**
 * Rows 2 and 3 over one set of shaped legs: a mirror of two of them (its process in
 * the root namespace, so every byte to or from a leg crosses that leg's link) against
 * the third alone, behind a link shaped the same. Returns the line saying why both
 * rows were skipped, if they were.
 */
async function benchShapedLegs(
  dir: string,
): Promise<{ write: ArrayRow; read: ArrayRow; notes: string[] } | string> {
  return await withShapedLegs(dir, async ([legA, legB, aloneLeg]) => {
    const legs = [legA!, legB!];
    const alone = parseHostPort(aloneLeg!, "127.0.0.1");
    const mirror = await startNewMirror(legs, `${dir}/state-shaped`);
    try {
      const address = mirror.address;
      await waitForMirror(address, allInSync, SYNC_TIMEOUT_MS);
      // The leg alone is in no mirror, so the per-leg counts are the mirror's traffic only.
      const read = await perLegBytes(
        legs,
        "readBytes",
        () => pairedThroughput(address, alone, "read", SHAPED_IMAGE_BYTES, READ_DEPTH),
      );
      const written = await perLegBytes(
        legs,
        "writtenBytes",
        () => pairedThroughput(address, alone, "write", SHAPED_IMAGE_BYTES, WRITE_DEPTH),
      );

      const over = `${SHAPED_IMAGE_BYTES / MiB} MiB, legs behind ${LINK_RATE}/s links`;
      const readTotal = read.perLeg.reduce((sum, bytes) => sum + bytes, 0);
      return {
        write: throughputRow(
          `sequential write, 1 MiB, ${WRITE_DEPTH} in flight, ${over}: mirror vs one leg`,
          written.result,
          0.7,
        ),
        read: throughputRow(
          `sequential read, 1 MiB, ${READ_DEPTH} in flight, ${over}: mirror vs one leg`,
          read.result,
          1.7,
        ),
        notes: [
          `shaped writes: the legs received ${
            written.perLeg.map((bytes, i) => `${(bytes / MiB).toFixed(0)} MiB (leg ${i + 1})`)
              .join(" and ")
          } of the ${RUNS * SHAPED_IMAGE_BYTES / MiB} MiB written to the mirror over ${RUNS} runs`,
          `shaped reads: the mirror's reads went ${
            read.perLeg.map((bytes, i) =>
              `${(100 * bytes / Math.max(readTotal, 1)).toFixed(0)}% to leg ${i + 1}`
            ).join(", ")
          } (${(readTotal / MiB).toFixed(0)} MiB read from the legs over ${RUNS} runs)`,
        ],
      };
    } finally {
      await mirror.stop();
    }
  });
}

/**
 * Makes the bench's namespaces, each with a veth shaped to LINK_RATE both ways, starts
 * an export of a SHAPED_IMAGE_BYTES image inside each, and runs `body` with their
 * addresses; tears it all down after. Returns the line saying why the shaped rows are
 * skipped when the namespaces cannot be made here.
 */
async function withShapedLegs<T>(
  dir: string,
  body: (legs: string[]) => Promise<T>,
): Promise<T | string> {
  const skip = (why: string) =>
    `SKIPPED: mirror write and read throughput over ${LINK_RATE}/s links (needs network namespaces): ${why}`;
  if (Deno.build.os !== "linux") return skip(`not on Linux (${Deno.build.os})`);
  for (const command of ["ip", "tc"]) {
    if ((await tool(command, ["-V"])).code === 127) return skip(`${command} is not installed`);
  }
  const legs: RunningDst[] = [];
  try {
    try {
      await removeNamespaces(); // what an interrupted run left
      for (const n of NAMESPACES) await makeNamespace(n);
    } catch (error) {
      return skip(error instanceof Error ? error.message : String(error));
    }
    const addresses: string[] = [];
    for (const [i, n] of NAMESPACES.entries()) {
      const image = `${dir}/shaped-${i}.img`;
      await fillImage(image, SHAPED_IMAGE_BYTES);
      const leg = await startInNamespace(
        n.ns,
        ["export", image, "--listen", `${n.nsIp}:0`],
        / on (\S+)\n/,
      );
      legs.push(leg);
      addresses.push(leg.ready[1]!);
    }
    return await body(addresses);
  } finally {
    await Promise.all(legs.map((leg) => leg.stop()));
    await removeNamespaces();
  }
}

async function makeNamespace(n: Namespace): Promise<void> {
  const tbf = ["root", "tbf", "rate", LINK_RATE, "burst", "256kb", "latency", "50ms"];
  await ipOk(["netns", "add", n.ns]);
  await ipOk(["link", "add", n.hostVeth, "type", "veth", "peer", "name", n.nsVeth]);
  await ipOk(["link", "set", n.nsVeth, "netns", n.ns]);
  await ipOk(["addr", "add", `${n.hostIp}/24`, "dev", n.hostVeth]);
  await ipOk(["link", "set", n.hostVeth, "up"]);
  await ipOk(["-n", n.ns, "addr", "add", `${n.nsIp}/24`, "dev", n.nsVeth]);
  await ipOk(["-n", n.ns, "link", "set", n.nsVeth, "up"]);
  await ipOk(["-n", n.ns, "link", "set", "lo", "up"]);
  await commandOk("tc", ["qdisc", "add", "dev", n.hostVeth, ...tbf]);
  await ipOk(["netns", "exec", n.ns, "tc", "qdisc", "add", "dev", n.nsVeth, ...tbf]);
}

/** Removes the bench's namespaces and veths, whichever exist; never throws. */
async function removeNamespaces(): Promise<void> {
  for (const n of NAMESPACES) {
    await tool("ip", ["link", "del", n.hostVeth]).catch(() => {});
    await tool("ip", ["netns", "del", n.ns]).catch(() => {});
  }
}

function ipOk(args: string[]): Promise<void> {
  return commandOk("ip", args);
}

async function commandOk(command: string, args: string[]): Promise<void> {
  const result = await tool(command, args);
  if (result.code !== 0) {
    throw new Error(
      `\`${command} ${args.join(" ")}\` failed (exit ${result.code}): ${
        (result.stderr || result.stdout).trim()
      }${Deno.uid() === 0 ? "" : " (not running as root)"}`,
    );
  }
}

/**
 * `dst ARGS...` inside network namespace `ns`, like spawn.ts's startDst (`ip netns
 * exec` execs, so the child's pid is dst's own and stop() signals it directly).
 */
async function startInNamespace(ns: string, args: string[], ready: RegExp): Promise<RunningDst> {
  const process = new Deno.Command("ip", {
    args: ["netns", "exec", ns, Deno.execPath(), "run", "-A", await freshBundle(), ...args],
    env: { XDG_STATE_HOME: TEST_STATE_HOME },
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  return await serving(process, `dst ${args[0]} in ${ns}`, ready);
}

/** Runs `measure`, and how many bytes each leg's export read or wrote meanwhile. */
async function perLegBytes<T>(
  legs: string[],
  counter: "readBytes" | "writtenBytes",
  measure: () => Promise<T>,
): Promise<{ result: T; perLeg: number[] }> {
  const bytesOf = (leg: string) =>
    withDevice(
      parseHostPort(leg, "127.0.0.1"),
      async (device) => ((await device.queryStatus()) as Record<typeof counter, number>)[counter],
      { writer: false }, // the mirror holds the leg's write lease
    );
  const before = await Promise.all(legs.map(bytesOf));
  const result = await measure();
  const after = await Promise.all(legs.map(bytesOf));
  return { result, perLeg: after.map((bytes, i) => bytes - before[i]!) };
}

// --- shared ------------------------------------------------------------------------------

interface Resync {
  /** From the "resync of LEG" line to the "leg LEG is in sync" line, by their timestamps. */
  ms: number;
  /** Regions the resync set out to copy, and copied. */
  total: number;
  copied: number;
}

/** The `nth` resync of `leg` in the mirror's log (waiting for the lines to come through). */
async function resyncFromLog(mirror: RunningDst, leg: string, nth: number): Promise<Resync> {
  const name = leg.replace(/[.]/g, "\\.");
  const started = new RegExp(
    `^(\\S+) INFO +array: resync of ${name}: (\\d+) of \\d+ regions`,
    "gm",
  );
  const ended = new RegExp(
    `^(\\S+) INFO +array: leg ${name} is in sync: copied (\\d+) regions`,
    "gm",
  );
  const deadline = performance.now() + 10_000;
  for (;;) {
    const log = mirror.log();
    const starts = [...log.matchAll(started)];
    const ends = [...log.matchAll(ended)];
    if (starts.length >= nth && ends.length >= nth) {
      const start = starts[nth - 1]!;
      const end = ends[nth - 1]!;
      return {
        ms: Date.parse(end[1]!) - Date.parse(start[1]!),
        total: Number(start[2]),
        copied: Number(end[2]),
      };
    }
    if (performance.now() > deadline) {
      throw new Error(`the mirror's log lacks resync #${nth} of ${leg}:\n${log}`);
    }
    await sleep(20);
  }
}

/** Sequential 1 MiB reads or writes over the first `bytes` of `device`; returns MiB/s. */
async function sequential(
  device: RemoteDevice,
  kind: "read" | "write",
  bytes: number,
  depth: number,
): Promise<number> {
  const payload = randomBytes(MiB);
  const buffers = Array.from({ length: depth }, () => new Uint8Array(MiB));
  let at = 0;
  const worker = async (buffer: Uint8Array) => {
    while (at < bytes) {
      const offset = at;
      at += MiB;
      await (kind === "write" ? device.write(offset, payload) : device.read(offset, buffer));
    }
  };
  const started = performance.now();
  await Promise.all(buffers.map(worker));
  if (kind === "write") await device.flush();
  return bytes / MiB / ((performance.now() - started) / 1000);
}

/**
 * RUNS sequential passes through one connection to `mirror` and RUNS through one to
 * `baseline`, each run alternating which goes first; MiB/s, `a` the mirror's.
 */
function pairedThroughput(
  mirror: HostPort,
  baseline: HostPort,
  kind: "read" | "write",
  bytes: number,
  depth: number,
): Promise<Paired> {
  return withDevice(mirror, (mirrored) =>
    withDevice(baseline, (alone) =>
      alternating(
        RUNS,
        () => sequential(mirrored, kind, bytes, depth),
        () => sequential(alone, kind, bytes, depth),
      )));
}

async function withDevice<T>(
  address: HostPort,
  body: (device: RemoteDevice) => Promise<T>,
  options: RemoteDeviceOptions = {},
): Promise<T> {
  const device = await RemoteDevice.connect(address, options);
  try {
    return await body(device);
  } finally {
    await device.close();
  }
}

/** Writes every byte of a new `bytes`-long image, so its tmpfs pages exist before timing. */
async function fillImage(path: string, bytes: number): Promise<void> {
  const block = randomBytes(MiB);
  const file = await Deno.open(path, { write: true, create: true, truncate: true });
  try {
    for (let at = 0; at < bytes; at += MiB) {
      for (let done = 0; done < MiB;) done += await file.write(block.subarray(done));
    }
  } finally {
    file.close();
  }
}

async function dstOk(args: string[]): Promise<void> {
  const result = await runDst(args);
  if (result.code !== 0) {
    throw new Error(
      `dst ${args.join(" ")} exited ${result.code}:\n${result.stdout}${result.stderr}`,
    );
  }
}

function seconds(ms: number): string {
  return ms < 1000 ? `${ms} ms` : `${(ms / 1000).toFixed(2)} s`;
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

if (import.meta.main) {
  const started = performance.now();
  printArrayBench(await benchArray());
  console.log(`\n(array bench took ${((performance.now() - started) / 1000).toFixed(0)} s)`);
}
