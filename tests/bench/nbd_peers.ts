/**
 * The NBD part of `deno task bench`: DST against nbdkit, side by side in one run, with
 * the same clients. nbdcopy for sequential (1 GiB, median of 5), fio's nbd engine for
 * 4 KiB random at 32 and at 1 in flight (3 s each, median of 5). Both servers of a
 * pairing run at once, and each measurement alternates which of them goes first, run
 * by run (alternate.ts), so the machine's drift falls on both alike. Every image is
 * written once before timing: the first write into a sparse tmpfs file measures page
 * allocation (3-4 s per GiB here, for nbdkit and DST alike), not the server. Two
 * pairings:
 *
 *   1. `dst export --nbd` vs nbdkit's file plugin, on images in /dev/shm;
 *   2. `dst attach` -> `dst export` vs nbdkit's nbd plugin -> nbdkit's file plugin
 *      (the same two hops).
 *
 * A peer that is not installed is skipped with a line saying so.
 *
 * Run alone with: deno task bundle && deno run -A tests/bench/nbd_peers.ts
 */

import { randomBytes } from "../helpers/random_bytes.ts";
import { newDisk, startAttach, startExport } from "../helpers/spawn.ts";
import { missing, spawnTool, tool, toolOk } from "../helpers/tools.ts";
import { alternating } from "./alternate.ts";

const MiB = 1024 * 1024;
const IMAGE_BYTES = 1024 * MiB;
const FIO_SECONDS = 3;
/** Runs of each measurement on each server, the median reported: nbdcopy's are short and vary most. */
const COPY_RUNS = 5;
const FIO_RUNS = 5;

export interface PeerRow {
  measurement: string;
  unit: string;
  dst: number;
  nbdkit: number;
  /** The least DST / nbdkit the issue asks for; null: no bar. */
  bar: number | null;
}

export interface PeerPairing {
  title: string;
  rows: PeerRow[];
}

interface Target {
  uri: string;
  stop(): Promise<void>;
}

/** Runs both pairings; returns their rows (empty when a peer is missing, with the reason printed). */
export async function benchNbdPeers(): Promise<PeerPairing[]> {
  if (missing("nbdkit", "nbdcopy", "fio")) {
    console.log(
      "NBD comparison skipped: nbdkit, nbdcopy and fio are needed (bash .ci/run installs them)",
    );
    return [];
  }
  const dir = await Deno.makeTempDir({ dir: "/dev/shm", prefix: "dst-bench-nbd-" });
  try {
    const source = `${dir}/source.bin`;
    const block = randomBytes(MiB);
    const file = await Deno.open(source, { write: true, create: true });
    for (let i = 0; i < IMAGE_BYTES / MiB; i++) await file.write(block);
    file.close();

    // Bars: export --nbd at least level on random I/O at 32 in flight, 0.8x sequential;
    // the two-hop chain 0.7x everywhere. 4 KiB at 1 in flight has none (it is latency).
    const oneHop = await compare(
      source,
      () => dstExportNbd(dir),
      () => nbdkitFile(dir),
      [0.8, 0.8, 1.0, 1.0, null],
    );
    const twoHops = await compare(
      source,
      () => dstAttachChain(dir),
      () => nbdkitChain(dir),
      [0.7, 0.7, 0.7, 0.7, 0.7],
    );
    return [
      { title: "`dst export --nbd` vs nbdkit file plugin", rows: oneHop },
      {
        title: "`dst attach` -> `dst export` vs nbdkit nbd plugin -> nbdkit file plugin",
        rows: twoHops,
      },
    ];
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

/**
 * Both servers run side by side, and each measurement alternates which of them goes
 * first, run by run: the machine's drift (other load, page cache, CPU frequency) then
 * falls on both alike, instead of on whichever always went first or second.
 */
async function compare(
  source: string,
  dst: () => Promise<Target>,
  nbdkit: () => Promise<Target>,
  bars: Array<number | null>,
): Promise<PeerRow[]> {
  const a = await dst();
  try {
    const b = await nbdkit();
    try {
      // Lay out each image's pages first: tmpfs page allocation is not the server.
      await nbdcopy(source, a.uri);
      await nbdcopy(source, b.uri);
      const rows: PeerRow[] = [];
      for (const [i, [measurement, unit, runs, run]] of measurements(source).entries()) {
        const paired = await alternating(runs, () => run(a.uri), () => run(b.uri));
        rows.push({ measurement, unit, dst: paired.a, nbdkit: paired.b, bar: bars[i] ?? null });
      }
      return rows;
    } finally {
      await b.stop();
    }
  } finally {
    await a.stop();
  }
}

type Measurement = [string, string, number, (uri: string) => Promise<number>];

function measurements(source: string): Measurement[] {
  return [
    ["sequential write 1 GiB, nbdcopy", "MiB/s", COPY_RUNS, (uri) => nbdcopy(source, uri)],
    ["sequential read 1 GiB, nbdcopy", "MiB/s", COPY_RUNS, (uri) => nbdcopy(uri, "null:")],
    ["4 KiB random read, 32 in flight, fio", "IOPS", FIO_RUNS, (uri) => fio(uri, "randread", 32)],
    ["4 KiB random write, 32 in flight, fio", "IOPS", FIO_RUNS, (uri) => fio(uri, "randwrite", 32)],
    ["4 KiB random read, 1 in flight, fio", "IOPS", FIO_RUNS, (uri) => fio(uri, "randread", 1)],
  ];
}

/** Prints each pairing as a markdown table, with the ratio and whether it meets its bar. */
export function printNbdPeers(pairings: PeerPairing[]): void {
  for (const { title, rows } of pairings) {
    console.log(
      `\n${title} (same clients and /dev/shm; each run alternates which server goes first; ` +
        `nbdcopy: median of ${COPY_RUNS}, ` +
        `fio: ${FIO_SECONDS} s, median of ${FIO_RUNS})\n`,
    );
    console.log("| measurement | DST | nbdkit | DST / nbdkit | bar | met? |");
    console.log("|---|--:|--:|--:|--:|:-:|");
    for (const row of rows) {
      const format = (value: number) => `${Math.round(value).toLocaleString("en")} ${row.unit}`;
      const ratio = row.dst / row.nbdkit;
      const bar = row.bar === null ? "-" : `>= ${row.bar.toFixed(2)}x`;
      const met = row.bar === null ? "-" : ratio >= row.bar ? "yes" : "**no**";
      console.log(
        `| ${row.measurement} | ${format(row.dst)} | ${format(row.nbdkit)} | ${
          ratio.toFixed(2)
        }x | ${bar} | ${met} |`,
      );
    }
  }
}

if (import.meta.main) printNbdPeers(await benchNbdPeers());

/** MiB/s of one nbdcopy of `bytes` (the image's size) from `from` to `to`. */
export async function nbdcopy(from: string, to: string, bytes = IMAGE_BYTES): Promise<number> {
  const started = performance.now();
  await toolOk("nbdcopy", [from, to]);
  return bytes / MiB / ((performance.now() - started) / 1000);
}

/** IOPS of fio's nbd engine, 4 KiB blocks, `rw` at `depth` in flight, over `bytes` of the export. */
export async function fio(
  uri: string,
  rw: string,
  depth: number,
  seconds = FIO_SECONDS,
  bytes = IMAGE_BYTES,
): Promise<number> {
  const out = await toolOk("fio", [
    "--name=bench",
    "--ioengine=nbd",
    `--uri=${uri}`,
    `--rw=${rw}`,
    "--bs=4k",
    `--iodepth=${depth}`,
    `--runtime=${seconds}`,
    "--time_based",
    `--size=${bytes}`,
    "--output-format=json",
  ]);
  const job = JSON.parse(out.slice(out.indexOf("{"))).jobs[0];
  return job.read.iops + job.write.iops;
}

async function dstExportNbd(dir: string): Promise<Target> {
  const server = await startExport([...newDisk(String(IMAGE_BYTES))(dir), "--nbd", "127.0.0.1:0"]);
  return { uri: server.nbdUri!, stop: async () => void (await server.stop()) };
}

async function dstAttachChain(dir: string): Promise<Target> {
  const server = await startExport([
    `${dir}/chain.img`,
    "--create",
    String(IMAGE_BYTES),
    "--listen",
    "127.0.0.1:0",
  ]);
  const attach = await startAttach([`127.0.0.1:${server.address.port}`, "--listen", "127.0.0.1:0"]);
  return {
    uri: attach.uri,
    stop: async () => {
      await attach.stop();
      await server.stop();
    },
  };
}

async function nbdkitFile(dir: string): Promise<Target> {
  const image = `${dir}/nbdkit.img`;
  await toolOk("truncate", ["-s", String(IMAGE_BYTES), image]);
  return await nbdkit(["file", `file=${image}`]);
}

async function nbdkitChain(dir: string): Promise<Target> {
  const backend = await nbdkitFile(dir);
  const front = await nbdkit(["nbd", `uri=${backend.uri}`]);
  return {
    uri: front.uri,
    stop: async () => {
      await front.stop();
      await backend.stop();
    },
  };
}

/** Starts nbdkit on a free loopback port and waits until it answers. */
async function nbdkit(plugin: string[]): Promise<Target> {
  const port = freePort();
  const child = spawnTool("nbdkit", [
    "-f",
    "--exit-with-parent",
    "-i",
    "127.0.0.1",
    "-p",
    String(port),
    ...plugin,
  ]);
  const uri = `nbd://127.0.0.1:${port}`;
  for (let i = 0; (await tool("nbdinfo", ["--size", uri])).code !== 0; i++) {
    if (i > 100) throw new Error(`nbdkit ${plugin.join(" ")} did not start`);
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  return {
    uri,
    stop: async () => {
      child.kill("SIGTERM");
      await child.status;
    },
  };
}

function freePort(): number {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = listener.addr.port;
  listener.close();
  return port;
}
